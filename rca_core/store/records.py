"""What a stage keeps beside its per-image arrays: the listing of its entries, its manifest (Parquet parts), its
tables, its plain files (checkpoints, model files, PNG exports) and its completion marker (_complete.json, which
holds the stage's summary). Every request goes through rca_core.object_io; the driver writes all of these, any
node reads them."""
from __future__ import annotations

import io
import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from rca_core import storage as io_
from rca_core.object_io import StorageUnavailable, request
from rca_core.store.errors import StoreError
from rca_core.store.jsonvalues import plain_json_or_text, plain_rows
from rca_core.store.layout import Loc, check_file_name


class StageRecords:
    """The records of one stage (`key`) of the store at `loc`. Picklable."""

    def __init__(self, loc: Loc, key: str):
        self.loc, self.key = loc, key

    # ---------------------------------------------------------------- listing
    def listed_ids(self, fields: list[str]) -> list[str]:
        """Ids with an entry under every one of `fields`, from one listing of each field's folder (object storage:
        one request per 1,000 ids, where asking id by id costs a request each). Listed is not done: resume still
        verifies each of them; an id not listed has nothing stored and is computed without a read."""
        fs, sets = self.loc.fs, []
        for f in fields:
            path = self.loc.join(self.key, f).rstrip("/")
            fs.invalidate_cache(path)  # s3fs/gcsfs keep listings: this one must see what other nodes wrote
            try:  # every file below, flat (object storage: no per-folder requests); an entry counts once its
                # zarr.json, written last, is there (a folder left empty, as some S3 servers keep, does not)
                names = request(path, fs.find, path, withdirs=False)
            except FileNotFoundError:
                return []
            rels = (n[len(path) + 1:].split("/") for n in names if n.startswith(path + "/"))
            sets.append({r[0] for r in rels if len(r) == 2 and r[1] == "zarr.json"})
        return sorted(set.intersection(*sets)) if sets else []

    # ---------------------------------------------------------------- manifest and tables
    def write_manifest(self, rows: list[dict], part: str | None = None) -> str | None:
        """Append manifest rows as one Parquet part; returns its path (None: no rows)."""
        if not rows:
            return None
        part = part or f"{int(time.time() * 1e6):x}-{uuid.uuid4().hex[:6]}"
        path = self.loc.join(self.key, "manifest", f"part-{part}.parquet")
        self._write_table_atomic(pa.Table.from_pylist(plain_rows(rows)), path)
        return path

    def manifest(self) -> pa.Table:
        """All manifest rows; the newest row wins when an image was recomputed."""
        fs = self.loc.fs
        d = self.loc.join(self.key, "manifest")
        if not request(d, fs.exists, d):
            return pa.table({"image_id": pa.array([], pa.string())})
        parts = sorted(p for p in request(d, fs.ls, d, detail=False) if p.endswith(".parquet"))
        tables = [request(p, pq.read_table, p, filesystem=fs) for p in parts]
        rows: dict[str, dict] = {}
        for t in tables:
            for r in t.to_pylist():
                rows[r.get("image_id")] = r
        if not rows:
            return tables[0].slice(0, 0)
        keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # rows of different parts differ
        return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows.values()])

    def write_table(self, name: str, rows: list[dict] | pa.Table) -> str:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(plain_rows(rows))
        path = self.loc.join(self.key, "tables", f"{name}.parquet")
        self._write_table_atomic(table, path)
        return path

    def read_table(self, name: str) -> pa.Table:
        path = self.loc.join(self.key, "tables", f"{name}.parquet")
        if not request(path, self.loc.fs.exists, path):
            raise StoreError(f"no table {name!r} in {self.loc.url}/{self.key}")
        return request(path, pq.read_table, path, filesystem=self.loc.fs)

    def _write_table_atomic(self, table: pa.Table, path: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        io_.FileRef(self.loc.fs, path, path).write_bytes(buf.getvalue())

    # ---------------------------------------------------------------- files
    def file(self, name: str) -> io_.FileRef:
        """A plain file under the stage's files/ folder."""
        return self.loc.file(self.key, "files", check_file_name(name))

    def write_file(self, name: str, data: bytes) -> str:
        """Write a file (atomic: temp + rename locally, one PUT on object storage); returns its URI."""
        ref = self.file(name)
        try:
            ref.write_bytes(data)
        except StorageUnavailable:  # already names the endpoint, the request and the last error
            raise
        except Exception as e:  # disk full, permissions, a file in the way, ...
            raise StoreError(f"writing {ref.uri} failed: {type(e).__name__}: {e}") from e
        return ref.uri

    # ---------------------------------------------------------------- completion
    def _complete(self) -> io_.FileRef:
        return self.loc.file(self.key, "_complete.json")

    def mark_complete(self, summary: dict) -> None:
        """Write _complete.json: the stage is done, with its summary (numpy values as plain ones)."""
        self._complete().write_text(json.dumps({"completed_at": time.time(), **summary}, indent=1,
                                               default=plain_json_or_text))

    def is_complete(self) -> bool:
        return self._complete().exists()

    def summary(self) -> dict:
        try:
            return json.loads(self._complete().read_bytes())
        except FileNotFoundError:
            raise StoreError(f"stage {self.key} is not complete in {self.loc.url}") from None

    def clear_complete(self) -> None:
        self._complete().remove()

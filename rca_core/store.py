"""The artifact store: a Zarr v3 hierarchy holding every stage's outputs, plus Parquet tables.

Layout (under the store root, a local directory or any fsspec URL):

    {stage}/{fingerprint}/zarr.json                 group; attrs: fields
    {stage}/{fingerprint}/{field}/{image_id}        one array per image and field, one chunk
    {stage}/{fingerprint}/_arrays/{name}            whole arrays (prototypes, embedding tables)
    {stage}/{fingerprint}/manifest/part-*.parquet   per-image manifest rows
    {stage}/{fingerprint}/files/...                 plain files (checkpoints, model files, PNG exports)
    {stage}/{fingerprint}/_complete.json            written last by the driver: the stage is done

Every byte goes through the store's URL (rca_core.storage): a worker on another node needs only the
URL, never a path on the driver's disk. Workers open the store with `create=False`: a node that cannot
see the store fails naming the store and the host instead of silently creating an empty one.

Who writes what (Zarr's concurrency contract): the driver calls `prepare` (group metadata),
`put_array`, `write_manifest`, `mark_complete`; a worker only creates and writes the arrays of the
images it owns (`write`). An image counts as done only once each of its arrays carries a checksum
marker in its attrs (its zarr.json, written after the data: a killed writer leaves at most a torn chunk that
fails the checksum, or a torn zarr.json that does not parse). `read` verifies that checksum, so a damaged
entry raises DamagedEntryError instead of being silently used, and `pending(verify=True)` sends it
back for recomputation.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rca_core import one_chunk
from rca_core import storage as io_

MARKER = "rca_crc32"  # CRC-32 of the array's bytes (put_array, and per-image forms one_chunk does not take)
CHUNK_MARKER = "rca_crc32_chunk"  # CRC-32 of the one chunk file's bytes (per-image arrays; checked before decoding)
WRITE_BEHIND_THREADS = 4  # images written at once behind the one being computed (object storage: ~50 ms each)
WRITE_BEHIND_DEPTH = 2 * WRITE_BEHIND_THREADS  # images queued for writing at most
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Blosc lz4 + bitshuffle: on VOC-sized uint8 CAMs 0.26 ms to compress and 5.7x smaller than float32 .npy, against
# zstd-3's 1.5 ms and 6.4x (codec probe in docs/benchmarks.md, "Artifact store vs .npy per image").
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),)


class StoreError(RuntimeError):
    """A problem with the artifact store (bad key, missing stage, write failure)."""


class DamagedEntryError(StoreError):
    """A stored per-image entry is missing its marker, unreadable, or fails its checksum."""

    def __init__(self, stage_key: str, image_id: str, field: str, why: str):
        self.stage_key, self.image_id, self.field, self.why = stage_key, image_id, field, why
        super().__init__(f"damaged entry {stage_key}/{field}/{image_id}: {why}")

    def __reduce__(self):  # picklable (it crosses Ray processes)
        return type(self), (self.stage_key, self.image_id, self.field, self.why)


def check_image_id(image_id: str) -> str:
    """Image ids become store keys: refuse anything that could escape its folder."""
    if not isinstance(image_id, str) or not _ID_RE.match(image_id) or ".." in image_id:
        raise StoreError(f"invalid image id {image_id!r}: only letters, digits, '_', '-', '.' are allowed (no '/', no '..')")
    return image_id


def has_marker(attrs: dict) -> bool:
    """Whether an array's attributes carry a checksum marker (its write was finished)."""
    return CHUNK_MARKER in attrs or MARKER in attrs


def checksum(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


@dataclass(frozen=True)
class _Loc:
    fs: Any
    root: str  # path inside fs

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])


class ArtifactStore:
    """Entry point: `ArtifactStore(url).stage(name, fingerprint)` -> StageOutput.

    `storage`: the run config's storage section (or a dict) with non-secret fsspec options.
    `create=False` (workers): the store must exist already; a missing one raises StoreError naming
    the store and this host, instead of creating an empty store on a node that cannot see the real one.
    """

    def __init__(self, url: str | os.PathLike, storage: Any = None, create: bool = True):
        self.url = str(url)
        self.storage = storage
        try:
            fs, root = io_.filesystem(self.url, storage)
        except io_.MissingExtraError as e:
            raise StoreError(str(e)) from None
        self.is_local = io_.is_local_fs(fs)
        if self.is_local:  # fsspec hands back absolute paths (fs.cat of several files keys them so): match them
            root = os.path.abspath(root)
        self.loc = _Loc(fs, root)
        if not create and not fs.exists(self.loc.join("zarr.json")):
            raise StoreError(f"artifact store {self.url} not found from host {io_.host()}: every node must see the "
                             "store (object storage such as s3://, or a file system mounted at the same path on "
                             "every node); a worker never creates one")
        if self.is_local:
            if create:
                os.makedirs(root, exist_ok=True)
            self.zstore = zarr.storage.LocalStore(root)
        else:
            self.zstore = zarr.storage.FsspecStore.from_url(self.url, storage_options=io_.options_for(self.url, storage))
        try:
            try:
                self.root = zarr.open_group(self.zstore, mode="a" if create else "r+")
            except zarr.errors.ContainsGroupError:  # another process (a DDP rank) created it in between
                self.root = zarr.open_group(self.zstore, mode="r+")
        except Exception as e:  # e.g. a file where the store directory should be
            raise StoreError(f"cannot open artifact store at {self.url}: {e}") from e

    @classmethod
    def for_config(cls, cfg, create: bool = True) -> "ArtifactStore":
        """The store of a run config (its URL and storage options)."""
        return cls(cfg.store, getattr(cfg, "storage", None), create=create)

    def file(self, *parts: str) -> io_.FileRef:
        """A file anywhere in the store, by its path relative to the store root."""
        rel = "/".join(parts)
        return io_.FileRef(self.loc.fs, self.loc.join(rel), io_.join(self.url, rel))

    def stage(self, name: str, fingerprint: str) -> "StageOutput":
        if not re.match(r"^[a-z0-9_]+$", name) or not re.match(r"^[A-Za-z0-9_\-]+$", fingerprint):
            raise StoreError(f"invalid stage key {name}/{fingerprint}")
        return StageOutput(self, f"{name}/{fingerprint}")

    def record_run(self, config_yaml: str, config_fingerprint: str, stage_keys: dict[str, str]) -> str:
        """Save a run's fully resolved config and its fingerprint (+ each stage's key) under _runs/."""
        self.file("_runs", config_fingerprint, "config.yaml").write_text(f"# fingerprint: {config_fingerprint}\n{config_yaml}")
        self.file("_runs", config_fingerprint, "run.json").write_text(json.dumps(
            {"fingerprint": config_fingerprint, "stages": stage_keys, "recorded_at": time.time()}, indent=1))
        return io_.join(self.url, "_runs", config_fingerprint)

    def stages(self) -> list[str]:
        out = []
        for name, grp in self.root.groups():
            if name.startswith("_"):
                continue
            for fp, _ in grp.groups():
                out.append(f"{name}/{fp}")
        return sorted(out)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"


class StageOutput:
    """One stage's outputs in the store (see the module docstring for who may call what)."""

    def __init__(self, store: ArtifactStore, key: str):
        self.store, self.key = store, key
        self._group = None
        self._writer = None         # write-behind: background writer threads (see write_behind)
        self._pending: list = []
        self._write_failed = False
        self._prefetched: dict = {}  # (image_id, field) -> Future of read(), filled by prefetch()
        self._chunk_keys: dict = {}  # field -> its arrays' chunk key (both files of an entry in one round trip)
        self.object_fast_path = True  # False: per-image entries through fsspec even where obstore could serve

    def __getstate__(self):  # picklable (DataLoader workers, Ray): no threads, no futures
        d = dict(self.__dict__)
        d.update(_writer=None, _pending=[], _prefetched={})
        return d

    # ---------------------------------------------------------------- driver side
    def prepare(self, fields: Iterable[str] = ()) -> "StageOutput":
        """Create the stage group and one subgroup per per-image field. Driver only, before workers."""
        fields = list(fields)
        grp = zarr.open_group(self.store.zstore, path=self.key, mode="a")
        known = list(grp.attrs.get("fields", []))
        for f in fields:
            if not re.match(r"^[a-z0-9_]+$", f):
                raise StoreError(f"invalid field name {f!r}")
            zarr.open_group(self.store.zstore, path=f"{self.key}/{f}", mode="a")
        new = sorted(set(known) | set(fields))
        if new != known:
            grp.attrs.update({"fields": new})
        self._group = grp
        self._fields = new
        return self

    @property
    def fields(self) -> list[str]:
        """The per-image fields (read once; prepare() sets them)."""
        if getattr(self, "_fields", None):
            return list(self._fields)
        try:
            grp = zarr.open_group(self.store.zstore, path=self.key, mode="r")
        except Exception:
            return []
        found = list(grp.attrs.get("fields", []))
        if found:
            self._fields = found
        return found

    def exists(self) -> bool:
        return bool(self.fields) or self.is_complete()

    def put_array(self, name: str, arr: np.ndarray, attrs: dict | None = None) -> None:
        """A whole array (prototypes, embedding tables). Driver only."""
        arr = np.asarray(arr)
        z = zarr.create_array(self.store.zstore, name=f"{self.key}/_arrays/{name}", shape=arr.shape,
                              dtype=arr.dtype, chunks=_whole_chunks(arr.shape), compressors=COMPRESSORS,
                              overwrite=True, attributes=dict(attrs or {}))
        if arr.size:
            z[...] = arr
        z.attrs.update({MARKER: checksum(arr)})

    def get_array(self, name: str) -> tuple[np.ndarray, dict]:
        return self._read_checked(f"_arrays/{name}", "_arrays", name)

    # ---------------------------------------------------------------- worker side
    def write(self, image_id: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Write all fields of one image; the image counts as done only after the last marker.
        Inside `write_behind()` the write happens on a background thread; errors surface at a later
        write or at flush()."""
        check_image_id(image_id)
        if self._writer is not None:
            while self._pending and (self._pending[0].done() or len(self._pending) >= WRITE_BEHIND_DEPTH):
                self._pending.pop(0).result()  # raises the first failure here, in the caller
            arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
            self._pending.append(self._writer.submit(self._write_queued, image_id, arrays, attrs))
            return
        self._write_now(image_id, arrays, attrs)

    def _write_queued(self, image_id: str, arrays: dict[str, np.ndarray], attrs: dict | None) -> None:
        if self._write_failed:  # after a failed write nothing more is written (the stage stops there)
            raise StoreError(f"write of {self.key}/*/{image_id} skipped after an earlier write failed")
        try:
            self._write_now(image_id, arrays, attrs)
        except BaseException:
            self._write_failed = True
            raise

    def write_behind(self):
        """Context: per-image writes go to WRITE_BEHIND_THREADS background threads, so that the next images are
        computed while earlier ones are written (object storage: tens of ms per request; each image's own
        chunk-then-marker order is kept inside its write). Leaving it waits for every write."""
        import contextlib
        from concurrent.futures import ThreadPoolExecutor

        @contextlib.contextmanager
        def ctx():
            if self._writer is not None:  # nested: the outer one flushes
                yield self
                return
            self._writer = ThreadPoolExecutor(WRITE_BEHIND_THREADS, thread_name_prefix="rca-write")
            self._write_failed = False
            try:
                yield self
                self.flush()
            finally:
                ex, self._writer = self._writer, None
                ex.shutdown(wait=True)
                self._pending = []

        return ctx()

    def flush(self) -> None:
        """Wait for every queued write; raise the first failure."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    def prefetch(self, image_id: str, field: str, executor) -> None:
        """Start reading (image_id, field) on `executor`; the next read() of it returns that result."""
        key = (image_id, field)
        if key not in self._prefetched:
            self._prefetched[key] = executor.submit(self._read_unchecked_id, image_id, field)

    def drop_prefetched(self) -> None:
        for f in self._prefetched.values():
            f.cancel()
        self._prefetched = {}

    def _read_unchecked_id(self, image_id: str, field: str):
        check_image_id(image_id)
        return self._read_checked(f"{field}/{image_id}", field, image_id)

    def _write_now(self, image_id: str, arrays: dict[str, np.ndarray], attrs: dict | None) -> None:
        for field, arr in arrays.items():
            path = f"{self.key}/{field}/{image_id}"
            try:
                self._put_encoded(path, encode_array(arr, attrs))
            except Exception as e:  # disk full, permissions, a file in the way, ...
                raise StoreError(f"writing {self.store.url}/{path} failed: {type(e).__name__}: {e}") from e

    def _objects(self):
        """The obstore client of an s3:// store in this process (None: local, or the fsspec path serves)."""
        if self.store.is_local or not self.object_fast_path:
            return None
        return io_.process_object_store(self.store.url, self.store.storage)

    def _object_key(self, path: str) -> str:
        return path.split("/", 1)[1]  # fsspec paths start with the bucket

    def _put_encoded(self, path: str, files: dict[str, bytes]) -> None:
        """Write an encoded array: its chunk first, its zarr.json (which carries the checksum marker) last,
        so a reader never sees the marker before the data. Two writes per field (object storage: two PUTs)
        instead of zarr's create + delete-old + data + attribute update (measured: ~10 requests, 100+ ms per
        field on an S3 server on loopback)."""
        fs = self.store.loc.fs
        base = self.store.loc.join(path)
        meta = files.pop("zarr.json")
        if self.store.is_local:
            # the chunk, then the metadata, both in place: a killed writer leaves a torn chunk (its checksum no
            # longer matches the marker) or a torn zarr.json (not JSON, or no marker in it), so the entry reads as
            # damaged and is redone; no temporary file + rename (measured in docs/benchmarks.md, "Artifact store vs
            # .npy": a tenth of a millisecond per entry)
            try:
                os.mkdir(base)
            except FileExistsError:
                pass
            except FileNotFoundError:  # the field's folder is not there yet
                os.makedirs(base, exist_ok=True)
            for rel, data in files.items():  # the chunk key has no folders (one_chunk.CHUNK_KEY_ENCODING)
                with open(f"{base}/{rel}", "wb") as f:
                    f.write(data)
            with open(f"{base}/zarr.json", "wb") as f:
                f.write(meta)
            return
        obj = self._objects()
        if obj is not None:  # obstore: the chunk, then the metadata that carries the marker
            import obstore

            for rel, data in files.items():
                obstore.put(obj, self._object_key(f"{base}/{rel}"), data)
            obstore.put(obj, self._object_key(f"{base}/zarr.json"), meta)
            return
        # object storage: both objects in one concurrent round trip. Should the chunk's PUT fail after the
        # metadata's, the marker's checksum no longer matches what a reader decodes: the entry reads as
        # damaged and is recomputed (every "is it done?" of the pipeline verifies the checksum).
        fs.pipe({**{f"{base}/{rel}": data for rel, data in files.items()}, f"{base}/zarr.json": meta})

    # ---------------------------------------------------------------- readers
    def read(self, image_id: str, field: str) -> tuple[np.ndarray, dict]:
        fut = self._prefetched.pop((image_id, field), None)
        if fut is not None:
            return fut.result()
        check_image_id(image_id)
        return self._read_checked(f"{field}/{image_id}", field, image_id)

    def _read_checked(self, rel: str, field: str, name: str) -> tuple[np.ndarray, dict]:
        try:
            meta, chunk = self._fetch(rel, field)
        except Exception as e:
            raise DamagedEntryError(self.key, name, field, f"missing or unreadable metadata ({type(e).__name__})") from e
        attrs = dict(meta.get("attributes") or {})
        if not has_marker(attrs):
            raise DamagedEntryError(self.key, name, field, "write was not finished (no checksum marker)")
        if CHUNK_MARKER in attrs:  # the chunk file's bytes are checked before they are decoded
            if chunk is None:
                raise DamagedEntryError(self.key, name, field, "chunk file missing")
            if zlib.crc32(chunk) != attrs.pop(CHUNK_MARKER):
                raise DamagedEntryError(self.key, name, field, "checksum mismatch")
            attrs.pop(MARKER, None)
        try:
            arr = one_chunk.decode(meta, chunk)
            if arr is None:  # not the store's own one-chunk form: let zarr-python read it
                arr = zarr.open_array(self.store.zstore, path=f"{self.key}/{rel}", mode="r")[...]
        except Exception as e:
            raise DamagedEntryError(self.key, name, field, f"unreadable data ({type(e).__name__}: {e})") from e
        if MARKER in attrs:  # entries of older stores and of the forms zarr-python writes: the array's bytes
            if checksum(arr) != attrs.pop(MARKER):
                raise DamagedEntryError(self.key, name, field, "checksum mismatch")
        return arr, attrs

    def _fetch(self, rel: str, field: str) -> tuple[dict, bytes | None]:
        """The parsed zarr.json of the array at rel and the bytes of its one chunk (None: no chunk file). Once a
        field's chunk key is known (it follows from the number of dimensions), both files are fetched together
        (object storage: one round trip instead of two)."""
        fs = self.store.loc.fs
        base = self.store.loc.join(self.key, rel)
        chunk = self._chunk_keys.get(field)
        if chunk is None:
            meta = one_chunk.parse_meta(io_.cat_file(fs, f"{base}/zarr.json"))
            form = one_chunk.simple_form(meta)
            if form is None:  # not the one-chunk form: zarr-python reads it (the caller)
                return meta, None
            self._chunk_keys[field] = form[2]
            try:
                return meta, io_.cat_file(fs, f"{base}/{form[2]}")
            except FileNotFoundError:
                return meta, None
        got = self._get_both(f"{base}/zarr.json", f"{base}/{chunk}")
        raw = got.get(f"{base}/zarr.json")
        if not isinstance(raw, bytes):
            raise raw if isinstance(raw, BaseException) else FileNotFoundError(f"{base}/zarr.json")
        meta = one_chunk.parse_meta(raw)
        form = one_chunk.simple_form(meta)
        if form is None or form[2] != chunk:  # another form than this field's usual one: fetch its own chunk
            self._chunk_keys.pop(field, None)
            return self._fetch(rel, field)
        data = got.get(f"{base}/{chunk}")
        return meta, data if isinstance(data, bytes) else None

    def _get_both(self, meta_path: str, chunk_path: str) -> dict:
        """{path: bytes or the exception} of both files of an entry, fetched concurrently."""
        obj = self._objects()
        fs = self.store.loc.fs
        if obj is None:
            return fs.cat([meta_path, chunk_path], on_error="return", **io_.one_read_kwargs(fs))
        import asyncio

        import obstore

        async def get(path):
            try:
                return bytes(await (await obstore.get_async(obj, self._object_key(path))).bytes_async())
            except Exception as e:  # noqa: BLE001 - handed back like fsspec's on_error="return"
                return e if not _not_found(e) else FileNotFoundError(path)

        async def both():
            return await asyncio.gather(get(meta_path), get(chunk_path))

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread (the usual case: workers, I/O threads)
            return dict(zip((meta_path, chunk_path), asyncio.run(both())))
        return fs.cat([meta_path, chunk_path], on_error="return", **io_.one_read_kwargs(fs))

    def is_done(self, image_id: str, verify: bool = False) -> bool:
        fields = self.fields
        for field in fields:
            if verify:
                try:
                    self.read(image_id, field)
                except DamagedEntryError:
                    return False
            else:
                try:
                    raw = io_.cat_file(self.store.loc.fs, self.store.loc.join(self.key, field, image_id, "zarr.json"))
                    if not has_marker(one_chunk.parse_meta(raw).get("attributes") or {}):
                        return False
                except Exception:
                    return False
        return bool(fields)

    def pending(self, image_ids: Iterable[str], verify: bool = False) -> list[str]:
        """Ids not done yet (or damaged, with verify=True), in the given order."""
        return [i for i in image_ids if not self.is_done(i, verify=verify)]

    def listed_ids(self, field: str | None = None) -> list[str]:
        """Ids with an entry under every per-image field (or `field`), from one listing of each field's folder
        (object storage: one request per 1,000 ids, where asking id by id costs a request each). Listed is not
        done: resume still verifies each of them (is_done(verify=True)); an id not listed has nothing stored
        and is computed without a read."""
        fs, sets = self.store.loc.fs, []
        for f in [field] if field else self.fields:
            path = self.store.loc.join(self.key, f).rstrip("/")
            fs.invalidate_cache(path)  # s3fs/gcsfs keep listings: this one must see what other nodes wrote
            try:  # every file below, flat (object storage: no per-folder requests); an entry counts once its
                # zarr.json, written last, is there (a folder left empty, as some S3 servers keep, does not)
                names = fs.find(path, withdirs=False)
            except FileNotFoundError:
                return []
            rels = (n[len(path) + 1:].split("/") for n in names if n.startswith(path + "/"))
            sets.append({r[0] for r in rels if len(r) == 2 and r[1] == "zarr.json"})
        return sorted(set.intersection(*sets)) if sets else []

    # ---------------------------------------------------------------- tables and files
    def write_manifest(self, rows: list[dict], part: str | None = None) -> str | None:
        """Append manifest rows as one Parquet part (driver only)."""
        if not rows:
            return None
        part = part or f"{int(time.time() * 1e6):x}-{uuid.uuid4().hex[:6]}"
        path = self.store.loc.join(self.key, "manifest", f"part-{part}.parquet")
        self._write_table_atomic(pa.Table.from_pylist(_jsonable_rows(rows)), path)
        return path

    def manifest(self) -> pa.Table:
        """All manifest rows; the newest row wins when an image was recomputed."""
        fs = self.store.loc.fs
        d = self.store.loc.join(self.key, "manifest")
        if not fs.exists(d):
            return pa.table({"image_id": pa.array([], pa.string())})
        parts = sorted(p for p in fs.ls(d, detail=False) if p.endswith(".parquet"))
        tables = [pq.read_table(p, filesystem=fs) for p in parts]
        rows: dict[str, dict] = {}
        for t in tables:
            for r in t.to_pylist():
                rows[r.get("image_id")] = r
        if not rows:
            return tables[0].slice(0, 0)
        keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # rows of different parts differ
        return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows.values()])

    def write_table(self, name: str, rows: list[dict] | pa.Table) -> str:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(_jsonable_rows(rows))
        path = self.store.loc.join(self.key, "tables", f"{name}.parquet")
        self._write_table_atomic(table, path)
        return path

    def read_table(self, name: str) -> pa.Table:
        path = self.store.loc.join(self.key, "tables", f"{name}.parquet")
        if not self.store.loc.fs.exists(path):
            raise StoreError(f"no table {name!r} in {self.store.url}/{self.key}")
        return pq.read_table(path, filesystem=self.store.loc.fs)

    def _write_table_atomic(self, table: pa.Table, path: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        io_.FileRef(self.store.loc.fs, path, path).write_bytes(buf.getvalue())

    def file(self, name: str) -> io_.FileRef:
        """A plain file under this stage's files/ folder (checkpoints, model files, PNG exports)."""
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StoreError(f"invalid file name {name!r}")
        return self.store.file(self.key, "files", name)

    def write_file(self, name: str, data: bytes) -> str:
        """Write a file (atomic: temp + rename locally, one PUT on object storage); returns its URI."""
        ref = self.file(name)
        try:
            ref.write_bytes(data)
        except Exception as e:  # disk full, permissions, a file in the way, ...
            raise StoreError(f"writing {ref.uri} failed: {type(e).__name__}: {e}") from e
        return ref.uri

    def read_file(self, name: str) -> bytes:
        return self.file(name).read_bytes()

    def has_file(self, name: str) -> bool:
        return self.file(name).exists()

    # ---------------------------------------------------------------- stage completion
    def _complete_ref(self) -> io_.FileRef:
        return self.store.file(self.key, "_complete.json")

    def mark_complete(self, summary: dict) -> None:
        self._complete_ref().write_text(json.dumps({"completed_at": time.time(), **summary}, indent=1,
                                                   default=_json_default))

    def is_complete(self) -> bool:
        return self._complete_ref().exists()

    def summary(self) -> dict:
        ref = self._complete_ref()
        try:
            return json.loads(ref.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"stage {self.key} is not complete in {self.store.url}") from None

    def clear_complete(self) -> None:
        self._complete_ref().remove()

    @property
    def uri(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.key}"

    def __repr__(self) -> str:
        return f"StageOutput({self.uri!r})"


def _not_found(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def encode_array(arr: np.ndarray, attrs: dict | None = None) -> dict[str, bytes]:
    """The files of a one-chunk Zarr v3 array (COMPRESSORS) holding `arr`, with `attrs` and a checksum marker in
    its attributes: {"zarr.json": ..., "c.0.0": ...}, the bytes zarr-python writes (rca_core.one_chunk), the marker
    the CRC-32 of the chunk file (CHUNK_MARKER: 5x fewer bytes than the array's for a CAM, and checked before
    decoding). The forms one_chunk does not take go through zarr-python, marked with the array's CRC-32 (MARKER)."""
    arr = np.ascontiguousarray(arr)
    fast = one_chunk.encode(arr, dict(attrs or {}), COMPRESSORS, chunk_marker=CHUNK_MARKER)
    if fast is not None:
        return fast
    attributes = {**dict(attrs or {}), MARKER: checksum(arr)}
    files: dict = {}
    z = zarr.create_array(zarr.storage.MemoryStore(store_dict=files), shape=arr.shape, dtype=arr.dtype,
                          chunks=_whole_chunks(arr.shape), compressors=COMPRESSORS,
                          chunk_key_encoding=one_chunk.CHUNK_KEY_ENCODING,
                          attributes=attributes, config={"write_empty_chunks": True})  # an all-fill chunk too: it replaces an older one
    if arr.size:
        z[...] = arr
    return {k: v.to_bytes() for k, v in files.items()}


def _whole_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, s) for s in shape) if shape else ()


def _json_default(o):  # summaries and tables: numpy values as plain ones, anything else as its text
    try:
        return one_chunk.plain_json(o)
    except TypeError:
        return str(o)


def _jsonable_rows(rows: list[dict]) -> list[dict]:
    """Rows as plain Python values, every row with every key (pyarrow takes the columns of the first row)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in keys} for r in rows]
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if isinstance(v, np.generic):
                v = v.item()
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, tuple):
                v = list(v)
            d[k] = v
        out.append(d)
    return out

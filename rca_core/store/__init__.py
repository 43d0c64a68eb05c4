"""The artifact store: a Zarr v3 hierarchy holding every stage's outputs, plus Parquet tables and plain files.

`ArtifactStore(url).stage(name, fingerprint)` gives a StageOutput, the one object callers use; it composes the
package's modules, one job each:

- layout      where things are (the key layout) and which names may become keys; `Loc`, the store's root
- codec       an entry's form: the one-chunk Zarr array, its checksum marker, the checks before a read is trusted
  (one_chunk: the Zarr v3 bytes themselves, encoded and decoded without zarr-python's per-call cost)
- entries     an entry's files put and fetched: local disk, obstore or fsspec (requests: rca_core.object_io)
- background  writes behind the computation, reads ahead of it
- records     listing, manifest, tables, plain files, the completion marker and summary
- lease       one writer per stage: a lease record taken before a stage computes, renewed while it runs
- errors, jsonvalues   StoreError / DamagedEntryError; numpy values as JSON

Every byte goes through the store's URL (rca_core.storage): a worker on another node needs only the URL, never a
path on the driver's disk. Workers open the store with `create=False`: a node that cannot see the store fails
naming the store and the host instead of silently creating an empty one.

Who writes what (Zarr's concurrency contract): the driver calls `prepare` (group metadata), `put_array`,
`write_manifest`, `mark_complete`; a worker only creates and writes the arrays of the images it owns (`write`).
An image counts as done only once each of its arrays carries a checksum marker in its attrs (its zarr.json,
written after the data: a killed writer leaves at most a torn chunk that fails the checksum, or a torn zarr.json
that does not parse). `read` verifies that checksum, so a damaged entry raises DamagedEntryError instead of
being silently used, and `pending(verify=True)` sends it back for recomputation.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

import numpy as np
import zarr

from rca_core import storage as io_
from rca_core.object_io import StorageUnavailable, request
from rca_core.store.background import WRITE_BEHIND_DEPTH, WRITE_BEHIND_THREADS, Prefetch, WriteBehind
from rca_core.store.codec import (CHUNK_MARKER, COMPRESSORS, MARKER, checksum, decode_verified, encode_array,
                                  has_marker, unreadable_metadata, whole_chunks)
from rca_core.store.entries import EntryFiles
from rca_core.store.errors import DamagedEntryError, StoreError
from rca_core.store.layout import Loc, check_field, check_image_id, stage_key
from rca_core.store.lease import LeaseBusy, LeaseLost, check_held, hold
from rca_core.store.one_chunk import parse_meta
from rca_core.store.records import StageRecords

__all__ = ["ArtifactStore", "StageOutput", "StoreError", "DamagedEntryError", "LeaseBusy", "LeaseLost", "COMPRESSORS", "MARKER",
           "CHUNK_MARKER", "WRITE_BEHIND_THREADS", "WRITE_BEHIND_DEPTH", "check_image_id", "checksum", "has_marker",
           "encode_array"]


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
        self.loc = Loc(fs, root, self.url)
        if not create and not request(self.loc.join("zarr.json"), fs.exists, self.loc.join("zarr.json")):
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
        return self.loc.file(*parts)

    def stage(self, name: str, fingerprint: str) -> "StageOutput":
        return StageOutput(self, stage_key(name, fingerprint))

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
    """One stage's outputs in the store (see the module docstring for who may call what). Picklable (DataLoader
    workers, Ray): no threads or pending reads travel with it."""

    def __init__(self, store: ArtifactStore, key: str):
        self.store, self.key = store, key
        self._fields: list[str] = []
        self._entries = EntryFiles(store.loc, key, store.is_local, store.storage)
        self._records = StageRecords(store.loc, key)
        self._writes = WriteBehind()
        self._prefetch = Prefetch()

    @property
    def object_fast_path(self) -> bool:
        """True (default): per-image entries through obstore where it serves; False: through fsspec."""
        return self._entries.object_fast_path

    @object_fast_path.setter
    def object_fast_path(self, on: bool) -> None:
        self._entries.object_fast_path = on

    # ---------------------------------------------------------------- driver side
    def prepare(self, fields: Iterable[str] = ()) -> "StageOutput":
        """Create the stage group and one subgroup per per-image field. Driver only, before workers."""
        fields = [check_field(f) for f in fields]
        grp = zarr.open_group(self.store.zstore, path=self.key, mode="a")
        known = list(grp.attrs.get("fields", []))
        for f in fields:
            zarr.open_group(self.store.zstore, path=f"{self.key}/{f}", mode="a")
        self._fields = sorted(set(known) | set(fields))
        if self._fields != known:
            grp.attrs.update({"fields": self._fields})
        return self

    @property
    def fields(self) -> list[str]:
        """The per-image fields (read once; prepare() sets them)."""
        if self._fields:
            return list(self._fields)
        try:
            grp = zarr.open_group(self.store.zstore, path=self.key, mode="r")
        except StorageUnavailable:  # the store did not answer: not the same as "no fields"
            raise
        except Exception:
            return []
        self._fields = list(grp.attrs.get("fields", []))
        return list(self._fields)

    def exists(self) -> bool:
        return bool(self.fields) or self.is_complete()

    def put_array(self, name: str, arr: np.ndarray, attrs: dict | None = None) -> None:
        """A whole array (prototypes, embedding tables). Driver only."""
        arr = np.asarray(arr)
        z = zarr.create_array(self.store.zstore, name=f"{self.key}/_arrays/{name}", shape=arr.shape,
                              dtype=arr.dtype, chunks=whole_chunks(arr.shape), compressors=COMPRESSORS,
                              overwrite=True, attributes=dict(attrs or {}))
        if arr.size:
            z[...] = arr
        z.attrs.update({MARKER: checksum(arr)})

    def get_array(self, name: str) -> tuple[np.ndarray, dict]:
        return self._read_checked(f"_arrays/{name}", "_arrays", name)

    # ---------------------------------------------------------------- worker side
    def write(self, image_id: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Write all fields of one image; the image counts as done only after the last marker. Inside
        `write_behind()` the write happens on a background thread; errors surface at a later write or at flush()."""
        check_image_id(image_id)
        if self._writes.active:
            arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
            self._writes.submit(f"{self.key}/*/{image_id}", self._write_now, image_id, arrays, attrs)
            return
        self._write_now(image_id, arrays, attrs)

    def _write_now(self, image_id: str, arrays: dict[str, np.ndarray], attrs: dict | None) -> None:
        for field, arr in arrays.items():
            try:
                self._entries.put(f"{field}/{image_id}", encode_array(arr, attrs))
            except StorageUnavailable:  # already names the endpoint, the request and the last error
                raise
            except Exception as e:  # disk full, permissions, a file in the way, ...
                raise StoreError(f"writing {self.store.url}/{self.key}/{field}/{image_id} failed: "
                                 f"{type(e).__name__}: {e}") from e

    def write_behind(self):
        """Context: per-image writes go to background threads (rca_core.store.background), so that the next
        images are computed while earlier ones are written (each image's chunk-then-marker order is kept inside
        its write). Leaving it waits for every write."""
        return self._writes.running(self)

    def flush(self) -> None:
        """Wait for every queued write; raise the first failure."""
        self._writes.flush()

    # ---------------------------------------------------------------- readers
    def prefetch(self, image_id: str, field: str, executor) -> None:
        """Start reading (image_id, field) on `executor`; the next read() of it returns that result."""
        self._prefetch.start((image_id, field), executor, self._read_entry, image_id, field)

    def drop_prefetched(self) -> None:
        self._prefetch.drop()

    def read(self, image_id: str, field: str) -> tuple[np.ndarray, dict]:
        """(array, attrs) of one image's field, checksum verified; DamagedEntryError when it cannot be trusted."""
        fut = self._prefetch.take((image_id, field))
        if fut is not None:
            return fut.result()
        return self._read_entry(image_id, field)

    def _read_entry(self, image_id: str, field: str) -> tuple[np.ndarray, dict]:
        check_image_id(image_id)
        return self._read_checked(f"{field}/{image_id}", field, image_id)

    def _read_checked(self, rel: str, field: str, name: str) -> tuple[np.ndarray, dict]:
        where = (self.key, name, field)
        try:
            meta, chunk = self._entries.fetch(rel, field)
        except StorageUnavailable:  # the store did not answer in time: not a damaged entry
            raise
        except Exception as e:
            raise unreadable_metadata(where, e) from e
        return decode_verified(meta, chunk, where, lambda: zarr.open_array(
            self.store.zstore, path=f"{self.key}/{rel}", mode="r")[...])

    def is_done(self, image_id: str, verify: bool = False) -> bool:
        """Whether every field of the image is written (its marker is there); verify=True: and reads back intact."""
        fields = self.fields
        for field in fields:
            if verify:
                try:
                    self.read(image_id, field)
                except DamagedEntryError:
                    return False
                continue
            try:  # unverified: the marker alone (a missing or torn zarr.json counts as not done)
                attrs = parse_meta(self._entries.get_meta(f"{field}/{image_id}")).get("attributes") or {}
            except StorageUnavailable:
                raise
            except Exception:
                return False
            if not has_marker(attrs):
                return False
        return bool(fields)

    def pending(self, image_ids: Iterable[str], verify: bool = False) -> list[str]:
        """Ids not done yet (or damaged, with verify=True), in the given order."""
        return [i for i in image_ids if not self.is_done(i, verify=verify)]

    def listed_ids(self, field: str | None = None) -> list[str]:
        """Ids with an entry under every per-image field (or `field`), from one listing per field (records)."""
        return self._records.listed_ids([field] if field else self.fields)

    # ---------------------------------------------------------------- records (rca_core.store.records)
    def write_manifest(self, rows: list[dict], part: str | None = None) -> str | None:
        """Append manifest rows as one Parquet part (driver only)."""
        return self._records.write_manifest(rows, part)

    def manifest(self):
        """All manifest rows (pyarrow.Table); the newest row wins when an image was recomputed."""
        return self._records.manifest()

    def write_table(self, name: str, rows):
        return self._records.write_table(name, rows)

    def read_table(self, name: str):
        return self._records.read_table(name)

    def file(self, name: str) -> io_.FileRef:
        """A plain file under this stage's files/ folder (checkpoints, model files, PNG exports)."""
        return self._records.file(name)

    def write_file(self, name: str, data: bytes) -> str:
        """Write a file (atomic: temp + rename locally, one PUT on object storage); returns its URI."""
        return self._records.write_file(name, data)

    def read_file(self, name: str) -> bytes:
        return self._records.file(name).read_bytes()

    def has_file(self, name: str) -> bool:
        return self._records.file(name).exists()

    def mark_complete(self, summary: dict) -> None:
        """Write the completion marker (and summary), unless this process's lease on the stage was lost."""
        check_held(self)
        self._records.mark_complete(summary)

    def lease(self, **kw):
        """Context: hold this stage's lease for the block (rca_core.store.lease.hold: ttl_s, on_busy, ...)."""
        return hold(self, **kw)

    def is_complete(self) -> bool:
        return self._records.is_complete()

    def summary(self) -> dict:
        return self._records.summary()

    def clear_complete(self) -> None:
        self._records.clear_complete()

    @property
    def uri(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.key}"

    def __repr__(self) -> str:
        return f"StageOutput({self.uri!r})"

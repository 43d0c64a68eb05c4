"""An entry's files in the store (an encoded array: its zarr.json and its one chunk): put and get, on a local
disk, through obstore, or through fsspec.

Writes put the chunk first and the zarr.json (which carries the checksum marker, rca_core.store.codec) last, so
a reader never sees the marker before the data. Two writes per entry (object storage: two PUTs) instead of
zarr-python's create + delete-old + data + attribute update (measured: ~10 requests, 100+ ms per field on an S3
server on loopback).

- Local disk: both files written in place, no temporary file + rename (a tenth of a millisecond per entry,
  "Artifact store vs .npy" in docs/benchmarks.md): a killed writer leaves a torn chunk (its checksum no longer
  matches the marker) or a torn zarr.json (not JSON, or no marker in it), so the entry reads as damaged and is
  redone.
- obstore (s3:// with a key in the environment, rca_core.storage.process_object_store): the chunk's PUT, then the
  metadata's.
- fsspec (every other URL): both objects in one concurrent round trip. Should the chunk's PUT fail after the
  metadata's, the marker's checksum no longer matches what a reader decodes: the entry reads as damaged and is
  recomputed (every "is it done?" of the pipeline verifies the checksum).

Reads fetch the zarr.json and the chunk together once a field's chunk key is known (it follows from the number
of dimensions): one concurrent round trip instead of two. Every request goes through rca_core.object_io.
"""
from __future__ import annotations

import os
from typing import Any

from rca_core import object_io
from rca_core import storage as io_
from rca_core.store import one_chunk
from rca_core.store.layout import Loc


class EntryFiles:
    """The entries of one stage (`key`) of the store at `loc`; `is_local`: a local disk. Picklable."""

    def __init__(self, loc: Loc, key: str, is_local: bool, storage: Any = None):
        self.loc, self.key, self.is_local, self.storage = loc, key, is_local, storage
        self.object_fast_path = True  # False: through fsspec even where obstore could serve
        self._chunk_keys: dict[str, str] = {}  # field -> its entries' chunk key (both files in one round trip)

    def client(self):
        """The obstore client of an s3:// store in this process (None: local, or fsspec serves)."""
        if self.is_local or not self.object_fast_path:
            return None
        return io_.process_object_store(self.loc.url, self.storage)

    def put(self, rel: str, files: dict[str, bytes]) -> None:
        """Write the files of the entry at `rel` (`{field}/{image_id}` under the stage), zarr.json last."""
        base = self.loc.join(self.key, rel)
        chunks = {name: data for name, data in files.items() if name != "zarr.json"}
        if self.is_local:
            try:
                os.mkdir(base)
            except FileExistsError:
                pass
            except FileNotFoundError:  # the field's folder is not there yet
                os.makedirs(base, exist_ok=True)
            for name, data in chunks.items():  # the chunk key has no folders (one_chunk.CHUNK_KEY_ENCODING)
                with open(f"{base}/{name}", "wb") as f:
                    f.write(data)
            with open(f"{base}/zarr.json", "wb") as f:
                f.write(files["zarr.json"])
            return
        ordered = {**{f"{base}/{name}": data for name, data in chunks.items()}, f"{base}/zarr.json": files["zarr.json"]}
        object_io.put_many(self.loc.fs, ordered, self.client())

    def get_meta(self, rel: str) -> bytes:
        """The bytes of the entry's zarr.json (one request); FileNotFoundError when there is none."""
        return object_io.get(self.loc.fs, self.loc.join(self.key, rel, "zarr.json"), self.client())

    def fetch(self, rel: str, field: str) -> tuple[dict, bytes | None]:
        """The parsed zarr.json of the entry at `rel` and the bytes of its one chunk (None: no chunk file, or not
        the one-chunk form, which zarr-python then reads). Raises when the zarr.json is missing or does not parse."""
        fs, client = self.loc.fs, self.client()
        base = self.loc.join(self.key, rel)
        chunk = self._chunk_keys.get(field)
        if chunk is None:
            meta = one_chunk.parse_meta(object_io.get(fs, f"{base}/zarr.json", client))
            form = one_chunk.simple_form(meta)
            if form is None:
                return meta, None
            self._chunk_keys[field] = form[2]
            try:
                return meta, object_io.get(fs, f"{base}/{form[2]}", client)
            except FileNotFoundError:
                return meta, None
        got = object_io.get_many(fs, [f"{base}/zarr.json", f"{base}/{chunk}"], client)
        raw = got.get(f"{base}/zarr.json")
        if not isinstance(raw, bytes):
            raise raw if isinstance(raw, BaseException) else FileNotFoundError(f"{base}/zarr.json")
        meta = one_chunk.parse_meta(raw)
        form = one_chunk.simple_form(meta)
        if form is None or form[2] != chunk:  # another form than this field's usual one: fetch its own chunk
            self._chunk_keys.pop(field, None)
            return self.fetch(rel, field)
        data = got.get(f"{base}/{chunk}")
        return meta, data if isinstance(data, bytes) else None

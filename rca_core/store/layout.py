"""Where things are in the artifact store, and which names may become keys.

Layout (under the store root, a local directory or any fsspec URL):

    {stage}/{fingerprint}/zarr.json                 group; attrs: fields
    {stage}/{fingerprint}/{field}/{image_id}        one array per image and field, one chunk
    {stage}/{fingerprint}/_arrays/{name}            whole arrays (prototypes, embedding tables)
    {stage}/{fingerprint}/manifest/part-*.parquet   per-image manifest rows
    {stage}/{fingerprint}/tables/{name}.parquet     tables (write_table)
    {stage}/{fingerprint}/files/...                 plain files (checkpoints, model files, PNG exports)
    {stage}/{fingerprint}/_complete.json            written last by the driver: the stage is done
    _runs/{config fingerprint}/...                  each run's resolved config and stage keys

Every name that becomes part of a key is checked here first: nothing may escape its folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rca_core import storage as io_
from rca_core.store.errors import StoreError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")  # stage and field names
_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_image_id(image_id: str) -> str:
    """Image ids become store keys: refuse anything that could escape its folder."""
    if not isinstance(image_id, str) or not _ID_RE.match(image_id) or ".." in image_id:
        raise StoreError(f"invalid image id {image_id!r}: only letters, digits, '_', '-', '.' are allowed (no '/', no '..')")
    return image_id


def stage_key(name: str, fingerprint: str) -> str:
    """`{name}/{fingerprint}`, the folder of one stage's outputs."""
    if not _NAME_RE.match(name) or not _FINGERPRINT_RE.match(fingerprint):
        raise StoreError(f"invalid stage key {name}/{fingerprint}")
    return f"{name}/{fingerprint}"


def check_field(field: str) -> str:
    if not _NAME_RE.match(field):
        raise StoreError(f"invalid field name {field!r}")
    return field


def check_file_name(name: str) -> str:
    """A path under a stage's files/ folder: relative, no '..'."""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise StoreError(f"invalid file name {name!r}")
    return name


@dataclass(frozen=True)
class Loc:
    """The store's root: its fsspec file system, the root's path inside it, and its URL (what other nodes use)."""

    fs: Any
    root: str
    url: str

    def join(self, *parts: str) -> str:
        """The path inside `fs` of a key under the root."""
        return "/".join([self.root.rstrip("/"), *parts])

    def file(self, *parts: str) -> io_.FileRef:
        """A file anywhere under the root, by its path relative to it."""
        rel = "/".join(parts)
        return io_.FileRef(self.fs, self.join(rel), io_.join(self.url, rel))

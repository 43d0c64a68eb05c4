"""A per-image entry's form: the Zarr v3 array it is stored as, its checksum marker, and the checks a read makes
before its bytes are trusted.

An entry is a one-chunk Zarr v3 array compressed with COMPRESSORS: `zarr.json` and one chunk file. Its attributes
carry a checksum marker, written with the metadata after the chunk, so an entry counts as finished only once its
marker is there:

- CHUNK_MARKER (`rca_crc32_chunk`): the CRC-32 of the chunk file's bytes, for the arrays rca_core.store.one_chunk
  encodes (every numeric array of one or more dimensions and size > 0). It is checked before the chunk is
  decoded, and hashes 5x fewer bytes than the array's for a CAM.
- MARKER (`rca_crc32`): the CRC-32 of the array's bytes, for the forms one_chunk does not take (0-d and 0-size
  arrays, through zarr-python), for whole arrays (`put_array`), and in entries of stores written before
  CHUNK_MARKER existed. Checked after decoding.

`decode_verified` turns what was fetched into the array or a DamagedEntryError naming why: no marker (the write
was not finished), chunk file missing, checksum mismatch, unreadable data; `unreadable_metadata` is the reason
for a zarr.json that is missing or does not parse.
"""
from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rca_core.store import one_chunk
from rca_core.store.errors import DamagedEntryError

MARKER = "rca_crc32"  # CRC-32 of the array's bytes (put_array, and per-image forms one_chunk does not take)
CHUNK_MARKER = "rca_crc32_chunk"  # CRC-32 of the one chunk file's bytes (per-image arrays; checked before decoding)
# Blosc lz4 + bitshuffle: on VOC-sized uint8 CAMs 0.26 ms to compress and 5.7x smaller than float32 .npy, against
# zstd-3's 1.5 ms and 6.4x (codec probe in docs/benchmarks.md, "Artifact store vs .npy per image").
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),)

Where = tuple[str, str, str]  # (stage key, image id or array name, field): what a DamagedEntryError names


def checksum(arr: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def has_marker(attrs: dict) -> bool:
    """Whether an array's attributes carry a checksum marker (its write was finished)."""
    return CHUNK_MARKER in attrs or MARKER in attrs


def whole_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One chunk covering the whole array (zarr wants chunk sides >= 1, even for a 0-size side)."""
    return tuple(max(1, s) for s in shape) if shape else ()


def encode_array(arr: np.ndarray, attrs: dict | None = None) -> dict[str, bytes]:
    """The files of a one-chunk Zarr v3 array (COMPRESSORS) holding `arr`, with `attrs` and a checksum marker in
    its attributes: {"zarr.json": ..., "c.0.0": ...}, the bytes zarr-python writes (rca_core.store.one_chunk), the
    marker the CRC-32 of the chunk file (CHUNK_MARKER). The forms one_chunk does not take go through zarr-python,
    marked with the array's CRC-32 (MARKER)."""
    arr = np.ascontiguousarray(arr)
    fast = one_chunk.encode(arr, dict(attrs or {}), COMPRESSORS, chunk_marker=CHUNK_MARKER)
    if fast is not None:
        return fast
    attributes = {**dict(attrs or {}), MARKER: checksum(arr)}
    files: dict = {}
    z = zarr.create_array(zarr.storage.MemoryStore(store_dict=files), shape=arr.shape, dtype=arr.dtype,
                          chunks=whole_chunks(arr.shape), compressors=COMPRESSORS,
                          chunk_key_encoding=one_chunk.CHUNK_KEY_ENCODING,
                          attributes=attributes, config={"write_empty_chunks": True})  # an all-fill chunk too: it replaces an older one
    if arr.size:
        z[...] = arr
    return {k: v.to_bytes() for k, v in files.items()}


def unreadable_metadata(where: Where, e: BaseException) -> DamagedEntryError:
    """The error for an entry whose zarr.json could not be fetched or parsed (`e`: why)."""
    return DamagedEntryError(*where, f"missing or unreadable metadata ({type(e).__name__})")


def decode_verified(meta: dict, chunk: bytes | None, where: Where,
                    read_with_zarr: Callable[[], np.ndarray]) -> tuple[np.ndarray, dict]:
    """(array, attributes without the marker) of an entry from its parsed zarr.json and its chunk's bytes (None: no
    chunk file), after checking its marker; DamagedEntryError otherwise. `read_with_zarr` reads the array through
    zarr-python, for the forms one_chunk does not decode."""
    attrs = dict(meta.get("attributes") or {})
    if not has_marker(attrs):
        raise DamagedEntryError(*where, "write was not finished (no checksum marker)")
    if CHUNK_MARKER in attrs:  # the chunk file's bytes are checked before they are decoded
        if chunk is None:
            raise DamagedEntryError(*where, "chunk file missing")
        if zlib.crc32(chunk) != attrs.pop(CHUNK_MARKER):
            raise DamagedEntryError(*where, "checksum mismatch")
        attrs.pop(MARKER, None)
    try:
        arr = one_chunk.decode(meta, chunk)
        if arr is None:  # not the store's own one-chunk form: let zarr-python read it
            arr = read_with_zarr()
    except Exception as e:
        raise DamagedEntryError(*where, f"unreadable data ({type(e).__name__}: {e})") from e
    if MARKER in attrs:  # entries of older stores and of the forms zarr-python writes: the array's bytes
        if checksum(arr) != attrs.pop(MARKER):
            raise DamagedEntryError(*where, "checksum mismatch")
    return arr, attrs

"""One-chunk Zarr v3 arrays (the store's per-image arrays) encoded and decoded without zarr-python's per-call cost.

The artifact store keeps every image's field as a Zarr v3 array of one chunk: a `zarr.json` and one chunk file
`c.0.0.0` beside it (default chunk key encoding with the "." separator: no chunk folders to create per image;
stores written before use "/", `c/0/0/0`, and read the same). For a VOC-sized CAM zarr-python spends ~1.3 ms
creating such an array in memory and ~1.5 ms opening and decoding it (metadata validation, its async codec pipeline), more than the
Blosc codec itself (`python bench/store.py vs-npy`, docs/benchmarks.md). Here the metadata is zarr-python's own, written
once per (dtype, number of dimensions) as a template in which only shape, chunk shape and attributes change,
and the chunk goes through numcodecs' Blosc with the configuration zarr-python wrote into that template (the
codec zarr's BloscCodec calls). The files are byte-for-byte the ones zarr-python writes
(tests/test_store_one_chunk.py checks it), so any Zarr reader opens them. `decode` takes only that simple
form; for anything else it returns None and the store reads the array through zarr-python.
"""
from __future__ import annotations

import json
import threading
import zlib
from typing import Any

import numpy as np

from rca_core.store.jsonvalues import plain_json

_NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64"}
_templates: dict[tuple[str, int], tuple[list, Any] | None] = {}
_lock = threading.Lock()


SEPARATOR = "."  # of new arrays' chunk keys
CHUNK_KEY_ENCODING = {"name": "default", "separator": SEPARATOR}


def chunk_key(ndim: int, separator: str = SEPARATOR) -> str:
    """The one chunk's key under the array (default chunk key encoding)."""
    return "c" + "".join(separator + "0" for _ in range(ndim))


def _template(dtype: np.dtype, ndim: int, compressors) -> tuple[list, Any] | None:
    """zarr-python's metadata for a one-chunk array of this dtype and ndim (rendered, _render_template), and its
    Blosc codec (None: not Blosc)."""
    key = (dtype.str, ndim)
    with _lock:
        if key not in _templates:
            import zarr
            from numcodecs import Blosc

            files: dict = {}
            zarr.create_array(zarr.storage.MemoryStore(store_dict=files), shape=(1,) * ndim, dtype=dtype,
                              chunks=(1,) * ndim, compressors=compressors, chunk_key_encoding=CHUNK_KEY_ENCODING,
                              config={"write_empty_chunks": True})
            meta = json.loads(files["zarr.json"].to_bytes())
            codecs = meta.get("codecs", [])
            if len(codecs) == 2 and codecs[0].get("name") == "bytes" and codecs[1].get("name") == "blosc":
                c = codecs[1]["configuration"]
                shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
                codec = Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=shuffle[c["shuffle"]],
                              blocksize=c.get("blocksize", 0), typesize=c["typesize"])
                _templates[key] = (_render_template(meta), codec)
            else:
                _templates[key] = None
        return _templates[key]


_SLOTS = ("shape", "chunk_shape", "attributes")


def _render_template(meta: dict) -> list[tuple[str, int] | str]:
    """The metadata's JSON text as json.dumps(indent=2) writes it, cut at the three values that change per array
    (shape, chunk shape, attributes): [text, (slot, indent), text, ...]. Filling a slot with its value dumped
    with indent=2, every line after the first shifted by the slot's indent, gives json.dumps' own bytes for the
    whole (JSON strings hold no raw newline), in a few microseconds instead of json's pure-Python indenting
    encoder walking the whole metadata per image (~0.2 ms)."""
    meta = dict(meta)
    meta["shape"] = "@@shape@@"
    meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": "@@chunk_shape@@"}}
    meta["attributes"] = "@@attributes@@"
    text = json.dumps(meta, allow_nan=True, indent=2)
    parts: list[tuple[str, int] | str] = []
    for slot in sorted(_SLOTS, key=lambda k: text.index(f'"@@{k}@@"')):  # in the order the text has them
        mark = f'"@@{slot}@@"'
        i = text.index(mark)
        line_start = text.rindex("\n", 0, i) + 1
        parts.append(text[:i])
        parts.append((slot, len(text[line_start:i]) - len(text[line_start:i].lstrip(" "))))
        text = text[i + len(mark):]
    parts.append(text)
    return parts


def _fill(parts: list, values: dict) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        else:
            slot, indent = p
            out.append(json.dumps(values[slot], allow_nan=True, indent=2, default=plain_json)
                       .replace("\n", "\n" + " " * indent))
    return "".join(out)


def encode(arr: np.ndarray, attributes: dict, compressors, chunk_marker: str | None = None) -> dict[str, bytes] | None:
    """{"zarr.json": ..., chunk_key: ...} of a one-chunk array holding `arr`; None where this form does not apply
    (empty or 0-d arrays, non-numeric dtypes, a codec chain other than bytes + Blosc). With `chunk_marker`, the
    attributes also get {chunk_marker: CRC-32 of the chunk file's bytes} (known only once the chunk is encoded)."""
    if arr.ndim == 0 or arr.size == 0 or arr.dtype.name not in _NUMERIC:
        return None
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    tpl = _template(arr.dtype, arr.ndim, compressors)
    if tpl is None:
        return None
    parts, codec = tpl
    shape = list(arr.shape)
    chunk = bytes(codec.encode(arr))
    attributes = attributes if chunk_marker is None else {**attributes, chunk_marker: zlib.crc32(chunk)}
    text = _fill(parts, {"shape": shape, "chunk_shape": shape, "attributes": attributes})
    return {"zarr.json": text.encode(), chunk_key(arr.ndim): chunk}


def parse_meta(meta: bytes) -> dict:
    return json.loads(meta)


def simple_form(meta: dict) -> tuple[tuple[int, ...], np.dtype, str] | None:
    """(shape, dtype, chunk key) when `meta` is a one-chunk array that `decode` takes, else None."""
    try:
        shape = tuple(int(s) for s in meta["shape"])
        codecs = meta["codecs"]
        ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
              and not meta.get("storage_transformers")
              and meta["chunk_grid"] == {"name": "regular", "configuration": {"chunk_shape": list(shape)}}
              and meta["chunk_key_encoding"].get("name") == "default"
              and _separator(meta) in ("/", ".")
              and meta["data_type"] in _NUMERIC and len(shape) > 0
              and len(codecs) == 2 and codecs[0].get("name") == "bytes"
              and codecs[0].get("configuration", {}).get("endian", "little") == "little"
              and codecs[1].get("name") == "blosc")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not ok:
        return None
    return shape, np.dtype(meta["data_type"]).newbyteorder("<"), chunk_key(len(shape), _separator(meta))


def _separator(meta: dict) -> str:
    return meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")


def decode(meta: dict, chunk: bytes | None) -> np.ndarray | None:
    """The array of a one-chunk array's parsed metadata and chunk bytes (None: chunk absent = all fill value).
    Returns None where the metadata is not the simple form (read it through zarr-python then); raises ValueError
    when the chunk does not decode to the array's size."""
    form = simple_form(meta)
    if form is None:
        return None
    shape, dtype, _ = form
    if chunk is None:
        return np.full(shape, meta.get("fill_value", 0), dtype=dtype)
    from numcodecs import Blosc

    nbytes = int(np.prod(shape)) * dtype.itemsize
    held = int.from_bytes(chunk[4:8], "little") if len(chunk) >= 16 else -1  # Blosc header: uncompressed size
    if held != nbytes:
        raise ValueError(f"chunk holds {held} bytes, {shape} {dtype} needs {nbytes}")
    out = np.empty(shape, dtype=dtype)  # decompressed straight into the array the caller gets (writable)
    try:
        Blosc().decode(chunk, out=out)
    except Exception as e:
        raise ValueError(f"chunk does not decode: {e}") from e
    return out

"""The artifact store's parts at their seams (rca_core.store's modules, rca_core.object_io): an entry's files are
the bytes zarr-python writes on every I/O path, a missing object is FileNotFoundError on every path, numpy values
become plain JSON once, and background writes and reads stay with the process that started them."""
from __future__ import annotations

import json
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from zarr.codecs import BloscCodec, BloscShuffle

from rca_core import object_io, storage
from rca_core.store import CHUNK_MARKER, MARKER, ArtifactStore, DamagedEntryError, StoreError

ATTRS = {"classes": [3, 7], "scale": 0.5}


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "u8": rng.integers(0, 256, (3, 17, 29)).astype(np.uint8),
        "f16": rng.random((2, 9, 11)).astype(np.float16),
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "zeros": np.zeros((2, 8, 8), np.float32),   # all fill value: the chunk is still written
        "empty": np.zeros((0, 4), np.uint8),        # 0-size: through zarr-python, array CRC marker
    }


def zarr_python_entry(arr: np.ndarray, attrs: dict) -> dict[str, bytes]:
    """The files zarr-python itself writes for an entry: one chunk, Blosc lz4 + bitshuffle, chunk keys `c.0.0`,
    the attributes followed by the checksum marker (the chunk file's CRC-32 where there is a chunk of a numeric
    array, else the array's CRC-32), added the way zarr-python adds attributes."""
    files: dict = {}
    assert arr.ndim  # (a 0-d array is stored as shape (1,): the store's np.ascontiguousarray makes it 1-d)
    z = zarr.create_array(zarr.storage.MemoryStore(store_dict=files), shape=arr.shape, dtype=arr.dtype,
                          chunks=tuple(max(1, s) for s in arr.shape),
                          compressors=(BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),),
                          chunk_key_encoding={"name": "default", "separator": "."}, attributes=dict(attrs),
                          config={"write_empty_chunks": True})
    if arr.size:
        z[...] = arr
    chunks = [k for k in files if k != "zarr.json"]
    if arr.size:
        z.attrs.update({CHUNK_MARKER: zlib.crc32(files[chunks[0]].to_bytes())})
    else:
        z.attrs.update({MARKER: zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1)) & 0xFFFFFFFF})
    return {k: v.to_bytes() for k, v in files.items()}


def entry_files(out, field: str, image_id: str) -> dict[str, bytes]:
    """Every file of an entry as stored, by its name under the entry's folder."""
    fs = out.store.loc.fs
    base = out.store.loc.join(out.key, field, image_id)
    return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    """A local store (written in place) and a URL store (fsspec's requests through rca_core.object_io)."""
    return str(tmp_path / "store") if request.param == "local" else f"memory://rca-parts-{tmp_path.name}/store"


def test_entries_are_zarr_pythons_bytes_on_every_path(store_url):
    out = ArtifactStore(store_url).stage("toy", "fp").prepare(["cam"])
    assert out.store.is_local == (not store_url.startswith("memory://"))
    for name, arr in arrays().items():
        out.write(name, {"cam": arr}, attrs=ATTRS)
        assert entry_files(out, "cam", name) == zarr_python_entry(arr, ATTRS), name
        z = zarr.open_array(out.store.zstore, path=f"{out.key}/cam/{name}", mode="r")  # any Zarr reader opens it
        assert np.array_equal(z[...], arr) and z.dtype == arr.dtype
        for _ in range(2):  # the first read learns the field's chunk key, the second fetches both files at once
            got, attrs = out.read(name, "cam")
            assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr), name
            assert attrs == ATTRS
        assert out.is_done(name) and out.is_done(name, verify=True)


def test_a_missing_entry_is_damaged_and_a_missing_file_not_found_on_every_path(store_url):
    out = ArtifactStore(store_url).stage("toy", "fp").prepare(["cam"])
    out.write("a", {"cam": arrays()["u8"]})
    for _ in range(2):  # before and after the field's chunk key is known
        with pytest.raises(DamagedEntryError, match="missing or unreadable metadata \\(FileNotFoundError\\)"):
            out.read("nope", "cam")
        out.read("a", "cam")
    assert not out.is_done("nope") and not out.is_done("nope", verify=True)
    fs, base = out.store.loc.fs, out.store.loc.join(out.key, "cam")
    with pytest.raises(FileNotFoundError):
        storage.fetch(fs, f"{base}/nope/zarr.json", store_url)
    with pytest.raises(FileNotFoundError):
        out.read_file("nope.bin")
    fs.rm(f"{base}/a/c.0.0.0")  # a lost chunk: damaged, not an array of zeros
    with pytest.raises(DamagedEntryError, match="chunk file missing"):
        out.read("a", "cam")


@pytest.mark.parametrize("client", ["fsspec-local", "fsspec-memory", "obstore-memory"])
def test_object_io_answers_the_same_on_every_client(client, tmp_path):
    """get / get_many / put_many: the same bytes back, and FileNotFoundError for a missing object, whichever client
    serves (obstore's MemoryStore: a real obstore client without a server; its NotFoundError is not an OSError)."""
    if client == "fsspec-local":
        fs, root, obj = storage.filesystem(str(tmp_path))[0], str(tmp_path), None
        (tmp_path / "bucket").mkdir()
    elif client == "fsspec-memory":
        fs, root, obj = storage.filesystem(f"memory://oio-{tmp_path.name}")[0], f"/oio-{tmp_path.name}", None
    else:
        from obstore.store import MemoryStore

        fs, root, obj = storage.filesystem(str(tmp_path))[0], "", MemoryStore()
    base = f"{root}/bucket" if root else "bucket"
    object_io.put_many(fs, {f"{base}/c.0": b"chunk", f"{base}/zarr.json": b"{}"}, obj)
    assert object_io.get(fs, f"{base}/c.0", obj) == b"chunk"
    with pytest.raises(FileNotFoundError):
        object_io.get(fs, f"{base}/missing", obj)
    got = object_io.get_many(fs, [f"{base}/zarr.json", f"{base}/missing"], obj)
    assert got[f"{base}/zarr.json"] == b"{}" and isinstance(got[f"{base}/missing"], FileNotFoundError)


def test_obstores_not_found_error_reads_as_file_not_found():
    """obstore raises its own NotFoundError (not an OSError) for a missing object on some of its paths; every
    request of rca_core.object_io answers FileNotFoundError naming the object instead. Other errors pass as they are."""
    from obstore.exceptions import NotFoundError

    def missing():
        raise NotFoundError("gone")

    with pytest.raises(FileNotFoundError, match="bucket/key"):
        object_io.request("bucket/key", missing)
    with pytest.raises(ZeroDivisionError):
        object_io.request("bucket/key", lambda: 1 / 0)
    assert object_io.split_key("bucket/a/b") == ("bucket", "a/b")


def test_summaries_and_rows_take_numpy_values(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("toy", "fp")
    out.mark_complete({"miou": np.float32(0.25), "counts": np.arange(3), "when": object.__name__})
    s = out.summary()
    assert s["miou"] == 0.25 and s["counts"] == [0, 1, 2] and s["when"] == "object"
    out.write_manifest([{"image_id": "a", "score": np.float64(0.5), "size": (3, 4)},
                        {"image_id": "b", "classes": np.array([1, 2], np.uint8)}])  # keys differ between rows
    rows = {r["image_id"]: r for r in out.manifest().to_pylist()}
    assert rows["a"] == {"image_id": "a", "score": 0.5, "size": [3, 4], "classes": None}
    assert rows["b"] == {"image_id": "b", "score": None, "size": None, "classes": [1, 2]}
    with pytest.raises(Exception, match="not JSON"):  # attributes refuse what zarr-python refuses
        out.write("x", {"m": np.zeros((2, 2), np.uint8)}, attrs={"bad": object()})
    assert json.loads(out.store.file(out.key, "_complete.json").read_text())["counts"] == [0, 1, 2]


def test_a_stage_output_pickles_with_writes_and_reads_under_way(tmp_path):
    """No thread, queue or future travels with a pickled StageOutput: the copy writes at once and reads afresh."""
    arr = arrays()["u8"]
    out = ArtifactStore(tmp_path / "s").stage("toy", "fp").prepare(["cam"])
    out.write("a", {"cam": arr})
    with ThreadPoolExecutor(1) as pool, out.write_behind():
        out.write("b", {"cam": arr})
        out.prefetch("a", "cam", pool)
        copy = pickle.loads(pickle.dumps(out))
        copy.write("c", {"cam": arr + 1})  # no writer threads in the copy: written before write() returns
        assert copy.is_done("c", verify=True)
        assert np.array_equal(copy.read("a", "cam")[0], arr)
        assert np.array_equal(out.read("a", "cam")[0], arr)  # the prefetched read
    assert out.is_done("b", verify=True)


def test_a_failed_background_write_surfaces_and_names_the_entry(tmp_path):
    arr = arrays()["u8"]
    out = ArtifactStore(tmp_path / "s").stage("toy", "fp").prepare(["cam"])
    (tmp_path / "s" / out.key / "cam" / "b").write_bytes(b"in the way")
    with pytest.raises(StoreError, match="toy/fp/cam/b"):
        with out.write_behind():
            out.write("a", {"cam": arr})
            out.write("b", {"cam": arr})
    assert out.is_done("a", verify=True) and not out.is_done("b")
    out.write("d", {"cam": arr})  # outside write_behind: written at once again
    assert out.is_done("d", verify=True)

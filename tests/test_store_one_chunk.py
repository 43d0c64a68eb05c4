"""rca_core.store.one_chunk: the store's per-image arrays encoded and decoded without zarr-python, as zarr-python would."""
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rca_core.store import one_chunk
from rca_core.store import COMPRESSORS, MARKER, ArtifactStore, DamagedEntryError, checksum


def zarr_python_files(arr, attrs, compressors=COMPRESSORS, cke=one_chunk.CHUNK_KEY_ENCODING):
    files = {}
    z = zarr.create_array(zarr.storage.MemoryStore(store_dict=files), shape=arr.shape, dtype=arr.dtype,
                          chunks=arr.shape, compressors=compressors, attributes=attrs, chunk_key_encoding=cke,
                          config={"write_empty_chunks": True})
    z[...] = arr
    return {k: v.to_bytes() for k, v in files.items()}


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "int64", "bool"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 33, 41), (1, 2, 3, 4)])
def test_bytes_are_zarr_pythons(dtype, shape):
    arr = (np.random.default_rng(0).random(shape) * 100).astype(dtype)
    attrs = {"classes": [1, 2], "scale": 0.5, MARKER: checksum(arr)}
    ours = one_chunk.encode(arr, attrs, COMPRESSORS)
    assert ours == zarr_python_files(arr, attrs)
    back = one_chunk.decode(one_chunk.parse_meta(ours["zarr.json"]), ours[one_chunk.chunk_key(arr.ndim)])
    assert back.dtype == arr.dtype and np.array_equal(back, arr) and back.flags.writeable


def test_forms_it_does_not_take_go_through_zarr_python(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("cam_infer", "abc").prepare(["cam"])
    assert one_chunk.encode(np.zeros((0, 4), np.uint8), {}, COMPRESSORS) is None
    assert one_chunk.encode(np.array(3.0), {}, COMPRESSORS) is None
    # an entry another tool wrote with several chunks and another codec: decode declines, the store still reads it
    arr = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    z = zarr.create_array(out.store.zstore, name=f"{out.key}/cam/img_0", shape=arr.shape, dtype=arr.dtype,
                          chunks=(3, 4), compressors=(BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle),),
                          attributes={MARKER: checksum(arr), "classes": [4]})
    z[...] = arr
    meta = one_chunk.parse_meta((tmp_path / "s" / out.key / "cam" / "img_0" / "zarr.json").read_bytes())
    assert one_chunk.simple_form(meta) is None and one_chunk.decode(meta, b"") is None
    got, attrs = out.read("img_0", "cam")
    assert np.array_equal(got, arr) and attrs == {"classes": [4]}
    # and an older store's one-chunk array (zstd, written by zarr-python) decodes here
    old = zarr_python_files(arr, {MARKER: checksum(arr)}, (BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),),
                            {"name": "default", "separator": "/"})
    assert np.array_equal(one_chunk.decode(one_chunk.parse_meta(old["zarr.json"]), old["c/0/0"]), arr)
    for rel, data in old.items():  # such an entry in the store reads too, beside the new form
        (tmp_path / "s" / out.key / "cam" / "img_old" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / out.key / "cam" / "img_old" / rel).write_bytes(data)
    out.write("img_new", {"cam": arr})
    assert (tmp_path / "s" / out.key / "cam" / "img_new" / "c.0.0").is_file()
    for image_id in ("img_new", "img_old", "img_new"):
        assert np.array_equal(out.read(image_id, "cam")[0], arr)


def test_truncated_or_foreign_chunk_is_damaged_not_garbage(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("crf_labels", "abc").prepare(["label"])
    lab = np.random.default_rng(1).integers(0, 21, (40, 50)).astype(np.uint8)
    out.write("a", {"label": lab})
    out.write("b", {"label": lab[:20]})
    chunk_a = tmp_path / "s" / out.key / "label" / "a" / "c.0.0"
    chunk_b = tmp_path / "s" / out.key / "label" / "b" / "c.0.0"
    assert np.array_equal(out.read("a", "label")[0], lab)
    chunk_a.write_bytes(chunk_b.read_bytes())  # a valid Blosc chunk of the wrong size
    with pytest.raises(DamagedEntryError, match="checksum mismatch"):
        out.read("a", "label")
    meta_a = one_chunk.parse_meta((chunk_a.parent / "zarr.json").read_bytes())
    with pytest.raises(ValueError, match="holds 1000 bytes"):  # unmarked (older) entries: the size check catches it
        one_chunk.decode(meta_a, chunk_b.read_bytes())
    chunk_b.write_bytes(chunk_b.read_bytes()[:-7])
    with pytest.raises(DamagedEntryError):
        out.read("b", "label")
    assert out.pending(["a", "b"], verify=True) == ["a", "b"]

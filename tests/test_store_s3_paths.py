"""The store's two object-storage paths on a real S3 server (SeaweedFS on 127.0.0.1): obstore (per-image
entries, when a key is in the environment) and fsspec/s3fs (everything else, and the fallback) write the
same objects and read each other's."""
from __future__ import annotations

import os

import numpy as np
import pytest

from harness.s3_server import SeaweedS3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    server.start()
    try:
        os.environ.update(server.env)
        server.make_bucket("paths")
        yield server
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.kill()  # throwaway data: SIGKILL is immediate, where stop() waits out weed's ~15 s gRPC grace


def test_obstore_and_s3fs_write_the_same_objects_and_read_each_other(s3, monkeypatch):
    from rca_core import storage
    from rca_core.store import ArtifactStore, DamagedEntryError

    fast = ArtifactStore("s3://paths/run").stage("cam_infer", "fp").prepare(["cam"])
    assert fast._entries.client() is not None  # a key in the environment: obstore serves per-image entries
    slow = ArtifactStore("s3://paths/run").stage("cam_infer", "fp")
    slow.object_fast_path = False       # this handle: the fsspec path
    assert slow._entries.client() is None
    cam = np.random.default_rng(0).integers(0, 256, (2, 37, 51)).astype(np.uint8)
    fast.write("a", {"cam": cam}, attrs={"classes": [3, 7]})
    slow.write("b", {"cam": cam}, attrs={"classes": [3, 7]})
    fs = fast.store.loc.fs
    base = "paths/run/cam_infer/fp/cam"
    for rel in ("zarr.json", "c.0.0.0"):
        assert fs.cat_file(f"{base}/a/{rel}") == fs.cat_file(f"{base}/b/{rel}")
    for out in (fast, slow):
        for image_id in ("a", "b"):
            got, attrs = out.read(image_id, "cam")
            assert np.array_equal(got, cam) and attrs == {"classes": [3, 7]}
    assert fast.listed_ids() == ["a", "b"] and fast.pending(["a", "b", "c"], verify=True) == ["c"]
    fs.rm(f"{base}/a/c.0.0.0")  # a lost chunk reads as damaged on both paths (and is recomputed)
    for out in (fast, slow):
        with pytest.raises(DamagedEntryError):
            out.read("a", "cam")
    # no key in the environment (profiles, SSO, config files): the fsspec path, which resolves those
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert storage.object_store("s3://paths/run") is None
    assert storage.object_store("gs://bucket/run") is None and storage.object_store("/tmp/x") is None


def _count_requests(monkeypatch) -> dict:
    """Count the S3 requests of this process by kind: s3fs's calls and obstore's GETs."""
    import collections

    import obstore
    import s3fs.core

    counts: dict = collections.Counter()
    call = s3fs.core.S3FileSystem._call_s3

    async def counted(self, method, *a, **k):
        counts[getattr(method, "__name__", str(method))] += 1
        return await call(self, method, *a, **k)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", counted)
    get = obstore.get
    monkeypatch.setattr(obstore, "get", lambda *a, **k: (counts.update(["obstore get"]), get(*a, **k))[1])
    return counts


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_data_set_on_s3_reads_each_file_with_one_request(s3, tmp_path, monkeypatch, client):
    """An image and its mask on S3 cost one GET each: no size request before the GET (s3fs asks for one unless
    told not to split the read), and the mask's size check uses the size of the image just decoded instead of
    reading the image again. With a key in the environment the GETs go through obstore, else through s3fs."""
    from test_data_voc import IDS, write_tree

    from rca_core import storage
    from rca_core.data.voc import DataError, VOCDataset

    masks = write_tree(tmp_path / "voc", "SegmentationClassAug")
    storage.upload_tree(tmp_path / "voc", f"s3://paths/voc-{client}")
    if client == "s3fs":  # no key in the environment: obstore does not serve, s3fs resolves the credentials
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        (tmp_path / "credentials").write_text(f"[default]\naws_access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
                                              f"aws_secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n")
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    ds = VOCDataset(f"s3://paths/voc-{client}")
    counts = _count_requests(monkeypatch)
    for iid in IDS:
        img = ds.image(iid)
        assert np.array_equal(ds.mask(iid), masks[iid]) and img.shape[:2] == masks[iid].shape
    gets = counts.pop("obstore get" if client == "obstore" else "get_object", 0)
    listings = counts.pop("list_objects_v2", 0)  # the mask folder, listed once for every image
    assert gets == 2 * len(IDS) and listings <= 1 and not counts, (gets, listings, dict(counts))
    # a mask that does not fit its image is still refused (the size comes from the decoded image)
    storage.write_bytes(f"s3://paths/voc-{client}/SegmentationClassAug/{IDS[1]}.png",
                        (tmp_path / "voc" / "SegmentationClassAug" / f"{IDS[0]}.png").read_bytes())
    with pytest.raises(DataError, match=IDS[1]):
        VOCDataset(f"s3://paths/voc-{client}").mask(IDS[1])


def test_entries_are_the_same_bytes_on_disk_through_obstore_and_through_s3fs(s3, tmp_path):
    """The entry I/O's three paths (local disk, obstore, fsspec/s3fs) store the same files for the same arrays
    (the bytes zarr-python writes: tests/test_store_parts.py), and each reads every other's back."""
    from test_store_parts import ATTRS, arrays, entry_files

    from rca_core.store import ArtifactStore

    local = ArtifactStore(tmp_path / "store").stage("cam_infer", "same").prepare(["cam"])
    fast = ArtifactStore("s3://paths/same").stage("cam_infer", "same").prepare(["cam"])
    slow = ArtifactStore("s3://paths/same").stage("cam_infer", "same")
    slow.object_fast_path = False
    for name, arr in arrays().items():
        for out, prefix in ((local, "d"), (fast, "o"), (slow, "f")):
            out.write(f"{prefix}-{name}", {"cam": arr}, attrs=ATTRS)
        on_disk = entry_files(local, "cam", f"d-{name}")
        assert entry_files(fast, "cam", f"o-{name}") == on_disk == entry_files(slow, "cam", f"f-{name}"), name
        for out in (fast, slow):
            for prefix in ("o", "f"):
                got, attrs = out.read(f"{prefix}-{name}", "cam")
                assert got.dtype == arr.dtype and np.array_equal(got, arr) and attrs == ATTRS


def test_a_missing_object_is_file_not_found_through_both_clients(s3):
    """A missing object: FileNotFoundError from every request of rca_core.object_io and from storage.fetch,
    DamagedEntryError (metadata missing) from the store, whichever client serves."""
    from rca_core import object_io, storage
    from rca_core.store import ArtifactStore, DamagedEntryError

    fs, _ = storage.filesystem("s3://paths/nf")
    client = storage.process_object_store("s3://paths/nf")
    assert client is not None
    object_io.put_many(fs, {"paths/nf/here": b"here"}, client)
    for c in (client, None):
        assert object_io.get(fs, "paths/nf/here", c) == b"here"
        with pytest.raises(FileNotFoundError):
            object_io.get(fs, "paths/nf/gone", c)
        got = object_io.get_many(fs, ["paths/nf/here", "paths/nf/gone"], c)
        assert got["paths/nf/here"] == b"here" and isinstance(got["paths/nf/gone"], FileNotFoundError), got
    with pytest.raises(FileNotFoundError):
        storage.fetch(fs, "paths/nf/gone", "s3://paths/nf")
    for fast_path in (True, False):
        out = ArtifactStore("s3://paths/nf").stage("cam_infer", "fp").prepare(["cam"])
        out.object_fast_path = fast_path
        out.write("a", {"cam": np.ones((2, 3), np.uint8)})
        for _ in range(2):  # before and after the field's chunk key is known
            with pytest.raises(DamagedEntryError, match="missing or unreadable metadata \\(FileNotFoundError\\)"):
                out.read("gone", "cam")
            out.read("a", "cam")

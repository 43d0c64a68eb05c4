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
        server.stop()


def test_obstore_and_s3fs_write_the_same_objects_and_read_each_other(s3, monkeypatch):
    from rca_core import storage
    from rca_core.store import ArtifactStore, DamagedEntryError

    fast = ArtifactStore("s3://paths/run").stage("cam_infer", "fp").prepare(["cam"])
    assert fast._objects() is not None  # a key in the environment: obstore serves per-image entries
    slow = ArtifactStore("s3://paths/run").stage("cam_infer", "fp")
    slow._obj = (os.getpid(), None)     # this handle: the fsspec path
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

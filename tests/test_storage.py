"""The I/O layer: URLs for the store, the data and the weights (fsspec's memory:// stands for a bucket here;
tests/test_cluster_s3.py runs the same code against a real S3 server)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import write_config


def test_missing_object_storage_extra_names_it(tmp_path):
    """Without s3fs, an s3:// store fails at once naming the extra to install."""
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from rca_core.store import ArtifactStore, StoreError\n"
            "try:\n    ArtifactStore('s3://bucket/run')\nexcept StoreError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install -e '.[s3]'" in out.stdout and "s3fs" in out.stdout, out.stdout + out.stderr


def test_s3_options_come_from_the_standard_environment(monkeypatch):
    from rca_core import storage
    from rca_core.config import StorageConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = storage.options_for("s3://b/x")
    assert opts["endpoint_url"] == "http://127.0.0.1:9" and opts["client_kwargs"]["region_name"] == "eu-west-3"
    assert opts["use_listings_cache"] is False
    given = storage.options_for("s3://b/x", StorageConfig(endpoint_url="http://127.0.0.1:10"))
    assert given["endpoint_url"] == "http://127.0.0.1:10"
    assert not any("secret" in k or "key" == k for k in opts)  # credentials never go through the config


def test_refused_credentials_is_told_from_a_missing_file():
    """Only an object store's refusal counts as refused credentials: a local store's missing marker is not, even
    when its path holds "403" (a hex token did, and the preflight blamed a node's AWS credentials)."""
    from botocore.exceptions import ClientError

    from rca_core import storage

    local = FileNotFoundError("file not found: /tmp/store/_preflight/3d74b403e7c44.json")
    assert not storage.refused_credentials(local, "/tmp/store")
    assert not storage.refused_credentials(local, "s3://b/run")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    assert storage.refused_credentials(denied, "s3://b/run")
    try:  # s3fs turns it into an OSError whose text lost the code; the cause keeps it
        raise PermissionError("Access Denied") from denied
    except PermissionError as e:
        assert storage.refused_credentials(e, "s3://b/run")
    try:
        raise OSError("an error at s3://b/run/_preflight/ab403cd.json") from TimeoutError("read timed out")
    except OSError as e:
        assert not storage.refused_credentials(e, "s3://b/run")


def test_file_ref_writes_atomically_and_names_a_missing_file(tmp_path):
    from rca_core import storage

    ref = storage.file_ref(tmp_path / "a" / "b.bin")
    ref.write_bytes(b"x" * 10)
    assert ref.read_bytes() == b"x" * 10 and not list((tmp_path / "a").glob("*.partial"))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.file_ref(tmp_path / "missing.bin").read_bytes()
    mem = storage.file_ref("memory://rca-test/f.bin")
    mem.write_bytes(b"abc")
    assert mem.read_bytes() == b"abc" and mem.exists()


def test_store_and_demo_data_on_a_url(tmp_path):
    """A URL store and a URL data root: the demo set is generated once into the URL, read back image by image,
    and a worker (generate=False) that finds no tree there raises instead of generating one."""
    from rca_core.config import load_config
    from rca_core.data import make_dataset
    from rca_core.data.demo import DemoNotReadyError
    from rca_core.store import ArtifactStore, StoreError

    cfg = load_config(write_config(tmp_path, store="memory://rca-url/store", data={"root": "memory://rca-url/data"}))
    with pytest.raises(DemoNotReadyError, match="memory://rca-url/data"):
        make_dataset(cfg.data, "train", generate=False)
    ds = make_dataset(cfg.data, "train", progress=False)
    assert len(ds.ids) == cfg.data.demo.n_train
    img, mask = ds.image(ds.ids[0]), ds.mask(ds.ids[0])
    assert img.shape[:2] == mask.shape and img.dtype == np.uint8
    assert make_dataset(cfg.data, "val", generate=False).ids  # now it is there
    with pytest.raises(StoreError, match="not found from host"):
        ArtifactStore("memory://rca-url/no-store", create=False)
    out = ArtifactStore.for_config(cfg).stage("toy", "k").prepare(["m"])
    out.write("a", {"m": np.arange(6, dtype=np.uint8).reshape(2, 3)}, attrs={"classes": [1]})
    arr, attrs = out.read("a", "m")
    assert arr.tolist() == [[0, 1, 2], [3, 4, 5]] and attrs == {"classes": [1]}
    out.write_file("png/a.png", b"png bytes")
    assert out.read_file("png/a.png") == b"png bytes"


def test_local_weights_are_staged_into_a_remote_store_without_changing_stage_keys(tmp_path):
    import torch

    from rca_core.config import load_config, stage_weights
    from rca_core.stages.planning import plan

    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    cfg = load_config(write_config(tmp_path, store="memory://rca-stage/store",
                                   cam={"backbone": {"pretrained": str(weights)}}))
    staged = stage_weights(cfg)
    url = staged.cam.backbone.pretrained
    assert url.startswith("memory://rca-stage/store/_inputs/weights/") and url.endswith("/w.pth")
    from rca_core import storage

    assert storage.read_bytes(url) == weights.read_bytes()
    assert plan(staged)["cam_train"].fingerprint == plan(cfg)["cam_train"].fingerprint
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(weights.read_bytes())
    other = cfg.model_copy(deep=True)
    other.cam.backbone.pretrained = str(moved)
    assert plan(other)["cam_train"].fingerprint == plan(cfg)["cam_train"].fingerprint  # content, not path
    assert stage_weights(cfg.model_copy(update={"store": str(tmp_path / "local")})).cam.backbone.pretrained == str(weights)

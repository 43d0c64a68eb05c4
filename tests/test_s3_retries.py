"""Both S3 clients of the store under the one retry policy, through a fault-injecting proxy in front of a real S3
server (tests/harness/s3_faults.py on SeaweedFS): throttling, server errors and connections reset mid-body are
ridden out with nothing lost and every retry counted; a blackout longer than the deadline fails the request in
time, naming the endpoint and the last error."""
from __future__ import annotations

import time

import numpy as np
import pytest

from rca_core import object_io
from rca_core.object_io import RetryPolicy, StorageUnavailable
from rca_core.store import ArtifactStore


@pytest.fixture(scope="module")
def s3_faults(tmp_path_factory):
    from harness.s3_faults import S3Faults
    from harness.s3_server import SeaweedS3

    s3 = SeaweedS3(tmp_path_factory.mktemp("retry_s3"))
    s3.start()
    try:
        s3.make_bucket("retries")
        with S3Faults(s3, seed=11) as faults:
            yield faults
    finally:
        s3.kill()  # throwaway data: SIGKILL is immediate, where stop() waits out weed's ~15 s gRPC grace


@pytest.fixture
def faults(s3_faults, monkeypatch):
    for k, v in s3_faults.env.items():
        monkeypatch.setenv(k, v)
    old = object_io.policy()
    object_io.configure(RetryPolicy(retries=8, deadline_s=20.0, backoff_s=0.02, backoff_max_s=0.2),
                        s3_faults.endpoint)
    s3_faults.clear()
    s3_faults.wait_serving(timeout=30)  # a blackout left by the test before has ended
    s3_faults.reset()
    yield s3_faults
    s3_faults.clear()
    object_io.configure(old)


def _exercise(out, n: int = 30) -> dict:
    """Entries written and read back, listed, a manifest, a file and a whole array: what a stage does."""
    rng = np.random.default_rng(0)
    data = {f"img_{i:03d}": rng.integers(0, 255, (3, 40, 50), dtype=np.uint8) for i in range(n)}
    with out.write_behind():
        for i, arr in data.items():
            out.write(i, {"cam": arr}, attrs={"classes": [1, 2, 3]})
    assert sorted(out.listed_ids()) == sorted(data)
    for i, arr in data.items():
        got, attrs = out.read(i, "cam")
        assert np.array_equal(got, arr) and attrs["classes"] == [1, 2, 3], i
    out.write_manifest([{"image_id": i, "status": "done"} for i in data])
    assert sorted(out.manifest().column("image_id").to_pylist()) == sorted(data)
    out.write_file("model.bin", bytes(range(256)) * 4000)
    assert out.read_file("model.bin") == bytes(range(256)) * 4000
    out.put_array("prototypes", np.arange(60, dtype=np.float32).reshape(3, 20))
    assert np.array_equal(out.get_array("prototypes")[0], np.arange(60, dtype=np.float32).reshape(3, 20))
    return data


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_throttling_errors_and_resets_are_ridden_out_and_counted(faults, client):
    from harness.s3_faults import Fault

    faults.set(slowdown=0.15, internal_error=0.05, reset=Fault(0.05, methods=["GET"], cut=0.5))
    before = object_io.STATS.snapshot()
    out = ArtifactStore(f"s3://retries/{client}").stage("cam_infer", "abc")
    out.object_fast_path = client == "obstore"
    assert (out._entries.client() is not None) == (client == "obstore")
    out.prepare(["cam"])
    _exercise(out)
    got = object_io.stats_since(before)
    injected = faults.counters()
    faults_seen = injected["slowdown"] + injected["internal_error"] + injected["reset"]
    assert faults_seen >= 10, injected  # the rates did bite
    assert got["gave_up"] == 0 and got["retries"] == faults_seen, (got, injected)
    assert injected["upstream_errors"] == 0


def test_blackout_longer_than_the_deadline_fails_in_time_naming_endpoint_and_error(faults):
    object_io.configure(RetryPolicy(retries=100, deadline_s=3.0, backoff_s=0.05, backoff_max_s=0.5), faults.endpoint)
    out = ArtifactStore("s3://retries/blackout").stage("cam_infer", "abc").prepare(["cam"])
    out.write("img_000", {"cam": np.zeros((1, 4, 4), np.uint8)})
    faults.blackout(6.0)  # longer than the deadline and its margin
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable) as e:
        out.read("img_000", "cam")
    took = time.monotonic() - t0
    assert took < 3.0 + 2.0, took
    msg = str(e.value)
    assert faults.endpoint in msg and "last error:" in msg and "storage.timeout_s 3" in msg, msg


def test_file_objects_and_pyarrow_ride_out_faults_too(faults, tmp_path):
    """What Ray Train's checkpoints do (pyarrow over fsspec: copy a folder up, look it up, delete it) and s3fs's file
    objects (open(..., "wb") uploads, s3fs's `call_s3`): the same policy, every injected fault retried."""
    import pyarrow.fs as pafs

    from harness.s3_faults import Fault
    from rca_core import storage

    src = tmp_path / "checkpoint"
    src.mkdir()
    for i in range(4):
        (src / f"part-{i}.bin").write_bytes(bytes([i]) * 50_000)
    fs, _ = storage.filesystem("s3://retries/pyarrow")
    arrow = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    faults.set(slowdown=0.2, internal_error=0.05, reset=Fault(0.05, methods=["GET"], cut=0.5))
    before = object_io.STATS.snapshot()
    for n in range(6):
        dst = f"retries/pyarrow/checkpoint_{n}"
        pafs.copy_files(str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=arrow)
        assert arrow.get_file_info(dst).type == pafs.FileType.Directory
        with fs.open(f"{dst}/extra.bin", "wb") as f:  # s3fs's S3File: put_object through fs.call_s3
            f.write(b"x" * 10_000)
        assert fs.cat_file(f"{dst}/part-3.bin") == bytes([3]) * 50_000
        if n:
            arrow.delete_dir(f"retries/pyarrow/checkpoint_{n - 1}")
    # the objects left (SeaweedFS lists a folder emptied by a delete as a prefix still: count objects, not prefixes)
    assert sorted({p.split("/")[2] for p in fs.find("retries/pyarrow")}) == ["checkpoint_5"]
    got = object_io.stats_since(before)
    injected = faults.counters()
    faults_seen = injected["slowdown"] + injected["internal_error"] + injected["reset"]
    assert faults_seen >= 10, injected
    assert got["gave_up"] == 0 and got["retries"] == faults_seen, (got, injected)

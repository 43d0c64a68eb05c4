"""Smoke test of the real-process harness: a SeaweedFS S3 server and a two-node Ray cluster whose node 2 sees
none of the driver's files in a hidden directory, both nodes reaching S3 through the standard AWS_* env alone."""
from __future__ import annotations

import os
import threading
import time

import pytest

from harness.ray_cluster import IsolationUnavailable, TwoNodeCluster, check_isolation
from harness.s3_server import SeaweedS3
from harness._proc import group_alive

pytestmark = pytest.mark.slow


def _in_thread(fn):
    """Run fn() in a thread; returns a join() that re-raises fn's exception (bounded by `timeout`)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001  handed to the joiner
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout: float):
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{fn} still running after {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join


@pytest.mark.timeout(240)
def test_two_nodes_private_dirs_shared_s3(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    try:
        check_isolation([hidden])
    except IsolationUnavailable as e:
        pytest.skip(f"node 2 cannot get private mounts here: {e}")

    s3 = SeaweedS3(tmp_path / "s3")
    cluster = TwoNodeCluster(tmp_path / "ray", hidden_dirs=[hidden], head_cpus=1, node2_cpus=1, env=s3.env)
    timings: dict[str, float] = {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.monotonic()
    s3_started = _in_thread(s3.start)  # the S3 server comes up while the head does
    try:
        cluster.start()
        s3_started(timeout=70)
        timings["up_s"] = time.monotonic() - t0
        bucket = "harness-smoke"
        s3.make_bucket(bucket)
        (hidden / "driver.txt").write_text("written by the driver")

        ray.init(address=cluster.address, log_to_driver=False)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert alive == {cluster.head_id, cluster.node2_id}

        def probe(hidden_dir: str, key: str):
            import os

            import fsspec
            import ray

            node = ray.get_runtime_context().get_node_id()
            fs = fsspec.filesystem("s3", skip_instance_cache=True)  # only the AWS_* environment: no arguments
            payload = f"from {node}".encode()
            fs.pipe(key, payload)
            return {"node": node, "seen": os.path.exists(os.path.join(hidden_dir, "driver.txt")),
                    "listing": sorted(os.listdir(hidden_dir)), "s3_roundtrip": fs.cat(key) == payload,
                    "endpoint": os.environ.get("AWS_ENDPOINT_URL")}

        remote = ray.remote(num_cpus=0.5)(probe)
        refs = {name: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                .remote(str(hidden), f"{bucket}/{name}.txt")
                for name, node_id in (("head", cluster.head_id), ("node2", cluster.node2_id))}
        res = {name: ray.get(ref, timeout=60) for name, ref in refs.items()}
        assert res["head"]["node"] == cluster.head_id and res["node2"]["node"] == cluster.node2_id
        assert res["head"]["seen"] and res["head"]["listing"] == ["driver.txt"]
        assert not res["node2"]["seen"] and res["node2"]["listing"] == []
        for name in ("head", "node2"):
            assert res[name]["s3_roundtrip"] and res[name]["endpoint"] == s3.endpoint
            assert s3.filesystem().cat(f"{bucket}/{name}.txt") == f"from {res[name]['node']}".encode()
        assert (hidden / "driver.txt").read_text() == "written by the driver"  # the driver's view is intact

        t1 = time.monotonic()
        raylet = cluster.kill_node2_raylet()
        timings["node2_dead_s"] = cluster.wait_node_dead(cluster.node2_id, timeout=30)
        assert not os.path.exists(f"/proc/{raylet}/cmdline") or not open(f"/proc/{raylet}/cmdline").read()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
                n["NodeID"] == cluster.node2_id and n["Alive"] for n in ray.nodes()):
            time.sleep(0.2)
        assert not any(n["NodeID"] == cluster.node2_id and n["Alive"] for n in ray.nodes())
        assert cluster.node_alive(cluster.head_id)
        timings["kill_to_noticed_s"] = time.monotonic() - t1
    finally:
        ray.shutdown()
        try:
            s3_started(timeout=70)  # never stop it while another thread is still starting it
        except Exception:  # noqa: BLE001  already reported above, or the test failed earlier
            pass
        pids = cluster.pids()
        t2 = time.monotonic()
        s3_stopped = _in_thread(s3.stop)  # ~15 s of gRPC grace in the filer: overlap it with Ray's stop
        cluster.stop()
        s3_stopped(timeout=60)
        timings["down_s"] = time.monotonic() - t2

    assert pids and cluster.leftover_pids() == []
    assert not group_alive(s3.pid)
    assert not any(p.exists() for p in s3.grpc_socket_paths())
    print(f"\nharness timings: {timings}; cluster {cluster.timings}; s3 start {s3.start_s:.1f} s, "
          f"stop {s3.stop_s:.1f} s")

"""A config that asks for more than the Ray cluster holds fails at once, naming the key and what the cluster has,
instead of waiting forever for resources no node has (tasks/cluster_fit.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_config

RCA = str(Path(sys.executable).with_name("rca"))


@pytest.fixture(scope="module")
def ray_2cpu():
    """A real local Ray of 2 CPUs, no GPU: the machine of the issue."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(tmp_path, **ray_over):
    from rca_core.config import load_config

    return load_config(write_config(tmp_path / "run", ray=ray_over))


def _all_stages(cfg):
    from rca_core.stages.planning import run_order

    return run_order(cfg, None)


def test_voc12_training_workers_on_two_cpus(ray_2cpu, tmp_path):
    """configs/voc12.yaml's 4 training workers on a 2-CPU cluster: every training stage is named, with the key."""
    from tasks.cluster_fit import ClusterTooSmall, check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=4)
    with pytest.raises(ClusterTooSmall) as e:
        check_cluster_fits(cfg, _all_stages(cfg))
    msg = str(e.value)
    assert "2 CPUs, 0 GPUs on 1 node(s)" in msg, msg
    for stage in ("cam_train", "affinity_train", "seg_train"):
        assert f"{stage}: ray.num_workers 4 x (1 CPU (ray.cpus_per_worker))" in msg, msg
        assert "holds 2 at once, not 4" in msg
    for stage in ("cam_infer", "crf_labels", "random_walk"):  # one 1-CPU actor fits: not named
        assert f"{stage}:" not in msg, msg
    assert "ray.resource_wait_s" in msg  # how an autoscaling cluster waits instead


def test_fitting_config_passes(ray_2cpu, tmp_path):
    from tasks.cluster_fit import check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=2)
    check_cluster_fits(cfg, _all_stages(cfg))  # no error


def test_actor_wider_than_any_node(ray_2cpu, tmp_path):
    from tasks.cluster_fit import ClusterTooSmall, check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=1, cpus_per_worker=3, train_cpus_per_worker=2)
    with pytest.raises(ClusterTooSmall) as e:
        check_cluster_fits(cfg, _all_stages(cfg))
    msg = str(e.value)
    assert "crf_labels: one actor of 3 CPU (ray.cpus_per_worker): no node holds one" in msg, msg
    assert "cam_train:" not in msg  # its workers take ray.train_cpus_per_worker (2): fits


def test_gpu_asked_of_a_cpu_cluster(ray_2cpu, tmp_path):
    from tasks.cluster_fit import ClusterTooSmall, check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=1, gpus_per_worker=1)
    with pytest.raises(ClusterTooSmall) as e:
        check_cluster_fits(cfg, _all_stages(cfg))
    msg = str(e.value)
    assert "cam_train: ray.num_workers 1 x (1 CPU (ray.cpus_per_worker) + 1 GPU (ray.gpus_per_worker))" in msg, msg
    assert "cam_infer: one actor of 1 CPU (ray.cpus_per_worker) + 1 GPU (ray.gpus_per_worker): no node holds one" \
        in msg, msg
    assert "crf_labels:" not in msg  # a CPU stage asks no GPU


def test_wait_for_an_autoscaler_then_fail(ray_2cpu, tmp_path):
    """ray.resource_wait_s: the autoscaler is asked for the bundles and the check waits (bounded) for nodes."""
    from tasks.cluster_fit import ClusterTooSmall, check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=3, resource_wait_s=2)
    with pytest.raises(ClusterTooSmall) as e:
        check_cluster_fits(cfg, ["cam_train"])
    assert "after waiting 2 s (ray.resource_wait_s)" in str(e.value)


def test_complete_stages_are_not_checked(ray_2cpu, tmp_path):
    """A stage already in the store needs no resources: a rerun with more workers than the cluster holds finds
    it complete."""
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore
    from tasks.cluster_fit import check_cluster_fits

    cfg = _cfg(tmp_path, num_workers=4)
    out = ArtifactStore.for_config(cfg).stage("cam_train", plan(cfg)["cam_train"].fingerprint)
    out.prepare(())
    out.mark_complete({"note": "made by the test"})
    check_cluster_fits(cfg, ["cam_train", "cam_infer"])  # no error


def test_rca_run_fails_in_seconds_naming_the_key(prefect_server, tmp_path):
    """`rca run` with more training workers than this machine has CPUs: exit 1 before any stage, the message on
    the console, nothing computed."""
    n = (os.cpu_count() or 1) * 8
    cfg = write_config(tmp_path / "run")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    r = subprocess.run([RCA, "run", "-c", str(cfg), "--set", f"ray.num_workers={n}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "the Ray cluster is too small for this config" in r.stderr, out
    assert f"cam_train: ray.num_workers {n} x (1 CPU (ray.cpus_per_worker))" in r.stderr, out
    assert "Traceback" not in r.stderr
    store = tmp_path / "run" / "store"
    done = list(store.glob("**/_complete.json"))
    assert not done, done

"""Orchestration with real Prefect (a local server) and real Ray: end to end, resume after kill -9,
a killed Ray worker. (Two nodes that share no disk, with the store on S3: tests/test_cluster_s3.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_stages, rca_run, write_config
import prefect_api
from harness.slowdown import slowdown_env

pytestmark = pytest.mark.slow
PER_IMAGE = ["memory_build", "cam_infer", "crf_labels", "random_walk", "seg_eval"]


def per_image_outputs(config: Path, stages=PER_IMAGE) -> dict[str, bytes]:
    """Every per-image array of the per-image stages, as raw bytes (+ its attrs), keyed by stage/field/id."""
    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    cfg = load_config(config)
    store = ArtifactStore(cfg.store)
    out = {}
    for name, p in plan(cfg).items():
        if name not in stages:
            continue
        st = store.stage(name, p.fingerprint)
        assert st.is_complete(), f"{name} not complete"
        for field in st.fields:
            for image_id in st.listed_ids(field):
                arr, attrs = st.read(image_id, field)
                out[f"{name}/{field}/{image_id}"] = arr.tobytes() + repr(sorted(attrs.items())).encode()
    return out


def test_pipeline_end_to_end_visible_in_prefect(reference_run, prefect_server):
    assert reference_run["rc"] == 0, reference_run["stdout"][-3000:]
    out = reference_run["stdout"]
    for stage in ["cam_train", "cam_infer", "crf_labels", "random_walk", "seg_train", "seg_eval"]:
        assert stage in out
    assert "outputs: artifact store" in out
    runs = [r for r in prefect_api.flow_runs(prefect_server, "rca-pipeline")
            if prefect_api.created_ts(r) >= reference_run["t0"] - 1]
    runs = sorted(runs, key=prefect_api.created_ts)[:1]  # the reference run: the first one after its start
    assert runs and runs[0]["state"]["type"] == "COMPLETED"
    stage_runs = prefect_api.flow_runs(prefect_server, "rca-stage-cam-infer")
    assert any(r["state"]["type"] == "COMPLETED" for r in stage_runs)
    tasks = prefect_api.task_runs_since(prefect_server, reference_run["t0"])
    names = {t["name"] for t in tasks if t["state"]["type"] == "COMPLETED"}
    assert {"cam_train", "cam_infer", "random_walk", "seg_eval"} <= names
    arts = prefect_api.artifacts(prefect_server, "rca-metrics")
    assert any(a["flow_run_id"] == runs[0]["id"] for a in arts)
    table = [a for a in arts if a["flow_run_id"] == runs[0]["id"]][0]["data"]
    assert "seg_eval" in str(table) and "cam_eval" in str(table)
    progress = prefect_api.artifacts(prefect_server, "rca-crf-labels-progress")
    assert progress and progress[0]["data"] == 100.0


def test_resume_after_kill9_mid_stage(reference_run, prefect_server, tmp_path):
    """kill -9 of the flow process (and its local Ray) in the middle of the random-walk stage; the
    re-run takes over the dead run's stage lease at once, shows finished stages as Cached, recomputes only
    unfinished images, and ends with outputs
    byte-identical to the uninterrupted reference run. To keep CI short the killed run starts from a
    store holding copies of the reference's stages before random_walk (same fingerprints)."""
    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    assert reference_run["rc"] == 0
    ref_cfg = load_config(reference_run["config"])
    cfg_path = write_config(tmp_path / "killed")
    cfg = load_config(cfg_path)
    copy_stages(ref_cfg, cfg, ["cam_train", "memory_build", "cam_infer", "cam_eval", "crf_labels", "affinity_train"])
    rw = ArtifactStore(cfg.store).stage("random_walk", plan(cfg)["random_walk"].fingerprint)
    p = rca_run(cfg_path, prefect_server, slowdown_env(tmp_path, image_delay=0.4),  # slow per-image work down
                args=["--stage", "random_walk"])
    n = cfg.data.demo.n_train
    deadline = time.time() + 900
    killed_with = None
    while time.time() < deadline and p.poll() is None:
        if rw.fields:
            done = rw.listed_ids()
            if 2 <= len(done) < n - 2:
                os.killpg(p.pid, signal.SIGKILL)  # the flow process and its local Ray, like a lost node
                killed_with = len(done)
                break
        time.sleep(0.1)
    p.wait(timeout=60)
    assert killed_with is not None, "never caught the random_walk stage in the middle: " + (p.stdout.read() or "")[-2000:]
    assert not rw.is_complete()
    t_resume = time.time()
    p2 = rca_run(cfg_path, prefect_server, args=["--stage", "random_walk"])
    stdout, _ = p2.communicate(timeout=900)
    assert p2.returncode == 0, stdout[-3000:]
    # the killed driver's lease is still in the store, far from expiry: its process is gone, so it is taken over
    # at once (no wait of lease.ttl_s)
    assert "random_walk: took over the lease of run" in stdout and "its process is gone" in stdout, stdout[-3000:]
    assert "waiting for another run" not in stdout, stdout[-3000:]
    summary = rw.summary()
    assert 0 < summary["recomputed_images"] <= n - killed_with
    tasks = {t["name"]: t["state"]["name"] for t in prefect_api.task_runs_since(prefect_server, t_resume)}
    for finished in ["cam_train", "memory_build", "cam_infer", "crf_labels", "affinity_train"]:
        assert tasks.get(finished) == "Cached", tasks
    assert tasks.get("random_walk") == "Completed"
    assert sorted(rw.manifest().column("image_id").to_pylist()) == sorted(f"train_{i:05d}" for i in range(n))
    done = ["memory_build", "cam_infer", "crf_labels", "random_walk"]
    assert per_image_outputs(cfg_path, done) == per_image_outputs(reference_run["config"], done)


def _kill_one_shard_worker(stop: threading.Event, killed: list) -> None:
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::StageActor" in cmd:
                time.sleep(0.5)  # let it get into its shard
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                except ProcessLookupError:
                    continue
                return
        time.sleep(0.05)


def test_ray_worker_killed_mid_stage(reference_run, tmp_path, monkeypatch):
    """A Ray worker process killed during a per-image stage: the stage completes, same outputs."""
    import ray

    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore
    from tasks.per_image import run_per_image_stage

    assert reference_run["rc"] == 0
    ref_cfg = load_config(reference_run["config"])
    cfg = ref_cfg.model_copy(update={"store": str(tmp_path / "store")})
    copy_stages(ref_cfg, cfg, ["cam_train", "memory_build", "cam_infer"])
    for k, v in slowdown_env(tmp_path, image_delay=0.2).items():  # for the workers of the Ray started below
        monkeypatch.setenv(k, v)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        stop, killed = threading.Event(), []
        th = threading.Thread(target=_kill_one_shard_worker, args=(stop, killed), daemon=True)
        th.start()
        summary = run_per_image_stage("crf_labels", cfg, cfg.store)
        stop.set()
    finally:
        ray.shutdown()
    assert killed, "no worker was killed"
    assert summary["images"] == ref_cfg.data.demo.n_train
    fp = plan(cfg)["crf_labels"].fingerprint
    new, ref = ArtifactStore(cfg.store).stage("crf_labels", fp), ArtifactStore(ref_cfg.store).stage("crf_labels", fp)
    for image_id in ref.listed_ids():
        a, b = new.read(image_id, "crf_label")[0], ref.read(image_id, "crf_label")[0]
        assert np.array_equal(a, b), image_id

"""Per-image stages on a pool of Ray actors (real local Ray): resources per stage, models built once per actor,
balanced shards, and a driver that reads no image during a stage."""
from __future__ import annotations

import pytest

from conftest import copy_stages, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory):
    """The tiny config run locally up to cam_infer: the inputs of the stages below."""
    import torch

    from rca_core.config import load_config
    from rca_core.stages.local import run_stage

    torch.set_num_threads(1)
    cfg = load_config(write_config(tmp_path_factory.mktemp("actors_base"), ray={"shard_size": 4}))
    run_stage("cam_infer", cfg, show_progress=False)
    return cfg


@pytest.fixture
def ray_with_a_gpu():
    """A local Ray that says it has one GPU (there is none: torch still runs on the CPU), 2 CPUs."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        from tasks.actor_pool import release_pools

        release_pools()
        ray.shutdown()


def fresh_copy(cam_run, tmp_path, stages, **ray_overrides):
    cfg = cam_run.model_copy(update={"store": str(tmp_path / "store")}, deep=True)
    for k, v in ray_overrides.items():
        setattr(cfg.ray, k, v)
    copy_stages(cam_run, cfg, stages)
    return cfg


def test_balanced_shards():
    from tasks.actor_pool import balanced_shards

    ids = [str(i) for i in range(400)]
    shards = balanced_shards(ids, 64, 2)
    assert len(shards) == 8 and {len(s) for s in shards} == {50}
    assert [i for s in shards for i in s] == ids
    odd = balanced_shards(ids[:25], 4, 3)
    assert len(odd) % 3 == 0 and max(map(len, odd)) - min(map(len, odd)) <= 1 and max(map(len, odd)) <= 4
    assert balanced_shards(ids[:2], 64, 4) == [["0"], ["1"]]


def test_gpu_request_per_stage_and_one_build_per_actor(cam_run, tmp_path, ray_with_a_gpu):
    """cam_infer's actors ask for the configured GPU share and get it; crf_labels' actors ask for none. Each
    actor builds the stage's models once, however many shards it runs."""
    from tasks.per_image import run_per_image_stage

    cfg = fresh_copy(cam_run, tmp_path, ["cam_train", "memory_build"], gpus_per_worker=0.5)
    cam = run_per_image_stage("cam_infer", cfg, cfg.store)
    assert cam["actor_resources"] == {"CPU": 1.0, "GPU": 0.5}
    assert cam["assigned_gpus"] == [0.5]
    assert cam["shards"] > cam["actors"] == 2 and cam["worker_builds"] == cam["actors"]
    crf = run_per_image_stage("crf_labels", cfg, cfg.store)
    assert crf["actor_resources"] == {"CPU": 1.0, "GPU": 0.0} and crf["assigned_gpus"] == [0.0]
    assert crf["shards"] > crf["actors"] and crf["worker_builds"] == crf["actors"]


def test_driver_reads_no_image_during_a_stage(cam_run, tmp_path, ray_with_a_gpu, monkeypatch):
    """The driver of a per-image stage reads no per-image array, image or mask: workers verify, compute and
    score; the driver merges what they return (so its reads do not grow with the number of images)."""
    from rca_core.data.voc import VOCDataset
    from rca_core.store import StageOutput
    from tasks.per_image import run_per_image_stage

    cfg = fresh_copy(cam_run, tmp_path, ["cam_train", "memory_build", "cam_infer"])
    reads = []
    for cls, name in ((StageOutput, "_read_checked"), (VOCDataset, "_read_image"), (VOCDataset, "_read_mask")):
        orig = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append((_n, a)), _o(self, *a, **k))[1])
    for stage in ("cam_eval", "crf_labels"):
        summary = run_per_image_stage(stage, cfg, cfg.store)
        assert summary["images"] > 0
    assert reads == [], reads[:5]
    # and the scores came back from the workers
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    out = ArtifactStore(cfg.store).stage("crf_labels", plan(cfg)["crf_labels"].fingerprint)
    s = out.summary()
    assert s["metrics"]["images"] == cfg.data.demo.n_train and 0 < s["metrics"]["miou_all"] <= 1
    # a fresh stage found nothing listed (its workers read no entry of their own before computing); run again
    # after its completion is cleared, it lists every image, the workers verify and keep them all
    assert s["listed_at_start"] == 0 and s["recomputed_images"] == s["images"]
    out.clear_complete()
    again = run_per_image_stage("crf_labels", cfg, cfg.store)
    assert again["listed_at_start"] == again["images"] == s["images"] and again["recomputed_images"] == 0
    assert again["metrics"]["miou_all"] == s["metrics"]["miou_all"]


@pytest.fixture
def ray_two_cpus(request, tmp_path):
    """A local Ray with 2 CPUs and no GPU; its workers wait the test's marker (seconds) after every training
    checkpoint (tests/harness/slowdown.py)."""
    import ray

    from harness.slowdown import slowdown_env

    delay = getattr(request, "param", None)
    env = {"env_vars": slowdown_env(tmp_path, epoch_delay=delay)} if delay else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        yield ray
    finally:
        from tasks.actor_pool import release_pools

        release_pools()
        ray.shutdown()


def _pids(cfg, stage) -> set[int]:
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    out = ArtifactStore(cfg.store).stage(stage, plan(cfg)[stage].fingerprint)
    return set(out.manifest().column("pid").to_pylist())


def _stage(cfg, name):
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    return ArtifactStore(cfg.store).stage(name, plan(cfg)[name].fingerprint)


def test_one_worker_training_runs_on_the_pool_which_lives_on(cam_run, tmp_path, ray_two_cpus):
    """A one-worker CPU training stage runs in one of the run's pooled actors (no new worker process): the
    pool's two 1-CPU actors hold its 2 CPUs; the per-image stage after it runs on the same processes, and the
    trained weights are those of the same stage run in a plain loop."""
    import torch

    from rca_core.stages.local import run_stage
    from rca_core.train_utils import load_torch
    from tasks.per_image import run_per_image_stage
    from tasks.training import run_training_stage

    cfg = fresh_copy(cam_run, tmp_path, ["cam_train", "memory_build", "cam_infer"], num_workers=1,
                     train_cpus_per_worker=2.0)
    crf = run_per_image_stage("crf_labels", cfg, cfg.store)
    pool = _pids(cfg, "crf_labels")
    assert crf["actors"] == len(pool) == 2
    aff = run_training_stage("affinity_train", cfg, cfg.store)
    assert aff["train_mode"] == "pool" and aff["host_actors"] == 2, aff
    host = _stage(cfg, "affinity_train").read_table("workers").column("pid").to_pylist()
    assert len(host) == 1 and host[0] in pool
    rw = run_per_image_stage("random_walk", cfg, cfg.store)
    assert _pids(cfg, "random_walk") == pool and rw["worker_builds"] == rw["actors"] == 2

    plain = fresh_copy(cam_run, tmp_path / "plain", ["cam_train", "memory_build", "cam_infer"])
    copy_stages(cfg, plain, ["crf_labels"])
    run_stage("affinity_train", plain, with_upstream=False, show_progress=False)
    a, b = (load_torch(_stage(c, "affinity_train").file("model.pt")) for c in (cfg, plain))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "pool-trained weights differ"


@pytest.mark.parametrize("ray_two_cpus", [3], indirect=True)
def test_lost_pooled_actor_mid_training_goes_on_as_a_task_from_its_checkpoint(cam_run, tmp_path, ray_two_cpus):
    """The pooled actor that trains is SIGKILLed after its first checkpoint: the stage goes on as a Ray task,
    which resumes from that checkpoint (no finished epoch redone) and completes."""
    import json
    import os
    import signal
    import threading
    import time

    from tasks.per_image import run_per_image_stage
    from tasks.training import run_training_stage

    cfg = fresh_copy(cam_run, tmp_path, ["cam_train", "memory_build", "cam_infer"], num_workers=1,
                     train_cpus_per_worker=2.0)
    cfg.refine.affinity.epochs = 3
    run_per_image_stage("crf_labels", cfg, cfg.store)
    out = _stage(cfg, "affinity_train")
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(run_training_stage("affinity_train", cfg, cfg.store)))
    th.start()
    deadline = time.time() + 180
    while not (out.has_file("checkpoint.pt") and out.has_file("workers/rank-0.json")):
        assert time.time() < deadline and th.is_alive(), "no first checkpoint within 180 s"
        time.sleep(0.2)
    pid = json.loads(out.read_file("workers/rank-0.json"))["pid"]
    assert pid in _pids(cfg, "crf_labels")  # a pooled actor: one this test's Ray started
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=300)
    assert not th.is_alive(), "the stage did not finish within 300 s"
    assert result["train_mode"] == "pool, then task" and "host_lost" in result, result
    assert result["resumed_from_epoch"] is not None and result["resumed_from_epoch"] >= 1, result
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]

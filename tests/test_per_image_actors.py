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
    from rca_core.stages import run_stage

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
        from tasks.per_image import release_pools

        release_pools()
        ray.shutdown()


def fresh_copy(cam_run, tmp_path, stages, **ray_overrides):
    cfg = cam_run.model_copy(update={"store": str(tmp_path / "store")}, deep=True)
    for k, v in ray_overrides.items():
        setattr(cfg.ray, k, v)
    copy_stages(cam_run, cfg, stages)
    return cfg


def test_balanced_shards():
    from tasks.per_image import balanced_shards

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
    from rca_core.stages import plan
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

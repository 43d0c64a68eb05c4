"""seg_train: a tiny training run lowers the loss, resumes from its checkpoint to the same weights as an
uninterrupted run, trains from stored pseudo-masks, and names what is missing."""
from pathlib import Path

import numpy as np
import pytest
import torch

from rca_core.config import load_config
from rca_core.stages.context import make_context
from rca_core.stages.planning import plan
from rca_core.stages.local import run_stage
from rca_core.stages import seg_train
from rca_core.store import ArtifactStore

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_cfg(tmp_path, **seg):
    over = {"store": str(tmp_path / "store"), "data": {"root": str(tmp_path.parent / "seg_tiny_data")},
            "compute": {"device": "cpu", "threads": 1},
            "segmenter": {"labels": "gt", "width": 8, "epochs": 3, "batch_size": 8, "crop_size": 48,
                          "optimizer": "adamw", "lr": 0.003, "lr_mult_head": 1.0, **seg}}
    return load_config(TINY, over)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_tiny_training_lowers_the_loss_and_writes_a_predictable_model(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, epochs=4)
    s = run_stage("seg_train", cfg, show_progress=False)
    assert s["epochs_done"] == 4 and s["steps"] == s["max_steps"] == 4 * 3  # 24 images / batch 8
    losses = s["epoch_losses"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    obj = torch.load(s["model"], map_location="cpu", weights_only=True)
    assert obj["meta"]["arch"] == "small" and obj["meta"]["num_classes"] == 4
    assert obj["meta"]["class_names"] == ["background", "disc", "square", "triangle"]
    table = ArtifactStore(cfg.store).stage("seg_train", plan(cfg)["seg_train"].fingerprint).read_table("epochs")
    assert table.column("epoch").to_pylist() == [1, 2, 3, 4]


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    cfg_a = tiny_cfg(tmp_path / "a")
    full = run_stage("seg_train", cfg_a, show_progress=False)

    cfg_b = tiny_cfg(tmp_path / "b")
    store = ArtifactStore(cfg_b.store)

    def crash_after_first_epoch(done, total):  # progress comes per step: 3 steps per epoch
        if done == 4:
            raise KeyboardInterrupt("simulated kill in epoch 2, after epoch 1's checkpoint")

    ctx = make_context("seg_train", cfg_b, store, progress=crash_after_first_epoch)
    ctx.out.prepare(())
    with pytest.raises(KeyboardInterrupt):
        seg_train.train(cfg_b, ctx)
    ck = torch.load(ctx.out.file(seg_train.CHECKPOINT).path, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 3
    assert not Path(ctx.out.file(seg_train.MODEL_FILE).path).exists()

    resumed = run_stage("seg_train", cfg_b, store, show_progress=False)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_done"] == 3 and resumed["steps"] == 9
    assert resumed["epoch_losses"][0] == pytest.approx(full["epoch_losses"][0])
    wa, wb = weights(full["model"]), weights(resumed["model"])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k


def test_trains_on_stored_pseudo_masks_and_refuses_without_them(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, labels="pseudo", epochs=1)
    store = ArtifactStore(cfg.store)
    plans = plan(cfg)
    rw = store.stage("random_walk", plans["random_walk"].fingerprint).prepare(["pseudo_mask"])
    ctx = make_context("seg_train", cfg, store, plans)
    for i in ctx.ids:  # "pseudo-masks" that ignore every pixel: the loss must be exactly 0 (the GT gives > 1)
        rw.write(i, {"pseudo_mask": np.full(ctx.dataset.size(i), 255, np.uint8)})
    ctx.out.prepare(())
    s = seg_train.train(cfg, ctx)
    assert s["labels"] == "pseudo" and s["steps"] == 3
    assert s["epoch_losses"] == [0.0]

    Path(ctx.out.file(seg_train.CHECKPOINT).path).unlink()  # start afresh
    rw.write(ctx.ids[0], {"pseudo_mask": np.zeros((5, 5), np.uint8)})  # wrong size for its image
    with pytest.raises(ValueError, match=f"mask of image {ctx.ids[0]}"):
        seg_train.train(cfg, ctx)

    ctx.inputs = {}
    with pytest.raises(RuntimeError, match="random_walk"):
        seg_train.train(cfg, ctx)


def test_augmentation_is_deterministic_and_pads_with_ignore():
    img = np.full((20, 30, 3), 200, np.uint8)
    mask = np.ones((20, 30), np.uint8)
    ds = seg_train.SegTrainSet(["a"], lambda i: img, lambda i: mask, crop_size=40, scale_range=(0.5, 1.0), seed=3)
    x1, y1 = ds[0]
    x2, y2 = ds[0]
    assert x1.shape == (3, 40, 40) and y1.shape == (40, 40) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(torch.unique(y1).tolist()) == {1, 255}  # the image was smaller than the crop: padded with 255
    bad = seg_train.SegTrainSet(["b"], lambda i: img, lambda i: mask[:10], crop_size=16, scale_range=(1, 1))
    with pytest.raises(ValueError, match="mask of image b"):
        bad[0]

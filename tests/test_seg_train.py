"""seg_train: a tiny training run lowers the loss, resumes from its checkpoint (also one written by an earlier
version of the stage) to the same weights as an uninterrupted run, counts max_seconds over every call of a resumed
run, puts its training curve in the run report, trains from stored pseudo-masks, and names what is missing."""
import logging
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


def test_tiny_training_lowers_the_loss_and_writes_a_predictable_model(tmp_path, caplog):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, epochs=4)
    with caplog.at_level(logging.INFO, logger="rca.train"):
        s = run_stage("seg_train", cfg, show_progress=False)
    assert s["epochs_done"] == 4 and s["steps"] == s["max_steps"] == 4 * 3  # 24 images / batch 8
    losses = s["epoch_losses"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    obj = torch.load(s["model"], map_location="cpu", weights_only=True)
    assert obj["meta"]["arch"] == "small" and obj["meta"]["num_classes"] == 4
    assert obj["meta"]["class_names"] == ["background", "disc", "square", "triangle"]
    table = ArtifactStore(cfg.store).stage("seg_train", plan(cfg)["seg_train"].fingerprint).read_table("history")
    assert table.column("epoch").to_pylist() == [1, 2, 3, 4]
    assert table.column("loss").to_pylist() == pytest.approx(losses)
    assert [r.getMessage().split(":")[0] for r in caplog.records if "epoch" in r.getMessage()] == \
        [f"seg_train epoch {e}/4" for e in (1, 2, 3, 4)]  # the per-epoch log line (logging, rank 0)


def test_the_run_report_shows_the_segmenter_training_curve(tmp_path, monkeypatch):
    from rca_core import report

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, epochs=2)
    s = run_stage("seg_train", cfg, show_progress=False)
    plotted = {}
    curves = report._curves

    def spy(histories, cam_curve, path):
        plotted.update(histories)
        return curves(histories, cam_curve, path)

    monkeypatch.setattr(report, "_curves", spy)
    page = report.write_report(cfg.store, tmp_path / "report", cfg)
    rows = plotted["seg_train"]  # what the report reads from the store for the segmenter's curve
    assert [r["epoch"] for r in rows] == [1, 2] and [r["loss"] for r in rows] == pytest.approx(s["epoch_losses"])
    assert "Training curves" in Path(page).read_text() and (tmp_path / "report" / "curves.png").exists()
    # an output of the same stage key written before the table was named "history" (it was "epochs")
    out = ArtifactStore(cfg.store).stage("seg_train", plan(cfg)["seg_train"].fingerprint)
    out.write_table("epochs", [{k: r[k] for k in ("epoch", "loss", "lr", "steps", "seconds")} for r in rows])
    Path(out.store.loc.join(out.key, "tables", "history.parquet")).unlink()
    plotted.clear()
    report.write_report(cfg.store, tmp_path / "report2", cfg)
    assert [r["epoch"] for r in plotted["seg_train"]] == [1, 2]


def crash_in_epoch_2(done, total):  # progress comes per step: 3 steps per epoch
    if done == 4:
        raise KeyboardInterrupt("simulated kill in epoch 2, after epoch 1's checkpoint")


@pytest.mark.parametrize("checkpoint_format", ["current", "earlier"])
def test_resume_after_interruption_gives_the_same_weights(tmp_path, checkpoint_format):
    torch.set_num_threads(1)
    cfg_a = tiny_cfg(tmp_path / "a")
    full = run_stage("seg_train", cfg_a, show_progress=False)

    cfg_b = tiny_cfg(tmp_path / "b")
    store = ArtifactStore(cfg_b.store)

    ctx = make_context("seg_train", cfg_b, store, progress=crash_in_epoch_2)
    ctx.out.prepare(())
    with pytest.raises(KeyboardInterrupt):
        seg_train.train(cfg_b, ctx)
    ck = torch.load(ctx.out.file(seg_train.CHECKPOINT).path, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 3
    assert not Path(ctx.out.file(seg_train.MODEL_FILE).path).exists()
    if checkpoint_format == "earlier":  # the extra keys the stage's own loop wrote before the shared loop
        ck["extra"] = {k: ck["extra"][k] for k in ("meta", "history", "max_steps")}
        for row in ck["extra"]["history"]:
            del row["global_step"]
        torch.save(ck, ctx.out.file(seg_train.CHECKPOINT).path)

    resumed = run_stage("seg_train", cfg_b, store, show_progress=False)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_done"] == 3 and resumed["steps"] == 9
    assert resumed["epoch_losses"][0] == pytest.approx(full["epoch_losses"][0])
    wa, wb = weights(full["model"]), weights(resumed["model"])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    table = ArtifactStore(cfg_b.store).stage("seg_train", plan(cfg_b)["seg_train"].fingerprint).read_table("history")
    assert table.column("epoch").to_pylist() == [1, 2, 3]


def test_max_seconds_counts_the_time_of_earlier_calls(tmp_path):
    """max_seconds is a budget for the whole training, not for each call: a run resumed from a checkpoint
    whose recorded training time is already over it trains no further (and still writes its segmenter)."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, max_seconds=1000.0)  # far more than these runs take
    ctx = make_context("seg_train", cfg, ArtifactStore(cfg.store), progress=crash_in_epoch_2)
    ctx.out.prepare(())
    with pytest.raises(KeyboardInterrupt):
        seg_train.train(cfg, ctx)
    path = ctx.out.file(seg_train.CHECKPOINT).path
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 3
    ck["extra"]["elapsed"] = 1500.0  # as if the earlier calls had trained for 25 minutes
    torch.save(ck, path)
    ctx.progress = None
    s = seg_train.train(cfg, ctx)
    assert s["stopped_early"] and s["finished"] and s["steps"] == 3 and s["epochs_done"] == 1
    assert s["train_seconds"] >= 1500.0
    obj = torch.load(s["model"], map_location="cpu", weights_only=True)
    assert obj["steps"] == 3 and [h["epoch"] for h in obj["history"]] == [1]


def test_max_seconds_stop_is_checkpointed_and_final(tmp_path):
    """A run that spends its budget saves the epoch it stopped in; calling it again trains no further."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, max_seconds=1e-6)  # spent after the first step
    ctx = make_context("seg_train", cfg, ArtifactStore(cfg.store))
    ctx.out.prepare(())
    s = seg_train.train(cfg, ctx)
    assert s["stopped_early"] and s["steps"] == 1 and s["epoch_losses"] and len(s["history"]) == 1
    ck = torch.load(ctx.out.file(seg_train.CHECKPOINT).path, map_location="cpu", weights_only=True)
    assert ck["step"] == 1 and ck["extra"]["stopped_early"] and ck["extra"]["finished"]
    again = seg_train.train(cfg, ctx)
    assert again["steps"] == 1 and again["stopped_early"] and again["resumed_from_epoch"] == 1


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

"""seg_eval: per-image predictions in the store, mIoU from them, multi-scale + flip + CRF path."""
from pathlib import Path

import numpy as np
import pytest
import torch

from rca_core.config import load_config
from rca_core.metrics import ConfusionMatrix
from rca_core.stages.context import make_context
from rca_core.stages.planning import plan
from rca_core.stages.local import run_stage
from rca_core.store import ArtifactStore

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_cfg(tmp_path, **seg):
    over = {"store": str(tmp_path / "store"), "data": {"root": str(tmp_path.parent / "seg_eval_data")},
            "compute": {"device": "cpu", "threads": 1},
            "segmenter": {"labels": "gt", "width": 8, "epochs": 4, "batch_size": 8, "crop_size": 48,
                          "optimizer": "adamw", "lr": 0.003, "lr_mult_head": 1.0, **seg}}
    return load_config(TINY, over)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("seg_eval")
    cfg = tiny_cfg(tmp_path)
    return tmp_path, cfg, run_stage("seg_eval", cfg, show_progress=False)


def test_eval_scores_the_stored_predictions(evaluated):
    _, cfg, s = evaluated
    store = ArtifactStore(cfg.store)
    out = store.stage("seg_eval", plan(cfg)["seg_eval"].fingerprint)
    ctx = make_context("seg_eval", cfg, store)
    cm = ConfusionMatrix(4, "all")
    for i in ctx.ids:
        pred, _ = out.read(i, "pred")
        assert pred.dtype == np.uint8 and pred.shape == ctx.dataset.size(i) and pred.max() < 4
        cm.update(pred, ctx.dataset.mask(i))
    res = cm.compute()
    assert s["images"] == len(ctx.ids) == 8
    assert s["miou"] == pytest.approx(res["miou"])
    assert set(s["iou"]) == {"background", "disc", "square", "triangle"}
    assert s["iou"]["background"] > 0.5  # 4 epochs on ground truth: background is learnt
    assert out.read_table("per_class").num_rows == 4
    assert out.get_array("confusion")[0].sum() == cm.mat.sum()


def test_multiscale_flip_crf_evaluation_reuses_the_trained_model(evaluated):
    tmp_path, cfg, _ = evaluated
    cfg2 = tiny_cfg(tmp_path, eval_scales=[1.0, 0.75], eval_flip=True, eval_crf=True)
    p1, p2 = plan(cfg), plan(cfg2)
    # the eval-only switches do not change the training stage's key: the trained model is reused
    assert p1["seg_train"].fingerprint == p2["seg_train"].fingerprint
    assert p1["seg_eval"].fingerprint != p2["seg_eval"].fingerprint
    s2 = run_stage("seg_eval", cfg2, show_progress=False)
    assert ArtifactStore(cfg.store).stage("seg_train", p1["seg_train"].fingerprint).summary()["epochs_done"] == 4
    assert s2["eval_crf"] and s2["eval_flip"] and s2["eval_scales"] == [1.0, 0.75]
    assert 0.0 <= s2["miou"] <= 1.0 and s2["images"] == 8
    # the plain single-scale figure is reported beside the paper's protocol, and equals the plain evaluation
    _, _, s1 = evaluated
    assert "miou_single_scale" not in s1
    assert s2["miou_single_scale"] == pytest.approx(s1["miou"])

"""Metrics against a brute-force per-pixel computation, both protocols, with ignore pixels."""
import numpy as np
import pytest

from rca_core.metrics import ConfusionMatrix, PseudoMaskScore


def brute_force(preds, gts, n, protocol):
    tp = np.zeros(n); fp = np.zeros(n); fn = np.zeros(n)
    valid = kept = 0
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g == 255:
                continue
            valid += 1
            if p == 255:
                if protocol == "confident":
                    continue
                p = 0
            kept += 1
            if p == g:
                tp[g] += 1
            else:
                fp[p] += 1
                fn[g] += 1
    ious, precs, recs = [], [], []
    for c in range(n):
        if tp[c] + fp[c] + fn[c] == 0:
            continue
        ious.append(tp[c] / (tp[c] + fp[c] + fn[c]))
        if tp[c] + fp[c] > 0:
            precs.append(tp[c] / (tp[c] + fp[c]))
        if tp[c] + fn[c] > 0:
            recs.append(tp[c] / (tp[c] + fn[c]))
    return np.mean(ious), np.mean(precs), np.mean(recs), kept / valid


@pytest.mark.parametrize("protocol", ["all", "confident"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(protocol, seed):
    rng = np.random.default_rng(seed)
    n = 5
    preds, gts = [], []
    for _ in range(4):  # streaming over several images of different sizes
        h, w = rng.integers(5, 20, size=2)
        gt = rng.integers(0, n, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, n, size=(h, w)).astype(np.uint8)
        pred[rng.random((h, w)) < 0.25] = 255
        preds.append(pred); gts.append(gt)
    cm = ConfusionMatrix(n, protocol)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    r = cm.compute()
    miou, prec, rec, kept = brute_force(preds, gts, n, protocol)
    assert r["miou"] == pytest.approx(miou)
    assert r["precision"] == pytest.approx(prec)
    assert r["recall"] == pytest.approx(rec)
    assert r["kept_fraction"] == pytest.approx(kept)
    if protocol == "all":
        assert r["kept_fraction"] == 1.0


def test_perfect_and_absent_classes():
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    r = ConfusionMatrix(4).compute() if False else None
    cm = ConfusionMatrix(4)
    cm.update(gt.copy(), gt)
    r = cm.compute()
    assert r["miou"] == 1.0
    assert r["iou"]["2"] is None and r["iou"]["3"] is None  # absent classes do not count


def test_protocols_differ_and_both_reported():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 255, 0, 255]], np.uint8)
    s = PseudoMaskScore(2)
    s.update(pred, gt)
    r = s.compute()
    assert r["miou_confident"] == 1.0
    assert r["kept_fraction"] == 0.5
    assert r["miou_all"] < 1.0


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="num_classes"):
        cm.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8))

"""Segmentation metrics from a streaming confusion matrix.

Two protocols for pseudo-masks (docs/method.md, Evaluation):
- "all": every pixel with a valid ground truth counts; a predicted 255 (uncertain) counts as background.
- "confident": pixels predicted 255 are dropped; `kept_fraction` says how many valid pixels remained.
Ground-truth 255 pixels are always ignored. Memory is O(num_classes^2), whatever the data set size.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

IGNORE = 255
Protocol = Literal["all", "confident"]


class ConfusionMatrix:
    def __init__(self, num_classes: int, protocol: Protocol = "all", class_names: list[str] | None = None):
        if protocol not in ("all", "confident"):
            raise ValueError(f"protocol must be 'all' or 'confident', got {protocol!r}")
        self.n = int(num_classes)
        self.protocol = protocol
        self.class_names = class_names or [str(i) for i in range(self.n)]
        self.mat = np.zeros((self.n, self.n), dtype=np.int64)  # rows: ground truth, cols: prediction
        self.valid_pixels = 0
        self.kept_pixels = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        valid = gt != IGNORE
        if np.any(gt[valid] >= self.n):
            raise ValueError(f"ground truth has labels >= num_classes ({self.n})")
        self.valid_pixels += int(valid.sum())
        p = pred.astype(np.int64)
        if self.protocol == "all":
            p = np.where(p == IGNORE, 0, p)
        else:
            valid &= p != IGNORE
        self.kept_pixels += int(valid.sum())
        p = p[valid]
        g = gt[valid].astype(np.int64)
        if p.size and (p.max() >= self.n or p.min() < 0):
            raise ValueError(f"prediction has labels outside [0, {self.n}) and != 255")
        self.mat += np.bincount(g * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.mat = self.mat + other.mat  # not in place: a matrix that came back from a Ray worker is read-only
        self.valid_pixels += other.valid_pixels
        self.kept_pixels += other.kept_pixels
        return self

    def compute(self) -> dict:
        """mIoU over classes that occur (in GT or prediction); per-class IoU/precision/recall (NaN if undefined)."""
        tp = np.diag(self.mat).astype(np.float64)
        gt_sum = self.mat.sum(1).astype(np.float64)
        pred_sum = self.mat.sum(0).astype(np.float64)
        union = gt_sum + pred_sum - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            precision = np.where(pred_sum > 0, tp / pred_sum, np.nan)
            recall = np.where(gt_sum > 0, tp / gt_sum, np.nan)
        present = union > 0
        return {
            "protocol": self.protocol,
            "miou": float(np.nanmean(iou[present])) if present.any() else float("nan"),
            "precision": float(np.nanmean(precision[present])) if present.any() else float("nan"),
            "recall": float(np.nanmean(recall[present])) if present.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(1, self.mat.sum())),
            "kept_fraction": float(self.kept_pixels / self.valid_pixels) if self.valid_pixels else float("nan"),
            "iou": {n: _f(v) for n, v in zip(self.class_names, iou)},
            "class_precision": {n: _f(v) for n, v in zip(self.class_names, precision)},
            "class_recall": {n: _f(v) for n, v in zip(self.class_names, recall)},
        }


class PseudoMaskScore:
    """Both protocols at once (the usual report for pseudo-masks)."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.all = ConfusionMatrix(num_classes, "all", class_names)
        self.confident = ConfusionMatrix(num_classes, "confident", class_names)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.all.update(pred, gt)
        self.confident.update(pred, gt)

    def merge(self, other: "PseudoMaskScore") -> "PseudoMaskScore":
        self.all.merge(other.all)
        self.confident.merge(other.confident)
        return self

    def compute(self) -> dict:
        a, c = self.all.compute(), self.confident.compute()
        return {
            "miou_all": a["miou"], "miou_confident": c["miou"], "kept_fraction": c["kept_fraction"],
            "precision": a["precision"], "recall": a["recall"],
            "precision_confident": c["precision"], "recall_confident": c["recall"],
            "all": a, "confident": c,
        }


def _f(v: float) -> float | None:
    return None if np.isnan(v) else float(v)

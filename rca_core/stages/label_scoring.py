"""Scoring a per-image label field (CRF labels, pseudo-masks) against the ground truth, on the workers.

Each worker folds the images it computes (or finds finished) into a PseudoMaskScore (both protocols,
docs/method.md, Evaluation) and hands it back with its shard; the driver only merges the confusion matrices, so no stage
reads every image on the driver. Only images of the evaluation split are scored (data.eval_split, e.g.
VOC train's 1,464 images while pseudo-masks are made for all of train_aug), as every paper does.
"""
from __future__ import annotations

from rca_core.metrics import PseudoMaskScore


def is_scored(ctx, image_id: str) -> bool:
    """Whether a stage scores this image (and so reads its ground-truth mask): an image of the evaluation subset
    (all of the split when it is the evaluation split) that has a mask."""
    eval_ids = ctx.extra.get("eval_ids")
    if eval_ids is not None and image_id not in eval_ids:
        return False
    has_mask = getattr(ctx.dataset, "has_mask", None)
    return has_mask is None or has_mask(image_id)


class LabelScorer:
    def __init__(self, ctx, num_classes: int):
        self.ctx, self.num_classes = ctx, num_classes
        self.names = list(getattr(ctx.dataset, "class_names", None) or [])
        self.score, self.images = PseudoMaskScore(num_classes, self.names or None), 0

    def wants(self, image_id: str) -> bool:
        return is_scored(self.ctx, image_id)

    def add(self, image_id: str, label) -> None:
        if self.wants(image_id):
            self.score.update(label, self.ctx.dataset.mask(image_id))
            self.images += 1

    def take(self) -> dict:
        """What was scored since the last take (picklable), then start afresh."""
        part = {"score": self.score, "images": self.images}
        self.score, self.images = PseudoMaskScore(self.num_classes, self.names or None), 0
        return part


def merge_scores(parts: list[dict], split: str) -> dict | None:
    """Metrics of the merged parts; None when nothing was scored (a split without masks)."""
    parts = [p for p in parts if p and p.get("images")]
    if not parts:
        return None
    total = parts[0]["score"]
    for p in parts[1:]:
        total.merge(p["score"])
    res = total.compute()
    return {"split": split, "images": int(sum(p["images"] for p in parts)),
            **{k: res[k] for k in ("miou_all", "miou_confident", "kept_fraction", "precision", "recall")},
            "iou_all": res["all"]["iou"]}

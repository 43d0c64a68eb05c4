"""Stage crf_labels: per image, dense CRF on the CAMs with a low and a high background alpha ->
confident label map "crf_label" (H, W) uint8: class ids where confident, 255 where the two CRFs disagree.

The rule (PSA's, see rca_core/crf.py): foreground from the low-alpha CRF (alpha 4), background where the
high-alpha CRF (alpha 32) says background, 255 elsewhere. finalize scores the maps against the ground
truth (both protocols) where the split has masks.
"""
from __future__ import annotations

import numpy as np

from rca_core.config import RunConfig
from rca_core.crf import IGNORE, confident_labels
from rca_core.metrics import PseudoMaskScore
from rca_core.stages.context import StageContext

STAGE = "crf_labels"
CODE_VERSION = "1"
INPUTS = ("cam_infer",)
FIELDS = ["crf_label"]
PREFETCH = ("image", "cam_infer/cam")  # read/decoded ahead on I/O threads (rca_core.stages.process_images)


def read_cams(cam_out, image_id: str) -> tuple[np.ndarray, list[int]]:
    """(K, H, W) float32 CAMs of an image's tag classes and their class ids, from cam_infer's "cam" field."""
    cam, attrs = cam_out.read(image_id, "cam")
    classes = [int(c) for c in attrs.get("classes", [])]
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"{cam_out.key}/cam/{image_id}: shape {cam.shape} does not match classes {classes}")
    return cam.astype(np.float32), classes


class Worker:
    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.cams = ctx.inputs["cam_infer"]

    def process(self, image_id: str) -> dict:
        cams, classes = read_cams(self.cams, image_id)
        image = self.ctx.dataset.image(image_id)
        if image.shape[:2] != cams.shape[1:]:
            raise ValueError(f"CAM of {image_id} is {cams.shape[1:]}, image is {image.shape[:2]}")
        out = confident_labels(image, cams, classes, self.cfg.refine.crf)
        label = out["label"]
        self.ctx.out.write(image_id, {"crf_label": label}, attrs={"classes": classes})
        return {"fg_fraction": float(((label > 0) & (label != IGNORE)).mean()),
                "ignore_fraction": float((label == IGNORE).mean())}


def evaluate_labels(out, field: str, dataset, ids: list[str], num_classes: int,
                    class_names: list[str] | None = None) -> dict | None:
    """Score a stored per-image label field against the ground truth (both protocols); None without masks."""
    score = PseudoMaskScore(num_classes, class_names)
    n = 0
    for image_id in ids:
        if not dataset.has_mask(image_id):
            continue
        pred, _ = out.read(image_id, field)
        score.update(pred, dataset.mask(image_id))
        n += 1
    if not n:
        return None
    res = score.compute()
    return {"images": n, **{k: res[k] for k in ("miou_all", "miou_confident", "kept_fraction", "precision", "recall")},
            "iou_all": res["all"]["iou"]}


def finalize(cfg: RunConfig, ctx: StageContext) -> dict:
    res = evaluate_labels(ctx.out, "crf_label", ctx.dataset, ctx.ids, cfg.data.num_classes, ctx.dataset.class_names)
    return {"metrics": res} if res else {}

"""Stage crf_labels: per image, dense CRF on the CAMs with a low and a high background alpha ->
confident label map "crf_label" (H, W) uint8: class ids where confident, 255 where the two CRFs disagree.

The rule (PSA's, see rca_core/crf.py): foreground from the low-alpha CRF (alpha 4), background where the
high-alpha CRF (alpha 32) says background, 255 elsewhere. The workers score the maps of the evaluation
split (data.eval_split) against the ground truth (both protocols); finalize merges their confusion matrices.
"""
from __future__ import annotations

import numpy as np

from rca_core.config import RunConfig
from rca_core.crf import IGNORE, confident_labels
from rca_core.stages.context import StageContext
from rca_core.stages.label_scoring import LabelScorer, merge_scores



def read_cams(cam_out, image_id: str) -> tuple[np.ndarray, list[int]]:
    """(K, H, W) float32 CAMs of an image's tag classes and their class ids, from cam_infer's "cam" field."""
    from rca_core.cam_ops import decode_cam

    cam, attrs = cam_out.read(image_id, "cam")
    cam = decode_cam(cam)
    classes = [int(c) for c in attrs.get("classes", [])]
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"{cam_out.key}/cam/{image_id}: shape {cam.shape} does not match classes {classes}")
    return cam, classes


class Worker:
    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.cams = ctx.inputs["cams"]
        self.scorer = LabelScorer(ctx, cfg.data.num_classes)

    def process(self, image_id: str) -> dict:
        cams, classes = read_cams(self.cams, image_id)
        image = self.ctx.dataset.image(image_id)
        if image.shape[:2] != cams.shape[1:]:
            raise ValueError(f"CAM of {image_id} is {cams.shape[1:]}, image is {image.shape[:2]}")
        out = confident_labels(image, cams, classes, self.cfg.refine.crf)
        label = out["label"]
        self.ctx.out.write(image_id, {"crf_label": label}, attrs={"classes": classes})
        self.scorer.add(image_id, label)
        return {"fg_fraction": float(((label > 0) & (label != IGNORE)).mean()),
                "ignore_fraction": float((label == IGNORE).mean())}

    def account(self, image_id: str) -> None:
        """Fold an image finished in an earlier run into the score."""
        if self.scorer.wants(image_id):
            self.scorer.add(image_id, self.ctx.out.read(image_id, "crf_label")[0])

    def partial(self) -> dict:
        return self.scorer.take()


def finalize(cfg: RunConfig, ctx: StageContext, parts: list | None = None) -> dict:
    res = merge_scores(parts or [], ctx.extra.get("eval_split", ctx.extra.get("split", "?")))
    return {"metrics": res} if res else {}

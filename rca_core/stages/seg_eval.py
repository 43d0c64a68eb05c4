"""Per-image stage: the trained segmenter's prediction on the val split, then mIoU in finalize.

`process(image_id)` predicts the image (optionally averaged over `segmenter.eval_scales` and horizontal
flips, then optionally refined by a dense CRF with `segmenter.eval_crf_params`: method.md section 6)
and stores it as "pred" (uint8, H x W). `finalize` streams every prediction and its ground truth through
`rca_core.metrics.ConfusionMatrix` (ground-truth 255 ignored) and returns mIoU, per-class IoU,
precision and recall, also stored as the "per_class" table.
"""
from __future__ import annotations

import numpy as np
import torch

from rca_core.config import RunConfig
from rca_core.metrics import ConfusionMatrix
from rca_core.predict import Predictor, load_segmenter

from .context import StageContext
from .seg_train import MODEL_FILE

STAGE = "seg_eval"
CODE_VERSION = "1"
INPUTS = ["seg_train"]
FIELDS = ["pred"]
PREFETCH = ("image", "mask")  # read/decoded ahead on I/O threads (rca_core.stages.process_images)


class Worker:
    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        seg = cfg.segmenter
        model, meta = load_segmenter(ctx.inputs["seg_train"].file(MODEL_FILE), ctx.device)
        if int(meta["num_classes"]) != cfg.data.num_classes:
            raise ValueError(f"segmenter has {meta['num_classes']} classes, data.num_classes is {cfg.data.num_classes}")
        self.predictor = Predictor(model, meta, ctx.device, seg.eval_scales, seg.eval_flip)
        self.crf = seg.eval_crf_params if seg.eval_crf else None

    def predict(self, image: np.ndarray) -> np.ndarray:
        probs = self.predictor.probs(image[None])[0]
        if self.crf is None:
            return probs.argmax(0).to(torch.uint8).cpu().numpy()
        from rca_core.crf import dense_crf  # pydensecrf only when asked for

        q = dense_crf(image, probs.cpu().numpy().astype(np.float32), self.crf)
        return q.argmax(0).astype(np.uint8)

    def process(self, image_id: str) -> dict:
        image = self.ctx.dataset.image(image_id)
        pred = self.predict(np.asarray(image, dtype=np.uint8))
        self.ctx.out.write(image_id, {"pred": pred})
        ds = self.ctx.dataset
        if hasattr(ds, "has_mask") and not ds.has_mask(image_id):
            return {"pixel_accuracy": float("nan")}
        gt = ds.mask(image_id)
        valid = gt != 255
        acc = float((pred[valid] == gt[valid]).mean()) if valid.any() else float("nan")
        return {"pixel_accuracy": acc}


def finalize(cfg: RunConfig, ctx: StageContext) -> dict:
    names = list(getattr(ctx.dataset, "class_names", None) or cfg.data.class_names or
                 [str(i) for i in range(cfg.data.num_classes)])
    cm = ConfusionMatrix(cfg.data.num_classes, "all", names)
    scored = 0
    for image_id in ctx.ids:
        if hasattr(ctx.dataset, "has_mask") and not ctx.dataset.has_mask(image_id):
            continue  # e.g. a test split: predictions are stored, nothing to score
        scored += 1
        pred, _ = ctx.out.read(image_id, "pred")
        cm.update(pred, ctx.dataset.mask(image_id))
    res = cm.compute()
    rows = [{"class": n, "iou": res["iou"][n], "precision": res["class_precision"][n],
             "recall": res["class_recall"][n]} for n in names]
    ctx.out.write_table("per_class", rows)
    ctx.out.put_array("confusion", cm.mat)
    seg = cfg.segmenter
    return {"miou": res["miou"], "precision": res["precision"], "recall": res["recall"],
            "pixel_accuracy": res["pixel_accuracy"], "iou": res["iou"], "class_precision": res["class_precision"],
            "class_recall": res["class_recall"], "images": len(ctx.ids), "scored_images": scored, "labels": seg.labels,
            "eval_scales": list(seg.eval_scales), "eval_flip": seg.eval_flip, "eval_crf": seg.eval_crf}

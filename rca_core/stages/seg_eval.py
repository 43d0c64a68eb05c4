"""Per-image stage: the trained segmenter's prediction on the val split, then mIoU in finalize.

`process(image_id)` predicts the image (optionally averaged over `segmenter.eval_scales` and horizontal
flips, then optionally refined by a dense CRF with `segmenter.eval_crf_params`: docs/method.md, Segmenter)
and stores it as "pred" (uint8, H x W). Each worker folds its predictions and their ground truth into a `rca_core.metrics.ConfusionMatrix`
(ground-truth 255 ignored) and hands it back with its shard; `finalize` merges them (no per-image reads on
the driver) and returns mIoU, per-class IoU, precision and recall, also stored as the "per_class" table.
"""
from __future__ import annotations

import numpy as np
import torch

from rca_core.config import RunConfig
from rca_core.metrics import ConfusionMatrix
from rca_core.predict import Predictor, load_segmenter

from .context import StageContext
from .seg_train import MODEL_FILE



class Worker:
    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        seg = cfg.segmenter
        model, meta = load_segmenter(ctx.inputs["model"].file(MODEL_FILE), ctx.device)
        self.fast = ctx.fast()
        model = self.fast.model(model)
        if int(meta["num_classes"]) != cfg.data.num_classes:
            raise ValueError(f"segmenter has {meta['num_classes']} classes, data.num_classes is {cfg.data.num_classes}")
        self.predictor = Predictor(model, meta, ctx.device, seg.eval_scales, seg.eval_flip)
        self.crf = seg.eval_crf_params if seg.eval_crf else None
        # the paper's protocol (multi-scale + flip + CRF) is reported with plain single-scale beside it
        self.single = (Predictor(model, meta, ctx.device, [1.0], False)
                       if (list(seg.eval_scales) != [1.0] or seg.eval_flip or seg.eval_crf) else None)
        self._names = class_names(cfg, ctx)
        self._reset()

    def _reset(self) -> None:
        n = self.cfg.data.num_classes
        self._cm, self._scored = ConfusionMatrix(n, "all", self._names), 0
        self._cm1 = ConfusionMatrix(n, "all", self._names) if self.single is not None else None

    def _score(self, image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> None:
        self._cm.update(pred, gt)
        self._scored += 1
        if self.single is not None:
            with self.fast.autocast():
                single = self.single.probs(image[None])[0].float()
            self._cm1.update(single.argmax(0).to(torch.uint8).cpu().numpy(), gt)

    def predict(self, image: np.ndarray) -> np.ndarray:
        with self.fast.autocast():  # the network in compute.precision; the CRF on float32 probabilities
            probs = self.predictor.probs(image[None])[0].float()
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
        self._score(np.asarray(image, dtype=np.uint8), pred, gt)
        valid = gt != 255
        acc = float((pred[valid] == gt[valid]).mean()) if valid.any() else float("nan")
        return {"pixel_accuracy": acc}

    def account(self, image_id: str) -> None:
        """A prediction stored by an earlier run: scored from the store (a split without masks: nothing)."""
        if self.ctx.dataset.has_mask(image_id):
            image = np.asarray(self.ctx.dataset.image(image_id), dtype=np.uint8) if self.single is not None else None
            self._score(image, self.ctx.out.read(image_id, "pred")[0], self.ctx.dataset.mask(image_id))

    def partial(self) -> dict:
        part = {"cm": self._cm, "scored": self._scored, "cm_single": self._cm1}
        self._reset()
        return part


def class_names(cfg: RunConfig, ctx: StageContext) -> list[str]:
    return list(getattr(ctx.dataset, "class_names", None) or cfg.data.class_names or
                [str(i) for i in range(cfg.data.num_classes)])


def finalize(cfg: RunConfig, ctx: StageContext, parts: list | None = None) -> dict:
    names = class_names(cfg, ctx)
    cm = ConfusionMatrix(cfg.data.num_classes, "all", names)
    cm1 = ConfusionMatrix(cfg.data.num_classes, "all", names)
    scored, single = 0, False
    for p in parts or []:
        cm.merge(p["cm"])
        scored += p["scored"]
        if p.get("cm_single") is not None:
            cm1.merge(p["cm_single"])
            single = True
    res = cm.compute()
    rows = [{"class": n, "iou": res["iou"][n], "precision": res["class_precision"][n],
             "recall": res["class_recall"][n]} for n in names]
    ctx.out.write_table("per_class", rows)
    ctx.out.put_array("confusion", cm.mat)
    seg = cfg.segmenter
    return {"miou": res["miou"], "precision": res["precision"], "recall": res["recall"],
            "pixel_accuracy": res["pixel_accuracy"], "iou": res["iou"], "class_precision": res["class_precision"],
            "class_recall": res["class_recall"], "images": len(ctx.ids), "scored_images": scored,
            "split": ctx.extra.get("split"), "labels": seg.labels,
            "eval_scales": list(seg.eval_scales), "eval_flip": seg.eval_flip, "eval_crf": seg.eval_crf,
            **({"miou_single_scale": cm1.compute()["miou"]} if single else {})}

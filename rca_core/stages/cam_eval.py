"""Stage cam_eval: CAM quality as mIoU over a sweep of background thresholds, on the evaluation split.

For each threshold t a pixel gets the class of its largest CAM when that CAM is > t, else background
(CAMs hold ground-truth classes only). The workers stream their images into one confusion matrix per
threshold (rca_core.metrics, ground-truth 255 ignored) and hand them back with each shard; finalize merges
them (no per-image reads on the driver). Nothing is stored per image (its record has no fields): a resumed run
scores every image again, which is cheap. Outputs: table `curve` (threshold, miou, precision, recall,
pixel_accuracy), table `per_class` at the best threshold, and the summary (best threshold, its mIoU /
precision / recall, per-class IoU, the whole curve, the split and the number of images scored).
"""
from __future__ import annotations

import numpy as np

from rca_core.cam_ops import decode_cam
from rca_core.metrics import ConfusionMatrix
from rca_core.train_utils import progress



class ThresholdSweep:
    """One confusion matrix per background threshold; merge() adds another sweep's counts."""

    def __init__(self, num_classes: int, thresholds: list[float], class_names: list[str] | None = None):
        self.thresholds = sorted(float(t) for t in thresholds)
        self.cms = [ConfusionMatrix(num_classes, "all", class_names) for _ in self.thresholds]
        self.images = 0

    def update(self, cam: np.ndarray, classes: list[int], gt: np.ndarray) -> None:
        classes = np.asarray([0] + list(classes), dtype=np.uint8)
        if cam.shape[0]:
            cam = cam.astype(np.float32)
            top, best = cam.argmax(0), cam.max(0)
            for t, cm in zip(self.thresholds, self.cms):
                cm.update(np.where(best > t, classes[1:][top], 0), gt)
        else:
            for cm in self.cms:
                cm.update(np.zeros_like(gt), gt)
        self.images += 1

    def merge(self, other: "ThresholdSweep") -> "ThresholdSweep":
        for a, b in zip(self.cms, other.cms):
            a.merge(b)
        self.images += other.images
        return self

    def result(self) -> dict:
        curve, results = [], []
        for t, cm in zip(self.thresholds, self.cms):
            r = cm.compute()
            results.append(r)
            curve.append({"threshold": t, "miou": r["miou"], "precision": r["precision"], "recall": r["recall"],
                          "pixel_accuracy": r["pixel_accuracy"]})
        b = int(np.nanargmax([c["miou"] for c in curve]))
        best = results[b]
        per_class = [{"class": n, "iou": best["iou"][n], "precision": best["class_precision"][n],
                      "recall": best["class_recall"][n]} for n in best["iou"]]
        return {"best_threshold": self.thresholds[b], "miou": best["miou"], "precision": best["precision"],
                "recall": best["recall"], "iou": best["iou"], "curve": curve, "per_class": per_class,
                "images": self.images}


def _check(cam: np.ndarray, gt: np.ndarray, image_id: str) -> None:
    if cam.shape[1:] != gt.shape:
        raise ValueError(f"cam_eval: CAM of {image_id} is {cam.shape[1:]} but its mask is {gt.shape}")


def evaluate(cams_out, dataset, ids: list[str], num_classes: int, thresholds: list[float],
             class_names: list[str] | None = None, show_progress: bool = True) -> dict:
    """The whole sweep in one process (notebooks, benches); the stage itself runs it on the workers."""
    sweep = ThresholdSweep(num_classes, thresholds, class_names)
    missing = [i for i in ids if not cams_out.is_done(i)]
    if missing:
        raise ValueError(f"cam_eval: {len(missing)} images of the evaluation split have no CAMs in "
                         f"{cams_out.key} (e.g. {missing[:3]}); data.eval_split must be a subset of the CAM split")
    for image_id in progress(ids, desc="cam_eval", disable=None if show_progress else True):
        cam, attrs = cams_out.read(image_id, "cam")
        cam = decode_cam(cam)
        gt = dataset.mask(image_id)
        _check(cam, gt, image_id)
        sweep.update(cam, attrs["classes"], gt)
    return sweep.result()


def _names(cfg, ctx) -> list[str] | None:
    names = cfg.data.class_names or getattr(ctx.dataset, "class_names", None)
    return list(names) if names else None


class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.cams = ctx.inputs["cams"]
        self.sweep = ThresholdSweep(cfg.data.num_classes, cfg.cam_eval.thresholds, _names(cfg, ctx))

    def process(self, image_id: str) -> dict:
        from rca_core.store import DamagedEntryError

        try:
            cam, attrs = self.cams.read(image_id, "cam")
            cam = decode_cam(cam)
        except DamagedEntryError as e:
            raise ValueError(f"cam_eval: image {image_id} of the evaluation split has no readable CAM in "
                             f"{self.cams.key} ({e}); data.eval_split must be a subset of the CAM split") from e
        gt = self.ctx.dataset.mask(image_id)
        _check(cam, gt, image_id)
        self.sweep.update(cam, attrs["classes"], gt)
        return {}

    def partial(self) -> ThresholdSweep:
        part = self.sweep
        self.sweep = ThresholdSweep(self.cfg.data.num_classes, self.cfg.cam_eval.thresholds, _names(self.cfg, self.ctx))
        return part


def finalize(cfg, ctx, parts: list | None = None) -> dict:
    sweep = ThresholdSweep(cfg.data.num_classes, cfg.cam_eval.thresholds, _names(cfg, ctx))
    for p in parts or []:
        sweep.merge(p)
    res = sweep.result()
    ctx.out.write_table("curve", res["curve"])
    ctx.out.write_table("per_class", res["per_class"])
    return {**{k: v for k, v in res.items() if k != "per_class"}, "split": ctx.extra.get("split")}

"""Stage cam_eval: CAM quality as mIoU over a sweep of background thresholds (driver only).

For each threshold t a pixel gets the class of its largest CAM when that CAM is > t, else background
(CAMs hold ground-truth classes only). One streaming confusion matrix per threshold
(rca_core.metrics), ground-truth 255 ignored. Outputs: table `curve` (threshold, miou, precision,
recall, pixel_accuracy), table `per_class` at the best threshold, and the summary (best threshold,
its mIoU / precision / recall, per-class IoU, the whole curve).
"""
from __future__ import annotations

import numpy as np

from rca_core.metrics import ConfusionMatrix
from rca_core.train_utils import progress

STAGE = "cam_eval"
CODE_VERSION = "1"
INPUTS = ("cam_infer",)


def evaluate(cams_out, dataset, ids: list[str], num_classes: int, thresholds: list[float],
             class_names: list[str] | None = None, show_progress: bool = True) -> dict:
    thresholds = sorted(float(t) for t in thresholds)
    cms = [ConfusionMatrix(num_classes, "all", class_names) for _ in thresholds]
    missing = [i for i in ids if not cams_out.is_done(i)]
    if missing:
        raise ValueError(f"cam_eval: {len(missing)} images of the evaluation split have no CAMs in "
                         f"{cams_out.key} (e.g. {missing[:3]}); data.eval_split must be a subset of the CAM split")
    for image_id in progress(ids, desc="cam_eval", disable=None if show_progress else True):
        cam, attrs = cams_out.read(image_id, "cam")
        gt = dataset.mask(image_id)
        if cam.shape[1:] != gt.shape:
            raise ValueError(f"cam_eval: CAM of {image_id} is {cam.shape[1:]} but its mask is {gt.shape}")
        classes = np.asarray([0] + list(attrs["classes"]), dtype=np.uint8)
        if cam.shape[0]:
            cam = cam.astype(np.float32)
            top, best = cam.argmax(0), cam.max(0)
            for t, cm in zip(thresholds, cms):
                cm.update(np.where(best > t, classes[1:][top], 0), gt)
        else:
            for cm in cms:
                cm.update(np.zeros_like(gt), gt)
    curve, results = [], []
    for t, cm in zip(thresholds, cms):
        r = cm.compute()
        results.append(r)
        curve.append({"threshold": t, "miou": r["miou"], "precision": r["precision"], "recall": r["recall"],
                      "pixel_accuracy": r["pixel_accuracy"]})
    b = int(np.nanargmax([c["miou"] for c in curve]))
    best = results[b]
    names = list(best["iou"])
    per_class = [{"class": n, "iou": best["iou"][n], "precision": best["class_precision"][n],
                  "recall": best["class_recall"][n]} for n in names]
    return {"best_threshold": thresholds[b], "miou": best["miou"], "precision": best["precision"],
            "recall": best["recall"], "iou": best["iou"], "curve": curve, "per_class": per_class,
            "images": len(ids)}


def run(cfg, ctx) -> dict:
    names = cfg.data.class_names or getattr(ctx.dataset, "class_names", None)
    res = evaluate(ctx.inputs["cam_infer"], ctx.dataset, ctx.ids, cfg.data.num_classes, cfg.cam_eval.thresholds,
                   list(names) if names else None)
    ctx.out.write_table("curve", res["curve"])
    ctx.out.write_table("per_class", res["per_class"])
    return {k: v for k, v in res.items() if k != "per_class"}

"""Segmenter quality: val mIoU of DeepLab trained on pseudo-masks (WSSS) vs on ground truth (the fully
supervised upper bound), their ratio, training time per epoch, and prediction throughput.

    python bench/segmenter_quality.py --config configs/demo.yaml --json OUT.json

writes {"wsss_val_miou", "supervised_val_miou", "ratio", "train_seconds", "predict_images_per_second", ...}.
Stages run through `rca_core.stages.run_stage` in the config's store, so stored pseudo-masks (random_walk)
and trained segmenters of the same config are reused (their timings come from the stored summaries).
`--wsss-labels gt` is a fallback for when no pseudo-masks can be made: both runs then train on ground
truth, the output says so in capitals, and the ratio means nothing.
The default budget is the config's segmenter.epochs (`--epochs 0`; 8 for the demo), the same as the main
job's, so after `bash scripts/main.sh` the WSSS model and the pseudo-masks are reused and only the
supervised model is trained (about 6 CPU minutes on the demo; seconds once it is stored too). From an
empty store it first runs the pipeline up to random_walk. `--epochs 2` gives a quick, under-trained
comparison. Prediction throughput: `predict_folder` over val images (read JPEG,
predict in batches, write palette PNG + overlay), with one corrupt file among them that must be reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, goal, report  # noqa: E402

sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--store", default=None, help="artifact store (default: the config's)")
    ap.add_argument("--wsss-labels", choices=["pseudo", "gt"], default="pseudo",
                    help="pseudo: the random_walk pseudo-masks (reused if stored, else computed); "
                         "gt: FALLBACK, ground truth (not weakly supervised)")
    ap.add_argument("--epochs", type=float, default=0, help="segmenter epochs (0 = the config's value)")
    ap.add_argument("--max-seconds", type=float, default=None, help="cap per segmenter training")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared 2-core machine: 1)")
    ap.add_argument("--predict-images", type=int, default=200, help="val images for the throughput run")
    ap.add_argument("--batch-size", type=int, default=16, help="prediction batch size")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set data.demo.n_train=400 (repeatable)")
    ap.add_argument("--no-doc", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args(argv)

    config_path = Path(args.config).resolve()
    os.chdir(ROOT)  # relative paths of the config (data root, store) are relative to the repo root
    import torch

    from rca_core.config import load_config, parse_overrides
    from rca_core.config.base import deep_update
    from rca_core.predict import predict_folder
    from rca_core.stages.planning import plan
    from rca_core.stages.local import run_stage
    from rca_core.store import ArtifactStore
    from rca_core.data import make_dataset

    torch.set_num_threads(args.threads)
    over: dict = {"compute": {"threads": args.threads}, "segmenter": {}}
    if args.epochs:
        over["segmenter"]["epochs"] = args.epochs
    if args.max_seconds:
        over["segmenter"]["max_seconds"] = args.max_seconds
    if args.store:
        over["store"] = args.store
    over = deep_update(parse_overrides(args.overrides), over)
    base = load_config(config_path, over)
    store = ArtifactStore(base.store)
    runs = {}
    for name, labels in [("wsss", args.wsss_labels), ("supervised", "gt")]:
        cfg = base.model_copy(deep=True)
        cfg.segmenter.labels = labels
        plans = plan(cfg)
        cached = store.stage("seg_train", plans["seg_train"].fingerprint).is_complete()
        pseudo_info = None
        if labels == "pseudo":
            rw = store.stage("random_walk", plans["random_walk"].fingerprint)
            print(f"[{name}] pseudo-masks: " + ("reusing stored random_walk output" if rw.is_complete() else
                                                "not stored yet - running the upstream stages (CAMs -> random walk)"),
                  flush=True)
            t = time.time()
            metrics = run_stage("random_walk", cfg, store).get("metrics") or {}
            pseudo_info = {"miou_all": metrics.get("miou_all"), "miou_confident": metrics.get("miou_confident"),
                           "seconds_here": time.time() - t}
        else:
            print(f"[{name}] labels: GROUND TRUTH" + (" (FALLBACK: NOT weakly supervised)" if name == "wsss" else ""),
                  flush=True)
        print(f"[{name}] segmenter: " + ("reusing the stored trained model" if cached else
                                         f"training {cfg.segmenter.arch}, {cfg.segmenter.epochs:g} epochs"), flush=True)
        ev = run_stage("seg_eval", cfg, store)
        tr = store.stage("seg_train", plans["seg_train"].fingerprint).summary()
        runs[name] = {"labels": labels, "eval": ev, "train": tr, "cached": cached, "pseudo": pseudo_info,
                      "model": tr["model"]}

    # prediction throughput (+ the corrupt-file check) with the WSSS model
    val = make_dataset(base.data, base.data.val_split, progress=False)
    ids = val.ids[: args.predict_images]
    with tempfile.TemporaryDirectory() as tmp:
        corrupt = Path(tmp) / "corrupt.jpg"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        files = [val.root / "JPEGImages" / f"{i}.jpg" for i in ids] + [corrupt]
        t = time.perf_counter()
        errors = predict_folder(runs["wsss"]["model"], files, Path(tmp) / "out", batch_size=args.batch_size,
                                show_progress=True)
        pred_s = time.perf_counter() - t
        written = len(list((Path(tmp) / "out" / "masks").glob("*.png")))
    ips = written / pred_s

    w, s = runs["wsss"], runs["supervised"]
    wm, sm = w["eval"]["miou"], s["eval"]["miou"]
    labels_note = ("pseudo-masks (random_walk)" if w["labels"] == "pseudo"
                   else "GROUND TRUTH - FALLBACK, NOT WEAKLY SUPERVISED")
    rows = []
    for name in ("wsss", "supervised"):
        r = runs[name]
        rows.append({"run": name, "train labels": "pseudo-masks" if r["labels"] == "pseudo" else "ground truth",
                     "arch": r["train"]["arch"], "epochs": r["train"]["epochs_done"],
                     "s / epoch": r["train"]["seconds_per_epoch"], "train s": r["train"]["train_seconds"],
                     "final loss": r["train"]["final_loss"], "val mIoU": r["eval"]["miou"],
                     "cached": "yes" if r["cached"] else "no"})
    rows.append({"run": "predict", "train labels": f"{written} val images + 1 corrupt, batch {args.batch_size}",
                 "arch": w["train"]["arch"], "val mIoU": None, "s / epoch": None,
                 "train s": None, "cached": f"{ips:.1f} img/s"})
    result = {
        "wsss_val_miou": wm, "supervised_val_miou": sm, "ratio": wm / sm if sm else float("nan"),
        "train_seconds": w["train"]["train_seconds"], "predict_images_per_second": ips,
        "wsss_labels": w["labels"], "wsss_labels_note": labels_note,
        "pseudo_mask_train_miou": (w["pseudo"] or {}).get("miou_all"),
        "seconds_per_epoch": w["train"]["seconds_per_epoch"],
        "supervised_train_seconds": s["train"]["train_seconds"], "epochs": w["train"]["epochs_done"],
        "wsss_per_class_iou": w["eval"]["iou"], "supervised_per_class_iou": s["eval"]["iou"],
        "predict_errors": errors, "predict_corrupt_file_reported": any("corrupt.jpg" in e for e in errors),
        "trained_here": {k: not v["cached"] for k, v in runs.items()}, "threads": args.threads,
        "config": str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path),
        "corrupt_file_goal": goal("predict names the corrupt file and writes the others",
                                  f"{written}/{len(ids)} written, errors={errors}",
                                  written == len(ids) and len(errors) == 1 and "corrupt.jpg" in errors[0]),
    }
    notes = (f"WSSS labels: {labels_note}. Segmenter {w['train']['arch']} ({base.segmenter.backbone}), "
             f"{w['train']['epochs_done']} epochs, batch {base.segmenter.batch_size}, crop {base.segmenter.crop_size}, "
             f"{base.segmenter.optimizer} lr {base.segmenter.lr:g}, torch threads {args.threads}. "
             f"WSSS / supervised mIoU ratio {result['ratio']:.3f}. Timings of cached runs come from the run that "
             "trained them. Prediction: end-to-end predict_folder (JPEG read, batched inference, palette PNG + "
             "overlay written), model load included.")
    report("Segmenter quality (seg_train / seg_eval / predict)", rows, result, args.json, notes,
           append=not args.no_doc)
    return result


if __name__ == "__main__":
    main()

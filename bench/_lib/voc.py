"""Stage timing at VOC size, shared by the entry points: a VOC-layout tree with random-init weights (`voc_work`) and
one stage run in this process through the code the Ray workers run (`time_stage`)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def time_stage(name: str, cfg, store, plans) -> dict:
    """One stage in this process: a per-image stage through the one per-image lifecycle (PerImageRun, its Worker's
    build timed apart as setup, run_shard, finish), a training stage through run_planned_stage. The row has the
    stage summary's FLOP figures (gflop_per_s, peak_gflop_per_s, flop_utilisation; None where it counts none)."""
    from rca_core.stages.local import run_planned_stage
    from rca_core.stages.runner import PerImageRun, build_worker, run_shard

    t0 = time.perf_counter()
    if plans[name].kind == "per_image":
        run = PerImageRun(name, cfg, store, plans)
        listed = run.begin()
        worker = build_worker(name, cfg, store, ctx=run.ctx)
        setup = time.perf_counter() - t0
        man = run.absorb(run_shard(worker, run.ids, listed))
        summary = run.finish()
        per = [r["seconds"] for r in man]
        row = {"stage": name, "kind": "per-image", "images": len(per), "setup_s": round(setup, 1),
               "s_per_img": sum(per) / len(per)}
    else:
        summary = run_planned_stage(name, cfg, store, plans, show_progress=False)
        steps, loop = summary["steps"], summary["train_seconds"]
        row = {"stage": name, "kind": "training", "images": steps * summary["global_batch"],
               "setup_s": round(time.perf_counter() - t0 - loop, 1),
               "s_per_img": loop / (steps * summary["global_batch"])}
    # the stage's own FLOP accounting (rca_core.flops): per worker, against its measured matmul peak
    row.update({k: summary.get(k) for k in ("gflop_per_s", "peak_gflop_per_s", "flop_utilisation")})
    print(f"[bench] {row}", flush=True)
    return row


def voc_work(args) -> dict:
    """A VOC-layout tree at 500x375 / 375x500 (the VOC-size test's writer) and random-init ResNet-50/101 weight
    files in --work (wiped first); the config overrides that point the recipe at them, with --train-steps
    steps of --train-batch images per training stage and --threads torch threads."""
    from bench._lib.harness import voc_tree_writers

    write_voc_tree, write_random_init_weights = voc_tree_writers()
    os.environ["RCA_NO_PROGRESS"] = "1"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    n = args.images
    write_voc_tree(work / "data" / "VOC2012", n_val=args.val_images, n_train=n // 2, n_sbd=n - n // 2)
    calib = sorted((work / "data" / "VOC2012" / "JPEGImages").glob("*.jpg"))[:8]
    write_random_init_weights(work / "weights" / "resnet50-imagenet.pth", 50, calib)
    write_random_init_weights(work / "weights" / "resnet101-imagenet.pth", 101, calib)
    b = args.train_batch
    over = {"store": str(work / "store"), "data": {"root": str(work / "data" / "VOC2012")},
            "cam": {"backbone": {"pretrained": str(work / "weights" / "resnet50-imagenet.pth")},
                    "train": {"batch_size": b, "epochs": args.train_steps * b / n, "num_workers": 0}},
            "refine": {"affinity": {"backbone": {"pretrained": str(work / "weights" / "resnet50-imagenet.pth")},
                                    "batch_size": b, "epochs": args.train_steps * b / n}},
            "segmenter": {"pretrained": str(work / "weights" / "resnet101-imagenet.pth"), "batch_size": b,
                          "epochs": args.train_steps * b / n},
            "compute": {"device": "cpu", "threads": args.threads}}
    return over

"""Per-image cost of every stage of configs/voc12.yaml at PASCAL VOC size on this CPU, and a projection of the
wall time of a full run on train_aug (10,582 images) and COCO train (82,783) on N CPU cores or N GPUs.

    python bench/voc_stage_cost.py --json OUT.json [--images 8] [--threads 1]

What is measured (this machine, --threads torch threads in one process): a VOC-layout tree at 500x375 /
375x500 (tests/test_voc_size_run.py's writer) and random-init ResNet-50/101 weight files (BatchNorm
statistics measured on the random network, as in that test). Every stage runs in-process with the
voc12 recipe unchanged for per-image work: CAM inference at 4 scales + flip, CRF labels at full size,
the random walk (logt 8) on the stride-4 grid, seg_eval at 5 scales + flip + dense CRF. Per-image
stages: seconds per image from the stage's own manifest (model loading excluded, reported apart).
Training stages: seconds per training image (one image through one optimizer step) at the recipe's
crop (512 / 512 / 321) from a short run of --train-steps steps at batch --train-batch; a full run is
epochs x images x that. FLOPs per image come from torch.utils.flop_counter on one forward (+backward
for training) of the stage's network at the sizes it sees.

Projection (derived, not measured):
- N CPU cores: per-image stages and training split over N workers with the parallel efficiency
  measured for 2 workers on this machine (docs/benchmarks.md "Ray scaling": 1.82x -> 0.91 per worker)
  assumed to hold for N; times = images x s/img / (N x 0.91).
- N GPUs: an ASSUMPTION-BASED projection (no GPU here): network FLOPs at --gpu-tflops sustained
  TFLOP/s per GPU (default 40: an A100/H100-class GPU at ~20-30 % of its dense TF32/bf16 peak on
  these convolutions); the rest of each stage's time (measured wall - FLOPs / this CPU's measured FLOP
  rate) either on the GPU at --gpu-elementwise-speedup x one core here, or for the CPU-bound stages
  (dense CRF, sparse random walk, threshold sweep) on --cpus-per-gpu cores per GPU.
`--from-json OUT.json` re-projects a saved measurement with other assumptions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import markdown_table, report  # noqa: E402

PER_IMAGE = ["memory_build", "cam_infer", "crf_labels", "random_walk", "seg_eval"]
TRAINING = ["cam_train", "affinity_train", "seg_train"]
CPU_EFFICIENCY = 0.91  # measured 1 -> 2 Ray workers on this machine (docs/benchmarks.md "Ray scaling")
# images per stage in a full run: (VOC train_aug / train / val, COCO train / train / val)
SPLITS = {"voc": {"train": 10582, "eval": 1464, "val": 1449}, "coco": {"train": 82783, "eval": 82783, "val": 40504}}
EPOCHS = {"voc": {"cam_train": 5, "affinity_train": 3, "seg_train": 19},
          "coco": {"cam_train": 5, "affinity_train": 3, "seg_train": 6}}
STAGE_SPLIT = {"memory_build": "train", "cam_infer": "train", "crf_labels": "train", "random_walk": "train",
               "seg_eval": "val", "cam_eval": "eval", "cam_train": "train", "affinity_train": "train",
               "seg_train": "train"}


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def cpu_flop_rate(threads: int) -> float:
    """FLOP/s of a ResNet-50 forward at 375x500 on this CPU with `threads` threads (what 'network time' means)."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    net = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 375, 500)
    with torch.no_grad():
        net(x)
        f = flops(lambda: net(x))
        t = time.perf_counter()
        for _ in range(3):
            net(x)
        dt = (time.perf_counter() - t) / 3
    return f / dt


def network_flops(cfg, work: Path) -> dict[str, float]:
    """FLOPs per image of each stage's networks at the sizes the recipe feeds them (500x375 image)."""
    import torch

    from rca_core.models.affinity_net import AffinityNet
    from rca_core.models.cam_net import CamNet
    from rca_core.models.deeplab import build_segmenter

    H, W = 375, 500
    nc = cfg.data.num_classes
    cam = CamNet(cfg.cam.model_copy(update={"backbone": cfg.cam.backbone.model_copy(update={"pretrained": None})}), nc)
    aff = AffinityNet(cfg.refine.affinity.model_copy(update={"backbone": cfg.refine.affinity.backbone.model_copy(
        update={"pretrained": None})}))
    seg = build_segmenter(cfg.segmenter.model_copy(update={"pretrained": None}), nc)
    out: dict[str, float] = {}

    def fwd(net, h, w, **kw):
        with torch.no_grad():
            net.eval()
            return flops(lambda: net(torch.zeros(1, 3, h, w), **kw))

    def train_step(net, c, key="logits", **kw):
        net.train()

        def go():
            o = net(torch.zeros(1, 3, c, c), **kw)
            (o[key] if isinstance(o, dict) else o).float().mean().backward()
        return flops(go)

    out["memory_build"] = fwd(cam, H, W, with_embeddings=True)
    flips = 2 if cfg.cam_infer.flip else 1
    out["cam_infer"] = sum(fwd(cam, round(H * s), round(W * s)) * flips for s in cfg.cam_infer.scales)
    out["crf_labels"] = 0.0
    out["cam_eval"] = 0.0
    out["random_walk"] = 0.0 if cfg.refine.saliency.enabled else fwd(aff, H, W)
    sflips = 2 if cfg.segmenter.eval_flip else 1
    out["seg_eval"] = sum(fwd(seg, round(H * s), round(W * s)) * sflips for s in cfg.segmenter.eval_scales)
    out["cam_train"] = train_step(cam, cfg.cam.train.crop_size, with_embeddings=True)
    out["affinity_train"] = train_step(aff, cfg.refine.affinity.crop_size)
    out["seg_train"] = train_step(seg, cfg.segmenter.crop_size)
    return out


def measure(args) -> dict:
    import torch

    from test_voc_size_run import write_random_init_weights, write_voc_tree

    from rca_core.config import load_config
    from rca_core.stages.registry import STAGE_NAMES as STAGES
    from rca_core.stages.context import make_context
    from rca_core.stages.planning import plan
    from rca_core.stages.runner import process_images, stage_module
    from rca_core.store import ArtifactStore

    torch.set_num_threads(args.threads)
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
    cfg = load_config(args.config, over)
    store = ArtifactStore(cfg.store)
    plans = plan(cfg)
    rows = []
    for name in STAGES:
        mod = stage_module(name)
        ctx = make_context(name, cfg, store, plans)
        t0 = time.perf_counter()
        if hasattr(mod, "Worker"):
            ctx.out.prepare(mod.FIELDS)
            worker = mod.Worker(cfg, ctx)
            setup = time.perf_counter() - t0
            man = process_images(worker, ctx.ids, out=ctx.out)
            ctx.out.write_manifest(man)
            summary = dict(mod.finalize(cfg, ctx) or {})
            ctx.out.mark_complete(summary)
            per = [r["seconds"] for r in man]
            rows.append({"stage": name, "kind": "per-image", "images": len(per), "setup_s": round(setup, 1),
                         "s_per_img": sum(per) / len(per)})
        elif hasattr(mod, "train"):
            ctx.out.prepare(())
            summary = mod.train(cfg, ctx)
            ctx.out.mark_complete(summary)
            steps = summary["steps"]
            loop = summary["train_seconds"]
            rows.append({"stage": name, "kind": "training", "images": steps * summary["global_batch"],
                         "setup_s": round(time.perf_counter() - t0 - loop, 1),
                         "s_per_img": loop / (steps * summary["global_batch"])})
        else:
            summary = dict(mod.run(cfg, ctx) or {})
            ctx.out.mark_complete(summary)
            rows.append({"stage": name, "kind": "driver", "images": len(ctx.ids), "setup_s": 0.0,
                         "s_per_img": (time.perf_counter() - t0) / len(ctx.ids)})
        print(f"[voc_stage_cost] {rows[-1]}", flush=True)
    return {"rows": rows, "cfg": cfg.model_dump(mode="json")}


# stages whose work beyond the network's FLOPs stays on the CPU on a GPU node: the dense CRF (pydensecrf),
# the sparse random walk (scipy), the threshold sweep; elsewhere it is elementwise tensor work on the GPU
CPU_BOUND_REST = {"crf_labels", "random_walk", "seg_eval", "cam_eval"}


def project(rows: list[dict], fl: dict[str, float], rate: float, args) -> list[dict]:
    out = []
    for data in ("voc", "coco"):
        for r in rows:
            name = r["stage"]
            imgs = SPLITS[data][STAGE_SPLIT[name]] * (EPOCHS[data].get(name, 1))
            cpu1 = imgs * r["s_per_img"]  # seconds on one worker of this machine
            f = fl.get(name, 0.0)
            rest = max(0.0, r["s_per_img"] - f / rate)  # seconds per image not explained by conv/matmul FLOPs
            row = {"data": data, "stage": name, "image_passes": imgs}
            for c in args.cores:
                row[f"cpu{c}_h"] = cpu1 / (c * CPU_EFFICIENCY) / 3600
            for g in args.gpus:
                gpu_s = f / (args.gpu_tflops * 1e12)
                cpu_s = 0.0
                if name in CPU_BOUND_REST:
                    cpu_s = rest / (args.cpus_per_gpu * CPU_EFFICIENCY)
                else:
                    gpu_s += rest / args.gpu_elementwise_speedup
                row[f"gpu{g}_h"] = imgs * (gpu_s + cpu_s) / g / 3600  # no overlap of GPU and CPU work assumed
            out.append(row)
        total = {"data": data, "stage": "TOTAL", "image_passes": None}
        for k in out[-1]:
            if k.endswith("_h"):
                total[k] = sum(x[k] for x in out if x["data"] == data and x["stage"] != "TOTAL")
        out.append(total)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "voc12.yaml"))
    ap.add_argument("--images", type=int, default=8, help="train_aug images (half VOC train, half SBD-only)")
    ap.add_argument("--val-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = the cost per core)")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--cores", type=int, nargs="*", default=[2, 16, 64])
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--gpu-tflops", type=float, default=40.0, help="ASSUMED sustained TFLOP/s per GPU")
    ap.add_argument("--cpus-per-gpu", type=int, default=8, help="ASSUMED CPU cores beside each GPU")
    ap.add_argument("--gpu-elementwise-speedup", type=float, default=100.0,
                    help="ASSUMED speed-up of the non-conv tensor work (pair affinities, upsampling) on a GPU over one "
                         "core of this CPU (memory bandwidth ~1-3 TB/s vs ~10 GB/s)")
    ap.add_argument("--from-json", default=None, help="re-project a saved measurement (its rows) instead of measuring")
    ap.add_argument("--work", default="bench/out/voc_stage_cost")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, rate = saved["rows"], saved["cpu_gflops"] * 1e9
        fl = {r["stage"]: r["gflop_per_img"] * 1e9 for r in rows}
        t0 -= saved["seconds"]
    else:
        m = measure(args)
        from rca_core.config import config_from_dict

        cfg = config_from_dict(m["cfg"])
        rate = cpu_flop_rate(args.threads)
        fl = network_flops(cfg, Path(args.work))
        rows = m["rows"]
        for r in rows:
            r["gflop_per_img"] = fl.get(r["stage"], 0.0) / 1e9
            r["network_share"] = min(1.0, fl.get(r["stage"], 0.0) / rate / r["s_per_img"]) if r["s_per_img"] else 0.0
    proj = project(rows, fl, rate, args)
    result = {"rows": rows, "projection": proj, "cpu_gflops": rate / 1e9, "seconds": time.time() - t0,
              "assumptions": {"cpu_efficiency": CPU_EFFICIENCY, "gpu_tflops": args.gpu_tflops,
                              "cpus_per_gpu": args.cpus_per_gpu, "gpu_elementwise_speedup": args.gpu_elementwise_speedup,
                              "cpu_bound_rest": sorted(CPU_BOUND_REST), "splits": SPLITS, "epochs": EPOCHS}}
    notes = (f"Measured on {args.images} train_aug + {args.val_images} val images at 500x375 / 375x500, "
             f"{args.threads} torch thread(s), in one process (no Ray), random-init weights; this CPU runs a "
             f"ResNet-50 forward at {rate / 1e9:.1f} GFLOP/s. s_per_img of a training stage = seconds per image "
             f"per optimizer step at the recipe's crop (batch {args.train_batch}, {args.train_steps} steps); "
             f"network_share = the part of s_per_img explained by its FLOPs at that rate. Total {result['seconds']:.0f} s."
             "\n\nProjected wall time in hours of a full run (image_passes = images x epochs). CPU columns: this "
             f"machine's per-core cost on N cores at the measured 2-worker efficiency {CPU_EFFICIENCY}. GPU columns "
             f"are an ASSUMPTION-BASED projection, not a measurement (no GPU here): network FLOPs at "
             f"{args.gpu_tflops:g} TFLOP/s sustained per GPU; the rest of each stage's measured time either on the "
             f"GPU at {args.gpu_elementwise_speedup:g}x one core of this CPU (elementwise tensor work: pair affinities, "
             f"upsampling, losses) or, for {', '.join(sorted(CPU_BOUND_REST))}, on {args.cpus_per_gpu} CPU cores per "
             "GPU at this machine's per-core speed (dense CRF, sparse random walk); GPU and CPU parts added (no "
             "overlap); data loading beside the GPU not counted.\n\n" + markdown_table(proj))
    report("Per-image cost of every stage at VOC size, and full-run projections (bench/voc_stage_cost.py)", rows,
           result, args.json, notes=notes, append=not args.no_append)
    return result


if __name__ == "__main__":
    main()

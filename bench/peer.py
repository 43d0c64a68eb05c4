"""Peers: this project's stages beside the code WSSS users run today, on the same images, cores and threads.

    python bench/peer.py BENCHMARK [options]      (python bench/peer.py BENCHMARK --help)

irn   IRN's own scripts (jiwoon-ahn/irn at a pinned commit, fetched into a cache outside the repository, never
      vendored): step/train_cam.py (1 epoch), step/make_cam.py (scales 1.0, 0.5, 1.5, 2.0 + flip),
      step/cam_to_ir_label.py, beside cam_train, cam_infer and crf_labels of configs/voc12.yaml on the same VOC-size
      images, with RCA's modules off (the same work as IRN) and on (+ memory_build). Seconds per image, the ratio
      per stage, GFLOP/s and the share of the measured matmul peak.

Each run writes its record to bench/results/peer.BENCHMARK.json (docs/benchmarks.md: python scripts/bench_table.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lib.cli import Benchmark, Subject  # noqa: E402
from bench._lib.common import BENCH_RUNS  # noqa: E402
from bench._lib.records import Result, goal  # noqa: E402

IRN_URL = "https://github.com/jiwoon-ahn/irn.git"
IRN_COMMIT = "a2ece0034d0a5a9635e4e131cd4fa6e2a779d316"  # master, 2020-01 ("Merge pull request #15")
CACHE = Path(os.environ.get("RCA_BENCH_CACHE", Path.home() / ".cache" / "rca-bench"))

# The smallest CPU patch of IRN, applied at run time in IRN's processes only (a sitecustomize module on their
# PYTHONPATH, so make_cam's and cam_to_ir_label's spawned children get it too); IRN's files are not touched.
SITECUSTOMIZE = '''"""CPU patch for IRN's scripts, written by bench/peer.py; active only where RCA_IRN_CPU=1."""
import contextlib
import os

if os.environ.get("RCA_IRN_CPU") == "1":
    import torch
    import torch.utils.model_zoo as model_zoo

    import numpy as np

    if not hasattr(np, "bool"):  # numpy 2 removed the alias; IRN's misc/pyutils.py uses it as a default argument
        np.bool = bool
    torch.set_num_threads(int(os.environ["RCA_IRN_THREADS"]))
    torch.Tensor.cuda = lambda self, *a, **k: self                            # .cuda() is a no-op
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.device_count = lambda: int(os.environ["RCA_IRN_PROCESSES"])  # make_cam: one process per "GPU"
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    # ImageNet weights from a local file (no download)
    model_zoo.load_url = lambda *a, **k: torch.load(os.environ["RCA_IRN_WEIGHTS"], map_location="cpu")
'''
# imageio (IRN reads and writes images with it) through Pillow, where imageio is not installed
IMAGEIO_SHIM = '''"""imageio's imread / imwrite through Pillow (bench/peer.py; only where imageio is not installed)."""
import numpy as np
from PIL import Image


def imread(path):
    return np.asarray(Image.open(path).convert("RGB"))


def imwrite(path, arr):
    Image.fromarray(np.asarray(arr)).save(path)
'''
STEP_RUNNER = '''"""Runs one of IRN's steps with run_sample.py's defaults and the given overrides; prints its wall seconds."""
import argparse
import importlib
import json
import sys
import time

over = json.loads(sys.argv[2])
args = argparse.Namespace(
    num_workers=1, voc12_root=None, train_list="train.txt", val_list="val.txt", infer_list="train.txt",
    chainer_eval_set="train", cam_network="net.resnet50_cam", cam_crop_size=512, cam_batch_size=16,
    cam_num_epoches=5, cam_learning_rate=0.1, cam_weight_decay=1e-4, cam_eval_thres=0.15,
    cam_scales=(1.0, 0.5, 1.5, 2.0), conf_fg_thres=0.30, conf_bg_thres=0.05, cam_weights_name="sess/res50_cam.pth",
    cam_out_dir="result/cam", ir_label_out_dir="result/ir_label")
for k, v in over.items():
    setattr(args, k, tuple(v) if isinstance(v, list) else v)
if __name__ == "__main__":
    step = importlib.import_module("step." + sys.argv[1])
    aside = [0.0]  # train_cam's per-epoch validation: timed apart (this project's cam_train has none)
    if hasattr(step, "validate"):
        inner = step.validate

        def validate(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                aside[0] += time.perf_counter() - t

        step.validate = validate
    t0 = time.perf_counter()
    step.run(args)
    seconds = time.perf_counter() - t0 - aside[0]
    print("RCA_IRN_SECONDS", json.dumps({"step": sys.argv[1], "seconds": seconds, "validation_seconds": aside[0]}),
          flush=True)
'''


def irn_checkout(src: str) -> Path:
    """IRN at IRN_COMMIT in the cache (cloned once from `src`: a URL or a local clone / mirror)."""
    dest = CACHE / f"irn-{IRN_COMMIT[:12]}"
    if (dest / "step" / "train_cam.py").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["git", "clone", "--quiet", src, str(tmp)], check=True, capture_output=True, text=True,
                       timeout=600)
        subprocess.run(["git", "-C", str(tmp), "checkout", "--quiet", IRN_COMMIT], check=True, capture_output=True,
                       text=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise SystemExit(f"cannot get IRN at {IRN_COMMIT[:12]} from {src}: {err.strip()[:300]}\n"
                         f"Pass --irn-src a local clone of {IRN_URL} (any clone that has that commit).")
    tmp.rename(dest)
    return dest


def write_irn_work(work: Path, ids: list[str], tags: dict[str, list[int]], val_ids: list[str]) -> Path:
    """IRN's inputs for our images: voc12/cls_labels.npy (20 foreground flags per int-coded id, read relative to
    the working directory), the id lists, the patch folder."""
    import numpy as np

    irn_work = work / "irn"
    (irn_work / "voc12").mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in ids + val_ids:
        v = np.zeros(20, np.float32)
        for c in tags[i]:
            v[c - 1] = 1.0
        labels[int(i.replace("_", ""))] = v
    np.save(irn_work / "voc12" / "cls_labels.npy", labels)
    # IRN's lists hold int-coded ids (2007000032; its loader decodes them back to 2007_000032)
    (irn_work / "train.txt").write_text("\n".join(i.replace("_", "") for i in ids) + "\n")
    (irn_work / "val.txt").write_text("\n".join(i.replace("_", "") for i in val_ids) + "\n")
    patch = irn_work / "patch"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (patch / "irn_step.py").write_text(STEP_RUNNER)
    try:
        import imageio  # noqa: F401
    except ImportError:
        (patch / "imageio.py").write_text(IMAGEIO_SHIM)
    for d in ("sess", "result/cam", "result/ir_label"):
        (irn_work / d).mkdir(parents=True, exist_ok=True)
    return irn_work


def run_irn_step(irn: Path, irn_work: Path, step: str, over: dict, threads: int, processes: int,
                 weights: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{irn_work / 'patch'}{os.pathsep}{irn}", "RCA_IRN_CPU": "1",
           "RCA_IRN_THREADS": str(threads), "RCA_IRN_PROCESSES": str(processes), "RCA_IRN_WEIGHTS": str(weights),
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(irn_work / "patch" / "irn_step.py"), step, json.dumps(over)],
                       cwd=irn_work, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"IRN step {step} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RCA_IRN_SECONDS")), None)
    seconds = json.loads(line.split(" ", 1)[1])["seconds"] if line else wall
    print(f"[bench] irn {step}: {seconds:.1f} s (process {wall:.1f} s)", flush=True)
    return seconds


# ================================================================================================== irn
def irn_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, default=24, help="VOC-size train images (>= 20 per process: IRN's "
                                                             "progress print divides by images // 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side's one compute process")
    ap.add_argument("--loader-workers", type=int, default=1,
                    help="DataLoader workers of the training on both sides (IRN's default: cores // 2)")
    ap.add_argument("--train-batch", type=int, default=8,
                    help="CAM training batch on both sides (recipe: 16; 8 gives 3 steps on 24 images)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0],
                    help="CAM inference scales on both sides (+ flip); IRN's and the recipe's: 1.0 0.5 1.5 2.0")
    ap.add_argument("--irn-src", default=os.environ.get("RCA_IRN_SRC", IRN_URL),
                    help="where to clone IRN from: its GitHub URL or a local clone (env RCA_IRN_SRC)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["irn", "plain", "rca"],
                    help="sides not to run (their rows are left out)")
    ap.add_argument("--work", default=str(BENCH_RUNS / "peer_irn"), help="scratch folder (wiped first)")


def _ours(cfg, stages: list[str]) -> list[dict]:
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    from bench._lib.voc import time_stage

    store, plans = ArtifactStore(cfg.store), plan(cfg)
    rows = []
    for name in stages:
        r = time_stage(name, cfg, store, plans)
        r["wall_s"] = r["setup_s"] + r["s_per_img"] * r["images"]
        rows.append(r)
    return rows


def irn(args) -> Result:
    """IRN's own scripts beside this project's stages, same N VOC-size images (500x375 / 375x500, the VOC-size
test's writer, random-init ResNet-50 weights with measured BatchNorm statistics), same machine, same run.

Both sides: one compute process with --threads torch threads (IRN's make_cam: one process, its patched GPU count
1; cam_to_ir_label: one process), CAM training for 1 epoch at batch --train-batch, crop 512, long side 320-640,
--loader-workers DataLoader workers; CAM inference at scales 1.0, 0.5, 1.5, 2.0 + flip; CRF labels at IRN's
thresholds (0.30 / 0.05). Ours in-process through the same code the Ray workers run (training: run_planned_stage;
per-image: the one per-image lifecycle), timed from the stage's start (its model build included) to its end;
IRN's from step.run(args) called to returned (model build, spawned processes and saving included; train_cam's
per-epoch validation on one batch of val images timed apart and left out, as ours has none).
- irn: IRN at the pinned commit, CPU-patched at run time (no CUDA calls, local weights, imageio through Pillow
  where it is not installed).
- plain: configs/voc12.yaml with RCA's memory bank, contrast and aggregation off: the same work as IRN.
- rca: configs/voc12.yaml as is (+ memory_build, which IRN does not have).
Goals (issue #26): plain <= 1.0x IRN in every stage; rca <= 1.3x in cam_train and cam_infer."""
    import torch

    from rca_core.config import load_config
    from rca_core.config.base import deep_update
    from rca_core.data import make_dataset

    from bench._lib.demo import config_file
    from bench._lib.voc import voc_work

    t_all = time.time()
    torch.set_num_threads(args.threads)
    irn_src = irn_checkout(args.irn_src) if "irn" not in args.skip else None
    n, b = args.images, args.train_batch
    # val: one training batch of images (IRN's train_cam validates every epoch, timed apart; 0 batches divide by 0)
    vargs = argparse.Namespace(work=args.work, images=n, val_images=b, train_batch=b, train_steps=1,
                               threads=args.threads)
    over = voc_work(vargs)  # a VOC tree: train_aug = n images (VOC train + SBD-only), random-init weights
    work = Path(args.work)
    over = deep_update(over, {
        "cam": {"train": {"batch_size": b, "epochs": 1, "num_workers": args.loader_workers}},
        "cam_infer": {"scales": list(args.scales), "flip": True},
        "compute": {"device": "cpu", "threads": args.threads}})
    rca_cfg = load_config(config_file("configs/voc12.yaml"), over)
    plain_cfg = load_config(config_file("configs/voc12.yaml"), deep_update(over, {"cam": {
        "memory": {"enabled": False}, "contrast": {"enabled": False}, "aggregation": {"enabled": False}}}))
    ds = make_dataset(rca_cfg.data, rca_cfg.data.train_split)
    ids = list(ds.ids)[:n]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} train images, not {n}")
    tags = {i: sorted(int(t) for t in ds.tags(i)) for i in ids}
    val = make_dataset(rca_cfg.data, "val")
    val_ids = list(val.ids)[:b]
    tags.update({i: sorted(int(t) for t in val.tags(i)) for i in val_ids})

    rows: list[dict] = []
    by = {}
    if "irn" not in args.skip:
        iw = write_irn_work(work, ids, tags, val_ids)
        weights = work / "weights" / "resnet50-imagenet.pth"
        root = str(work / "data" / "VOC2012")
        common = {"voc12_root": root, "num_workers": args.loader_workers, "cam_batch_size": b,
                  "cam_num_epoches": 1, "cam_scales": list(args.scales)}
        steps = {"train_cam": n // b * b, "make_cam": n, "cam_to_ir_label": n}
        stage_of = {"train_cam": "cam_train", "make_cam": "cam_infer", "cam_to_ir_label": "crf_labels"}
        for step, images in steps.items():
            extra = {"num_workers": 1} if step == "cam_to_ir_label" else {}  # its processes: one
            s = run_irn_step(irn_src, iw, step, {**common, **extra}, args.threads, 1, weights)  # make_cam: 1 process
            by[("irn", stage_of[step])] = {"side": "irn", "stage": stage_of[step], "irn_step": step,
                                           "images": images, "wall_s": round(s, 1), "s_per_img": s / images}
    stage_sets = {"plain": (plain_cfg, ["cam_train", "cam_infer", "crf_labels"]),
                  "rca": (rca_cfg, ["cam_train", "memory_build", "cam_infer"])}
    for side, (cfg, stages) in stage_sets.items():
        if side in args.skip:
            continue
        for r in _ours(cfg, stages):
            r["s_per_img"] = r["wall_s"] / r["images"]
            by[(side, r["stage"])] = {"side": side, **r}
    # IRN runs the same network as the plain side: its GFLOP/s from plain's counted GFLOP per image
    for stage in ("cam_train", "cam_infer"):
        ref, mine = by.get(("plain", stage)), by.get(("irn", stage))
        if ref and mine and ref.get("gflop_per_s"):
            gflop_per_img = ref["gflop_per_s"] * (ref["wall_s"] - ref["setup_s"]) / ref["images"]
            mine["gflop_per_s"] = round(gflop_per_img / mine["s_per_img"], 1)
            mine["peak_gflop_per_s"] = ref["peak_gflop_per_s"]
            mine["flop_utilisation"] = round(mine["gflop_per_s"] / ref["peak_gflop_per_s"], 3)
    goals = []
    for (side, stage), r in by.items():
        ref = by.get(("irn", stage))
        if side != "irn" and ref:
            r["x_irn"] = round(r["s_per_img"] / ref["s_per_img"], 2)
            if side == "plain":
                goals.append(goal(f"plain {stage} <= 1.0x IRN", f"{r['x_irn']:.2f}x", r["x_irn"] <= 1.0))
            elif stage in ("cam_train", "cam_infer"):
                goals.append(goal(f"rca {stage} <= 1.3x IRN", f"{r['x_irn']:.2f}x", r["x_irn"] <= 1.3))
        r["s_per_img"] = round(r["s_per_img"], 3)
        r["wall_s"] = round(r["wall_s"], 1)
        rows.append({k: r.get(k) for k in ("side", "stage", "images", "wall_s", "setup_s", "s_per_img", "x_irn",
                                           "gflop_per_s", "peak_gflop_per_s", "flop_utilisation")})
    seconds = time.time() - t_all
    headline = {f"{g['goal'].split(' <=')[0]}": g["measured"] for g in goals}
    notes = (f"{n} VOC-size train images, {args.threads} torch threads per side, {args.loader_workers} DataLoader "
             f"worker(s) in training, CAM training batch {b} for 1 epoch (IRN drops the last partial batch: "
             f"{n // b * b} images), IRN {IRN_COMMIT[:12]}. wall_s: the stage from start to end (model build "
             f"included); s_per_img = wall_s / images; x_irn = s_per_img / IRN's. gflop_per_s and "
             f"flop_utilisation: our stage's own summary (model FLOPs counted by torch.utils.flop_counter over its "
             f"seconds per image, against this process's measured float32 matmul peak); IRN's rows: the plain "
             f"side's GFLOP per image (the same network and work) over IRN's seconds per image. Total {seconds:.0f} s.")
    return Result("IRN's own scripts beside ours: CAM training, CAM inference, CRF labels at VOC size", rows,
                  goals=goals, headline=headline, notes=notes,
                  details={"irn_commit": IRN_COMMIT, "images": n, "threads": args.threads, "seconds": seconds})


SUBJECT = Subject("peer", __doc__, [
    Benchmark("irn", "IRN's train_cam / make_cam / cam_to_ir_label beside cam_train / cam_infer / crf_labels at "
              "VOC size (goals: <= 1.0x with RCA's modules off, <= 1.3x on)", irn_args, irn),
])

if __name__ == "__main__":
    sys.exit(SUBJECT.main())

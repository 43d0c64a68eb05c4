"""Quality: what the method's parts give, measured on the demo data set.

    python bench/quality.py BENCHMARK [options]      (python bench/quality.py BENCHMARK --help)

cam-ablation  plain-CAM baseline vs RCA (and contrast-only, aggregation-only), same budget, several seeds
refine        pseudo-mask quality along the refinement chain: CAM -> CRF labels -> random walk
segmenter     val mIoU of the segmenter trained on pseudo-masks vs on ground truth, prediction throughput
workers       CAM mIoU after training on 1 vs 2 workers (the same recipe must give the same CAMs)
precision     the demo pipeline in fp32 / channels-last / bf16: every stage's mIoU and time

Stages run through rca_core.stages.local (run_stage / run_planned_stage), so per-image stages go through the one
per-image lifecycle of rca_core.stages.runner. Each run writes its record to bench/results/quality.BENCHMARK.json
(docs/benchmarks.md: python scripts/bench_table.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lib.cli import Benchmark, Subject  # noqa: E402
from bench._lib.common import BENCH_RUNS, ROOT  # noqa: E402
from bench._lib.demo import config_file  # noqa: E402
from bench._lib.records import Result, goal, slug  # noqa: E402


def _base_overrides(args) -> dict:
    """--set, --epochs and --warmup-epochs of cam-ablation / workers as one override dict."""
    from rca_core.config import parse_overrides
    from rca_core.config.base import deep_update

    over = parse_overrides(args.set)
    if args.epochs:
        over = deep_update(over, {"cam": {"train": {"epochs": args.epochs}}})
    if args.warmup_epochs >= 0:
        over = deep_update(over, {"cam": {"contrast": {"warmup_epochs": args.warmup_epochs}}})
    return over


def _cam_budget_args(ap: argparse.ArgumentParser, work: str) -> None:
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default=None, help="run these seeds (comma list) instead of range(--seeds)")
    ap.add_argument("--epochs", type=float, default=3,
                    help="cam.train.epochs for every run (0 = the config's; CAMs peak early, then overfit)")
    ap.add_argument("--warmup-epochs", type=float, default=1,
                    help="cam.contrast.warmup_epochs for the budget (negative = the config's)")
    ap.add_argument("--subset", type=int, default=200,
                    help="memory build, CAM inference and evaluation on the first N training images (0 = all); "
                         "training always uses the whole split")
    ap.add_argument("--work", default=str(BENCH_RUNS / work), help="scratch folder (its stores are wiped first)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides key.sub=value")


# ============================================================================================ cam-ablation
STAGES = ["cam_train", "memory_build", "cam_infer", "cam_eval"]
OFF = {"enabled": False}
VARIANTS = {
    "baseline": {"memory": OFF, "contrast": OFF, "aggregation": OFF},
    "rca": {"memory": {"enabled": True}, "contrast": {"enabled": True}, "aggregation": {"enabled": True}},
    "sc": {"memory": {"enabled": True}, "contrast": {"enabled": True}, "aggregation": OFF},
    "agg": {"memory": {"enabled": True}, "contrast": OFF, "aggregation": {"enabled": True}},
}


def cam_ablation_args(ap: argparse.ArgumentParser) -> None:
    _cam_budget_args(ap, "cam_ablation")
    ap.add_argument("--variants", default="baseline,rca", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per part")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="combine the runs of earlier --json outputs (e.g. seeds run in parallel) instead of running")
    ap.add_argument("--jobs", type=int, default=2,
                    help="run the variants (or, with one variant, the seeds) in this many side-by-side processes, "
                         "each in its own store, then merge (default 2: the 2 cores of the reference machine)")


def _side_by_side(args, seeds: list[int], variants: list[str]) -> list[str]:
    """Split the (seed, variant) grid over args.jobs child processes of this benchmark (one store each): by variant
    when there are at least as many variants as jobs, else by seed. Returns their --json paths."""
    if len(variants) >= args.jobs:
        groups = [(seeds, variants[i::args.jobs]) for i in range(args.jobs)]
    else:
        groups = [(seeds[i::args.jobs], variants) for i in range(min(args.jobs, len(seeds)))]
    procs, outs = [], []
    for i, (s, v) in enumerate(groups):
        work = Path(args.work) / f"job{i}"
        out = work.with_suffix(".json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "cam-ablation", "--config", args.config, "--seed-list",
               ",".join(map(str, s)), "--variants", ",".join(v), "--epochs", str(args.epochs),
               "--warmup-epochs", str(args.warmup_epochs), "--work", str(work), "--threads", str(args.threads),
               "--subset", str(args.subset), "--json", str(out), "--no-record", "--jobs", "1"]
        if args.set:
            cmd += ["--set", *args.set]
        print(f"[cam-ablation] job {i}: seeds {s}, variants {v}", flush=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT))
        outs.append(str(out))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"cam-ablation: job(s) {failed} failed (see their output above)")
    return outs


def cam_ablation(args) -> Result:
    """CAM ablation: plain-CAM baseline vs RCA, same budget, several seeds.

For each seed and variant it runs, from scratch in a fresh store, the stages cam_train -> memory_build ->
cam_infer -> cam_eval (each in a forked child process, so the time and the peak resident memory of every part are
measured separately) and reports CAM mIoU (mean and spread) per variant. Variants: `baseline` (memory, contrast
and aggregation off), `rca` (the config's RCA parts, all on), and for diagnosis `sc` (memory + contrast only) and
`agg` (memory + aggregation only). Every variant gets the same budget: --epochs (default 3: CAMs peak early) with
the contrast warm-up scaled to 1 epoch; training always uses the whole training split; memory build, CAM
inference (the config's scales + flip) and evaluation use its first --subset images (default 200; their config
says data.max_images, so their store keys name the subset). Goal: RCA's mean CAM mIoU above the baseline's.
`--jobs 2` (default) runs baseline and RCA side by side in two processes (own stores), so the wall time on 2
idle cores is the RCA half's, about 10 minutes for the default 3 seeds; longer when the machine is shared."""
    from bench._lib.demo import stage_part
    from bench._lib.procs import run_forked
    from rca_core.config import load_config
    from rca_core.config.base import deep_update

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    t0 = time.time()
    store = str(Path(args.work) / "store")
    if args.merge is None:
        shutil.rmtree(store, ignore_errors=True)
    base_over = _base_overrides(args)
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    runs: list[dict] = []
    side_by_side = args.merge is None and args.jobs > 1 and len(seeds) * len(variants) > 1
    if side_by_side:
        args.merge = _side_by_side(args, seeds, variants)
    if args.merge is not None:
        seeds, extra_seconds = [], 0.0
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            part = part.get("details", part)  # a record of this benchmark, or an old --json output
            runs += part["runs"]
            extra_seconds = max(extra_seconds, part["seconds"])  # parts ran side by side: wall = the longest
        runs.sort(key=lambda r: (r["seed"], variants.index(r["variant"]) if r["variant"] in variants else 99))
        runs = [r for r in runs if r["variant"] in variants]
        if not side_by_side:  # earlier runs: their wall time adds to this call's
            t0 -= extra_seconds
    for seed in seeds:
        for v in variants:
            over = deep_update(base_over, {"seed": seed, "store": store, "cam": VARIANTS[v]})
            cfg_dict = load_config(config_file(args.config), over).model_dump(mode="json")
            run = {"variant": v, "seed": seed}
            for name in STAGES:
                summary, seconds, rss, cpu = run_forked(stage_part, name, cfg_dict, store, args.threads, args.subset)
                run[f"{name}_s"] = round(seconds, 1)
                run[f"{name}_cpu_s"] = round(cpu, 1)
                run[f"{name}_rss_mib"] = round(rss)
                if name == "cam_train":
                    run.update(epochs=summary.get("epochs_done"), final_map=summary.get("final_map"),
                               history=summary.get("history"))
                elif name == "memory_build":
                    run["regions"] = summary.get("regions")
                elif name == "cam_eval":
                    run.update(miou=summary["miou"], threshold=summary["best_threshold"],
                               precision=summary["precision"], recall=summary["recall"], curve=summary["curve"])
            runs.append(run)
            print(f"[cam-ablation] seed {seed} {v}: mIoU {run['miou']:.4f} at t={run['threshold']} "
                  f"(train {run['cam_train_s']} s)", flush=True)
    per_run = [{k: run.get(k) for k in ["variant", "seed", "epochs", "final_map", "miou", "threshold", "precision",
                                        "recall"] + [f"{s}_s" for s in STAGES] + [f"{s}_cpu_s" for s in STAGES]
                + [f"{s}_rss_mib" for s in STAGES]} for run in runs]

    def over_runs(key, v, agg):
        vals = [r[key] for r in runs if r["variant"] == v and r.get(key) is not None]
        return agg(vals) if vals else None

    rows = []
    for v in variants:
        m = [r["miou"] for r in runs if r["variant"] == v]
        rows.append({"variant": v, "seeds": len(m), "miou_mean": statistics.fmean(m),
                     "miou_std": statistics.stdev(m) if len(m) > 1 else 0.0, "miou_min": min(m), "miou_max": max(m),
                     **{f"{s}_s_mean": over_runs(f"{s}_s", v, statistics.fmean) for s in STAGES},
                     **{f"{s}_cpu_s_mean": over_runs(f"{s}_cpu_s", v, statistics.fmean) for s in STAGES},
                     **{f"{s}_rss_mib_max": over_runs(f"{s}_rss_mib", v, max) for s in STAGES}})
    seconds = time.time() - t0
    details = {f"{v}_miou": [r["miou"] for r in runs if r["variant"] == v] for v in variants}
    for v in variants:
        details[f"{v}_threshold"] = [r["threshold"] for r in runs if r["variant"] == v]
    details.update(seconds=seconds, epochs=runs[0]["epochs"] if runs else None, runs=runs)
    for s in rows:
        print(f"[cam-ablation] {s['variant']}: CAM mIoU {s['miou_mean']:.4f} +- {s['miou_std']:.4f} "
              f"over {s['seeds']} seeds (min {s['miou_min']:.4f}, max {s['miou_max']:.4f})")
    goals, headline = [], {f"{s['variant']} CAM mIoU": f"{s['miou_mean']:.4f} +- {s['miou_std']:.4f}" for s in rows}
    if "baseline" in variants and "rca" in variants:
        d = statistics.fmean(details["rca_miou"]) - statistics.fmean(details["baseline_miou"])
        details["rca_minus_baseline"] = d
        goals.append(goal("RCA mean CAM mIoU > baseline mean", round(d, 4), d > 0))
    notes = (f"Total {seconds:.0f} s. Per-part times are wall seconds of each stage in its own forked process "
             f"({args.threads} torch thread(s)); rss = that process's peak resident memory (includes ~0.4 GB of "
             f"imported libraries). Budget: {args.epochs or 'the config'} epochs, warm-up {args.warmup_epochs}, "
             f"memory build / inference / evaluation on the first {args.subset or 'all'} training images.")
    return Result("CAM ablation: plain-CAM baseline vs RCA", rows, goals=goals, headline=headline, notes=notes,
                  extra_tables=[{"title": "Per run", "rows": per_run}], details=details)


# ============================================================================================ refine
REFINE = ("crf_labels", "affinity_train", "random_walk")
NOISE = {"shift": 0.06, "blur": 0.06, "drop": 0.7, "spurious": 0.5, "spurious_rate": 0.004, "version": 1}
KEYS = ("miou_all", "miou_confident", "kept_fraction", "precision", "recall")


def noisy_cams(mask, tags: list[int], rng, p: dict = NOISE):
    """(K, H, W) float32 CAMs in [0, 1] from a ground-truth mask: per class the mask, shifted by up to p['shift'] of
    the side, multiplied by a smooth random field (parts fade out, p['drop']), plus faint spurious blobs elsewhere
    (p['spurious']), Gaussian-blurred (sigma p['blur'] of the side), max-normalised."""
    import numpy as np
    from scipy import ndimage

    h, w = mask.shape
    s = max(h, w)
    out = []
    for c in tags:
        m = (mask == c).astype(np.float32)
        k = int(p["shift"] * s)
        dy, dx = rng.integers(-k, k + 1, 2)
        m = np.roll(m, (int(dy), int(dx)), (0, 1))
        field = ndimage.gaussian_filter(rng.random((h, w)).astype(np.float32), s * 0.08)
        field = (field - field.min()) / (field.max() - field.min() + 1e-6)
        m = m * np.clip(1 - p["drop"] + 2 * p["drop"] * field, 0, 1) ** 2
        sp = ndimage.gaussian_filter((rng.random((h, w)) < p["spurious_rate"]).astype(np.float32), s * 0.04)
        m = m + p["spurious"] * sp / (sp.max() + 1e-6)
        m = ndimage.gaussian_filter(m, p["blur"] * s)
        out.append(m / (m.max() + 1e-6))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, h, w), np.float32)


class NoisyCamWorker:
    """A cam_infer Worker that writes noisy CAMs made from the ground-truth masks (stored float16)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.index = {i: k for k, i in enumerate(ctx.ids)}

    def process(self, image_id: str) -> dict:
        import numpy as np

        tags = sorted(int(t) for t in self.ctx.dataset.tags(image_id))
        rng = np.random.default_rng([self.cfg.seed, self.index[image_id]])
        cams = noisy_cams(self.ctx.dataset.mask(image_id), tags, rng)
        self.ctx.out.write(image_id, {"cam": cams.astype(np.float16)}, attrs={"classes": tags})
        return {}


def noisy_plans(cfg, cam_fp: str | None = None) -> dict:
    """The real plan with cam_infer replaced by the noisy-CAM stage (or the cam_infer output `cam_fp`); the
    refinement keys are computed by rca_core.stages.planning.stage_plan from those CAMs."""
    from rca_core.config import fingerprint
    from rca_core.stages.planning import StagePlan, data_identity, plan, stage_plan

    real = plan(cfg)
    cam_fp = cam_fp or "noisy-" + fingerprint("noisy_cams", NOISE, data_identity(cfg), cfg.seed)
    plans = dict(real)
    ci = real["cam_infer"]
    plans["cam_infer"] = StagePlan("cam_infer", cam_fp, {}, {}, ci.split, ci.record)
    for name in REFINE:
        plans[name] = stage_plan(name, cfg, {i: plans[i].fingerprint for i in real[name].inputs})
    return plans


def write_noisy_cams(cfg, store, plans: dict) -> None:
    """The noisy CAMs as a cam_infer output, through the one per-image lifecycle (PerImageRun + run_shard)."""
    from rca_core.stages.runner import PerImageRun, run_shard

    if store.stage("cam_infer", plans["cam_infer"].fingerprint).is_complete():
        return
    run = PerImageRun("cam_infer", cfg, store, plans)
    listed = run.begin()
    run.absorb(run_shard(NoisyCamWorker(cfg, run.ctx), run.ids, listed, show_progress=True))
    run.finish(noise=NOISE, dtype="float16")


def _pick(res: dict) -> dict:
    return {k: res[k] for k in KEYS} | {"iou_all": res["all"]["iou"]}


def score_cams(cam_out, ds, ids, num_classes, names, thresholds) -> dict:
    import numpy as np

    from rca_core.cam_ops import decode_cam
    from rca_core.metrics import PseudoMaskScore

    scores = {t: PseudoMaskScore(num_classes, names) for t in thresholds}
    for i in ids:
        cam, attrs = cam_out.read(i, "cam")
        cam = decode_cam(cam)  # uint8 (the default) or float16 -> float32 in [0, 1]
        gt = ds.mask(i)
        keys = np.asarray([0] + [int(c) for c in attrs["classes"]])
        best = cam.max(0) if cam.shape[0] else np.zeros(gt.shape, np.float32)
        arg = cam.argmax(0) + 1 if cam.shape[0] else np.zeros(gt.shape, np.int64)
        for t, s in scores.items():
            s.update(keys[np.where(best > t, arg, 0)].astype(np.uint8), gt)
    results = {t: s.compute() for t, s in scores.items()}
    t_best = max(results, key=lambda t: results[t]["miou_all"])
    return _pick(results[t_best]) | {"bg_threshold": t_best,
                                      "miou_by_threshold": {str(t): r["miou_all"] for t, r in results.items()}}


def score_field(out, field, ds, ids, num_classes, names) -> dict:
    from rca_core.metrics import PseudoMaskScore

    s = PseudoMaskScore(num_classes, names)
    for i in ids:
        pred, _ = out.read(i, field)
        s.update(pred, ds.mask(i))
    return _pick(s.compute())


def seconds_per_image(out) -> float | None:
    import numpy as np

    t = out.manifest()
    if "seconds" not in t.column_names or t.num_rows == 0:
        return None
    return float(np.mean(t.column("seconds").to_numpy(zero_copy_only=False)))


def refine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--noisy-cams", action="store_true", help="CAMs made from the ground-truth masks with noise")
    ap.add_argument("--cam-key", metavar="FINGERPRINT",
                    help="use the complete cam_infer/FINGERPRINT of the store (e.g. CAMs of an earlier code version)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. refine.random_walk.logt=6")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: compute.threads or 1)")


def refine(args) -> Result:
    """Pseudo-mask quality along the refinement chain: raw CAM -> CRF labels -> random-walk pseudo-masks.

For the eval split (data.eval_split; only ids that the train-split stages processed), each step is scored against
the ground truth under both protocols ("all": 255 counts as background; "confident": 255 dropped), with mean
precision / recall over classes and the kept fraction, plus the time per image of the CRF and the random walk
(from the stages' manifests: the stage's own per-image time).
- Raw CAM: argmax of [t ; CAMs] with the background threshold t swept over cam_eval.thresholds; the best t (by
  mIoU) is reported, as IRN/PSA report CAM quality.
- CRF: the confident crf_label map (stage crf_labels). Under "all" it equals the low-alpha CRF.
- Random walk: the pseudo_mask (stage random_walk).
CAMs: by default the real CAMs of the pipeline (run_stage runs cam_train .. random_walk, reusing whatever is
complete in the config's store). --noisy-cams uses CAMs made from the ground-truth masks (shifted, blurred, partly
missing, with spurious blobs) written as a cam_infer output of a key of their own, and runs crf_labels /
affinity_train / random_walk on them (keys derived from the real ones + the noise). Goals: the CRF beats the CAMs,
the random walk beats the CRF (mIoU, all pixels)."""
    import torch

    from rca_core.config import load_config, parse_overrides
    from rca_core.data import make_dataset
    from rca_core.stages.local import run_planned_stage, run_stage
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    cfg = load_config(config_file(args.config), parse_overrides(args.set) if args.set else None)
    torch.set_num_threads(args.threads or cfg.compute.threads or 1)
    store = ArtifactStore(cfg.store)
    if args.noisy_cams or args.cam_key:
        plans = noisy_plans(cfg, args.cam_key)
        if args.cam_key:
            if not store.stage("cam_infer", args.cam_key).is_complete():
                raise SystemExit(f"cam_infer/{args.cam_key} is not complete in {store.url}")
        else:
            write_noisy_cams(cfg, store, plans)
        for name in REFINE:
            if not store.stage(name, plans[name].fingerprint).is_complete():
                run_planned_stage(name, cfg, store, plans)
    else:
        plans = plan(cfg)
        run_stage("random_walk", cfg, store)
    outs = {n: store.stage(n, plans[n].fingerprint) for n in ("cam_infer",) + REFINE}
    ds = make_dataset(cfg.data, cfg.data.eval_split)
    done = set(outs["random_walk"].listed_ids())
    ids = [i for i in ds.ids if i in done and ds.has_mask(i)]
    if not ids:
        raise SystemExit(f"no image of split {cfg.data.eval_split!r} has a mask and a pseudo-mask in {store.url}")
    nc, names = cfg.data.num_classes, ds.class_names
    res = {"cam": score_cams(outs["cam_infer"], ds, ids, nc, names, cfg.cam_eval.thresholds),
           "crf": score_field(outs["crf_labels"], "crf_label", ds, ids, nc, names)
           | {"seconds_per_image": seconds_per_image(outs["crf_labels"])},
           "random_walk": score_field(outs["random_walk"], "pseudo_mask", ds, ids, nc, names)
           | {"seconds_per_image": seconds_per_image(outs["random_walk"])}}
    aff = outs["affinity_train"].summary()
    res["affinity_train"] = {k: aff.get(k) for k in ("steps", "epochs", "train_seconds", "final_loss")}
    cams = "noisy CAMs from masks" if args.noisy_cams else (
        f"CAMs cam_infer/{args.cam_key}" if args.cam_key else "CAMs of the CAM stage")
    res["setup"] = {"config": args.config, "overrides": args.set, "cams": cams, "split": cfg.data.eval_split,
                    "images": len(ids), "stage_keys": {n: o.key for n, o in outs.items()}}
    c, f, w = res["cam"]["miou_all"], res["crf"]["miou_all"], res["random_walk"]["miou_all"]
    goals = [goal("CRF labels beat raw CAMs (mIoU, all pixels)", f"{f:.3f} vs {c:.3f}", f > c),
             goal("random walk beats CRF labels (mIoU, all pixels)", f"{w:.3f} vs {f:.3f}", w > f)]
    rows = [{"step": n, **{k: res[n][k] for k in KEYS}, "s/img": res[n].get("seconds_per_image")}
            for n in ("cam", "crf", "random_walk")]
    notes = (f"CAM row: best background threshold {res['cam']['bg_threshold']}. s/img: the stage's own time per "
             f"image (CRF: two dense CRFs; random walk: AffinityNet forward + walk), one thread. AffinityNet: "
             f"{res['affinity_train']['steps']} steps, {res['affinity_train']['train_seconds'] or 0:.0f} s.")
    return Result(f"Refinement quality: CAM -> CRF labels -> random walk ({cams}, {cfg.name}, {cfg.data.eval_split} "
                  f"split, {len(ids)} images)", rows,
                  goals=goals, goal_text="each step beats the one before (mIoU, all pixels)",
                  headline={"mIoU CAM -> CRF -> walk": f"{c:.4f} -> {f:.4f} -> {w:.4f}"}, notes=notes,
                  details=res)


# ============================================================================================ segmenter
def segmenter_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="configs/demo.yaml")
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


def segmenter(args) -> Result:
    """Segmenter quality: val mIoU of the segmenter trained on pseudo-masks (WSSS) vs on ground truth (the fully
supervised upper bound), their ratio, training time per epoch, and prediction throughput.

Stages run through rca_core.stages.local.run_stage in the config's store, so stored pseudo-masks (random_walk) and
trained segmenters of the same config are reused (their timings come from the stored summaries). --wsss-labels gt
is a fallback for when no pseudo-masks can be made: both runs then train on ground truth, the output says so in
capitals, and the ratio means nothing. The default budget is the config's segmenter.epochs (--epochs 0; 8 for the
demo), the same as the main job's, so after `bash scripts/main.sh` the WSSS model and the pseudo-masks are reused
and only the supervised model is trained; from an empty store it first runs the pipeline up to random_walk.
--epochs 2 gives a quick, under-trained comparison. Prediction throughput: predict_folder over val images (read
JPEG, predict in batches, write palette PNG + overlay), with one corrupt file among them that must be reported
(the goal). The WSSS / supervised ratio has no goal."""
    config_path = Path(config_file(args.config)).resolve()
    os.chdir(ROOT)  # relative paths of the config (data root, store) are relative to the repo root
    import torch

    from rca_core.config import load_config, parse_overrides
    from rca_core.config.base import deep_update
    from rca_core.data import make_dataset
    from rca_core.predict import predict_folder
    from rca_core.stages.local import run_stage
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    torch.set_num_threads(args.threads)
    over: dict = {"compute": {"threads": args.threads}, "segmenter": {}}
    if args.epochs:
        over["segmenter"]["epochs"] = args.epochs
    if args.max_seconds:
        over["segmenter"]["max_seconds"] = args.max_seconds
    if args.store:
        over["store"] = args.store
    base = load_config(config_path, deep_update(parse_overrides(args.overrides), over))
    store = ArtifactStore(base.store)
    runs = {}
    for name, labels in [("wsss", args.wsss_labels), ("supervised", "gt")]:
        cfg = base.model_copy(deep=True)
        cfg.segmenter.labels = labels
        plans = plan(cfg)
        cached = store.stage("seg_train", plans["seg_train"].fingerprint).is_complete()
        pseudo = None
        if labels == "pseudo":
            rw = store.stage("random_walk", plans["random_walk"].fingerprint)
            print(f"[{name}] pseudo-masks: " + ("reusing stored random_walk output" if rw.is_complete() else
                                                "not stored yet - running the upstream stages (CAMs -> random walk)"),
                  flush=True)
            t = time.time()
            metrics = run_stage("random_walk", cfg, store).get("metrics") or {}
            pseudo = {"miou_all": metrics.get("miou_all"), "miou_confident": metrics.get("miou_confident"),
                      "seconds_here": time.time() - t}
        else:
            print(f"[{name}] labels: GROUND TRUTH" + (" (FALLBACK: NOT weakly supervised)" if name == "wsss" else ""),
                  flush=True)
        print(f"[{name}] segmenter: " + ("reusing the stored trained model" if cached else
                                         f"training {cfg.segmenter.arch}, {cfg.segmenter.epochs:g} epochs"), flush=True)
        ev = run_stage("seg_eval", cfg, store)
        tr = store.stage("seg_train", plans["seg_train"].fingerprint).summary()
        runs[name] = {"labels": labels, "eval": ev, "train": tr, "cached": cached, "pseudo": pseudo,
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
    ratio = wm / sm if sm else float("nan")
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
                 "arch": w["train"]["arch"], "cached": f"{ips:.1f} img/s"})
    goals = [goal("predict names the corrupt file and writes the others", f"{written}/{len(ids)} written, "
                  f"{len(errors)} error(s)", written == len(ids) and len(errors) == 1 and "corrupt.jpg" in errors[0])]
    notes = (f"WSSS labels: {labels_note}. Segmenter {w['train']['arch']} ({base.segmenter.backbone}), "
             f"{w['train']['epochs_done']} epochs, batch {base.segmenter.batch_size}, crop {base.segmenter.crop_size}, "
             f"{base.segmenter.optimizer} lr {base.segmenter.lr:g}, torch threads {args.threads}. "
             f"WSSS / supervised mIoU ratio {ratio:.3f}. Timings of cached runs come from the run that "
             "trained them. Prediction: end-to-end predict_folder (JPEG read, batched inference, palette PNG + "
             f"overlay written), model load included. Errors reported: {errors}.")
    return Result("Segmenter quality (seg_train / seg_eval / predict)", rows, goals=goals,
                  headline={"WSSS / supervised val mIoU": f"{ratio:.3f} ({wm:.4f} / {sm:.4f})",
                            "predict": f"{ips:.1f} img/s"}, notes=notes,
                  details={"wsss_val_miou": wm, "supervised_val_miou": sm, "ratio": ratio,
                           "train_seconds": w["train"]["train_seconds"], "predict_images_per_second": ips,
                           "wsss_labels": w["labels"], "wsss_labels_note": labels_note,
                           "pseudo_mask_train_miou": (w["pseudo"] or {}).get("miou_all"),
                           "seconds_per_epoch": w["train"]["seconds_per_epoch"],
                           "supervised_train_seconds": s["train"]["train_seconds"],
                           "epochs": w["train"]["epochs_done"], "wsss_per_class_iou": w["eval"]["iou"],
                           "supervised_per_class_iou": s["eval"]["iou"], "predict_errors": errors,
                           "trained_here": {k: not v["cached"] for k, v in runs.items()}, "threads": args.threads,
                           "config": str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT)
                                         else config_path)})


# ============================================================================================ workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, cfg_dict: dict, store: str, port: int, out_json: str) -> None:
    """One rank of cam_train (torch.distributed gloo when world > 1, as Ray Train runs it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RCA_NO_PROGRESS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from rca_core.config import config_from_dict
    from rca_core.stages import cam_train
    from rca_core.stages.context import make_context
    from rca_core.store import ArtifactStore

    cfg = config_from_dict(cfg_dict)
    ctx = make_context("cam_train", cfg, ArtifactStore(store, create=False), generate=False)
    if rank == 0:
        ctx.out.prepare(())
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    summary = cam_train.train(cfg, ctx)
    seconds = time.perf_counter() - t
    if rank == 0:
        ctx.out.mark_complete(summary)
        Path(out_json).write_text(json.dumps({"summary": summary, "seconds": seconds}, default=str))
    if world > 1:
        dist.destroy_process_group()


def _train_cam(cfg_dict: dict, store: str, world: int, work: Path) -> dict:
    """cam_train on `world` ranks (1 = a plain process without torch.distributed)."""
    import torch.multiprocessing as mp

    out_json = str(work / f"cam_train_w{world}.json")
    if world == 1:
        p = mp.get_context("spawn").Process(target=_rank_main, args=(0, 1, cfg_dict, store, 0, out_json))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"cam_train (1 worker) failed with exit code {p.exitcode}")
    else:
        mp.spawn(_rank_main, args=(world, cfg_dict, store, _free_port(), out_json), nprocs=world)
    return json.loads(Path(out_json).read_text())


def workers_args(ap: argparse.ArgumentParser) -> None:
    _cam_budget_args(ap, "workers_equivalence")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")


def workers(args) -> Result:
    """CAM quality on 1 vs 2 training workers: the same recipe must give the same CAMs.

For each seed it trains the CAM network twice from scratch, in separate stores: once in one process (no
torch.distributed, the `rca stage --local` path) and once on 2 ranks of torch.distributed (gloo, one process per
rank, as Ray Train runs it), with the config's global cam.train.batch_size (each rank half of it). Then
memory_build -> cam_infer -> cam_eval score both on the same first --subset training images (forked parts, as in
cam-ablation). Goals: the same global batch, optimizer steps and lr of every epoch on both; the mean
|difference| of CAM mIoU between worker counts below the spread over seeds. Budget: --epochs 3 (the contrast
warm-up scaled to 1 epoch, as in cam-ablation), 1 torch thread per process; about 6-7 minutes per seed on 2 cores."""
    from bench._lib.demo import stage_part
    from bench._lib.procs import run_forked
    from rca_core.config import load_config
    from rca_core.config.base import deep_update
    from rca_core.data import make_dataset
    from rca_core.store import ArtifactStore

    t0 = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    worlds = [int(w) for w in args.workers.split(",")]
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    over = _base_overrides(args)
    runs = []
    for seed in seeds:
        for world in worlds:
            store = str(work / f"store_s{seed}_w{world}")
            cfg = load_config(config_file(args.config), deep_update(over, {"seed": seed, "store": store}))
            cfg_dict = cfg.model_dump(mode="json")
            make_dataset(cfg.data, cfg.data.train_split, progress=False)  # the driver generates the demo set
            ArtifactStore(store)  # the driver creates the store; the ranks open it
            tr = _train_cam(cfg_dict, store, world, work)
            s = tr["summary"]
            run = {"seed": seed, "workers": world, "global_batch": s["global_batch"],
                   "per_rank_batch": s["per_rank_batch"], "steps": s["steps"],
                   "epoch_lrs": [h["lr"] for h in s["history"]], "final_map": s["final_map"],
                   "cam_train_s": round(tr["seconds"], 1)}
            for name in ("memory_build", "cam_infer", "cam_eval"):
                summary, seconds, _, _ = run_forked(stage_part, name, cfg_dict, store, 1, args.subset)
                run[f"{name}_s"] = round(seconds, 1)
                if name == "cam_eval":
                    run["miou"] = summary["miou"]
                    run["threshold"] = summary["best_threshold"]
            runs.append(run)
            print(f"[workers] seed {seed}, {world} worker(s): CAM mIoU {run['miou']:.4f} (t={run['threshold']}), "
                  f"steps {run['steps']}, global batch {run['global_batch']}, train {run['cam_train_s']} s", flush=True)
    per_run = [{k: r[k] for k in ("seed", "workers", "global_batch", "per_rank_batch", "steps", "final_map", "miou",
                                   "threshold", "cam_train_s", "memory_build_s", "cam_infer_s", "cam_eval_s")}
               for r in runs]
    by = {(r["seed"], r["workers"]): r for r in runs}
    diffs = [by[(s, worlds[1])]["miou"] - by[(s, worlds[0])]["miou"] for s in seeds] if len(worlds) > 1 else []
    miou = {w: [by[(s, w)]["miou"] for s in seeds] for w in worlds}
    spread = statistics.stdev(miou[worlds[0]]) if len(seeds) > 1 else float("nan")
    same_recipe = all(by[(s, w)]["global_batch"] == by[(s, worlds[0])]["global_batch"]
                      and by[(s, w)]["steps"] == by[(s, worlds[0])]["steps"]
                      and by[(s, w)]["epoch_lrs"] == by[(s, worlds[0])]["epoch_lrs"] for s in seeds for w in worlds)
    mean_abs = statistics.fmean(abs(d) for d in diffs) if diffs else float("nan")
    rows = [{"workers": w, "seeds": len(seeds), "miou_mean": statistics.fmean(miou[w]),
             "miou_std": statistics.stdev(miou[w]) if len(seeds) > 1 else 0.0,
             "cam_train_s_mean": statistics.fmean(by[(s, w)]["cam_train_s"] for s in seeds)} for w in worlds]
    seconds = time.time() - t0
    goals = [goal("same global batch, steps and per-epoch lr on every worker count", same_recipe, same_recipe),
             goal(f"mean |mIoU({worlds[-1]} workers) - mIoU({worlds[0]})| below the seed std",
                  f"{mean_abs:.4f} vs std {spread:.4f}", bool(diffs) and mean_abs < spread)]
    notes = (f"Total {seconds:.0f} s. Each run from scratch in its own store; cam_train with "
             f"{args.epochs or 'the config'} epochs (warm-up {args.warmup_epochs}), 1 torch thread per process "
             f"(the 2-worker run uses both cores); memory_build / cam_infer / cam_eval on the first {args.subset} "
             f"training images. Per-seed difference ({worlds[-1]} - {worlds[0]} workers): "
             + ", ".join(f"{d:+.4f}" for d in diffs) + ".")
    return Result(f"CAM mIoU on {' vs '.join(map(str, worlds))} training workers", rows, goals=goals,
                  goal_text="same recipe on every worker count; mIoU difference below the seed spread",
                  headline={"mean |diff| vs seed std": f"{mean_abs:.4f} vs {spread:.4f}"}, notes=notes,
                  extra_tables=[{"title": "Per run", "rows": per_run}],
                  details={"runs": runs, "miou": {str(w): v for w, v in miou.items()}, "diff_per_seed": diffs,
                           "mean_abs_diff": mean_abs, "seed_std": spread, "seconds": seconds})


# ============================================================================================ precision
PRECISION_VARIANTS = {"fp32, NCHW": {"precision": "fp32", "channels_last": "off"},
                      "fp32, channels-last": {"precision": "fp32", "channels_last": "on"},
                      "bf16, channels-last": {"precision": "bf16", "channels_last": "on"}}
PIPELINE_FIGURES = (("cam_eval", "miou", "CAM"), ("crf_labels", "miou_all", "CRF"),
                    ("random_walk", "miou_all", "random walk"), ("seg_eval", "miou", "segmenter val"))


def precision_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--images", type=int, default=400, help="demo training images (the config's: 1600)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    ap.add_argument("--work", default=str(BENCH_RUNS / "precision"), help="scratch folder (wiped first)")


def precision(args) -> Result:
    """The fast paths' effect on quality and time: the whole demo pipeline (cam_train .. seg_eval, the config's
recipe on --images training images) in one process with --threads torch threads, once per setting of
compute.precision / compute.channels_last: fp32 in the default memory layout (the code before the fast paths),
fp32 channels-last (the CPU default now), bf16 channels-last (autocast; the GPU default, on CPU where asked).
Each run trains from scratch in its own store, same seed; rows: each stage's mIoU and seconds. No goal: bf16
changes rounding, so its figures move within what a seed does (docs/benchmarks.md, "CAM mIoU on 1 vs 2
workers", has the seed spread)."""
    import torch

    from rca_core.config import load_config
    from rca_core.stages.local import run_stage
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    t_all = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(args.threads)
    os.environ["RCA_NO_PROGRESS"] = "1"
    rows, per_stage = [], {}
    for name, compute in PRECISION_VARIANTS.items():
        over = {"store": str(work / slug(name)), "data": {"root": str(work / "data"), "demo": {"n_train": args.images}},
                "compute": {**compute, "threads": args.threads, "device": "cpu"}}
        cfg = load_config(config_file(args.config), over)
        store = ArtifactStore(cfg.store)
        t0 = time.time()
        for last in ("cam_eval", "seg_eval"):  # seg_eval's upstream has every stage but cam_eval
            run_stage(last, cfg, store, show_progress=False)
        seconds = time.time() - t0
        plans = plan(cfg)
        summ = {n: store.stage(n, p.fingerprint).summary() for n, p in plans.items()}
        row = {"setting": name}
        for stage, key, label in PIPELINE_FIGURES:
            m = summ[stage].get("metrics") or summ[stage]
            row[label] = round(float(m[key]), 4)
        row["pipeline_s"] = round(seconds, 1)
        for stage in ("cam_train", "cam_infer", "affinity_train", "seg_train"):
            row[f"{stage}_s"] = round(float(summ[stage].get("train_seconds", summ[stage].get("seconds", 0))), 1)
        per_stage[name] = {n: {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None}
                           for n, s in summ.items()}
        rows.append(row)
        print(f"[bench] {row}", flush=True)
    headline = {r["setting"]: f"CAM {r['CAM']:.4f}, segmenter val {r['segmenter val']:.4f}, {r['pipeline_s']:.0f} s"
                for r in rows}
    notes = (f"{args.images} demo training images, the demo recipe (configs/demo.yaml), {args.threads} torch threads, "
             f"one process, CPU (AVX-512 BF16, no AMX). mIoU: CAM = cam_eval's best-threshold mIoU, CRF and random "
             f"walk on all pixels (255 as background), segmenter on val. Seconds: each stage's own (training: its "
             f"loop). Total {time.time() - t_all:.0f} s.")
    return Result("Fast paths on the demo: fp32 vs channels-last vs bf16, every stage's mIoU and time", rows,
                  headline=headline, notes=notes, details={"stages": per_stage})


SUBJECT = Subject("quality", __doc__, [
    Benchmark("cam-ablation", "plain-CAM baseline vs RCA, same budget, several seeds (goal: RCA > baseline)",
              cam_ablation_args, cam_ablation,
              lambda a: None if a.variants.replace(" ", "") == "baseline,rca" else slug(a.variants),
              "--variants other than baseline,rca (their names); give --variant with --set"),
    Benchmark("refine", "pseudo-mask quality CAM -> CRF labels -> random walk (goal: each step improves)",
              refine_args, refine,
              lambda a: "noisy-cams" if a.noisy_cams else (f"cam-{slug(a.cam_key)}" if a.cam_key else None),
              "--noisy-cams (noisy-cams), --cam-key K (cam-K); give --variant with --set"),
    Benchmark("segmenter", "segmenter on pseudo-masks vs ground truth, prediction throughput", segmenter_args,
              segmenter),
    Benchmark("workers", "CAM mIoU after training on 1 vs 2 workers (goal: within the seed spread)", workers_args,
              workers),
    Benchmark("precision", "the demo pipeline in fp32 / channels-last / bf16: every stage's mIoU and time",
              precision_args, precision),
])

if __name__ == "__main__":
    sys.exit(SUBJECT.main())

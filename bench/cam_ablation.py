"""CAM ablation: plain-CAM baseline vs RCA, same budget, several seeds (issue 3 "Show").

    python bench/cam_ablation.py --config configs/demo.yaml --seeds 3 --json OUT.json

For each seed and variant it runs, from scratch in a fresh store, the stages cam_train -> memory_build
-> cam_infer -> cam_eval (each in a forked child process, so the time and the peak resident memory of
every part are measured separately) and prints CAM mIoU (mean and spread) per variant.
Variants: `baseline` (memory, contrast and aggregation off), `rca` (the config's RCA parts, all on),
and for diagnosis `sc` (memory + contrast only) and `agg` (memory + aggregation only).
The JSON holds {"baseline_miou": [per seed], "rca_miou": [per seed], "threshold": [best background
threshold of each rca run], "baseline_threshold": [...], "seconds": total wall time, "runs": [...]}.
Every variant gets the same budget: --epochs (default 3; NOTES.md: CAMs peak early, then overfit) with
the contrast warm-up scaled to 1 epoch; training always uses the whole training split, memory build,
CAM inference (the config's scales + flip) and evaluation use its first --subset images (default 200).
Budget (CPU seconds measured with 1 thread, seed 0, --subset 200): baseline 154 s (train 119 s), RCA
199 s (train 159 s) -> about 18 CPU minutes for the default 3 seeds x 2 variants. `--jobs 2` (default)
runs baseline and RCA side by side in two processes (own stores), so the wall time on 2 idle cores is
the RCA half's, about 10 minutes; wall time is longer when the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, report  # noqa: E402
from rca_core.config import load_config, parse_overrides  # noqa: E402
from rca_core.config.base import deep_update  # noqa: E402
import rca_core.stages  # noqa: E402,F401  (imported before forking: every part runs the same code)
from rca_core.stages import cam_eval, cam_infer, cam_train, memory_build  # noqa: E402,F401

STAGES = ["cam_train", "memory_build", "cam_infer", "cam_eval"]
OFF = {"enabled": False}
VARIANTS = {
    "baseline": {"memory": OFF, "contrast": OFF, "aggregation": OFF},
    "rca": {"memory": {"enabled": True}, "contrast": {"enabled": True}, "aggregation": {"enabled": True}},
    "sc": {"memory": {"enabled": True}, "contrast": {"enabled": True}, "aggregation": OFF},
    "agg": {"memory": {"enabled": True}, "contrast": OFF, "aggregation": {"enabled": True}},
}


def _child(name, cfg_dict, store, threads, subset, q):
    os.environ["RCA_NO_PROGRESS"] = "1"
    import torch

    from rca_core.config import config_from_dict
    from rca_core.stages.context import make_context
    from rca_core.stages.planning import plan
    from rca_core.stages.runner import process_images, stage_module
    from rca_core.stages.local import run_stage
    from rca_core.store import ArtifactStore

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    t = time.perf_counter()
    try:
        if name == "cam_train" or not subset:
            summary = run_stage(name, cfg, store, with_upstream=False, show_progress=False)
        else:  # the first `subset` images of the split only; the output is not marked complete
            ctx = make_context(name, cfg, ArtifactStore(store), plan(cfg))
            ctx.ids = ctx.ids[:subset]
            mod = stage_module(name)
            if hasattr(mod, "Worker"):
                ctx.out.prepare(mod.FIELDS)
                worker = mod.Worker(cfg, ctx)
                ctx.out.write_manifest(process_images(worker, ctx.out.pending(ctx.ids)))
                summary = dict(mod.finalize(cfg, ctx) or {})
            else:
                summary = dict(mod.run(cfg, ctx) or {})
        ru = resource.getrusage(resource.RUSAGE_SELF)
        q.put(("ok", summary, time.perf_counter() - t, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime))
    except BaseException as e:  # report to the parent, which raises
        q.put(("error", f"{type(e).__name__}: {e}", 0.0, 0.0, 0.0))


def run_part(name: str, cfg_dict: dict, store: str, threads: int, subset: int | None) -> tuple[dict, float, float, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, cfg_dict, store, threads, subset, q))
    p.start()
    status, payload, seconds, rss, cpu = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"stage {name} failed: {payload}")
    return payload, seconds, rss, cpu


def run_side_by_side(args, seeds: list[int], variants: list[str]) -> list[str]:
    """Split the (seed, variant) grid over args.jobs child processes of this script (one store each):
    by variant when there are at least as many variants as jobs, else by seed. Returns their JSON paths."""
    import subprocess

    if len(variants) >= args.jobs:
        groups = [(seeds, variants[i::args.jobs]) for i in range(args.jobs)]
    else:
        groups = [(seeds[i::args.jobs], variants) for i in range(min(args.jobs, len(seeds)))]
    procs, outs = [], []
    for i, (s, v) in enumerate(groups):
        work = Path(args.work) / f"job{i}"
        out = work.with_suffix(".json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--seed-list",
               ",".join(map(str, s)), "--variants", ",".join(v), "--epochs", str(args.epochs),
               "--warmup-epochs", str(args.warmup_epochs), "--work", str(work), "--threads", str(args.threads),
               "--subset", str(args.subset), "--json", str(out), "--no-append", "--jobs", "1"]
        if args.set:
            cmd += ["--set", *args.set]
        print(f"[cam_ablation] job {i}: seeds {s}, variants {v}", flush=True)
        procs.append(subprocess.Popen(cmd))
        outs.append(str(out))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"cam_ablation: job(s) {failed} failed (see their output above)")
    return outs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=float, default=3,
                    help="cam.train.epochs for every variant (0 = the config's); NOTES.md: CAMs peak early")
    ap.add_argument("--warmup-epochs", type=float, default=1,
                    help="cam.contrast.warmup_epochs for the budget (negative = the config's)")
    ap.add_argument("--seed-list", default=None, help="run these seeds (comma list) instead of range(--seeds)")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="combine the runs of earlier --json outputs (e.g. seeds run in parallel) instead of running")
    ap.add_argument("--variants", default="baseline,rca", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--work", default="bench/out/cam_ablation", help="scratch dir (its store is wiped first)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per part")
    ap.add_argument("--subset", type=int, default=200,
                    help="memory build, CAM inference and evaluation on the first N training images (0 = all); "
                         "training always uses the whole split")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key.sub=value")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    ap.add_argument("--jobs", type=int, default=2,
                    help="run the variants (or, with one variant, the seeds) in this many side-by-side processes, "
                         "each in its own store, then merge (default 2: the 2 cores of the reference machine)")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    t0 = time.time()
    store = str(Path(args.work) / "store")
    if args.merge is None:
        shutil.rmtree(store, ignore_errors=True)
    base_over = parse_overrides(args.set)
    if args.epochs:
        base_over = deep_update(base_over, {"cam": {"train": {"epochs": args.epochs}}})
    if args.warmup_epochs >= 0:
        base_over = deep_update(base_over, {"cam": {"contrast": {"warmup_epochs": args.warmup_epochs}}})
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    runs, rows = [], []
    side_by_side = args.merge is None and args.jobs > 1 and len(seeds) * len(variants) > 1
    if side_by_side:
        args.merge = run_side_by_side(args, seeds, variants)
    if args.merge is not None:
        seeds, extra_seconds = [], 0.0
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            runs += part["runs"]
            extra_seconds = max(extra_seconds, part["seconds"])  # parts ran side by side: wall = the longest
        runs.sort(key=lambda r: (r["seed"], variants.index(r["variant"]) if r["variant"] in variants else 99))
        runs = [r for r in runs if r["variant"] in variants]
        if not side_by_side:  # earlier runs: their wall time adds to this call's
            t0 -= extra_seconds
    for seed in seeds:
        for v in variants:
            over = deep_update(base_over, {"seed": seed, "store": store, "cam": VARIANTS[v]})
            cfg = load_config(args.config, over)
            cfg_dict = cfg.model_dump(mode="json")
            run = {"variant": v, "seed": seed}
            for name in STAGES:
                summary, seconds, rss, cpu = run_part(name, cfg_dict, store, args.threads, args.subset)
                run[f"{name}_s"] = round(seconds, 1)
                run[f"{name}_cpu_s"] = round(cpu, 1)
                run[f"{name}_rss_mib"] = round(rss)
                if name == "cam_train":
                    run["epochs"] = summary.get("epochs_done")
                    run["final_map"] = summary.get("final_map")
                    run["history"] = summary.get("history")
                if name == "memory_build":
                    run["regions"] = summary.get("regions")
                if name == "cam_eval":
                    run["miou"] = summary["miou"]
                    run["threshold"] = summary["best_threshold"]
                    run["precision"] = summary["precision"]
                    run["recall"] = summary["recall"]
                    run["curve"] = summary["curve"]
            runs.append(run)
            print(f"[cam_ablation] seed {seed} {v}: mIoU {run['miou']:.4f} at t={run['threshold']} "
                  f"(train {run['cam_train_s']} s)", flush=True)
    for run in runs:
        rows.append({k: run.get(k) for k in ["variant", "seed", "epochs", "final_map", "miou", "threshold",
                                             "precision", "recall"] + [f"{s}_s" for s in STAGES]
                     + [f"{s}_cpu_s" for s in STAGES] + [f"{s}_rss_mib" for s in STAGES]})

    def mean(key, v):
        vals = [r[key] for r in runs if r["variant"] == v and r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    def peak(key, v):
        vals = [r[key] for r in runs if r["variant"] == v and r.get(key) is not None]
        return max(vals) if vals else None

    summary_rows = []
    for v in variants:
        m = [r["miou"] for r in runs if r["variant"] == v]
        summary_rows.append({"variant": v, "seeds": len(m), "miou_mean": statistics.fmean(m),
                             "miou_std": statistics.stdev(m) if len(m) > 1 else 0.0,
                             "miou_min": min(m), "miou_max": max(m),
                             **{f"{s}_s_mean": mean(f"{s}_s", v) for s in STAGES},
                             **{f"{s}_cpu_s_mean": mean(f"{s}_cpu_s", v) for s in STAGES},
                             **{f"{s}_rss_mib_max": peak(f"{s}_rss_mib", v) for s in STAGES}})
    seconds = time.time() - t0
    result = {f"{v}_miou": [r["miou"] for r in runs if r["variant"] == v] for v in variants}
    result["threshold"] = [r["threshold"] for r in runs if r["variant"] == ("rca" if "rca" in variants else variants[0])]
    for v in variants:
        result[f"{v}_threshold"] = [r["threshold"] for r in runs if r["variant"] == v]
    result["seconds"] = seconds
    result["epochs"] = runs[0]["epochs"] if runs else None
    result["runs"] = runs
    for s in summary_rows:
        print(f"[cam_ablation] {s['variant']}: CAM mIoU {s['miou_mean']:.4f} +- {s['miou_std']:.4f} "
              f"over {s['seeds']} seeds (min {s['miou_min']:.4f}, max {s['miou_max']:.4f})")
    if "baseline" in variants and "rca" in variants:
        d = statistics.fmean(result["rca_miou"]) - statistics.fmean(result["baseline_miou"])
        result["rca_minus_baseline"] = d
        result["rca_beats_baseline"] = {"goal": "RCA mean CAM mIoU > baseline mean", "measured": round(d, 4), "met": d > 0}
    notes = (f"Total {seconds:.0f} s. Per-part times are wall seconds of each stage in its own forked process "
             f"({args.threads} torch thread(s)); rss = that process's peak resident memory (includes ~0.4 GB of "
             "imported libraries). Machine shared with other jobs while measured.\n\nPer run:\n\n"
             + markdown_table(rows))
    report("CAM ablation: baseline vs RCA (bench/cam_ablation.py)", summary_rows, result, args.json,
           notes=notes, append=not args.no_append)
    return result


if __name__ == "__main__":
    main()

"""Speed-up of the per-image stages (cam_infer, crf_labels, random_walk) from 1 to 2 Ray workers.

Goal (issue 7): at least 1.8x on this 2-core machine. Both settings run in one process and one Ray
instance (ratios measured in one run), through tasks.per_image.run_per_image_stage with
cfg.ray.actors (and num_workers) = 1 and then 2, on the same finished upstream stages, each in its own copy of the
bench store (so no worker reuses a model built for the other run). Ray start-up (ray.init and warming
one worker process per CPU) is excluded from the stage times and reported. Stage time includes
building the Worker (model load) in each worker process and the stage's finalize step (driver only).
With --repeat R each setting runs R times, alternating 1 and 2 workers, and the median is used.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, report  # noqa: E402
from stage_throughput import (PER_IMAGE_STAGES, add_config_args, describe, shared_bench_config,  # noqa: E402
                              fresh_copy, measure_stage, prepare_upstream, setup_env, start_ray, stop_ray)

GOAL = 1.8


def _median(runs: list[dict]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def speedup_table(runs: dict, stages: list[str], lo: int, hi: int, col: Callable[[int], str], what: str,
                  extra: Callable[[str], dict] | None = None) -> tuple[list[dict], dict]:
    """Rows and goals of a lo -> hi scaling measurement: runs[(stage, n)] is a list of {"seconds", "images"}
    (median taken); `col(n)` names a setting's columns ("1w", "2nodes"), `what` the unit in the goals."""
    rows, goals = [], {}
    for s in stages:
        t_lo, t_hi = _median(runs[(s, lo)]), _median(runs[(s, hi)])
        n = runs[(s, lo)][0]["images"]
        sp = t_lo / t_hi
        rows.append({"stage": s, "images": n, f"seconds_{col(lo)}": t_lo, f"seconds_{col(hi)}": t_hi,
                     f"img_s_{col(lo)}": n / t_lo, f"img_s_{col(hi)}": n / t_hi, "speedup": sp,
                     **(extra(s) if extra else {})})
        goals[f"goal_{s}"] = goal(f"{s}: speed-up {lo} -> {hi} {what} >= {GOAL}x", round(sp, 3), sp >= GOAL)
    total_lo = sum(r[f"seconds_{col(lo)}"] for r in rows)
    total_hi = sum(r[f"seconds_{col(hi)}"] for r in rows)
    overall = total_lo / total_hi
    rows.append({"stage": "all three", f"seconds_{col(lo)}": total_lo, f"seconds_{col(hi)}": total_hi,
                 "speedup": overall})
    goals["speedup_overall"] = overall
    goals["goal"] = goal(f"per-image stages together: speed-up {lo} -> {hi} {what} >= {GOAL}x", round(overall, 3),
                         overall >= GOAL)
    return rows, goals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--workers", type=int, nargs=2, default=[1, 2], metavar=("FROM", "TO"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (median)")
    args = ap.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(1)
    cfg, base = shared_bench_config(args)
    t = time.perf_counter()
    prepare_upstream(cfg, args.stages)
    prep_s = time.perf_counter() - t
    w_lo, w_hi = args.workers
    cfgs = {}
    for w in (w_lo, w_hi):
        c = cfg.model_copy(deep=True)
        c.ray.num_workers = w
        c.ray.actors = w  # per-image stages run on an actor pool sized by ray.actors (num_workers is training's)
        c.store = fresh_copy(cfg.store, base / f"scaling-w{w}")
        cfgs[w] = c
    ray_info = start_ray(cfg, num_cpus=max(w_lo, w_hi))
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for s in args.stages:
            for _ in range(args.repeat):
                for w in (w_lo, w_hi):
                    r = measure_stage(cfgs[w], s, "ray")
                    runs.setdefault((s, w), []).append(r)
                    print(f"[bench] {s} x{w}: {r['seconds']:.2f} s ({r['processes']} worker processes)", flush=True)
    finally:
        ray_info["ray_shutdown_s"] = stop_ray()
        for w in (w_lo, w_hi):
            shutil.rmtree(base / f"scaling-w{w}", ignore_errors=True)
    result = {"config": args.config, "images": cfg.data.demo.n_train, "workers": [w_lo, w_hi],
              "repeat": args.repeat, **ray_info, "upstream_prepare_seconds": prep_s}
    rows, goals = speedup_table(
        runs, args.stages, w_lo, w_hi, lambda n: f"{n}w", "Ray workers",
        lambda s: {f"img_s_per_worker_{w_hi}w": runs[(s, w_hi)][0]["images"] / _median(runs[(s, w_hi)]) / w_hi,
                   f"processes_{w_hi}w": runs[(s, w_hi)][-1]["processes"]})
    result.update(goals, rows=rows, runs={f"{k[0]}/{k[1]}": v for k, v in runs.items()})
    notes = (f"{describe(cfg)}. Ray start-up, not in the stage times: ray.init {ray_info['ray_init_s']:.1f} s, "
             f"warming {ray_info['ray_worker_pids']} worker processes {ray_info['ray_warm_workers_s']:.1f} s, "
             f"shutdown {ray_info['ray_shutdown_s']:.1f} s. Stage time = Worker build in each worker process + "
             f"all shards + finalize in the driver. Median of {args.repeat} run(s) per setting.")
    report(f"Ray scaling of the per-image stages ({w_lo} -> {w_hi} workers)", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

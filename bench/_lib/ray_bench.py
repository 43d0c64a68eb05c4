"""A local Ray for benches, one measured per-image stage, speed-up tables.

`start_ray` starts a local Ray and warms one worker process per CPU (torch and the per-image stages' modules
imported), so that start-up is reported on its own and not inside a stage's time. `measure_stage` runs one
per-image stage from an empty stage folder, either in this process (rca_core.stages.local.run_stage, the plain
loop) or on the run's actor pool (tasks.per_image.run_per_image_stage with cfg.ray.actors actors).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from .common import Timer
from .demo import PER_IMAGE_STAGES, drop_stage, stage_rows
from .records import goal

SPEEDUP_GOAL = 1.8


def start_ray(num_cpus: int | None = None) -> dict:
    """ray.init and warm one worker process per CPU (each imports torch and rca_core); returns the seconds."""
    import ray

    from tasks.ray_runtime import LOCAL_RAY_ENV

    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": LOCAL_RAY_ENV},
             log_to_driver=False, configure_logging=True, logging_level="WARNING")
    t1 = time.perf_counter()

    @ray.remote(num_cpus=1)
    def warm(sleep: float) -> int:
        import torch  # noqa: F401

        from rca_core.stages.runner import stage_module
        for s in PER_IMAGE_STAGES:  # imports (torchvision, pydensecrf, ...) are start-up, not stage time
            stage_module(s)
        time.sleep(sleep)
        return os.getpid()

    n = int(ray.cluster_resources().get("CPU", 1))
    pids = ray.get([warm.remote(0.5) for _ in range(n)], timeout=300)
    return {"ray_init_s": t1 - t0, "ray_warm_workers_s": time.perf_counter() - t1, "ray_worker_pids": len(set(pids))}


def stop_ray() -> float:
    """Release the run's actor pools and shut this process's Ray down; returns the seconds."""
    import ray

    from tasks.actor_pool import release_pools

    t = time.perf_counter()
    release_pools()
    ray.shutdown()
    return time.perf_counter() - t


def measure_stage(cfg, name: str, mode: str) -> dict:
    """Run one per-image stage from scratch on its finished inputs; mode 'plain' (run_stage in this process) or
    'ray' (run_per_image_stage with cfg.ray.actors actors, Ray already started)."""
    from rca_core.stages.local import run_stage

    drop_stage(cfg, name)
    with Timer() as t:
        if mode == "plain":
            summary = run_stage(name, cfg, cfg.store, with_upstream=False, show_progress=False)
        else:
            from tasks.per_image import run_per_image_stage

            summary = run_per_image_stage(name, cfg, cfg.store)
    rows = stage_rows(cfg, name)
    n = int(summary.get("images", len(rows)))
    compute = sum(float(r.get("seconds", 0.0)) for r in rows)
    workers = 1 if mode == "plain" else (cfg.ray.actors or cfg.ray.num_workers)
    return {"stage": name, "mode": "plain loop" if mode == "plain" else f"ray x{workers}", "workers": workers,
            "images": n, "seconds": t.seconds, "images_per_s": n / t.seconds,
            "images_per_s_per_worker": n / t.seconds / workers,
            "compute_images_per_s": n / compute if compute else None,
            "ms_per_image": 1000.0 * compute / max(1, len(rows)),
            "processes": len({r.get("pid") for r in rows}) if mode != "plain" else 1}


def median_seconds(runs: list[dict]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def speedup_table(runs: dict, stages: list[str], lo: int, hi: int, col: Callable[[int], str], what: str,
                  extra: Callable[[str], dict] | None = None) -> tuple[list[dict], list[dict], float]:
    """(rows, goals, overall speed-up) of a lo -> hi scaling measurement: runs[(stage, n)] is a list of
    {"seconds", "images"} (median taken); `col(n)` names a setting's columns ("1w", "2nodes"), `what` the unit in
    the goals. The goal of the stages together comes first."""
    rows, goals = [], []
    for s in stages:
        t_lo, t_hi = median_seconds(runs[(s, lo)]), median_seconds(runs[(s, hi)])
        n = runs[(s, lo)][0]["images"]
        sp = t_lo / t_hi
        rows.append({"stage": s, "images": n, f"seconds_{col(lo)}": t_lo, f"seconds_{col(hi)}": t_hi,
                     f"img_s_{col(lo)}": n / t_lo, f"img_s_{col(hi)}": n / t_hi, "speedup": sp,
                     **(extra(s) if extra else {})})
        goals.append(goal(f"{s}: speed-up {lo} -> {hi} {what} >= {SPEEDUP_GOAL}x", round(sp, 3), sp >= SPEEDUP_GOAL))
    total_lo = sum(r[f"seconds_{col(lo)}"] for r in rows)
    total_hi = sum(r[f"seconds_{col(hi)}"] for r in rows)
    overall = total_lo / total_hi
    rows.append({"stage": "all three" if len(stages) == 3 else "all", f"seconds_{col(lo)}": total_lo,
                 f"seconds_{col(hi)}": total_hi, "speedup": overall})
    goals.insert(0, goal(f"per-image stages together: speed-up {lo} -> {hi} {what} >= {SPEEDUP_GOAL}x",
                         round(overall, 3), overall >= SPEEDUP_GOAL))
    return rows, goals, overall

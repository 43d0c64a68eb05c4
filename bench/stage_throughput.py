"""Per-image stages (cam_infer, crf_labels, random_walk): images per second per worker.

Each stage is measured on the same finished upstream stages, twice: the plain local loop
(rca_core.stages.run_stage, one process, no Ray) and one Ray worker (tasks.per_image.run_per_image_stage
with cfg.ray.actors = 1). Ray start-up (ray.init + warming the worker processes) is excluded from
the per-stage time and reported on its own. A stage's time includes building its Worker (model load)
and its finalize step, as in a real run; "compute img/s" is from the manifest's per-image seconds only.

The upstream stages (cam_train, memory_build, affinity_train, ...) are built once with the plain
runner into a bench store under runs/bench/ and reused by later runs (same fingerprints); their
training epochs are capped by --train-epochs (they are not measured here, and the speed of the
per-image stages does not depend on how long the networks were trained).

This file also holds the helpers that ray_scaling.py, growth.py, resume_cost.py and
orchestration_overhead.py share (config overrides, bench store preparation, one measured stage).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, Timer, report  # noqa: E402

PER_IMAGE_STAGES = ["cam_infer", "crf_labels", "random_walk"]
BENCH_RUNS = ROOT / "runs" / "bench"


# ----------------------------------------------------------------------------- shared helpers
def setup_env() -> None:
    """What scripts/env.sh exports, for Ray and Prefect in this process and its children."""
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false", "DO_NOT_TRACK": "1",
                 "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}.items():
        os.environ.setdefault(k, v)


def add_config_args(ap: argparse.ArgumentParser, train_epochs: float | None = 1.0) -> None:
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="run config (default: the demo)")
    ap.add_argument("--images", type=int, default=None, help="training images of the demo set (default: the config's)")
    ap.add_argument("--train-epochs", type=float, default=train_epochs,
                    help="cap the epochs of the training stages (cam_train, affinity_train, seg_train); 0 = as configured")
    ap.add_argument("--json", default=None, help="write the figures (and goals) here")
    ap.add_argument("--no-append", action="store_true", help="do not append the table to docs/benchmarks.md")
    ap.add_argument("--note", default="", help="a remark appended to the notes (e.g. 'measured while the machine was busy')")


def bench_config(config: str, images: int | None = None, train_epochs: float | None = None, store: Path | None = None,
                 workers: int | None = None, data_root: Path | None = None, scale_val: bool = False):
    """The run config of a bench: one torch thread per process, absolute paths, its own data root and store."""
    from rca_core.config import load_config, resolve_paths

    over: dict = {"compute": {"threads": 1}}
    if images:
        over.setdefault("data", {}).setdefault("demo", {})["n_train"] = int(images)
    if train_epochs:
        over["cam"] = {"train": {"epochs": train_epochs}}
        over["refine"] = {"affinity": {"epochs": train_epochs}}
        over["segmenter"] = {"epochs": train_epochs}
    cfg = resolve_paths(load_config(config, over), ROOT)
    if scale_val and images:
        cfg.data.demo.n_val = max(2, round(cfg.data.demo.n_val * images / load_config(config).data.demo.n_train))
    if cfg.data.kind == "demo":
        d = cfg.data.demo
        cfg.data.root = str(data_root or BENCH_RUNS / "data" / f"{cfg.name}-{d.n_train}-{d.n_val}-{d.size}")
    if store is not None:
        cfg.store = str(store)
    if workers:
        cfg.ray.num_workers = int(workers)
        cfg.ray.actors = int(workers)  # the per-image stages' actor pool
    return cfg


def shared_bench_config(args, workers: int | None = None):
    """(config, folder) of a bench on the shared bench store runs/bench/stores/<name>-<images>-e<epochs>/base,
    which later benches with the same data set and epochs reuse (same stage keys)."""
    probe = bench_config(args.config, args.images, args.train_epochs)
    base = BENCH_RUNS / "stores" / f"{probe.name}-{probe.data.demo.n_train}-e{args.train_epochs or 0:g}"
    return bench_config(args.config, args.images, args.train_epochs, store=base / "base", workers=workers), base


def prepare_upstream(cfg, stages: list[str], show_progress: bool = True) -> dict[str, float]:
    """Run (plain loop, once per bench store) the given stages and everything they need; returns the seconds
    spent per requested stage (with its unfinished upstream), 0 when all was already in the store."""
    from rca_core.stages.local import run_stage

    seconds = {}
    for s in stages:
        print(f"[bench] preparing {s} and its upstream in {cfg.store} ...", flush=True)
        t = time.perf_counter()
        run_stage(s, cfg, cfg.store, with_upstream=True, show_progress=show_progress)
        seconds[s] = time.perf_counter() - t
    return seconds


def fresh_copy(base_store: str, dst: Path) -> str:
    """A copy of the prepared store (a different store URL, so no Ray worker reuses a Worker built for another)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base_store, dst, ignore=shutil.ignore_patterns("_prefect_results"))
    return str(dst)


def drop_stage(cfg, name: str) -> None:
    from rca_core.stages.planning import plan

    d = Path(cfg.store) / plan(cfg)[name].key
    if d.exists():
        shutil.rmtree(d)


def start_ray(cfg, num_cpus: int | None = None) -> dict:
    """ray.init and warm one worker process per CPU (each imports torch and rca_core); returns the seconds."""
    import ray

    from tasks.ray_runtime import LOCAL_RAY_ENV as RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": RAY_ENV},
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
    import ray

    t = time.perf_counter()
    ray.shutdown()
    return time.perf_counter() - t


def stage_rows(cfg, name: str) -> list[dict]:
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    return ArtifactStore.for_config(cfg).stage(name, plan(cfg)[name].fingerprint).manifest().to_pylist()


def measure_stage(cfg, name: str, mode: str) -> dict:
    """Run one per-image stage from scratch on its finished inputs; mode 'plain' (run_stage) or 'ray'
    (run_per_image_stage with cfg.ray.actors actors, Ray already started)."""
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


def describe(cfg) -> str:
    d = cfg.data.demo
    return (f"config {cfg.name}: {d.n_train} train images of {d.size} px, torch threads 1 per process, "
            f"shard size {cfg.ray.shard_size}")


# ----------------------------------------------------------------------------- this figure
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-loop rows")
    args = ap.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(1)
    cfg, base = shared_bench_config(args, workers=1)
    t = time.perf_counter()
    upstream = prepare_upstream(cfg, args.stages)
    prep_s = time.perf_counter() - t
    rows = []
    if not args.no_plain:
        cfg_plain = cfg.model_copy(deep=True)
        cfg_plain.store = fresh_copy(cfg.store, base / "plain")
        for s in args.stages:
            rows.append(measure_stage(cfg_plain, s, "plain"))
            print(rows[-1], flush=True)
    cfg_ray = cfg.model_copy(deep=True)
    cfg_ray.store = fresh_copy(cfg.store, base / "ray1")
    ray_info = start_ray(cfg_ray)
    try:
        for s in args.stages:
            rows.append(measure_stage(cfg_ray, s, "ray"))
            print(rows[-1], flush=True)
    finally:
        ray_info["ray_shutdown_s"] = stop_ray()
    for d in ("plain", "ray1"):
        shutil.rmtree(base / d, ignore_errors=True)
    result = {"config": args.config, "images": cfg.data.demo.n_train, "rows": rows, **ray_info,
              "upstream_prepare_seconds": prep_s, "upstream_stages_run": upstream,
              "per_stage": {r["stage"] + (" plain" if r["mode"] == "plain loop" else " ray1"): r["images_per_s_per_worker"]
                            for r in rows},
              "note": "no goal of its own; the 1 -> 2 worker speed-up goal is in bench/ray_scaling.py"}
    notes = (f"{describe(cfg)}. Ray start-up (not in the stage times): ray.init {ray_info['ray_init_s']:.1f} s, "
             f"warming {ray_info['ray_worker_pids']} worker processes {ray_info['ray_warm_workers_s']:.1f} s, "
             f"shutdown {ray_info['ray_shutdown_s']:.1f} s. Stage time includes building the Worker and finalize; "
             f"compute img/s counts only per-image process() time. Upstream training epochs capped at "
             f"{args.train_epochs or 'config'} (not measured).")
    table = [{k: r[k] for k in ("stage", "mode", "images", "seconds", "images_per_s_per_worker", "compute_images_per_s",
                                "ms_per_image", "processes")} for r in rows]
    report("Per-image stage throughput (images/s per worker)", table, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

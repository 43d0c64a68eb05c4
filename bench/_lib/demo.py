"""Bench configs on the demo data set, the shared bench store, upstream stages, stage subsets, synthetic CAMs.

- `bench_config`: a run config for a bench (one torch thread per process, absolute paths, its own data root and
  store, training epochs capped);
- `shared_bench_config` + `prepare_upstream`: the upstream stages (cam_train, memory_build, affinity_train,
  ...) are built once with the plain runner into runs/bench/stores/<name>-<images>-e<epochs>/base and reused by
  every later bench with the same data set and epochs (same stage keys); `fresh_copy` gives a timed run its own
  copy, `drop_stage` empties one stage of it;
- `subset_plans`: the plans of a run whose training stages use the whole split and whose per-image stages use
  only its first N images (data.max_images in their config: their store keys say so); the stages then run
  through rca_core.stages.local.run_planned_stage, the one per-image lifecycle;
- `make_cams`: VOC-sized synthetic CAMs (smooth maps in [0, 1], mostly near zero, as normalised CAMs are).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .common import BENCH_RUNS, ROOT

PER_IMAGE_STAGES = ["cam_infer", "crf_labels", "random_walk"]
DEMO_CONFIG = "configs/demo.yaml"


def config_file(path: str) -> str:
    """A config path as given (relative to the working directory), else relative to the repository root."""
    return path if Path(path).exists() or Path(path).is_absolute() else str(ROOT / path)


def add_config_args(ap: argparse.ArgumentParser, train_epochs: float | None = 1.0) -> None:
    ap.add_argument("--config", default=DEMO_CONFIG, help="run config (default: the demo)")
    ap.add_argument("--images", type=int, default=None, help="training images of the demo set (default: the config's)")
    ap.add_argument("--train-epochs", type=float, default=train_epochs,
                    help="cap the epochs of the training stages (cam_train, affinity_train, seg_train); 0 = as "
                         "configured (default: %(default)s)")


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
    config = config_file(config)
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
    """Remove one stage's folder from a local store (the next run of it starts from nothing)."""
    from rca_core.stages.planning import plan

    d = Path(cfg.store) / plan(cfg)[name].key
    if d.exists():
        shutil.rmtree(d)


def stage_rows(cfg, name: str) -> list[dict]:
    """The stage's manifest rows (one per image: status, seconds, node, pid, ...)."""
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    return ArtifactStore.for_config(cfg).stage(name, plan(cfg)[name].fingerprint).manifest().to_pylist()


def describe(cfg) -> str:
    d = cfg.data.demo
    return (f"config {cfg.name}: {d.n_train} train images of {d.size} px, torch threads 1 per process, "
            f"shard size {cfg.ray.shard_size}")


def subset_plans(cfg, subset: int | None, full: tuple[str, ...] = ("cam_train",)):
    """(config of the subset, plans): the stages in `full` planned on the whole split, every other stage on the
    first `subset` images (data.max_images = subset in its config, so its key names the subset); with no subset,
    (cfg, plan(cfg)). Run a stage with `run_subset_stage`."""
    from rca_core.stages import registry
    from rca_core.stages.planning import plan, stage_plan

    if not subset:
        return cfg, plan(cfg)
    sub = cfg.model_copy(deep=True)
    sub.data.max_images = int(subset)
    plans: dict = {}
    for rec in registry.STAGES:
        c = cfg if rec.name in full else sub
        plans[rec.name] = stage_plan(rec.name, c, {u: plans[u].fingerprint for u in rec.upstream(c)})
    return sub, plans


def run_subset_stage(name: str, cfg, sub, plans: dict, store: str, full: tuple[str, ...] = ("cam_train",)) -> dict:
    """One stage of `subset_plans` in this process (rca_core.stages.local.run_planned_stage)."""
    from rca_core.stages.local import run_planned_stage
    from rca_core.store import ArtifactStore

    c = cfg if name in full else sub
    return run_planned_stage(name, c, ArtifactStore(store, c.storage), plans, show_progress=False)


def make_cams(n: int, seed: int = 0, voc_like: bool = True):
    """`n` float32 CAM stacks (1-3 classes) of 300-500 px a side (96 px when not voc_like): smooth blobs in
    [0, 1] with 2 % noise, max-normalised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cams = []
    for _ in range(n):
        h, w = (int(rng.integers(300, 501)), int(rng.integers(300, 501))) if voc_like else (96, 96)
        c = int(rng.integers(1, 4))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        maps = []
        for _ in range(c):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(0.1, 0.3) * max(h, w)
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            m += 0.02 * rng.standard_normal((h, w)).astype(np.float32)
            m = np.clip(m, 0, None)
            maps.append(m / m.max())
        cams.append(np.stack(maps).astype(np.float32))
    return cams


def stage_part(name: str, cfg_dict: dict, store: str, threads: int, subset: int | None) -> dict:
    """One stage of a from-scratch run (`subset_plans`: training on the whole split, per-image stages on the
    first `subset` images), with `threads` torch threads; meant for procs.run_forked (time and peak memory of the
    part alone). Returns the stage's summary."""
    import os

    import torch

    from rca_core.config import config_from_dict

    os.environ["RCA_NO_PROGRESS"] = "1"
    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    sub, plans = subset_plans(cfg, subset)
    return run_subset_stage(name, cfg, sub, plans, store)

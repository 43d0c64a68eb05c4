"""Training stages over Ray Train: TorchTrainer runs the stage's `train(cfg, ctx)` on N workers
(DDP; gloo on CPU, NCCL on GPU). Rank 0 writes checkpoints and outputs into the store; a restarted
worker group resumes from the last checkpoint. Progress goes through a small JSON file in the stage's
store folder that the driver polls (no Prefect call inside Ray workers).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from rca_core.config import RunConfig
from rca_core.stages import make_context, plan, stage_module
from rca_core.store import ArtifactStore

from .ray_runtime import gpus_per_worker

SUMMARY_FILE = "train_summary.json"
PROGRESS_FILE = "progress.json"


def _train_loop(config: dict) -> None:
    import ray.train
    import torch

    cfg = RunConfig.model_validate(config["cfg"])
    name, store_url = config["name"], config["store"]
    torch.set_num_threads(cfg.compute.threads or max(1, int(cfg.ray.cpus_per_worker)))
    store = ArtifactStore(store_url)
    rank = ray.train.get_context().get_world_rank()
    progress_path = store.stage(name, plan(cfg)[name].fingerprint).path_for(PROGRESS_FILE)

    def progress(done: int, total: int) -> None:
        if rank == 0:
            tmp = progress_path + ".tmp"
            Path(tmp).write_text(json.dumps({"done": done, "total": total, "time": time.time()}))
            os.replace(tmp, progress_path)

    ctx = make_context(name, cfg, store, progress=progress)
    if ray.train.torch.get_device().type == "cuda":
        ctx.device = ray.train.torch.get_device()
    summary = stage_module(name).train(cfg, ctx) or {}
    if rank == 0:
        tmp = ctx.out.path_for(SUMMARY_FILE + ".tmp")
        Path(tmp).write_text(json.dumps(summary, default=str))
        os.replace(tmp, ctx.out.path_for(SUMMARY_FILE))
    ray.train.report({"rank": rank})


def run_training_stage(name: str, cfg: RunConfig, store_url: str,
                       on_progress: Callable[[int, int], None] | None = None) -> dict:
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = ArtifactStore(store_url)
    out = store.stage(name, plan(cfg)[name].fingerprint)
    out.prepare(())
    t0 = time.time()
    gpus = gpus_per_worker(cfg.ray)
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    storage = out.path_for("ray_train") if store.is_local else f"{store_url.rstrip('/')}/{out.key}/files/ray_train"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "name": name, "store": store_url},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RayRunConfig(storage_path=storage, name=f"{name}-{out.key.split('/')[1]}",
                                failure_config=FailureConfig(max_failures=2)),
    )
    stop = threading.Event()
    watcher = None
    if on_progress and store.is_local:
        watcher = threading.Thread(target=_watch_progress, args=(out.path_for(PROGRESS_FILE), on_progress, stop), daemon=True)
        watcher.start()
    try:
        trainer.fit()
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
    with out.open_file(SUMMARY_FILE, "r") as f:
        summary = json.load(f)
    summary.setdefault("seconds", time.time() - t0)
    summary["train_workers"] = cfg.ray.num_workers
    out.mark_complete(summary)
    return summary


def _watch_progress(path: str, on_progress: Callable[[int, int], None], stop: threading.Event) -> None:
    last = None
    while not stop.wait(2.0):
        try:
            p = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if (p["done"], p["total"]) != last:
            last = (p["done"], p["total"])
            on_progress(p["done"], p["total"])

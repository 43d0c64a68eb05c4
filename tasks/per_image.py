"""Per-image stages over Ray: shards of image ids go to Ray tasks; each worker process builds the
stage's Worker (models loaded) once and keeps it for every later shard of the same stage.

Workers open the store by its URL with create=False and never generate the demo set; a preflight
(tasks/preflight.py) first checks that every node sees the store and the data.
The driver owns all metadata: it prepares the stage's groups, writes the manifest part of each
finished shard, runs `finalize` and marks the stage complete. Workers only write the per-image arrays
of their shard. A killed worker's shard is retried by Ray (max_retries); images already written are
kept, and rewriting one is idempotent (deterministic bytes). No Prefect call happens in a worker.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from rca_core.config import RunConfig
from rca_core.stages import KEPT, make_context, new_manifest_rows, plan, process_images, stage_module
from rca_core.store import ArtifactStore

from .preflight import preflight
from .ray_runtime import gpus_per_worker

_WORKERS: dict[tuple, object] = {}  # per worker process: (stage key, store url) -> stage Worker


def _shard_fn(name: str, cfg_json: dict, store_url: str, ids: list[str], maybe_done: list[str]) -> list[dict]:
    import ray
    import torch

    cfg = RunConfig.model_validate(cfg_json)
    key = (name, plan(cfg)[name].fingerprint, store_url)
    worker = _WORKERS.get(key)
    if worker is None:
        torch.set_num_threads(cfg.compute.threads or max(1, int(cfg.ray.cpus_per_worker)))
        mod = stage_module(name)
        store = ArtifactStore(store_url, cfg.storage, create=False)
        worker = mod.Worker(cfg, make_context(name, cfg, store, generate=False))
        _WORKERS.clear()  # one stage's models at a time per process
        _WORKERS[key] = worker
    delay = float(os.environ.get("RCA_FAULT_IMAGE_DELAY", "0"))  # fault-injection hook for reliability tests
    node = ray.get_runtime_context().get_node_id()
    rows = []
    for row in process_images(worker, ids, out=worker.ctx.out, maybe_done=set(maybe_done)):
        rows.append({**row, "node_id": node, "pid": os.getpid()})
        if delay and row["status"] != KEPT:
            time.sleep(delay)
    return rows


def run_per_image_stage(name: str, cfg: RunConfig, store_url: str,
                        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) one per-image stage across Ray workers; returns its summary.

    The driver lists which images already have arrays (one listing per field, no per-image reads) and
    sends every image out in shards; workers verify the listed ones (kept when intact) and compute the rest.
    """
    import ray

    mod = stage_module(name)
    store = ArtifactStore(store_url, cfg.storage)
    plans = plan(cfg)
    ctx = make_context(name, cfg, store, plans)
    preflight(cfg, name, plans[name].split)
    out = ctx.out
    t0 = time.time()
    out.prepare(getattr(mod, "FIELDS", ()))
    listed = set(out.done_ids())
    shards = [ctx.ids[i:i + cfg.ray.shard_size] for i in range(0, len(ctx.ids), cfg.ray.shard_size)]
    gpus = gpus_per_worker(cfg.ray)
    remote = ray.remote(max_retries=3)(_shard_fn).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=gpus, scheduling_strategy="SPREAD")
    cfg_json = cfg.model_dump(mode="json")
    total = len(ctx.ids)
    done_images = 0
    if on_progress:
        on_progress(done_images, total)
    in_flight: dict = {}
    queue = list(shards)
    nodes: set[str] = set()
    computed = 0
    while queue or in_flight:
        while queue and len(in_flight) < cfg.ray.num_workers:
            shard = queue.pop(0)
            in_flight[remote.remote(name, cfg_json, store_url, shard, [i for i in shard if i in listed])] = shard
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            shard = in_flight.pop(ref)
            rows = ray.get(ref)  # raises if the shard failed after its retries: the stage fails, work is kept
            out.write_manifest(new_manifest_rows(out, rows))
            nodes.update(r["node_id"] for r in rows)
            computed += sum(r["status"] != KEPT for r in rows)
            done_images += len(shard)
            if on_progress:
                on_progress(done_images, total)
    summary = dict(mod.finalize(cfg, ctx) or {})
    summary.setdefault("images", total)
    summary["recomputed_images"] = computed
    summary["shards"] = len(shards)
    summary["nodes"] = len(nodes)
    summary.setdefault("seconds", time.time() - t0)
    out.mark_complete(summary)
    return summary

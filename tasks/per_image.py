"""A per-image stage over the run's pool of Ray actors (driver side).

The lifecycle is rca_core.stages.runner.PerImageRun (the same as a local run): prepare the fields, list what
is stored once, hand out balanced shards (`ray.shard_size` images at most, their count a multiple of the pool
size, so the last wave has no straggler), absorb each shard's manifest rows and statistics, finalize. The
actors (tasks/actor_pool.py, tasks/remote.py) build the stage's Worker once each and verify, compute and write
their images; the driver never reads an image. No Prefect call happens in a worker.
"""
from __future__ import annotations

import time
from typing import Callable

from rca_core.config import RunConfig
from rca_core.stages.planning import plan
from rca_core.stages.runner import PerImageRun
from rca_core.store import ArtifactStore

from . import actor_pool
from .preflight import preflight


def run_per_image_stage(name: str, cfg: RunConfig, store_url: str,
                        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) one per-image stage across the actor pool; returns its summary."""
    t_start = time.time()
    plans = plan(cfg)
    run = PerImageRun(name, cfg, ArtifactStore(store_url, cfg.storage), plans)
    preflight(cfg, name, plans[name].split)
    run.begin()
    cpus, gpus = actor_pool.stage_resources(name, cfg)
    slots = actor_pool.pool_capacity(cpus, gpus)
    if cfg.ray.actors:
        slots = min(slots, cfg.ray.actors)
    shards = actor_pool.balanced_shards(run.ids, cfg.ray.shard_size, slots)
    actors = actor_pool.get_pool(cpus, gpus, min(slots, len(shards)) or 1)
    cfg_json = cfg.model_dump(mode="json")
    total = len(run.ids)
    if on_progress:
        on_progress(0, total)
    nodes, gpu_ids, assigned = set(), set(), set()
    builds: dict[tuple, int] = {}
    build_seconds: list[float] = []
    busy: dict[str, float] = {}  # node -> seconds its actors spent on images
    lost: list[str] = []

    def call(actor, shard, tries):  # a requeued shard verifies every id: the lost actor may have finished some
        return actor.run.remote(name, cfg_json, store_url, shard, run.maybe_done(shard, recheck=tries > 0))

    t_shards = time.time()
    for res in actor_pool.run_shards(actors, shards, call, lost, replace=lambda: actor_pool.grow_pool(cpus, gpus)):
        for r in run.absorb(res):
            busy[r["node_id"]] = busy.get(r["node_id"], 0.0) + float(r.get("seconds") or 0.0)
            nodes.add(r["node_id"])
        builds[(res["node_id"], res["pid"])] = res["builds"]
        build_seconds.append(res["build_seconds"])
        gpu_ids.update(res["gpu_ids"])
        assigned.add(float(res["resources"].get("GPU", 0.0)))
        if on_progress:
            on_progress(run.images, total)
    t_final = time.time()
    # where the stage's wall time went: the driver before the first shard (data set, preflight, listing, pool),
    # the shards, the driver's merge after them (added by finish)
    phases = {"setup": t_shards - t_start, "shards": t_final - t_shards}
    summary = run.finish(phase_seconds=phases, image_seconds_by_node=busy, shards=len(shards), actors=len(actors),
                         actors_lost=len(lost), worker_builds=sum(builds.values()),
                         worker_build_seconds=max(build_seconds, default=0.0),  # the slowest actor's model build
                         actor_resources={"CPU": cpus, "GPU": gpus},       # asked for
                         assigned_gpus=sorted(assigned),                   # what the actors got
                         nodes=len(nodes))
    return summary

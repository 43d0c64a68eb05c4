"""Run stages in this process, without Prefect or Ray (a notebook, `rca stage NAME --local`, the tests).

Each stage is computed holding its lease in the store (rca_core.store.lease), as in the Prefect task.

The same stage code and lifecycle as on a cluster: per-image stages through rca_core.stages.runner (one
shard), training stages through their `train(cfg, ctx)` with a checkpoint in the store.
"""
from __future__ import annotations

import logging
import time

from rca_core import object_io
from rca_core.config import RunConfig
from rca_core.store import ArtifactStore

from .context import make_context
from .planning import StagePlan, plan, upstream_closure
from .runner import run_per_image_local, stage_module

log = logging.getLogger("rca.stages")


def record_run(cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None) -> str:
    """Save the run's resolved config and every stage's key under the store's _runs/."""
    plans = plans or plan(cfg)
    return store.record_run(cfg.resolved_yaml(), cfg.fingerprint(), {n: p.key for n, p in plans.items()})


def run_stage(name: str, cfg: RunConfig, store: ArtifactStore | str | None = None, *,
              with_upstream: bool = True, show_progress: bool = True) -> dict:
    """Run one stage (and, by default, any unfinished upstream stage) in this process. Returns its summary."""
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store or cfg.store, cfg.storage)
    plans = plan(cfg)
    record_run(cfg, store, plans)
    summary: dict = {}
    for n in (upstream_closure(name, cfg) if with_upstream else [name]):
        out = store.stage(n, plans[n].fingerprint)
        if out.is_complete():
            summary = out.summary()
            continue
        for up in plans[n].inputs:
            if not store.stage(up, plans[up].fingerprint).is_complete():
                raise RuntimeError(f"stage {n} needs {up}, which is not complete in {store.url}")
        with out.lease(ttl_s=cfg.lease.ttl_s, on_busy=cfg.lease.on_busy, wait_timeout_s=cfg.lease.wait_timeout_s,
                       on_wait=lambda h, n=n: log.info("%s: waiting for another run that computes it: %s", n,
                                                       h.describe())):
            summary = out.summary() if out.is_complete() else run_planned_stage(n, cfg, store, plans, show_progress)
    return summary


def run_planned_stage(name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan],
                      show_progress: bool = True) -> dict:
    """Run one stage with the given plans in this process (its inputs must be complete)."""
    import torch

    if cfg.compute.threads:
        torch.set_num_threads(cfg.compute.threads)
    if plans[name].kind == "per_image":
        return run_per_image_local(name, cfg, store, plans, show_progress)
    t0, before = time.time(), object_io.STATS.snapshot()
    ctx = make_context(name, cfg, store, plans)
    ctx.out.prepare(())
    summary = dict(stage_module(name).train(cfg, ctx) or {})
    summary.setdefault("seconds", time.time() - t0)
    summary.update(object_io.summary_fields(object_io.stats_since(before)))
    ctx.out.mark_complete(summary)
    return summary


__all__ = ["run_stage", "run_planned_stage", "record_run"]

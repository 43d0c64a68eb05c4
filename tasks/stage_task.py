"""The Prefect task that runs one stage: cached by the stage's fingerprint, dispatched to Ray.

Cache key = stage name + stage fingerprint (its config sections, its inputs' fingerprints, its
CODE_VERSION) + library version + store location. Results and cache records are persisted inside the
store (`<store>/_prefect_results`, through fsspec for a bucket), so another machine running the flow
against the same store finds them. A run whose stage is complete in the store finds the cached result
(state Cached). If the store lost the stage, the flow passes refresh_cache=True and the task
recomputes; inside the task, finished images are skipped (per-image resume). Before computing, the task takes the
stage's lease in the store (rca_core.store.lease): a second run on the same store and config waits for the first
(then finds the stage complete) or fails naming it (`lease.on_busy`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

import rca_core
from rca_core import storage
from rca_core.config import RunConfig
from rca_core.stages.planning import plan
from rca_core.store import ArtifactStore

from . import console
from .progress import StageProgress


def cache_key(name: str, cfg: RunConfig) -> str:
    fp = plan(cfg)[name].fingerprint
    where = hashlib.sha256(storage.absolute(cfg.store).encode()).hexdigest()[:8]
    return f"rca-{name}-{fp}-v{rca_core.__version__}-{where}"


def _key_fn(context: TaskRunContext, parameters: dict) -> str:
    return parameters["key"]


def result_storage_for(cfg: RunConfig):
    """Where Prefect keeps this run's task results and cache records: inside the artifact store.
    A local store: a folder; a bucket: a RemoteFileSystem block over the same fsspec URL, saved on the
    Prefect server under a name derived from the URL (Prefect requires that); its settings hold the
    endpoint / region only, never credentials (those stay in the environment)."""
    if not storage.is_url(cfg.store):
        return Path(storage.absolute(cfg.store)) / "_prefect_results"
    from prefect.filesystems import RemoteFileSystem

    basepath = storage.join(cfg.store, "_prefect_results")
    settings = storage.options_for(cfg.store, cfg.storage)
    name = "rca-results-" + hashlib.sha256(f"{basepath} {sorted(settings.items())}".encode()).hexdigest()[:12]
    if name not in _SAVED_BLOCKS:  # Prefect wants result storage saved server-side: once per process
        RemoteFileSystem(basepath=basepath, settings=settings).save(name, overwrite=True)
        _SAVED_BLOCKS.add(name)
    return f"remote-file-system/{name}"


_SAVED_BLOCKS: set[str] = set()


def scalars(summary: dict) -> dict:
    """The scalar entries of a stage summary (nested "metrics" flattened): what a Prefect result carries."""
    metrics = summary.get("metrics") or {}
    flat = {**metrics, **summary}
    where = scored_on(summary)
    if where:
        flat["scored_on"] = where
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) or v is None}


def scored_on(summary: dict) -> str | None:
    """"train, 1464 images": the split and the number of images a stage's figures were computed on."""
    metrics = summary.get("metrics") or {}
    split = metrics.get("split") or summary.get("split")
    images = metrics.get("images") if metrics else summary.get("scored_images", summary.get("images"))
    has_figure = any(isinstance((metrics or summary).get(k), float) for k in ("miou", "miou_all"))
    return f"{split}, {images} images" if split and images is not None and has_figure else None


@task(name="run-stage", cache_key_fn=_key_fn, persist_result=True, log_prints=True)
def run_stage_task(name: str, config: RunConfig, key: str) -> dict:
    """Run one stage (over Ray) unless the store already has it; returns a small pointer + metrics."""
    from tasks.per_image import run_per_image_stage
    from tasks.training import run_training_stage

    cfg = config
    store = ArtifactStore.for_config(cfg)
    p = plan(cfg)
    out = store.stage(name, p[name].fingerprint)
    found_complete = False
    if not out.is_complete():
        for up in p[name].inputs:
            if not store.stage(up, p[up].fingerprint).is_complete():
                raise RuntimeError(f"stage {name} needs stage {up}, which is not complete in {cfg.store}")
        with out.lease(ttl_s=cfg.lease.ttl_s, on_busy=cfg.lease.on_busy, wait_timeout_s=cfg.lease.wait_timeout_s,
                       on_wait=lambda h: console.say(f"{name}: waiting for another run that computes it: "
                                                     f"{h.describe()} (lease.on_busy: fail stops instead)")) as lease:
            if lease.took_over is not None:
                h = lease.took_over
                console.say(f"{name}: took over the lease of run {h.run_id} (host {h.host}, pid {h.pid}): "
                            f"{lease.took_over_why}")
            if out.is_complete():  # the other run finished it while this one waited
                found_complete = True
            else:
                progress = StageProgress(name)
                run = run_per_image_stage if p[name].kind == "per_image" else run_training_stage
                run(name, cfg, cfg.store, on_progress=progress)
                progress.close()
    return {"stage": name, "key": out.key, "store": cfg.store, "summary": scalars(out.summary()),
            "found_complete": found_complete}

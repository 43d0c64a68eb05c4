"""The one per-image runner: the lifecycle of a per-image stage, used by the local path, the Ray actor pool
and every benchmark.

Driver side (`PerImageRun`): prepare the stage's fields in the store -> list what is there once -> hand out
shards -> absorb each shard's result (manifest rows, the workers' statistics) -> finalize (the stage module
merges the statistics; no per-image reads) -> summary and completion marker.

Worker side (`build_worker`, `run_shard`): the stage's Worker is built once per process (its models) and runs
shards: the images of a shard that were listed at the start are verified first (every field read back and its
checksum checked) and kept when finished (status "kept": the Worker's `account` folds them into its
statistics); the others are computed, the next images' inputs (the record's `prefetch`) read and decoded on
I/O threads meanwhile, and the writes go out behind (StageOutput.write_behind).

The stage module supplies `Worker(cfg, ctx)` with `process(image_id) -> dict` (+ optional `account`,
`partial`) and `finalize(cfg, ctx, parts) -> dict`; everything else is here.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from rca_core import flops, object_io
from rca_core.config import RunConfig
from rca_core.store import ArtifactStore, StageOutput

from .context import StageContext, make_context
from .label_scoring import is_scored
from .planning import StagePlan, plan

KEPT = "kept"  # manifest status of an image found finished (verified) instead of computed
# the first images of each shard computed under torch's FLOP counter (its dispatch costs a few % per image, so
# not every image): the stage's GFLOP per image is their mean, its GFLOP/s that over the seconds per image
COUNT_FLOPS_IMAGES = 2


def stage_module(name_or_plan: str | StagePlan):
    """The module with a stage's code (its record's `module`)."""
    from . import registry

    rec = name_or_plan.record if isinstance(name_or_plan, StagePlan) else registry.get(name_or_plan)
    return importlib.import_module(rec.module)


# ------------------------------------------------------------------------------------------ worker side
def build_worker(name: str, cfg: RunConfig, store: ArtifactStore, *, device=None, generate: bool = False,
                 ctx: StageContext | None = None):
    """The stage's Worker (models loaded) for this process; `device` overrides the config's choice."""
    ctx = ctx or make_context(name, cfg, store, generate=generate)
    if device is not None:
        ctx.device = device
    return stage_module(ctx.plan).Worker(cfg, ctx)


def run_shard(worker: Any, ids: list[str], maybe_done: set[str] | None = None, *, show_progress: bool = False,
              on_done: Callable[[int, int], None] | None = None, lookahead: int = 2, io_threads: int = 4) -> dict:
    """Run a shard on a built Worker: {"rows": manifest rows, "partial": the Worker's statistics or None}."""
    rows = process_images(worker, ids, show_progress=show_progress, on_done=on_done, out=worker.ctx.out,
                          maybe_done=maybe_done, lookahead=lookahead, io_threads=io_threads)
    # this worker's matmul peak (its device and threads; measured once per process), where it ran model FLOPs
    ran_networks = any(r.get("gflop") for r in rows)
    peak = flops.matmul_peak_gflops(worker.ctx.device) if ran_networks else None
    fast = worker.ctx.fast() if ran_networks else None  # the precision and memory format its networks ran in
    return {"rows": rows, "partial": worker.partial() if hasattr(worker, "partial") else None, "peak_gflops": peak,
            "fast": {"compute_precision": fast.precision, "channels_last": fast.channels_last} if fast else None}


def process_images(worker: Any, ids: list[str], show_progress: bool = False, desc: str = "",
                   on_done: Callable[[int, int], None] | None = None, out: StageOutput | None = None,
                   maybe_done: set[str] | None = None, prefetch: tuple[str, ...] | None = None,
                   lookahead: int = 2, io_threads: int = 4) -> list[dict]:
    """Run worker.process over ids; returns manifest rows (image_id, status, seconds, written_at + stage stats).

    Resume: with `out`, the ids (or only those in `maybe_done`, when given) are verified first, concurrently;
    a finished one is kept (status "kept", `account(image_id)` called), a damaged or missing one is computed.
    I/O overlaps compute: the inputs named by `prefetch` (default: the stage record's) of the next `lookahead`
    images are read and decoded on background threads while the current one is computed ("mask" only for the
    images the stage scores), and with `out`, writes go out on background threads."""
    from tqdm.auto import tqdm

    ctx = getattr(worker, "ctx", None)
    if prefetch is None:
        prefetch = tuple(ctx.plan.record.prefetch) if ctx is not None and ctx.plan is not None else ()
    rows: list[dict] = []
    pool = ThreadPoolExecutor(io_threads, thread_name_prefix="rca-io")
    try:
        has_fields = out is not None and bool(out.fields)
        check = [i for i in ids if has_fields and (maybe_done is None or i in maybe_done)]
        kept = {i for i, ok in zip(check, pool.map(lambda i: out.is_done(i, verify=True), check)) if ok}
        todo = [i for i in ids if i not in kept]
        position = {i: k for k, i in enumerate(todo)}

        def start(k: int) -> None:
            if ctx is None or k >= len(todo):
                return
            for spec in prefetch:
                if spec == "mask" and not is_scored(ctx, todo[k]):
                    continue  # masks are read for the images a stage scores only
                if spec in ("image", "mask"):
                    ctx.dataset.prefetch(spec, todo[k], pool)
                else:
                    role, fld = spec.split("/", 1)
                    ctx.inputs[role].prefetch(todo[k], fld, pool)

        for k in range(min(lookahead, len(todo))):
            start(k)
        writes = out.write_behind() if out is not None else contextlib.nullcontext()
        n_counted = 0
        with writes:
            for n, image_id in enumerate(tqdm(ids, desc=desc, disable=not show_progress, leave=False)):
                t = time.perf_counter()
                if image_id in kept:
                    if hasattr(worker, "account"):
                        worker.account(image_id)
                    rows.append({"image_id": image_id, "status": KEPT, "seconds": time.perf_counter() - t})
                else:
                    start(position[image_id] + lookahead)
                    counting = n_counted < COUNT_FLOPS_IMAGES
                    with flops.counting() if counting else contextlib.nullcontext() as counted:
                        stats = worker.process(image_id) or {}
                    n_counted += counting
                    rows.append({"image_id": image_id, "status": "done", "seconds": time.perf_counter() - t,
                                 "written_at": time.time(), "gflop": round(counted.gflop, 3) if counting else None,
                                 **stats})
                if on_done:
                    on_done(n + 1, len(ids))
    finally:
        if ctx is not None:
            if hasattr(ctx.dataset, "drop_prefetched"):
                ctx.dataset.drop_prefetched()
            for inp in ctx.inputs.values():
                inp.drop_prefetched()
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


# ------------------------------------------------------------------------------------------ driver side
def new_manifest_rows(rows: list[dict], in_manifest: set[str]) -> list[dict]:
    """The rows of a shard to append to the manifest: every computed image, and the kept images the manifest
    lacks (`in_manifest`: its image ids; an image finished before an interruption whose shard never reported)."""
    return [r for r in rows if r["status"] != KEPT or r["image_id"] not in in_manifest]


class PerImageRun:
    """One per-image stage run, driver side: `begin()`, then `maybe_done(shard)` / `absorb(result)` per
    shard, then `finish(**summary)`. The driver never reads the stage's images itself."""

    def __init__(self, name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None,
                 ctx: StageContext | None = None):
        self.name, self.cfg, self.store = name, cfg, store
        self.ctx = ctx or make_context(name, cfg, store, plans or plan(cfg))
        self.out = self.ctx.out
        self.record = self.ctx.plan.record
        self.listed: set[str] = set()
        self.parts: list = []
        self.images = 0
        self.computed = 0
        self._manifest_has: set[str] | None = None
        self.t0 = time.time()  # reset by begin(): a stage's "seconds" run from there
        self.storage_before = object_io.STATS.snapshot()  # this process's object-storage requests from here on
        self.worker_storage: list[dict] = []               # the workers' (other processes), shard by shard
        self.gflop_counted, self.images_counted = 0.0, 0  # model FLOPs of the images counted (COUNT_FLOPS_IMAGES)
        self.compute_seconds = 0.0  # the computed images' seconds
        self.peaks: list[float] = []             # the workers' matmul peaks (GFLOP/s), shard by shard
        self.fast: dict | None = None            # the workers' precision and memory format (stages with networks)

    @property
    def ids(self) -> list[str]:
        return self.ctx.ids

    def begin(self) -> set[str]:
        """Create the stage's fields and list what is stored already (one listing per field): only those ids
        are verified by the workers; an id not listed is computed without a read."""
        self.t0 = time.time()
        self.out.prepare(self.record.fields)
        self.listed = set(self.out.listed_ids())
        return self.listed

    def maybe_done(self, shard: list[str], recheck: bool = False) -> list[str] | None:
        """The shard's ids to verify before computing; None (verify all) for a shard that comes back after
        a lost worker, which may have finished some of them."""
        return None if recheck else [i for i in shard if i in self.listed]

    def absorb(self, result: dict) -> list[dict]:
        """Fold a shard's result in: its manifest rows (a kept image only where the manifest lacks it: it was
        finished before an interruption whose shard never reported back) and its statistics. Returns its rows."""
        rows = result["rows"]
        if any(r["status"] == KEPT for r in rows) and self._manifest_has is None:  # read once per stage
            self._manifest_has = set(self.out.manifest().column("image_id").to_pylist())
        self.out.write_manifest(new_manifest_rows(rows, self._manifest_has or set()))
        if result.get("partial") is not None:
            self.parts.append(result["partial"])
        self.images += len(rows)
        self.computed += sum(r["status"] != KEPT for r in rows)
        counted = [r["gflop"] for r in rows if r["status"] != KEPT and r.get("gflop") is not None]
        self.gflop_counted += sum(counted)
        self.images_counted += len(counted)
        self.compute_seconds += sum(r["seconds"] for r in rows if r["status"] != KEPT)
        if result.get("peak_gflops"):
            self.peaks.append(result["peak_gflops"])
        if result.get("fast"):
            self.fast = result["fast"]
        if result.get("storage"):
            self.worker_storage.append(result["storage"])
        return rows

    def finish(self, **extra) -> dict:
        """The stage module's finalize over the absorbed statistics, the summary (with `extra`), the completion
        marker. A `phase_seconds` dict in `extra` gets the finalize's own time as "finalize"."""
        t = time.time()
        summary = dict(stage_module(self.ctx.plan).finalize(self.cfg, self.ctx, self.parts) or {})
        if isinstance(extra.get("phase_seconds"), dict):
            extra["phase_seconds"] = {**extra["phase_seconds"], "finalize": time.time() - t}
        summary.setdefault("images", len(self.ids))
        summary["recomputed_images"] = self.computed
        summary["listed_at_start"] = len(self.listed)
        summary.update(object_io.summary_fields(object_io.stats_since(self.storage_before), *self.worker_storage))
        if self.gflop_counted > 0:  # per worker: model FLOPs per image over seconds per image, against its peak
            per_image = self.gflop_counted / self.images_counted
            summary.update(flops.utilisation(per_image * self.computed, self.compute_seconds,
                                             statistics.median(self.peaks) if self.peaks else None))
            summary["gflop_per_image"] = round(per_image, 2)
        if self.fast:
            summary.update(self.fast)
        summary.update(extra)
        summary.setdefault("seconds", time.time() - self.t0)
        self.out.mark_complete(summary)
        return summary


def run_per_image_local(name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None,
                        show_progress: bool = False) -> dict:
    """A per-image stage in this process: the same lifecycle as on the actor pool, with one shard."""
    run = PerImageRun(name, cfg, store, plans)
    listed = run.begin()
    worker = build_worker(name, cfg, store, ctx=run.ctx)
    run.absorb(run_shard(worker, run.ids, listed, show_progress=show_progress))
    return run.finish()


__all__ = ["KEPT", "PerImageRun", "new_manifest_rows", "build_worker", "run_shard", "process_images", "run_per_image_local",
           "stage_module"]

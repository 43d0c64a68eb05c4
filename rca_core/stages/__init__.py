"""The stage registry: which stages exist, what they depend on, how their store keys are derived,
and a plain local runner (`run_stage`) that the Prefect/Ray layer mirrors.

A stage's fingerprint = hash(stage name, stage CODE_VERSION, the config sections that shape its
outputs, the data set identity, the seed, the fingerprints of its inputs). So changing one stage's
config changes its key and the keys of every stage after it, and nothing before it.
"""
from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from rca_core.config import RunConfig, fingerprint
from rca_core.store import ArtifactStore, StageOutput

from .context import StageContext

# name -> (module, input stage names, config sections that shape its outputs, split attribute of cfg.data)
_REGISTRY: dict[str, tuple[str, tuple[str, ...], Callable[[RunConfig], Any], str]] = {
    "cam_train": ("rca_core.stages.cam_train", (), lambda c: {"cam": c.cam}, "train_split"),
    "memory_build": ("rca_core.stages.memory_build", ("cam_train",), lambda c: {"agg": c.cam.aggregation}, "train_split"),
    "cam_infer": ("rca_core.stages.cam_infer", ("cam_train", "memory_build"), lambda c: {"infer": c.cam_infer}, "train_split"),
    "cam_eval": ("rca_core.stages.cam_eval", ("cam_infer",), lambda c: {"eval": c.cam_eval}, "eval_split"),
    "crf_labels": ("rca_core.stages.crf_labels", ("cam_infer",), lambda c: {"crf": c.refine.crf}, "train_split"),
    "affinity_train": ("rca_core.stages.affinity_train", ("crf_labels",), lambda c: {"aff": c.refine.affinity}, "train_split"),
    "random_walk": ("rca_core.stages.random_walk", ("cam_infer", "affinity_train"),
                    lambda c: {"rw": c.refine.random_walk, "sal": c.refine.saliency}, "train_split"),
    "seg_train": ("rca_core.stages.seg_train", ("random_walk",), lambda c: {"seg": c.segmenter.model_dump(
        exclude={"eval_scales", "eval_flip", "eval_crf", "eval_crf_params"})}, "train_split"),
    "seg_eval": ("rca_core.stages.seg_eval", ("seg_train",), lambda c: {"seg_eval": c.segmenter.model_dump(
        include={"eval_scales", "eval_flip", "eval_crf", "eval_crf_params"})}, "val_split"),
}
STAGES: list[str] = list(_REGISTRY)


@dataclass(frozen=True)
class StagePlan:
    name: str
    fingerprint: str
    inputs: dict[str, str]   # upstream name -> its fingerprint
    split: str
    module: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.fingerprint}"


def stage_module(name: str):
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    return importlib.import_module(_REGISTRY[name][0])


def stage_inputs(name: str, cfg: RunConfig | None = None) -> tuple[str, ...]:
    inputs = _REGISTRY[name][1]
    if name == "seg_train" and cfg is not None and cfg.segmenter.labels == "gt":
        return ()  # the fully supervised upper bound needs no pseudo-masks
    return inputs


def stage_kind(name: str) -> str:
    """'per_image' (Worker + finalize), 'training' (train) or 'driver' (run)."""
    mod = stage_module(name)
    if hasattr(mod, "Worker"):
        return "per_image"
    if hasattr(mod, "train"):
        return "training"
    if hasattr(mod, "run"):
        return "driver"
    raise TypeError(f"stage module {mod.__name__} defines none of Worker, train, run")


def data_identity(cfg: RunConfig) -> dict:
    """What names the data: for the demo set its generator settings and version (not where it lives)."""
    d = cfg.data.model_dump(mode="json")
    if cfg.data.kind == "demo":
        from rca_core.data.demo import GENERATOR_VERSION

        d.pop("root")
        d["generator_version"] = GENERATOR_VERSION
    else:
        d.pop("demo")
    return d


def plan(cfg: RunConfig) -> dict[str, StagePlan]:
    """Fingerprints of every stage, in dependency order."""
    out: dict[str, StagePlan] = {}
    for name in STAGES:
        inputs = {i: out[i].fingerprint for i in stage_inputs(name, cfg)}
        out[name] = stage_plan(name, cfg, inputs)
    return out


def stage_plan(name: str, cfg: RunConfig, inputs: dict[str, str]) -> StagePlan:
    """One stage's plan given its inputs' keys (e.g. to refine CAMs from another source)."""
    modname, _, section, split_attr = _REGISTRY[name]
    code = getattr(_maybe_module(modname), "CODE_VERSION", "0")
    fp = fingerprint(name, code, weights_identity(section(cfg)), data_identity(cfg), cfg.seed, inputs)
    return StagePlan(name, fp, inputs, getattr(cfg.data, split_attr), modname)


_WEIGHT_HASHES: dict[tuple, str] = {}


def weights_identity(section: Any) -> Any:
    """The section as JSON with every `pretrained` file replaced by the hash of its content: a stage key
    names the weights, not where they are (a local path, another working directory, or the copy that
    rca_core.config.stage_weights put in the store under _inputs/weights/<hash>/)."""
    from pydantic_core import to_jsonable_python

    def walk(obj):
        if isinstance(obj, dict):
            return {k: (_weights_hash(v) if k == "pretrained" and isinstance(v, str) and v else walk(v))
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(to_jsonable_python(section))


def _weights_hash(location: str) -> str:
    import os
    import re

    from rca_core import storage

    m = re.search(r"/_inputs/weights/([0-9a-f]{16})/[^/]+$", location)
    if m:
        return f"sha256:{m.group(1)}"
    if storage.is_url(location):
        key = (location,)
    else:
        try:
            st = os.stat(location)
        except OSError:
            return f"missing:{location}"  # load time names the missing file
        key = (os.path.abspath(location), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHT_HASHES:
        _WEIGHT_HASHES[key] = storage.content_hash(location)
    return f"sha256:{_WEIGHT_HASHES[key]}"


def _maybe_module(modname: str):
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            return None  # stage not written yet: plan still works for the others
        raise


def upstream_closure(name: str, cfg: RunConfig) -> list[str]:
    """`name` and everything it needs, in run order."""
    need: list[str] = []

    def visit(n: str):
        for i in stage_inputs(n, cfg):
            visit(i)
        if n not in need:
            need.append(n)

    visit(name)
    return need


def make_context(name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None,
                 progress: Callable[[int, int], None] | None = None, generate: bool = True) -> StageContext:
    """A stage's context. Workers pass generate=False: they never generate the demo data set."""
    from rca_core.data import make_dataset
    from rca_core.device import pick_device

    plans = plans or plan(cfg)
    p = plans[name]
    ds = make_dataset(cfg.data, p.split, generate=generate, progress=generate, storage_options=cfg.storage)
    if not ds.ids:
        split_file = f"{cfg.data.root}/ImageSets/Segmentation/{p.split}.txt"
        raise ValueError(f"stage {name}: split {p.split!r} lists no images ({split_file}); nothing to run on")
    return StageContext(
        out=store.stage(name, p.fingerprint),
        inputs={i: store.stage(i, fp) for i, fp in p.inputs.items()},
        ids=list(ds.ids), dataset=ds, device=pick_device(cfg.compute.device), progress=progress,
        extra={"split": p.split, "stage_key": p.key, **eval_subset(cfg, p.split, ds.ids)},
    )


def eval_subset(cfg: RunConfig, split: str, ids: list[str]) -> dict:
    """Which of a stage's images are scored: those of data.eval_split (pseudo-masks are made for the whole
    training split, e.g. VOC train_aug, and scored on VOC train, as every paper does)."""
    eval_split = cfg.data.eval_split
    if eval_split == split:
        return {"eval_split": eval_split, "eval_ids": None}
    from rca_core.data.voc import read_split

    wanted = read_split(cfg.data.root, eval_split, cfg.storage)
    if cfg.data.max_images is not None:
        wanted = wanted[:cfg.data.max_images]
    return {"eval_split": eval_split, "eval_ids": set(wanted) & set(ids)}


def record_run(cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None) -> str:
    plans = plans or plan(cfg)
    return store.record_run(cfg.resolved_yaml(), cfg.fingerprint(), {n: p.key for n, p in plans.items()})


def run_stage(name: str, cfg: RunConfig, store: ArtifactStore | str | None = None, *,
              with_upstream: bool = True, show_progress: bool = True) -> dict:
    """Run one stage (and, by default, any unfinished upstream stage) in this process. Returns its summary."""
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store or cfg.store, cfg.storage)
    plans = plan(cfg)
    record_run(cfg, store, plans)
    order = upstream_closure(name, cfg) if with_upstream else [name]
    summary: dict = {}
    for n in order:
        out = store.stage(n, plans[n].fingerprint)
        if out.is_complete():
            summary = out.summary()
            continue
        for i in stage_inputs(n, cfg):
            if not store.stage(i, plans[i].fingerprint).is_complete():
                raise RuntimeError(f"stage {n} needs {i}, which is not complete in {store.url}")
        summary = run_planned_stage(n, cfg, store, plans, show_progress)
    return summary


def run_planned_stage(name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan],
                      show_progress: bool = True) -> dict:
    """Run one stage with the given plans in this process (its inputs must be complete)."""
    import torch

    if cfg.compute.threads:
        torch.set_num_threads(cfg.compute.threads)
    mod = stage_module(name)
    ctx = make_context(name, cfg, store, plans)
    t0 = time.time()
    if hasattr(mod, "Worker"):
        ctx.out.prepare(getattr(mod, "FIELDS", ()))
        worker = mod.Worker(cfg, ctx)
        rows = process_images(worker, ctx.ids, show_progress=show_progress, desc=name, out=ctx.out,
                              maybe_done=set(ctx.out.listed_ids()))
        ctx.out.write_manifest(new_manifest_rows(ctx.out, rows))
        parts = [worker.partial()] if hasattr(worker, "partial") else []
        summary = dict(mod.finalize(cfg, ctx, parts) or {})
        summary.setdefault("images", len(ctx.ids))
        summary.setdefault("recomputed_images", sum(r["status"] == "done" for r in rows))
    elif hasattr(mod, "train"):
        ctx.out.prepare(())
        summary = dict(mod.train(cfg, ctx) or {})
    else:
        ctx.out.prepare(())
        summary = dict(mod.run(cfg, ctx) or {})
    summary.setdefault("seconds", time.time() - t0)
    ctx.out.mark_complete(summary)
    return summary


KEPT = "kept"  # manifest status of an image found finished (verified) instead of computed


def new_manifest_rows(out: StageOutput, rows: list[dict]) -> list[dict]:
    """The rows to append to the manifest: every computed image, and kept images the manifest lacks
    (finished before an interruption whose shard never reported back)."""
    kept = [r for r in rows if r["status"] == KEPT]
    if not kept:
        return rows
    have = set(out.manifest().column("image_id").to_pylist())
    return [r for r in rows if r["status"] != KEPT or r["image_id"] not in have]


def process_images(worker: Any, ids: list[str], show_progress: bool = False, desc: str = "",
                   on_done: Callable[[int, int], None] | None = None, out: StageOutput | None = None,
                   maybe_done: set[str] | None = None, prefetch: tuple[str, ...] | None = None,
                   lookahead: int = 2, io_threads: int = 4) -> list[dict]:
    """Run worker.process over ids; returns manifest rows (image_id, status, seconds, written_at + stage stats).

    Resume: with `out`, the ids (or only those in `maybe_done`, when given) are verified first, concurrently
    (every field read back, checksum checked); a finished one is kept (status "kept", not recomputed; the
    worker's `account(image_id)` folds its stored output into the stage's statistics), a damaged or missing
    one is computed.
    I/O overlaps compute: the inputs named by the stage's PREFETCH ("image", "mask", "<stage>/<field>") of the
    next `lookahead` images are read and decoded on background threads while the current one is computed ("mask"
    only for the images the stage scores), and with `out`, writes go out on background threads
    (StageOutput.write_behind)."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .label_scoring import is_scored

    ctx = getattr(worker, "ctx", None)
    if prefetch is None:
        prefetch = tuple(getattr(sys.modules.get(type(worker).__module__), "PREFETCH", ()))
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
                    stage, field = spec.split("/", 1)
                    ctx.inputs[stage].prefetch(todo[k], field, pool)

        for k in range(min(lookahead, len(todo))):
            start(k)
        writes = out.write_behind() if out is not None else contextlib.nullcontext()
        with writes:
            it = tqdm(ids, desc=desc, disable=not show_progress, leave=False)
            for n, image_id in enumerate(it):
                t = time.perf_counter()
                if image_id in kept:
                    if hasattr(worker, "account"):
                        worker.account(image_id)
                    rows.append({"image_id": image_id, "status": KEPT, "seconds": time.perf_counter() - t})
                else:
                    start(position[image_id] + lookahead)
                    stats = worker.process(image_id) or {}
                    rows.append({"image_id": image_id, "status": "done", "seconds": time.perf_counter() - t,
                                 "written_at": time.time(), **stats})
                if on_done:
                    on_done(n + 1, len(ids))
    finally:
        if ctx is not None:
            ctx.dataset.drop_prefetched() if hasattr(ctx.dataset, "drop_prefetched") else None
            for inp in ctx.inputs.values():
                inp.drop_prefetched()
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


__all__ = ["STAGES", "StagePlan", "StageContext", "plan", "run_stage", "make_context", "stage_module",
           "stage_inputs", "stage_kind", "record_run", "upstream_closure", "process_images", "new_manifest_rows", "stage_plan",
           "run_planned_stage"]

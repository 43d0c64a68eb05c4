"""Per-image stages on the run's actor pool (tasks/per_image.py) vs Ray Data `map_batches` with an actor class.

Issue 13 asks that the choice be made by measurement. Both run the same stage the same way around the fan-out:
the driver builds the stage context, runs the preflight, prepares the stage, lists what is already stored, and
after the fan-out writes the manifest rows, merges the workers' statistics (`finalize`) and marks the stage
complete. Only the fan-out differs:
- pool: `tasks.per_image.run_per_image_stage` (balanced shards of `ray.shard_size` images, one actor per slot,
  the Worker built once per actor and kept for later shards and stages of the same key);
- ray_data: `ray.data.from_items(ids).map_batches(ShardFn, batch_size=shard, compute=ActorPoolStrategy(size=n),
  num_cpus=1)`, where
  ShardFn builds the stage's Worker in its constructor and runs the same `process_images` over each batch,
  returning the batch's manifest rows and pickled statistics as one output row.
Three settings per stage and actor count: "pool, warm" (the run's pool processes already started but holding no
models of the stage, as for every stage after the first in a run), "pool, cold" (pools released first: actor processes started inside the timed stage, as for
the first stage of a run) and "ray_data" (Ray Data starts its actors for every dataset it executes). Each timed
run starts from an empty stage folder; the order of the settings alternates between repeats.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import report  # noqa: E402
from stage_throughput import (PER_IMAGE_STAGES, add_config_args, describe, shared_bench_config,  # noqa: E402
                              drop_stage, fresh_copy, prepare_upstream, setup_env, start_ray, stop_ray)

SETTINGS = ("pool, warm", "pool, cold", "ray_data")


class ShardFn:
    """Ray Data's actor class: the stage's Worker built once per actor, one batch of ids per call."""

    def __init__(self, name: str, cfg_json: dict, store_url: str):
        import torch

        from rca_core.config import RunConfig
        from rca_core.stages.context import make_context
        from rca_core.stages.runner import stage_module
        from rca_core.store import ArtifactStore

        cfg = RunConfig.model_validate(cfg_json)
        torch.set_num_threads(cfg.compute.threads or 1)
        ctx = make_context(name, cfg, ArtifactStore(store_url, cfg.storage, create=False), generate=False)
        self.worker = stage_module(name).Worker(cfg, ctx)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from rca_core.stages.runner import process_images

        ids = [str(i) for i in batch["id"]]
        rows = process_images(self.worker, ids, out=self.worker.ctx.out, maybe_done=set())
        part = self.worker.partial() if hasattr(self.worker, "partial") else None
        return {"rows": np.array([json.dumps(rows)], dtype=object),
                "partial": np.array([pickle.dumps(part)], dtype=object)}


def run_ray_data(name: str, cfg, store_url: str, actors: int) -> dict:
    """The stage with its fan-out through Ray Data; the driver's part as in run_per_image_stage."""
    import ray.data

    from rca_core.stages.context import make_context
    from rca_core.stages.planning import plan
    from rca_core.stages.runner import stage_module
    from rca_core.store import ArtifactStore
    from tasks.per_image import balanced_shards
    from tasks.preflight import preflight

    mod = stage_module(name)
    store = ArtifactStore(store_url, cfg.storage)
    plans = plan(cfg)
    ctx = make_context(name, cfg, store, plans)
    preflight(cfg, name, plans[name].split)
    out = ctx.out
    out.prepare(getattr(mod, "FIELDS", ()))
    out.listed_ids()
    shard = len(balanced_shards(ctx.ids, cfg.ray.shard_size, actors)[0])
    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = False
    ds = ray.data.from_items([{"id": i} for i in ctx.ids], override_num_blocks=max(1, -(-len(ctx.ids) // shard)))
    res = ds.map_batches(ShardFn, fn_constructor_args=(name, cfg.model_dump(mode="json"), store_url),
                         batch_size=shard, compute=ray.data.ActorPoolStrategy(size=actors),
                         num_cpus=float(cfg.ray.cpus_per_worker),
                         batch_format="numpy").take_all()
    parts = []
    for r in res:
        out.write_manifest(json.loads(r["rows"]))
        part = pickle.loads(r["partial"])
        if part is not None:
            parts.append(part)
    summary = dict(mod.finalize(cfg, ctx, parts) or {})
    summary["images"] = len(ctx.ids)
    out.mark_complete(summary)
    return summary



def timed(setting: str, name: str, cfg, actors: int) -> dict:
    from tasks.per_image import get_pool, release_pools, run_per_image_stage, stage_resources

    import ray

    drop_stage(cfg, name)
    if setting == "pool, warm":  # processes up, the stage's models not built yet: the next stage of a run
        pool = get_pool(cfg, *stage_resources(name, cfg), actors)
        ray.get([a.drop_models.remote() for a in pool], timeout=300)
    else:
        release_pools()
    t = time.perf_counter()
    if setting == "ray_data":
        summary = run_ray_data(name, cfg, cfg.store, actors)
    else:
        summary = run_per_image_stage(name, cfg, cfg.store)
    sec = time.perf_counter() - t
    metrics = summary.get("metrics") or {}
    return {"seconds": sec, "images": int(summary.get("images", 0)),
            "miou": metrics.get("miou_all", metrics.get("miou"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting (median)")
    args = ap.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(1)
    cfg, base = shared_bench_config(args)
    t = time.perf_counter()
    prepare_upstream(cfg, args.stages, show_progress=False)
    prep_s = time.perf_counter() - t
    cfgs = {}
    for n in args.actors:
        c = cfg.model_copy(deep=True)
        c.ray.num_workers = c.ray.actors = n
        c.store = fresh_copy(cfg.store, base / f"data-vs-pool-{n}")
        cfgs[n] = c
    ray_info = start_ray(cfg, num_cpus=max(args.actors))
    runs: dict[tuple, list[dict]] = {}
    try:
        for s in args.stages:
            for rep in range(args.repeat):
                for n in args.actors:
                    order = SETTINGS if rep % 2 == 0 else tuple(reversed(SETTINGS))
                    for setting in order:
                        r = timed(setting, s, cfgs[n], n)
                        runs.setdefault((s, n, setting), []).append(r)
                        print(f"[bench] {s} x{n} {setting}: {r['seconds']:.2f} s (mIoU {r['miou']})", flush=True)
    finally:
        from tasks.per_image import release_pools

        release_pools()
        ray_info["ray_shutdown_s"] = stop_ray()
        import shutil

        for n in args.actors:
            shutil.rmtree(base / f"data-vs-pool-{n}", ignore_errors=True)
    rows = []
    for s in args.stages:
        for n in args.actors:
            med = {st: statistics.median(r["seconds"] for r in runs[(s, n, st)]) for st in SETTINGS}
            rows.append({"stage": s, "actors": n, "images": runs[(s, n, SETTINGS[0])][0]["images"],
                         **{f"{st} s": med[st] for st in SETTINGS},
                         "ray_data / pool warm": med["ray_data"] / med["pool, warm"],
                         "ray_data / pool cold": med["ray_data"] / med["pool, cold"],
                         "same mIoU": len({r["miou"] for st in SETTINGS for r in runs[(s, n, st)]}) == 1})
    result = {"config": args.config, "images": cfg.data.demo.n_train, "actors": args.actors, "repeat": args.repeat,
              **ray_info, "upstream_prepare_seconds": prep_s, "rows": rows,
              "runs": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in runs.items()}}
    notes = (f"{describe(cfg)}; one local Ray with {max(args.actors)} CPUs, one CPU per actor. Median of "
             f"{args.repeat} run(s) per setting, the settings' order alternating. Stage time = the driver's part "
             f"(context, preflight, listing, manifest, finalize) + the fan-out; 'pool, warm': the run's actors "
             f"already up (every stage after the first in a run), 'pool, cold': actor processes started in the "
             f"timed stage, 'ray_data': Ray Data starts its own actors for each dataset it executes.")
    report("Per-image stages: actor pool vs Ray Data map_batches (issue 13)", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

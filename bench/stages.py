"""Stage speed: per-image and training stages, on one process, on 1 -> N actors, on 1 -> 2 nodes, at VOC size.

    python bench/stages.py BENCHMARK [options]      (python bench/stages.py BENCHMARK --help)

throughput  per-image stages (cam_infer, crf_labels, random_walk): images/s per worker, plain loop vs one Ray actor
scaling     the same stages on 1 -> N actors of one host (goal: >= 1.8x from 1 to 2)
nodes       1 -> 2 Ray nodes that share no disk, store and data in an S3 bucket (goal: >= 1.8x)
ray-data    the run's actor pool vs Ray Data map_batches with an actor class, same stage code
voc-cost    per-image cost of every stage of configs/voc12.yaml at VOC size, and full-run projections
cam-sources seconds per image of RCA's CAMs (memory_build + cam_infer) and CLIP's (clip_cam) at VOC size
growth      peak memory and time of every step at 1x and 4x the images (goals: flat memory, linear time)

Every per-image stage runs through the one lifecycle of rca_core.stages.runner (PerImageRun, build_worker,
run_shard): in this process via rca_core.stages.local, on the actor pool via tasks.per_image.run_per_image_stage.
Each run writes its record to bench/results/stages.BENCHMARK.json (docs/benchmarks.md: python scripts/bench_table.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lib.cli import Benchmark, Child, Subject  # noqa: E402
from bench._lib.common import BENCH_RUNS, ROOT  # noqa: E402
from bench._lib.demo import (PER_IMAGE_STAGES, add_config_args, bench_config, config_file, describe,  # noqa: E402
                             fresh_copy, prepare_upstream, shared_bench_config)
from bench._lib.records import Result, goal  # noqa: E402
from bench._lib.voc import time_stage, voc_work  # noqa: E402


def _threads_1() -> None:
    import torch

    torch.set_num_threads(1)


# ============================================================================================ throughput
def throughput_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-loop rows")


def throughput(args) -> Result:
    """Per-image stages (cam_infer, crf_labels, random_walk): images per second per worker.

Each stage is measured on the same finished upstream stages, twice: the plain local loop
(rca_core.stages.local.run_stage, one process, no Ray) and one Ray actor (tasks.per_image.run_per_image_stage
with cfg.ray.actors = 1). Ray start-up (ray.init + warming the worker processes) is excluded from the per-stage
time and reported on its own. A stage's time includes building its Worker (model load) and its finalize step,
as in a real run; "compute img/s" is from the manifest's per-image seconds only. The upstream stages are built
once with the plain runner into the shared bench store under runs/bench/ (training epochs capped by
--train-epochs: not measured here, and the per-image stages' speed does not depend on them). No goal of its
own: the 1 -> 2 actor goal is `scaling`'s."""
    from bench._lib.ray_bench import measure_stage, start_ray, stop_ray

    _threads_1()
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
    ray_info = start_ray()
    try:
        for s in args.stages:
            rows.append(measure_stage(cfg_ray, s, "ray"))
            print(rows[-1], flush=True)
    finally:
        ray_info["ray_shutdown_s"] = stop_ray()
    for d in ("plain", "ray1"):
        shutil.rmtree(base / d, ignore_errors=True)
    per = {}
    for r in rows:
        per.setdefault(r["stage"], {})[r["mode"]] = r["images_per_s_per_worker"]
    headline = {f"{s} img/s per worker (" + " / ".join(per[s]) + ")": " / ".join(f"{v:.3g}" for v in per[s].values())
                for s in per}
    notes = (f"{describe(cfg)}. Ray start-up (not in the stage times): ray.init {ray_info['ray_init_s']:.1f} s, "
             f"warming {ray_info['ray_worker_pids']} worker processes {ray_info['ray_warm_workers_s']:.1f} s, "
             f"shutdown {ray_info['ray_shutdown_s']:.1f} s. Stage time includes building the Worker and finalize; "
             f"compute img/s counts only per-image process() time. Upstream training epochs capped at "
             f"{args.train_epochs or 'config'} (not measured). No goal of its own (the 1 -> 2 actor goal is "
             f"`python bench/stages.py scaling`'s).")
    table = [{k: r[k] for k in ("stage", "mode", "images", "seconds", "images_per_s_per_worker", "compute_images_per_s",
                                "ms_per_image", "processes")} for r in rows]
    return Result("Per-image stage throughput (images/s per worker)", table, headline=headline, notes=notes,
                  details={"config": args.config, "images": cfg.data.demo.n_train, "rows": rows, **ray_info,
                           "upstream_prepare_seconds": prep_s, "upstream_stages_run": upstream})


# ============================================================================================ scaling
def scaling_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--workers", type=int, nargs=2, default=[1, 2], metavar=("FROM", "TO"),
                    help="actor counts compared (default 1 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (median)")


def scaling(args) -> Result:
    """Speed-up of the per-image stages from FROM to TO actors of the run's pool on one host.

Goal: at least 1.8x from 1 to 2 on this 2-core machine, for the three stages together and for each. Both settings
run in one process and one local Ray (ratios measured in one run), through tasks.per_image.run_per_image_stage
with cfg.ray.actors (and num_workers) = FROM and then TO, on the same finished upstream stages, each in its own
copy of the bench store (so no actor reuses a model built for the other setting). Ray start-up (ray.init and
warming one worker process per CPU) is excluded from the stage times and reported. Stage time includes building
the Worker (model load) in each actor and the stage's finalize step (driver). With --repeat R each setting runs
R times, alternating, and the median is used."""
    from bench._lib.ray_bench import measure_stage, median_seconds, speedup_table, start_ray, stop_ray

    _threads_1()
    cfg, base = shared_bench_config(args)
    t = time.perf_counter()
    prepare_upstream(cfg, args.stages)
    prep_s = time.perf_counter() - t
    w_lo, w_hi = args.workers
    cfgs = {}
    for w in (w_lo, w_hi):
        c = cfg.model_copy(deep=True)
        c.ray.num_workers = w
        c.ray.actors = w  # per-image stages run on an actor pool sized by ray.actors
        c.store = fresh_copy(cfg.store, base / f"scaling-w{w}")
        cfgs[w] = c
    ray_info = start_ray(num_cpus=max(w_lo, w_hi))
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for s in args.stages:
            for _ in range(args.repeat):
                for w in (w_lo, w_hi):
                    r = measure_stage(cfgs[w], s, "ray")
                    runs.setdefault((s, w), []).append(r)
                    print(f"[bench] {s} x{w}: {r['seconds']:.2f} s ({r['processes']} worker processes)", flush=True)
    finally:
        ray_info["ray_shutdown_s"] = stop_ray()
        for w in (w_lo, w_hi):
            shutil.rmtree(base / f"scaling-w{w}", ignore_errors=True)
    rows, goals, overall = speedup_table(
        runs, args.stages, w_lo, w_hi, lambda n: f"{n}w", "actors",
        lambda s: {f"img_s_per_worker_{w_hi}w": runs[(s, w_hi)][0]["images"] / median_seconds(runs[(s, w_hi)]) / w_hi,
                   f"processes_{w_hi}w": runs[(s, w_hi)][-1]["processes"]})
    notes = (f"{describe(cfg)}. Ray start-up, not in the stage times: ray.init {ray_info['ray_init_s']:.1f} s, "
             f"warming {ray_info['ray_worker_pids']} worker processes {ray_info['ray_warm_workers_s']:.1f} s, "
             f"shutdown {ray_info['ray_shutdown_s']:.1f} s. Stage time = Worker build in each actor + all shards + "
             f"finalize in the driver. Median of {args.repeat} run(s) per setting.")
    return Result(f"Ray scaling of the per-image stages on one host ({w_lo} -> {w_hi} actors)", rows, goals=goals,
                  goal_text=f"speed-up {w_lo} -> {w_hi} actors >= 1.8x, the stages together and each",
                  headline={f"speed-up {w_lo} -> {w_hi} actors, " + rows[-1]["stage"]: round(overall, 3)}, notes=notes,
                  details={"config": args.config, "images": cfg.data.demo.n_train, "workers": [w_lo, w_hi],
                           "repeat": args.repeat, **ray_info, "upstream_prepare_seconds": prep_s,
                           "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}})


# ============================================================================================ nodes
BUCKET = "bench-nodes"


def nodes_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting (median)")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--size", type=int, default=None,
                    help="side of the demo images in pixels (default: the config's, 96); VOC's images are ~500x375")
    ap.add_argument("--no-pin", action="store_true",
                    help="let both nodes' processes float over all of the host's cores (default: each node's Ray "
                         "processes pinned to its own cores with taskset, as on two machines)")


def nodes(args) -> Result:
    """Speed-up of the per-image stages from 1 to 2 Ray nodes that share no disk, with the store and data on S3.

Goal: at least 1.8x. A Ray head and a second node on 127.0.0.1 (the test harness's two-node cluster), node 2 in its
own mount namespace with private tmpfs over this bench's work directory and the checkout's runs/ and data/, so it
sees nothing the driver writes locally; a SeaweedFS S3 server on 127.0.0.1 holds the artifact store and the demo
data set. Each node offers --cpus-per-node CPUs (1 by default: one core per node on a 2-core machine), so 1 actor
= one node's share, 2 actors = both nodes (the manifest's node ids say where each image ran). Each node's Ray
processes are pinned to its own core(s) with taskset (--no-pin: unpinned), as two machines would be.

The upstream stages are computed once with the plain runner into a local store and uploaded to the bucket (same
stage keys); then for each stage, --repeat times, alternating 1 and 2 actors, the stage's folder in the bucket is
deleted and the stage runs through tasks.per_image.run_per_image_stage from this process (the driver). Stage time
includes the stage's verification, the actors' model builds (each timed stage starts with actors that hold no
models, as each stage of a run does), all shards and the driver's merge; the pool's actors are started once
before (reported, not timed per stage). Median of the repeats. The CPU seconds of each kind of process during
each timed stage are recorded (the S3 server and this driver float over both cores)."""
    from bench._lib.cpu import DRIVER, RAY_SYSTEM_GROUP, RAY_WORKERS, S3_SERVER, CpuSampler
    from bench._lib.demo import stage_rows
    from bench._lib.harness import pinned_cpu_sets, s3_bucket, two_nodes
    from bench._lib.ray_bench import speedup_table

    _threads_1()
    from rca_core import storage
    from rca_core.stages.planning import plan

    work = Path(tempfile.mkdtemp(prefix="rca-bench-nodes-"))
    local_dir = work / "local"
    local = bench_config(args.config, args.images, args.train_epochs, store=local_dir / "store",
                         data_root=local_dir / "data")
    if args.size:
        local.data.demo.size = args.size
    hidden = [local_dir, ROOT / "runs", ROOT / "data"]
    for d in hidden:
        d.mkdir(parents=True, exist_ok=True)
    pin = None if args.no_pin else pinned_cpu_sets(args.cpus_per_node)
    runs: dict = {}
    t_all = time.perf_counter()
    try:
        with s3_bucket(work, BUCKET) as s3:
            t = time.perf_counter()
            prepare_upstream(local, args.stages, show_progress=False)
            prep_s = time.perf_counter() - t
            t = time.perf_counter()
            storage.upload_tree(local.store, f"s3://{BUCKET}/store")
            storage.upload_tree(local.data.root, f"s3://{BUCKET}/data")
            upload_s = time.perf_counter() - t
            cluster = two_nodes(work / "ray", hidden, args.cpus_per_node, s3.env, pin)
            t = time.perf_counter()
            cluster.start()
            cluster_s = time.perf_counter() - t
            try:
                runs, pool_s, affinity = _nodes_runs(args, local, cluster, s3, CpuSampler, stage_rows, plan)
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows, goals, overall = speedup_table(runs, args.stages, 1, 2, lambda n: "1node" if n == 1 else f"{n}nodes", "nodes",
                                         lambda s: {"nodes_used_1": runs[(s, 1)][-1]["nodes"],
                                                    "nodes_used_2": runs[(s, 2)][-1]["nodes"]})
    d = local.data.demo
    notes = (f"config {local.name}: {d.n_train} train images of {d.size} px, 1 torch thread per actor, "
             f"{args.cpus_per_node} CPU(s) per node, shard size {local.ray.shard_size}, store and data in a "
             f"SeaweedFS bucket on 127.0.0.1; node 2 sees none of the driver's local files. Median of "
             f"{args.repeat} run(s) per setting. Upstream prepared locally in {prep_s:.0f} s, uploaded in "
             f"{upload_s:.0f} s; cluster start {cluster_s:.0f} s; the pool's two actors started before the "
             f"timed stages ({pool_s:.1f} s). "
             + (f"Each node's Ray processes pinned to its own core(s) with taskset (head {pin[0]}, node 2 "
                f"{pin[1]}; the actors' allowed CPUs: {affinity}); the S3 server and this driver float over "
                f"both." if pin else "Unpinned (--no-pin): both nodes' processes float over all cores."))
    cores = len(os.sched_getaffinity(0))
    cpu_lines = []
    for s in args.stages:
        for n in (1, 2):
            cs = [r["cpu"] for r in runs[(s, n)]]
            share = lambda g: statistics.median(c["by_group_cpu_s"].get(g, 0.0) / c["wall_s"] for c in cs)  # noqa: E731
            busy = statistics.median(c["machine_busy_cpu_s"] / c["wall_s"] for c in cs)
            cpu_lines.append(f"{s} x{n}: machine {busy:.2f} of {cores} cores busy, Ray workers "
                             f"{share(RAY_WORKERS):.2f}, S3 server {share(S3_SERVER):.2f}, driver {share(DRIVER):.2f}, "
                             f"Ray system {share(RAY_SYSTEM_GROUP):.2f}")
    notes += " CPU in use during the timed stages (cores, median of the runs): " + "; ".join(cpu_lines) + "."
    return Result(f"Ray scaling over two nodes that share no disk (S3 store, {d.size} px images)", rows,
                  goals=goals, goal_text="speed-up 1 -> 2 nodes >= 1.8x, the stages together and each",
                  headline={"speed-up 1 -> 2 nodes, " + rows[-1]["stage"]: round(overall, 3)}, notes=notes,
                  details={"runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}, "prepare_seconds": prep_s,
                           "upload_seconds": upload_s, "cluster_start_seconds": cluster_s, "pinned_cpus": pin,
                           "pool_start_seconds": pool_s, "actor_cpus": affinity, "cpu_cores_by_group": cpu_lines,
                           "total_seconds": time.perf_counter() - t_all, "image_size": d.size})


def _nodes_runs(args, local, cluster, s3, CpuSampler, stage_rows, plan):  # noqa: N803
    import ray

    from tasks.actor_pool import get_pool, release_pools, stage_resources
    from tasks.per_image import run_per_image_stage
    from tasks.ray_runtime import ray_session

    cfgs = {}
    for n in (1, 2):
        c = local.model_copy(deep=True)
        c.store, c.data.root = f"s3://{BUCKET}/store", f"s3://{BUCKET}/data"
        c.ray.address, c.ray.actors, c.ray.num_workers = cluster.address, n, n
        cfgs[n] = c
    fs = s3.filesystem()
    runs: dict = {}
    with ray_session(cfgs[2].ray):
        alive = [nd for nd in ray.nodes() if nd.get("Alive")]
        print(f"[bench] cluster {cluster.address}: {len(alive)} nodes, "
              f"{ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)
        try:
            # the pool's actors (one per node) started before any stage is timed: a stage's time is then its own
            # work (Worker build, shards, merge) in both settings, not the first one's process start
            t = time.perf_counter()
            pool = get_pool(*stage_resources(args.stages[0], cfgs[2]), 2)
            warm = ray.get([a.ping.remote() for a in pool], timeout=300)
            pool_s = time.perf_counter() - t
            affinity = ray.get([a.__ray_call__.remote(lambda _self: sorted(os.sched_getaffinity(0))) for a in pool],
                               timeout=60)
            print(f"[bench] actor pool up on {len(set(warm))} node(s) in {pool_s:.1f} s; their CPUs: {affinity}",
                  flush=True)
            for s in args.stages:
                key = plan(cfgs[1])[s].key
                for _ in range(args.repeat):
                    for n in (1, 2):
                        path = f"{BUCKET}/store/{key}"
                        if fs.exists(path):
                            fs.rm(path, recursive=True)
                        # as in a run, where each stage runs once: no actor holds the stage's models yet
                        ray.get([a.drop_models.remote() for a in pool], timeout=60)
                        with CpuSampler() as cpu:
                            cpu.driver_pid = os.getpid()
                            t = time.perf_counter()
                            summary = run_per_image_stage(s, cfgs[n], cfgs[n].store)
                            sec = time.perf_counter() - t
                        man = stage_rows(cfgs[n], s)
                        nodes_ = {m["node_id"] for m in man if m.get("node_id")}
                        r = {"seconds": sec, "images": int(summary.get("images", len(man))), "nodes": len(nodes_),
                             "phase_seconds": summary.get("phase_seconds"),
                             "image_seconds_by_node": summary.get("image_seconds_by_node"),
                             "worker_build_seconds": summary.get("worker_build_seconds"), "cpu": cpu.result()}
                        runs.setdefault((s, n), []).append(r)
                        ph = r["phase_seconds"] or {}
                        busy = ", ".join(f"{v:.1f}" for v in (r["image_seconds_by_node"] or {}).values())
                        print(f"[bench] {s} x{n} actors: {sec:.2f} s on {len(nodes_)} node(s); driver setup "
                              f"{ph.get('setup', 0):.2f} s, shards {ph.get('shards', 0):.2f} s, finalize "
                              f"{ph.get('finalize', 0):.2f} s; image seconds per node: {busy}; model build "
                              f"{r['worker_build_seconds'] or 0:.2f} s", flush=True)
        finally:
            release_pools()
    return runs, pool_s, affinity


# ============================================================================================ ray-data
SETTINGS = ("pool, warm", "pool, cold", "ray_data")


class ShardFn:
    """Ray Data's actor class: the stage's Worker built once per actor (rca_core.stages.runner.build_worker), one
    batch of ids per call through runner.run_shard; returns the shard's result as one output row."""

    def __init__(self, name: str, cfg_json: dict, store_url: str):
        import torch

        from rca_core.config import RunConfig
        from rca_core.stages.runner import build_worker
        from rca_core.store import ArtifactStore

        cfg = RunConfig.model_validate(cfg_json)
        torch.set_num_threads(cfg.compute.threads or 1)
        self.worker = build_worker(name, cfg, ArtifactStore(store_url, cfg.storage, create=False))

    def __call__(self, batch: dict) -> dict:
        import pickle

        import numpy as np

        from rca_core.stages.runner import run_shard

        ids = [str(i) for i in batch["id"]]
        maybe = {str(i) for i, listed in zip(batch["id"], batch["listed"]) if listed}
        return {"result": np.array([pickle.dumps(run_shard(self.worker, ids, maybe))], dtype=object)}


def run_ray_data(name: str, cfg, store_url: str, actors: int) -> dict:
    """The stage with its fan-out through Ray Data; the driver's part is run_per_image_stage's: the stage's
    PerImageRun (begin, absorb, finish) and the preflight."""
    import pickle

    import ray.data

    from rca_core.stages.planning import plan
    from rca_core.stages.runner import PerImageRun
    from rca_core.store import ArtifactStore
    from tasks.actor_pool import balanced_shards
    from tasks.preflight import preflight

    plans = plan(cfg)
    run = PerImageRun(name, cfg, ArtifactStore(store_url, cfg.storage), plans)
    preflight(cfg, name, plans[name].split)
    listed = run.begin()
    shard = len(balanced_shards(run.ids, cfg.ray.shard_size, actors)[0])
    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = False
    ds = ray.data.from_items([{"id": i, "listed": i in listed} for i in run.ids],
                             override_num_blocks=max(1, -(-len(run.ids) // shard)))
    res = ds.map_batches(ShardFn, fn_constructor_args=(name, cfg.model_dump(mode="json"), store_url),
                         batch_size=shard, compute=ray.data.ActorPoolStrategy(size=actors),
                         num_cpus=float(cfg.ray.cpus_per_worker), batch_format="numpy").take_all()
    for r in res:
        run.absorb(pickle.loads(r["result"]))
    return run.finish()


def ray_data_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting (median)")


def ray_data(args) -> Result:
    """Per-image stages on the run's actor pool (tasks/per_image.py) vs Ray Data `map_batches` with an actor class.

A choice made by measurement. Both run the same stage the same way around the fan-out: the driver's
rca_core.stages.runner.PerImageRun (stage context, listing what is stored, absorbing each shard's manifest rows
and statistics, finalize, completion marker) and the preflight. Only the fan-out differs:
- pool: tasks.per_image.run_per_image_stage (balanced shards of ray.shard_size images, one actor per slot, the
  Worker built once per actor and kept for later shards);
- ray_data: ray.data.from_items(ids).map_batches(ShardFn, batch_size=shard, compute=ActorPoolStrategy(size=n)),
  where ShardFn builds the stage's Worker in its constructor (runner.build_worker) and runs runner.run_shard
  over each batch, returning the shard's result as one output row.
Three settings per stage and actor count: "pool, warm" (the pool's processes already started but holding no
models of the stage, as for every stage after the first in a run), "pool, cold" (pools released first: actor
processes started inside the timed stage, as for the first stage of a run) and "ray_data" (Ray Data starts its
actors for every dataset it executes). Each timed run starts from an empty stage folder; the order of the
settings alternates between repeats. No goal: the figure that chose the pool."""
    from bench._lib.demo import drop_stage
    from bench._lib.ray_bench import start_ray, stop_ray

    _threads_1()
    import ray

    from tasks.actor_pool import get_pool, release_pools, stage_resources
    from tasks.per_image import run_per_image_stage

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

    def timed(setting: str, name: str, c, actors: int) -> dict:
        drop_stage(c, name)
        if setting == "pool, warm":  # processes up, the stage's models not built yet: the next stage of a run
            pool = get_pool(*stage_resources(name, c), actors)
            ray.get([a.drop_models.remote() for a in pool], timeout=300)
        else:
            release_pools()
        t0 = time.perf_counter()
        summary = run_ray_data(name, c, c.store, actors) if setting == "ray_data" else \
            run_per_image_stage(name, c, c.store)
        sec = time.perf_counter() - t0
        metrics = summary.get("metrics") or {}
        return {"seconds": sec, "images": int(summary.get("images", 0)),
                "miou": metrics.get("miou_all", metrics.get("miou"))}

    ray_info = start_ray(num_cpus=max(args.actors))
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
        ray_info["ray_shutdown_s"] = stop_ray()
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
    warm = [r["ray_data / pool warm"] for r in rows]
    cold = [r["ray_data / pool cold"] for r in rows]
    notes = (f"{describe(cfg)}; one local Ray with {max(args.actors)} CPUs, one CPU per actor. Median of "
             f"{args.repeat} run(s) per setting, the settings' order alternating. Stage time = the driver's part "
             f"(context, preflight, listing, manifest, finalize) + the fan-out; 'pool, warm': the run's actors "
             f"already up (every stage after the first in a run), 'pool, cold': actor processes started in the "
             f"timed stage, 'ray_data': Ray Data starts its own actors for each dataset it executes.")
    return Result("Per-image stages: actor pool vs Ray Data map_batches", rows,
                  headline={"ray_data / pool, warm": f"{min(warm):.2f}-{max(warm):.2f}x",
                            "ray_data / pool, cold": f"{min(cold):.2f}-{max(cold):.2f}x"}, notes=notes,
                  details={"config": args.config, "images": cfg.data.demo.n_train, "actors": args.actors,
                           "repeat": args.repeat, **ray_info, "upstream_prepare_seconds": prep_s,
                           "runs": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in runs.items()}})


# ============================================================================================ voc-cost
CPU_EFFICIENCY = 0.91  # measured 1 -> 2 Ray workers on this machine (stages scaling, 1.82x)
# images per stage in a full run: (VOC train_aug / train / val, COCO train / train / val)
SPLITS = {"voc": {"train": 10582, "eval": 1464, "val": 1449}, "coco": {"train": 82783, "eval": 82783, "val": 40504}}
EPOCHS = {"voc": {"cam_train": 5, "affinity_train": 3, "seg_train": 19},
          "coco": {"cam_train": 5, "affinity_train": 3, "seg_train": 6}}
STAGE_SPLIT = {"memory_build": "train", "cam_infer": "train", "crf_labels": "train", "random_walk": "train",
               "seg_eval": "val", "cam_eval": "eval", "cam_train": "train", "affinity_train": "train",
               "seg_train": "train"}
# stages whose work beyond the network's FLOPs stays on the CPU on a GPU node: the dense CRF (pydensecrf), the
# sparse random walk (scipy), the threshold sweep; elsewhere it is elementwise tensor work on the GPU
CPU_BOUND_REST = {"crf_labels", "random_walk", "seg_eval", "cam_eval"}


def voc_cost_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="configs/voc12.yaml")
    ap.add_argument("--images", type=int, default=8, help="train_aug images (half VOC train, half SBD-only)")
    ap.add_argument("--val-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = the cost per core)")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--cores", type=int, nargs="*", default=[2, 16, 64])
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--gpu-tflops", type=float, default=40.0, help="ASSUMED sustained TFLOP/s per GPU")
    ap.add_argument("--cpus-per-gpu", type=int, default=8, help="ASSUMED CPU cores beside each GPU")
    ap.add_argument("--gpu-elementwise-speedup", type=float, default=100.0,
                    help="ASSUMED speed-up of the non-conv tensor work (pair affinities, upsampling) on a GPU over one "
                         "core of this CPU (memory bandwidth ~1-3 TB/s vs ~10 GB/s)")
    ap.add_argument("--from-json", default=None,
                    help="re-project a saved measurement (a record or --json output of this benchmark) instead of "
                         "measuring")
    ap.add_argument("--work", default=str(BENCH_RUNS / "voc_stage_cost"), help="scratch folder (wiped first)")


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def cpu_flop_rate(threads: int) -> float:
    """FLOP/s of a ResNet-50 forward at 375x500 on this CPU with `threads` threads (what 'network time' means)."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    net = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 375, 500)
    with torch.no_grad():
        net(x)
        f = _flops(lambda: net(x))
        t = time.perf_counter()
        for _ in range(3):
            net(x)
        dt = (time.perf_counter() - t) / 3
    return f / dt


def network_flops(cfg) -> dict[str, float]:
    """FLOPs per image of each stage's networks at the sizes the recipe feeds them (500x375 image)."""
    import torch

    from rca_core.models.affinity_net import AffinityNet
    from rca_core.models.cam_net import CamNet
    from rca_core.models.deeplab import build_segmenter

    H, W = 375, 500  # noqa: N806
    nc = cfg.data.num_classes
    cam = CamNet(cfg.cam.model_copy(update={"backbone": cfg.cam.backbone.model_copy(update={"pretrained": None})}), nc)
    aff = AffinityNet(cfg.refine.affinity.model_copy(update={"backbone": cfg.refine.affinity.backbone.model_copy(
        update={"pretrained": None})}))
    seg = build_segmenter(cfg.segmenter.model_copy(update={"pretrained": None}), nc)
    out: dict[str, float] = {}

    def fwd(net, h, w, **kw):
        with torch.no_grad():
            net.eval()
            return _flops(lambda: net(torch.zeros(1, 3, h, w), **kw))

    def train_step(net, c, key="logits", **kw):
        net.train()

        def go():
            o = net(torch.zeros(1, 3, c, c), **kw)
            (o[key] if isinstance(o, dict) else o).float().mean().backward()
        return _flops(go)

    out["memory_build"] = fwd(cam, H, W, with_embeddings=True)
    flips = 2 if cfg.cam_infer.flip else 1
    out["cam_infer"] = sum(fwd(cam, round(H * s), round(W * s)) * flips for s in cfg.cam_infer.scales)
    out["crf_labels"] = 0.0
    out["cam_eval"] = 0.0
    out["random_walk"] = 0.0 if cfg.refine.saliency.enabled else fwd(aff, H, W)
    sflips = 2 if cfg.segmenter.eval_flip else 1
    out["seg_eval"] = sum(fwd(seg, round(H * s), round(W * s)) * sflips for s in cfg.segmenter.eval_scales)
    out["cam_train"] = train_step(cam, cfg.cam.train.crop_size, with_embeddings=True)
    out["affinity_train"] = train_step(aff, cfg.refine.affinity.crop_size)
    out["seg_train"] = train_step(seg, cfg.segmenter.crop_size)
    return out


def measure_voc(args) -> dict:
    """Every stage of the config in this process on a VOC-size tree: per-image stages through the one per-image
    lifecycle (PerImageRun, build_worker timed apart, run_shard, finish), training stages through
    run_planned_stage."""
    import torch

    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    torch.set_num_threads(args.threads)
    over = voc_work(args)
    cfg = load_config(config_file(args.config), over)
    store = ArtifactStore(cfg.store)
    plans = plan(cfg)
    rows = [time_stage(name, cfg, store, plans) for name in plans]
    return {"rows": rows, "cfg": cfg.model_dump(mode="json")}


def project(rows: list[dict], fl: dict[str, float], rate: float, args) -> list[dict]:
    out = []
    for data in ("voc", "coco"):
        for r in rows:
            name = r["stage"]
            imgs = SPLITS[data][STAGE_SPLIT[name]] * (EPOCHS[data].get(name, 1))
            cpu1 = imgs * r["s_per_img"]  # seconds on one worker of this machine
            f = fl.get(name, 0.0)
            rest = max(0.0, r["s_per_img"] - f / rate)  # seconds per image not explained by conv/matmul FLOPs
            row = {"data": data, "stage": name, "image_passes": imgs}
            for c in args.cores:
                row[f"cpu{c}_h"] = cpu1 / (c * CPU_EFFICIENCY) / 3600
            for g in args.gpus:
                gpu_s = f / (args.gpu_tflops * 1e12)
                cpu_s = 0.0
                if name in CPU_BOUND_REST:
                    cpu_s = rest / (args.cpus_per_gpu * CPU_EFFICIENCY)
                else:
                    gpu_s += rest / args.gpu_elementwise_speedup
                row[f"gpu{g}_h"] = imgs * (gpu_s + cpu_s) / g / 3600  # no overlap of GPU and CPU work assumed
            out.append(row)
        total = {"data": data, "stage": "TOTAL", "image_passes": None}
        for k in out[-1]:
            if k.endswith("_h"):
                total[k] = sum(x[k] for x in out if x["data"] == data and x["stage"] != "TOTAL")
        out.append(total)
    return out


def voc_cost(args) -> Result:
    """Per-image cost of every stage of configs/voc12.yaml at PASCAL VOC size on this CPU, and a projection of the
wall time of a full run on train_aug (10,582 images) and COCO train (82,783) on N CPU cores or N GPUs.

What is measured (this machine, --threads torch threads in one process): a VOC-layout tree at 500x375 / 375x500
(the VOC-size test's writer) and random-init ResNet-50/101 weight files (BatchNorm statistics measured on the
random network, as in that test). Every stage runs in-process with the voc12 recipe unchanged for per-image work:
CAM inference at 4 scales + flip, CRF labels at full size, the random walk (logt 8) on the stride-4 grid, seg_eval
at 5 scales + flip + dense CRF. Per-image stages: seconds per image from the stage's own manifest (the Worker's
model build timed apart as setup). Training stages: seconds per training image (one image through one optimizer
step) at the recipe's crop (512 / 512 / 321) from a short run of --train-steps steps at batch --train-batch; a
full run is epochs x images x that. FLOPs per image come from torch.utils.flop_counter on one forward
(+backward for training) of the stage's network at the sizes it sees.

Projection (derived, not measured):
- N CPU cores: per-image stages and training split over N workers with the parallel efficiency measured for 2
  workers on this machine (1.82x -> 0.91 per worker) assumed to hold for N; times = images x s/img / (N x 0.91).
- N GPUs: an ASSUMPTION-BASED projection: network FLOPs at --gpu-tflops sustained TFLOP/s per GPU (default 40:
  an A100/H100-class GPU at ~20-30 % of its dense TF32/bf16 peak on these convolutions); the rest of each stage's
  time (measured wall - FLOPs / this CPU's measured FLOP rate) either on the GPU at --gpu-elementwise-speedup x one
  core here, or for the CPU-bound stages (dense CRF, sparse random walk, threshold sweep) on --cpus-per-gpu cores
  per GPU. --from-json re-projects a saved measurement with other assumptions. No goal."""
    t0 = time.time()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved = saved.get("details", saved)  # a record, or the old --json output
        rows, rate = saved["rows"], saved["cpu_gflops"] * 1e9
        fl = {r["stage"]: r["gflop_per_img"] * 1e9 for r in rows}
        t0 -= saved["seconds"]
    else:
        m = measure_voc(args)
        from rca_core.config import config_from_dict

        cfg = config_from_dict(m["cfg"])
        rate = cpu_flop_rate(args.threads)
        fl = network_flops(cfg)
        rows = m["rows"]
        for r in rows:
            r["gflop_per_img"] = fl.get(r["stage"], 0.0) / 1e9
            r["network_share"] = min(1.0, fl.get(r["stage"], 0.0) / rate / r["s_per_img"]) if r["s_per_img"] else 0.0
    proj = project(rows, fl, rate, args)
    seconds = time.time() - t0
    totals = {p["data"]: p for p in proj if p["stage"] == "TOTAL"}
    c0, g0 = args.cores[0], args.gpus[0]
    headline = {f"full VOC run, {c0} cores": f"{totals['voc'][f'cpu{c0}_h']:.0f} h",
                f"full VOC run, {g0} GPU (assumed)": f"{totals['voc'][f'gpu{g0}_h']:.1f} h"}
    notes = (f"Measured on {args.images} train_aug + {args.val_images} val images at 500x375 / 375x500, "
             f"{args.threads} torch thread(s), in one process (no Ray), random-init weights; this CPU runs a "
             f"ResNet-50 forward at {rate / 1e9:.1f} GFLOP/s. s_per_img of a training stage = seconds per image "
             f"per optimizer step at the recipe's crop (batch {args.train_batch}, {args.train_steps} steps); "
             f"network_share = the part of s_per_img explained by its FLOPs at that rate. gflop_per_s, "
             f"peak_gflop_per_s, flop_utilisation: the stage's own summary (its counted model FLOPs over its "
             f"seconds, against a float32 matmul timed in the same process; empty where a stage has no network). "
             f"Total {seconds:.0f} s."
             "\n\nProjection: wall time in hours of a full run (image_passes = images x epochs). CPU columns: this "
             f"machine's per-core cost on N cores at the measured 2-worker efficiency {CPU_EFFICIENCY}. GPU columns "
             f"are an ASSUMPTION-BASED projection, not a measurement: network FLOPs at {args.gpu_tflops:g} TFLOP/s "
             f"sustained per GPU; the rest of each stage's measured time either on the GPU at "
             f"{args.gpu_elementwise_speedup:g}x one core of this CPU (elementwise tensor work: pair affinities, "
             f"upsampling, losses) or, for {', '.join(sorted(CPU_BOUND_REST))}, on {args.cpus_per_gpu} CPU cores "
             "per GPU at this machine's per-core speed (dense CRF, sparse random walk); GPU and CPU parts added (no "
             "overlap); data loading beside the GPU not counted.")
    return Result("Per-image cost of every stage at VOC size, and full-run projections", rows, headline=headline,
                  notes=notes, extra_tables=[{"title": "Projected hours of a full run", "rows": proj}],
                  details={"rows": rows, "projection": proj, "cpu_gflops": rate / 1e9, "seconds": seconds,
                           "assumptions": {"cpu_efficiency": CPU_EFFICIENCY, "gpu_tflops": args.gpu_tflops,
                                           "cpus_per_gpu": args.cpus_per_gpu,
                                           "gpu_elementwise_speedup": args.gpu_elementwise_speedup,
                                           "cpu_bound_rest": sorted(CPU_BOUND_REST), "splits": SPLITS,
                                           "epochs": EPOCHS}})


# ============================================================================================ growth
MEM_GOAL, TIME_GOAL = 1.2, 1.2


def growth_step(cfg_path: str, step: str) -> None:
    """Child: one step (generating the data set, or one stage with the plain runner) in a process of its own."""
    from bench._lib.procs import emit

    _threads_1()
    from rca_core.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    t = time.perf_counter()
    if step == "data":
        from rca_core.data import make_dataset

        n = sum(len(make_dataset(cfg.data, s, progress=False).ids)
                for s in sorted({cfg.data.train_split, cfg.data.val_split}))
    else:
        from rca_core.stages.local import run_stage

        n = run_stage(step, cfg, cfg.store, with_upstream=False, show_progress=False).get("images")
    emit({"seconds": time.perf_counter() - t, "images": n})


def growth_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--scales", type=int, nargs=2, default=[1, 4], metavar=("LOW", "HIGH"))
    ap.add_argument("--stages", nargs="+", default=None, help="stages to run (default: all, in order)")


def growth(args) -> Result:
    """Peak memory and time of the pipeline on the demo data set at LOW and HIGH times the images (1x and 4x).

Goals: memory flat (peak RSS at 4x within 1.2x of 1x) and time linear (time at 4x no more than 1.2 x 4 = 4.8x
the time at 1x). Every step runs in its own fresh subprocess (the plain runner rca_core.stages.local.run_stage,
one torch thread), so its peak RSS (from os.wait4) is its own: first generating the demo set, then each stage in
dependency order into a fresh store per scale. Train and val images are both scaled. The training stages run
--train-epochs epochs (default 1) at both scales, so their work grows with the images like every other stage's.
"stage s" is the time inside the subprocess after its imports (the linearity figure)."""
    from bench._lib.procs import run_child
    from rca_core.config import load_config
    from rca_core.stages.planning import upstream_closure
    from rca_core.stages.registry import STAGE_NAMES

    base_n = args.images or load_config(config_file(args.config)).data.demo.n_train
    wanted = args.stages or STAGE_NAMES
    probe = bench_config(args.config, base_n, args.train_epochs)
    order = [s for s in STAGE_NAMES if any(s in upstream_closure(w, probe) for w in wanted)]
    steps = ["data"] + order
    work = BENCH_RUNS / "growth" / f"{probe.name}-{base_n}"
    res: dict[int, dict[str, dict]] = {}
    cfgs = {}
    for scale in args.scales:
        d = work / f"x{scale}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        cfg = bench_config(args.config, base_n * scale, args.train_epochs, store=d / "store", scale_val=True,
                           data_root=d / "data")
        cfgs[scale] = cfg
        cfg_path = d / "config.json"
        cfg_path.write_text(cfg.model_dump_json())
        res[scale] = {}
        for step in steps:
            t = time.perf_counter()
            r = run_child([sys.executable, __file__, "_growth-step", str(cfg_path), step], d / "steps.log")
            res[scale][step] = {"step": step, "stage_s": r["seconds"], "wall_s": time.perf_counter() - t,
                                "peak_rss_mib": r["peak_rss_mib"], "images": r["images"]}
            print(f"[bench] x{scale} {step}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        shutil.rmtree(d / "data", ignore_errors=True)
        shutil.rmtree(d / "store", ignore_errors=True)
    lo, hi = args.scales
    k = hi / lo
    rows = []
    for step in steps:
        a, b = res[lo][step], res[hi][step]
        rows.append({"step": step, f"s_{lo}x": a["stage_s"], f"s_{hi}x": b["stage_s"], "time_ratio": b["stage_s"] / a["stage_s"],
                     f"rss_mib_{lo}x": a["peak_rss_mib"], f"rss_mib_{hi}x": b["peak_rss_mib"],
                     "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"]})
    t_lo = sum(r["stage_s"] for r in res[lo].values())
    t_hi = sum(r["stage_s"] for r in res[hi].values())
    m_lo = max(r["peak_rss_mib"] for r in res[lo].values())
    m_hi = max(r["peak_rss_mib"] for r in res[hi].values())
    rows.append({"step": "all (time: sum, RSS: max)", f"s_{lo}x": t_lo, f"s_{hi}x": t_hi, "time_ratio": t_hi / t_lo,
                 f"rss_mib_{lo}x": m_lo, f"rss_mib_{hi}x": m_hi, "rss_ratio": m_hi / m_lo})
    worst = max(rows[:-1], key=lambda r: r["rss_ratio"])
    goals = [goal(f"peak RSS at {hi}x <= {MEM_GOAL}x of {lo}x (largest step)", round(m_hi / m_lo, 3), m_hi / m_lo <= MEM_GOAL),
             goal(f"every step's peak RSS at {hi}x <= {MEM_GOAL}x of {lo}x", f"{worst['step']} {worst['rss_ratio']:.3f}",
                  worst["rss_ratio"] <= MEM_GOAL),
             goal(f"time at {hi}x <= {TIME_GOAL} x {k:g} x time at {lo}x (linear)", round(t_hi / t_lo / k, 3),
                  t_hi / t_lo / k <= TIME_GOAL)]
    notes = (f"{describe(cfgs[lo])} at {lo}x ({cfgs[lo].data.demo.n_val} val); {cfgs[hi].data.demo.n_train} train / "
             f"{cfgs[hi].data.demo.n_val} val at {hi}x. Training stages {args.train_epochs or 'as configured'} "
             f"epoch(s). Each row is one subprocess (plain runner); time ratio {hi}x/{lo}x of the sum = "
             f"{t_hi / t_lo:.2f} (linear = {k:g}); largest peak RSS {m_lo:.0f} -> {m_hi:.0f} MiB.")
    return Result(f"Growth: {lo}x -> {hi}x images, peak memory and time per step", rows, goals=goals,
                  goal_text=f"flat memory (peak RSS at {hi}x <= {MEM_GOAL}x of {lo}x, overall and per step), linear "
                            f"time ({hi}x <= {TIME_GOAL} x {k:g} x {lo}x)",
                  headline={f"peak RSS {hi}x / {lo}x": round(m_hi / m_lo, 3),
                            f"time {hi}x / {lo}x / {k:g}": round(t_hi / t_lo / k, 3)}, notes=notes,
                  details={"config": args.config, "train_images": {str(s): cfgs[s].data.demo.n_train for s in args.scales},
                           "val_images": {str(s): cfgs[s].data.demo.n_val for s in args.scales},
                           "train_epochs": args.train_epochs, "steps": {str(s): res[s] for s in args.scales}})


# ============================================================================================ cam-sources
def cam_sources_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, default=8, help="train_aug images (half VOC train, half SBD-only)")
    ap.add_argument("--val-images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = the cost per core)")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=1, help="cam_train steps (its weights only feed cam_infer)")
    ap.add_argument("--work", default=str(BENCH_RUNS / "cam_sources"), help="scratch folder (wiped first)")


def clip_flops(cfg, image_shape=(375, 500)) -> float:
    """FLOPs of clip_cam on one image with `image_shape` and two labelled classes (forward + GradCAM backward)."""
    import numpy as np

    from rca_core.models.clip_es import ClipCam, build_clip, text_embeddings

    c = cfg.cam.clip
    model = build_clip(c)
    fg = text_embeddings(model, ["a", "b"], c.templates)
    bg = text_embeddings(model, c.background, c.templates)
    img = np.zeros((*image_shape, 3), np.uint8)
    cam = ClipCam(model, fg, bg, c)
    return _flops(lambda: cam(img, [0, 1]))


def cam_sources(args) -> Result:
    """Seconds per image of each CAM source at PASCAL VOC size on this CPU: RCA's (memory_build + cam_infer of
configs/voc12.yaml: ResNet-50, 4 scales + flip) beside CLIP's (clip_cam of configs/voc12_clip.yaml: ViT-B/16 at
the image's size rounded up to 16, GradCAM per labelled class + CAA), same images, same threads, in one process
through the one per-image lifecycle (the Worker's model build timed apart as setup). Random weights on both sides
(`cam.clip.random_arch: model`: the real ViT-B/16 architecture, so the cost is the real one); cam_train runs
--train-steps steps only to give cam_infer a model (RCA's training cost per image is voc-cost's). GFLOP/img from
torch.utils.flop_counter (clip_cam: forward + the GradCAM backward of 2 classes), GFLOP/s = that / s_per_img,
beside this CPU's ResNet-50 forward rate. No goal: the figures say what each source costs."""
    import torch

    from rca_core.config import load_config
    from rca_core.config.base import deep_update
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    t0 = time.time()
    torch.set_num_threads(args.threads)
    over = voc_work(args)
    rca_cfg = load_config(config_file("configs/voc12.yaml"), over)
    clip_over = deep_update(over, {"cam": {"clip": {"weights": "random", "random_arch": "model"}}})
    clip_cfg = load_config(config_file("configs/voc12_clip.yaml"), clip_over)
    store = ArtifactStore(rca_cfg.store)
    rows = []
    p = plan(rca_cfg)
    for name in ("cam_train", "memory_build", "cam_infer"):
        row = time_stage(name, rca_cfg, store, p)
        if name != "cam_train":
            rows.append({"source": "rca", **row})
    rows.append({"source": "clip", **time_stage("clip_cam", clip_cfg, store, plan(clip_cfg))})
    fl = network_flops(rca_cfg)
    fl["clip_cam"] = clip_flops(clip_cfg)
    rate = cpu_flop_rate(args.threads)
    for r in rows:
        f = fl.get(r["stage"], 0.0)
        r["gflop_per_img"] = round(f / 1e9, 1)
        r["gflop_per_s"] = round(f / 1e9 / r["s_per_img"], 1) if r["s_per_img"] else None
        r["s_per_img"] = round(r["s_per_img"], 2)
    rca_s = sum(r["s_per_img"] for r in rows if r["source"] == "rca")
    clip_s = next(r["s_per_img"] for r in rows if r["source"] == "clip")
    seconds = time.time() - t0
    headline = {"rca CAMs (memory_build + cam_infer)": f"{rca_s:.2f} s/img",
                "clip CAMs (clip_cam, ViT-B/16)": f"{clip_s:.2f} s/img",
                "clip / rca": f"{clip_s / rca_s:.2f}x"}
    notes = (f"{args.images} train_aug images at 500x375 / 375x500, {args.threads} torch thread(s), one process, "
             f"random weights; this CPU runs a ResNet-50 forward at {rate / 1e9:.1f} GFLOP/s. RCA's CAMs also need "
             f"cam_train (not in these rows). Total {seconds:.0f} s.")
    return Result("CAM sources at VOC size: seconds per image of RCA's and CLIP's CAMs", rows, headline=headline,
                  notes=notes, details={"rows": rows, "cpu_gflops": rate / 1e9, "seconds": seconds})


SUBJECT = Subject("stages", __doc__, [
    Benchmark("throughput", "per-image stages: images/s per worker, plain loop vs one Ray actor", throughput_args,
              throughput),
    Benchmark("scaling", "per-image stages on 1 -> N actors of one host (goal >= 1.8x for 1 -> 2)", scaling_args,
              scaling, lambda a: None if a.workers == [1, 2] else f"{a.workers[0]}-{a.workers[1]}-actors",
              "--workers other than 1 2 (FROM-TO-actors)"),
    Benchmark("nodes", "1 -> 2 Ray nodes without shared disk, store and data on S3 (goal >= 1.8x)", nodes_args, nodes,
              lambda a: f"{a.size}px" if a.size else None, "--size N (Npx)"),
    Benchmark("ray-data", "the run's actor pool vs Ray Data map_batches, same stage code", ray_data_args, ray_data),
    Benchmark("voc-cost", "per-image cost of every voc12 stage at VOC size + full-run projections", voc_cost_args,
              voc_cost),
    Benchmark("cam-sources", "seconds per image of RCA's and CLIP's CAMs at VOC size (cam_infer vs clip_cam)",
              cam_sources_args, cam_sources),
    Benchmark("growth", "peak memory and time per step at 1x and 4x the images (flat memory, linear time)",
              growth_args, growth),
], children=[Child("_growth-step", 2, growth_step)])

if __name__ == "__main__":
    sys.exit(SUBJECT.main())

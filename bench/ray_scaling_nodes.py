"""Speed-up of the per-image stages from 1 to 2 Ray nodes that share no disk, with the store and data on S3.

Goal (issue 13): at least 1.8x. The two-node harness of tests/test_cluster_s3.py: a Ray head and a second
node on 127.0.0.1, node 2 in its own mount namespace with private tmpfs over this bench's work directory and
the checkout's runs/ and data/, so it sees nothing the driver writes locally; a SeaweedFS S3 server on
127.0.0.1 holds the artifact store and the demo data set. Each node offers --cpus-per-node CPUs (1 by
default: on this 2-core machine that is one core per node), so 1 actor = one node's share, 2 actors = both
nodes (the manifest's node ids say where each image ran). Each node's Ray processes are pinned to its own
core(s) with taskset (--no-pin: unpinned), as two machines would be: unpinned, the one-node run's I/O threads
(prefetch, write-behind) borrow the idle second core, which a one-core machine does not have.

The upstream stages are computed once with the plain runner into a local store and uploaded to the bucket
(same stage keys); then for each stage, --repeat times, alternating 1 and 2 actors, the stage's folder in
the bucket is deleted and the stage runs through tasks.per_image.run_per_image_stage from this process
(the driver, on the head's host view). Stage time includes the stage's verification, the actors' model
builds (each timed stage starts with actors that hold no models, as each stage of a run does), all shards and
the driver's merge; the actor pool's processes are started once before (their start-up is reported, not
timed per stage). Median of the repeats. The S3 server and this driver float over both cores; the CPU
seconds of each kind of process during each timed stage are recorded (bench/cpu_account.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import ROOT, report  # noqa: E402
from cpu_account import CpuSampler  # noqa: E402
from ray_scaling import speedup_table  # noqa: E402
from stage_throughput import (PER_IMAGE_STAGES, add_config_args, bench_config, prepare_upstream,  # noqa: E402
                              setup_env, stage_rows)
BUCKET = "bench-nodes"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--stages", nargs="+", default=PER_IMAGE_STAGES, choices=PER_IMAGE_STAGES)
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting (median)")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--size", type=int, default=None,
                    help="side of the demo images in pixels (default: the config's, 96); VOC's images are ~500x375")
    ap.add_argument("--no-pin", action="store_true",
                    help="let both nodes' processes float over all of the host's cores (default: each node's Ray "
                         "processes pinned to its own cores with taskset, as on two machines)")
    args = ap.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(1)
    from harness.ray_cluster import TwoNodeCluster
    from harness.s3_server import SeaweedS3
    from rca_core import storage
    from rca_core.stages.planning import plan

    work = Path(tempfile.mkdtemp(prefix="rca-bench-nodes-"))
    local_dir = work / "local"
    local = bench_config(args.config, args.images, args.train_epochs, store=local_dir / "store",
                         data_root=local_dir / "data")
    if args.size:
        local.data.demo.size = args.size
    s3 = SeaweedS3(work / "s3")
    hidden = [local_dir, ROOT / "runs", ROOT / "data"]
    for d in hidden:
        d.mkdir(parents=True, exist_ok=True)
    pin = None
    if not args.no_pin:
        cores = sorted(os.sched_getaffinity(0))
        k = args.cpus_per_node
        if len(cores) < 2 * k:
            raise SystemExit(f"pinning needs {2 * k} cores, this host offers {len(cores)}: use --no-pin")
        pin = (",".join(map(str, cores[:k])), ",".join(map(str, cores[k:2 * k])))
    cluster = TwoNodeCluster(work / "ray", hidden_dirs=hidden, head_cpus=args.cpus_per_node,
                             node2_cpus=args.cpus_per_node, env=s3.env, cpu_sets=pin)
    runs: dict = {}
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        s3.start()
        os.environ.update(s3.env)  # the standard AWS_* environment alone points s3:// at the server
        s3.make_bucket(BUCKET)
        prepare_upstream(local, args.stages, show_progress=False)
        prep_s = time.perf_counter() - t
        t = time.perf_counter()
        storage.upload_tree(local.store, f"s3://{BUCKET}/store")
        storage.upload_tree(local.data.root, f"s3://{BUCKET}/data")
        upload_s = time.perf_counter() - t
        t = time.perf_counter()
        cluster.start()
        cluster_s = time.perf_counter() - t
        cfgs = {}
        for n in (1, 2):
            c = local.model_copy(deep=True)
            c.store, c.data.root = f"s3://{BUCKET}/store", f"s3://{BUCKET}/data"
            c.ray.address, c.ray.actors, c.ray.num_workers = cluster.address, n, n  # the address once started
            cfgs[n] = c
        import ray

        from tasks.per_image import get_pool, release_pools, run_per_image_stage, stage_resources
        from tasks.ray_runtime import ray_session

        fs = s3.filesystem()
        with ray_session(cfgs[2].ray):
            alive = [nd for nd in ray.nodes() if nd.get("Alive")]
            print(f"[bench] cluster {cluster.address}: {len(alive)} nodes, "
                  f"{ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)
            try:
                # the pool's actors (one per node) started before any stage is timed: a stage's time is then
                # its own work (Worker build, shards, merge) in both settings, not the first one's process start
                t = time.perf_counter()
                pool = get_pool(cfgs[2], *stage_resources(args.stages[0], cfgs[2]), 2)
                warm = ray.get([a.ping.remote() for a in pool], timeout=300)
                pool_s = time.perf_counter() - t
                affinity = ray.get([a.__ray_call__.remote(lambda _self: sorted(os.sched_getaffinity(0))) for a in pool],
                                   timeout=60)
                print(f"[bench] actor pool up on {len(set(warm))} node(s) in {pool_s:.1f} s; their CPUs: "
                      f"{affinity}", flush=True)
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
                            nodes = {m["node_id"] for m in man if m.get("node_id")}
                            r = {"seconds": sec, "images": int(summary.get("images", len(man))), "nodes": len(nodes),
                                 "phase_seconds": summary.get("phase_seconds"),
                                 "image_seconds_by_node": summary.get("image_seconds_by_node"),
                                 "worker_build_seconds": summary.get("worker_build_seconds"),
                                 "cpu": cpu.result()}
                            runs.setdefault((s, n), []).append(r)
                            ph = r["phase_seconds"] or {}
                            busy = ", ".join(f"{v:.1f}" for v in (r["image_seconds_by_node"] or {}).values())
                            print(f"[bench] {s} x{n} actors: {sec:.2f} s on {len(nodes)} node(s); driver setup "
                                  f"{ph.get('setup', 0):.2f} s, shards {ph.get('shards', 0):.2f} s, finalize "
                                  f"{ph.get('finalize', 0):.2f} s; image seconds per node: {busy}; model build "
                                  f"{r['worker_build_seconds'] or 0:.2f} s", flush=True)
                            c = r["cpu"]
                            print(f"[bench]   CPU seconds: machine busy {c['machine_busy_cpu_s']:.1f} of "
                                  f"{c['wall_s'] * len(os.sched_getaffinity(0)):.1f}; " + ", ".join(
                                      f"{g} {v:.1f}" for g, v in c["by_group_cpu_s"].items()), flush=True)
            finally:
                release_pools()
    finally:
        cluster.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows, goals = speedup_table(runs, args.stages, 1, 2, lambda n: "1node" if n == 1 else f"{n}nodes", "nodes",
                                lambda s: {"nodes_used_1": runs[(s, 1)][-1]["nodes"],
                                           "nodes_used_2": runs[(s, 2)][-1]["nodes"]})
    result = {**goals, "rows": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()},
              "prepare_seconds": prep_s, "upload_seconds": upload_s, "cluster_start_seconds": cluster_s,
              "pinned_cpus": pin, "pool_start_seconds": pool_s, "actor_cpus": affinity,
              "total_seconds": time.perf_counter() - t_all}
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
    DRIVER = "driver (the run's own process)"  # noqa: N806 - cpu_account's group of this process (driver_pid)
    cpu_lines = []
    for s in args.stages:
        for n in (1, 2):
            cs = [r["cpu"] for r in runs[(s, n)]]
            share = lambda g: statistics.median(c["by_group_cpu_s"].get(g, 0.0) / c["wall_s"] for c in cs)
            busy = statistics.median(c["machine_busy_cpu_s"] / c["wall_s"] for c in cs)
            cpu_lines.append(f"{s} x{n}: machine {busy:.2f} of {cores} cores busy, Ray workers "
                             f"{share('ray workers (ray::...)'):.2f}, S3 server {share('s3 server (SeaweedFS)'):.2f}, "
                             f"driver {share(DRIVER):.2f}, Ray system "
                             f"{share('ray system (raylet, gcs, dashboard, agents)'):.2f}")
    result["cpu_cores_by_group"] = cpu_lines
    notes += (" CPU in use during the timed stages (cores, median of the runs; bench/cpu_account.py): "
              + "; ".join(cpu_lines) + ".")
    report("Ray scaling over two nodes that share no disk (S3 store)", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

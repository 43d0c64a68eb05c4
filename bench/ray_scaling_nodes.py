"""Speed-up of the per-image stages from 1 to 2 Ray nodes that share no disk, with the store and data on S3.

Goal (issue 13): at least 1.8x. The two-node harness of tests/test_cluster_s3.py: a Ray head and a second
node on 127.0.0.1, node 2 in its own mount namespace with private tmpfs over this bench's work directory and
the checkout's runs/ and data/, so it sees nothing the driver writes locally; a SeaweedFS S3 server on
127.0.0.1 holds the artifact store and the demo data set. Each node offers --cpus-per-node CPUs (1 by
default: on this 2-core machine that is one core per node), so 1 actor = one node's share, 2 actors = both
nodes (the manifest's node ids say where each image ran).

The upstream stages are computed once with the plain runner into a local store and uploaded to the bucket
(same stage keys); then for each stage, --repeat times, alternating 1 and 2 actors, the stage's folder in
the bucket is deleted and the stage runs through tasks.per_image.run_per_image_stage from this process
(the driver, on the head's host view). Stage time includes the stage's verification, all shards and the
driver's merge; the actor pool is built once (its start-up is reported, not timed per stage). Median of
the repeats. The S3 server, both raylets, the workers and this driver share the machine's cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import ROOT, report  # noqa: E402
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
    args = ap.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(1)
    from harness.ray_cluster import TwoNodeCluster
    from harness.s3_server import SeaweedS3
    from rca_core import storage
    from rca_core.stages import plan

    work = Path(tempfile.mkdtemp(prefix="rca-bench-nodes-"))
    local_dir = work / "local"
    local = bench_config(args.config, args.images, args.train_epochs, store=local_dir / "store",
                         data_root=local_dir / "data")
    s3 = SeaweedS3(work / "s3")
    hidden = [local_dir, ROOT / "runs", ROOT / "data"]
    for d in hidden:
        d.mkdir(parents=True, exist_ok=True)
    cluster = TwoNodeCluster(work / "ray", hidden_dirs=hidden, head_cpus=args.cpus_per_node,
                             node2_cpus=args.cpus_per_node, env=s3.env)
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

        from tasks.per_image import release_pools, run_per_image_stage
        from tasks.ray_runtime import ray_session

        fs = s3.filesystem()
        with ray_session(cfgs[2].ray):
            alive = [nd for nd in ray.nodes() if nd.get("Alive")]
            print(f"[bench] cluster {cluster.address}: {len(alive)} nodes, "
                  f"{ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)
            try:
                for s in args.stages:
                    key = plan(cfgs[1])[s].key
                    for _ in range(args.repeat):
                        for n in (1, 2):
                            path = f"{BUCKET}/store/{key}"
                            if fs.exists(path):
                                fs.rm(path, recursive=True)
                            t = time.perf_counter()
                            summary = run_per_image_stage(s, cfgs[n], cfgs[n].store)
                            sec = time.perf_counter() - t
                            man = stage_rows(cfgs[n], s)
                            nodes = {m["node_id"] for m in man if m.get("node_id")}
                            r = {"seconds": sec, "images": int(summary.get("images", len(man))), "nodes": len(nodes)}
                            runs.setdefault((s, n), []).append(r)
                            print(f"[bench] {s} x{n} actors: {sec:.2f} s on {len(nodes)} node(s)", flush=True)
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
              "total_seconds": time.perf_counter() - t_all}
    d = local.data.demo
    notes = (f"config {local.name}: {d.n_train} train images of {d.size} px, 1 torch thread per actor, "
             f"{args.cpus_per_node} CPU(s) per node, shard size {local.ray.shard_size}, store and data in a "
             f"SeaweedFS bucket on 127.0.0.1; node 2 sees none of the driver's local files. Median of "
             f"{args.repeat} run(s) per setting. Upstream prepared locally in {prep_s:.0f} s, uploaded in "
             f"{upload_s:.0f} s; cluster start {cluster_s:.0f} s.")
    report("Ray scaling over two nodes that share no disk (S3 store)", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

"""A per-image stage with its artifact store on S3 vs on local disk (issue #12's goal: at most 1.3x the time).

Starts a real SeaweedFS S3 server on 127.0.0.1 (tests/harness/s3_server.py), runs cam_train and
memory_build of the demo config once into a local store, copies those stages into an S3 store (same
keys), then times cam_infer and crf_labels in each store, in this process (1 torch thread, the stage's
own runner: concurrent verification, prefetch, write-behind), alternating local and S3 runs. The data set
stays on local disk in both runs unless --data-on-s3, which times the S3-store runs with the data tree in
the bucket too. Each timed run starts from an empty stage folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import ROOT, goal, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--images", type=int, default=200, help="training images of the demo set")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=["cam_infer", "crf_labels"])
    ap.add_argument("--data-on-s3", action="store_true", help="also time S3 runs with data.root in the bucket")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    import torch

    from harness.s3_server import SeaweedS3
    from rca_core import storage
    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.stages.local import run_planned_stage, run_stage
    from rca_core.store import ArtifactStore

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rca-bench-s3-"))
    s3 = SeaweedS3(work / "s3")
    rows, result = [], {}
    try:
        s3.start()
        os.environ.update(s3.env)  # the standard AWS_* environment alone points s3:// at the server
        s3.make_bucket("bench")
        ov = {"store": str(work / "local-store"), "data": {"root": str(work / "data"),
                                                         "demo": {"n_train": args.images, "n_val": 8}},
              "cam": {"train": {"epochs": 1}}}
        local = load_config(args.config, ov)
        remote = local.model_copy(update={"store": "s3://bench/store"}, deep=True)
        t = time.perf_counter()
        run_stage("memory_build", local, show_progress=False)  # + cam_train
        setup_s = time.perf_counter() - t
        plans = plan(local)
        fs = s3.filesystem()
        for name in ("cam_train", "memory_build"):
            storage.upload_tree(Path(local.store) / plans[name].key, f"s3://bench/store/{plans[name].key}")
            fs.pipe(f"bench/store/{name}/zarr.json", (Path(local.store) / name / "zarr.json").read_bytes())
        fs.pipe("bench/store/zarr.json", (Path(local.store) / "zarr.json").read_bytes())
        variants = [("local", local), ("s3", remote)]
        if args.data_on_s3:
            storage.upload_tree(local.data.root, "s3://bench/data")
            remote_data = remote.model_copy(deep=True)
            remote_data.data.root = "s3://bench/data"
            variants.append(("s3 + data on s3", remote_data))

        def clear(cfg, name):
            key = plan(cfg)[name].key
            if storage.is_url(cfg.store):
                path = f"bench/store/{key}"
                if fs.exists(path):
                    fs.rm(path, recursive=True)
            else:
                shutil.rmtree(Path(cfg.store) / key, ignore_errors=True)

        times: dict[tuple[str, str], list[float]] = {}
        for name in args.stages:
            for r in range(args.repeat):
                for label, cfg in variants:
                    clear(cfg, name)
                    store = ArtifactStore.for_config(cfg)
                    t = time.perf_counter()
                    run_planned_stage(name, cfg, store, plan(cfg), show_progress=False)
                    times.setdefault((name, label), []).append(time.perf_counter() - t)
            base = min(times[(name, "local")])
            for label, _ in variants:
                best = min(times[(name, label)])
                rows.append({"stage": name, "store": label, "images": args.images,
                             "seconds (best of %d)" % args.repeat: round(best, 2),
                             "ms/image": round(1000 * best / args.images, 1), "ratio vs local": round(best / base, 3)})
        worst = max(r["ratio vs local"] for r in rows if r["store"] == "s3")
        result = {"rows": rows, "setup_seconds": setup_s, "times": {f"{k[0]}/{k[1]}": v for k, v in times.items()},
                  "goal": goal("per-image stage over an S3 store <= 1.3x the local store's time", worst, worst <= 1.3)}
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    report("Per-image stages: S3 store vs local store", rows, result, args.json, append=not args.no_append,
           notes="SeaweedFS on 127.0.0.1 (one process, loopback: no network latency beyond the HTTP round trip); "
                 "the stage runner verifies finished images concurrently, reads the next images' inputs ahead "
                 "and writes behind, so request latency overlaps compute. In-process, 1 torch thread.")


if __name__ == "__main__":
    main()

"""Orchestration overhead: the Prefect pipeline flow over Ray vs the rca_core stages in a plain loop.

Goal (issue 6/7): under 5 % of the demo's wall time. The same work twice, each in a fresh subprocess
with its own fresh store (the demo data set is generated once beforehand, outside both timings):
- plain loop: rca_core.stages.run_stage(name, with_upstream=False) for every stage in order, then the
  run report (rca_core.report.write_report), in one process;
- pipeline: flows.pipeline.pipeline(config=cfg) against a local Prefect server (127.0.0.1): a local Ray
  session, one stage flow + cached task per stage, per-image stages in shards over Ray tasks,
  training stages under Ray Train, progress and table artifacts, the run report.
--images N scales the val split with the train split. Both use the same parallelism by default (--workers 1: one Ray worker, and one torch thread per
process on both sides), so the difference is what Prefect and Ray add (Ray start/stop, worker
processes and model loads, Ray Train worker groups, Prefect API calls, result persistence), not
extra cores. Times start after the imports in each subprocess. The Prefect server's start-up is
reported on its own (a server normally runs already).
overhead_fraction = (pipeline_seconds - plain_loop_seconds) / pipeline_seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, goal, report  # noqa: E402
from stage_throughput import BENCH_RUNS, add_config_args, bench_config, describe, setup_env  # noqa: E402

GOAL = 0.05


def child(mode: str, cfg_path: str) -> None:
    setup_env()
    import torch

    torch.set_num_threads(1)
    from rca_core.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    stages: dict[str, float] = {}
    if mode == "plain":
        from rca_core.report import write_report
        from rca_core.stages import STAGES, run_stage

        t0 = time.perf_counter()
        for name in STAGES:
            t = time.perf_counter()
            run_stage(name, cfg, cfg.store, with_upstream=False, show_progress=False)
            stages[name] = time.perf_counter() - t
        t = time.perf_counter()
        write_report(cfg.store, Path(cfg.store).parent / "report", cfg)
        stages["report"] = time.perf_counter() - t
        total = time.perf_counter() - t0
    else:
        from flows.pipeline import pipeline

        t0 = time.perf_counter()
        res = pipeline(config=cfg)
        total = time.perf_counter() - t0
        stages = {r["stage"]: float(r["seconds"]) for r in res["table"]}
        if any(r.get("status") == "cached" for r in res["table"]):
            raise SystemExit("a stage was cached: the pipeline store was not fresh")
    print("RESULT " + json.dumps({"seconds": total, "stages": stages}), flush=True)


def run_child(mode: str, cfg_path: Path, log: Path, env: dict | None = None) -> dict:
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, __file__, "--child", mode, str(cfg_path)], cwd=ROOT,
                           env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=f, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"the {mode} run failed (rc {p.returncode}); see {log}:\n"
                         + (p.stdout[-1500:] + log.read_text()[-3000:]))
    return json.loads(line[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, train_epochs=None)
    ap.add_argument("--workers", type=int, default=1, help="Ray workers of the pipeline (default 1: same parallelism "
                                                           "as the plain loop)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    setup_env()
    from flows.prefect_server import local_prefect_server
    from rca_core.data import make_dataset

    probe = bench_config(args.config, args.images, args.train_epochs, workers=args.workers, scale_val=True)
    work = BENCH_RUNS / "overhead" / f"{probe.name}-{probe.data.demo.n_train}-w{args.workers}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfgs = {}
    for mode in ("plain", "pipeline"):
        c = probe.model_copy(deep=True)
        c.store = str(work / mode / "store")
        (work / mode).mkdir()
        (work / f"{mode}.json").write_text(c.model_dump_json())
        cfgs[mode] = c
    for split in sorted({probe.data.train_split, probe.data.eval_split, probe.data.val_split}):
        make_dataset(probe.data, split)  # generate the demo set once, outside both timings
    plain = run_child("plain", work / "plain.json", work / "plain.log")
    print(f"[bench] plain loop: {plain['seconds']:.1f} s", flush=True)
    t = time.perf_counter()
    with local_prefect_server(work / "prefect_home") as api:
        server_s = time.perf_counter() - t
        pipe = run_child("pipeline", work / "pipeline.json", work / "pipeline.log", {"PREFECT_API_URL": api})
    print(f"[bench] pipeline: {pipe['seconds']:.1f} s", flush=True)
    overhead = (pipe["seconds"] - plain["seconds"]) / pipe["seconds"]
    rows = []
    for name in [n for n in plain["stages"] if n != "report"]:
        a, b = plain["stages"][name], pipe["stages"].get(name)
        rows.append({"stage": name, "plain_loop_s": a, "pipeline_s": b, "extra_s": None if b is None else b - a})
    rest_plain = plain["seconds"] - sum(v for k, v in plain["stages"].items() if k != "report")
    rest_pipe = pipe["seconds"] - sum(pipe["stages"].values())
    rows.append({"stage": "rest (report; pipeline: + data check, Ray start/stop, artifacts)", "plain_loop_s": rest_plain,
                 "pipeline_s": rest_pipe, "extra_s": rest_pipe - rest_plain})
    rows.append({"stage": "whole run", "plain_loop_s": plain["seconds"], "pipeline_s": pipe["seconds"],
                 "extra_s": pipe["seconds"] - plain["seconds"]})
    result = {"pipeline_seconds": pipe["seconds"], "plain_loop_seconds": plain["seconds"], "overhead_fraction": overhead,
              "prefect_server_start_seconds": server_s, "workers": args.workers, "config": args.config,
              "images": probe.data.demo.n_train, "rows": rows,
              "goal": goal(f"orchestration overhead < {GOAL:.0%} of the pipeline's wall time", round(overhead, 4),
                           overhead < GOAL)}
    notes = (f"{describe(probe)}, {args.workers} Ray worker(s) in the pipeline, training epochs "
             f"{args.train_epochs or 'as configured'}. Overhead = (pipeline - plain) / pipeline = {overhead:.1%}. "
             f"Pipeline stage rows are the stage flows' wall times as the flow reports them. Prefect server start-up "
             f"{server_s:.1f} s, not included.")
    report("Orchestration overhead: Prefect + Ray vs a plain loop", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

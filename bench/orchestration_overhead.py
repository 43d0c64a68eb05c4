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
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, goal, report  # noqa: E402
from cpu_account import CpuSampler  # noqa: E402
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
        from rca_core.stages.registry import STAGE_NAMES as STAGES
        from rca_core.stages.local import run_stage

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
    """Run one side in a subprocess; its result plus the CPU seconds every kind of process spent meanwhile."""
    with open(log, "w") as f, CpuSampler() as cpu:
        p = subprocess.Popen([sys.executable, __file__, "--child", mode, str(cfg_path)], cwd=ROOT,
                             env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=f, text=True)
        cpu.driver_pid = p.pid
        out, _ = p.communicate()
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"the {mode} run failed (rc {p.returncode}); see {log}:\n"
                         + (out[-1500:] + log.read_text()[-3000:]))
    return {**json.loads(line[-1][7:]), "cpu": cpu.result()}


def cpu_line(name: str, cpu: dict) -> str:
    """One sentence: the CPU seconds each kind of process spent during one side's run (bench/cpu_account.py)."""
    groups = ", ".join(f"{k} {v:.1f}" for k, v in cpu["by_group_cpu_s"].items())
    return (f"CPU seconds during the {name} ({cpu['wall_s']:.0f} s wall, machine busy {cpu['machine_busy_cpu_s']:.1f}, "
            f"steal {cpu['machine_steal_cpu_s']:.1f}): {groups}, not attributed {cpu['unattributed_cpu_s']:.1f}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, train_epochs=None)
    ap.add_argument("--workers", type=int, default=1, help="Ray workers of the pipeline (default 1: same parallelism "
                                                           "as the plain loop)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (plain loop, pipeline), alternated; the overhead "
                                                           "is the median of the rounds' (default 1)")
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
    for r in range(args.repeats):  # a fresh store per run
        for mode in ("plain", "pipeline"):
            c = probe.model_copy(deep=True)
            c.store = str(work / f"{mode}-{r}" / "store")
            (work / f"{mode}-{r}").mkdir()
            (work / f"{mode}-{r}.json").write_text(c.model_dump_json())
    for split in sorted({probe.data.train_split, probe.data.eval_split, probe.data.val_split}):
        make_dataset(probe.data, split)  # generate the demo set once, outside both timings
    pairs = []
    server_s = []
    for r in range(args.repeats):  # alternated: plain, pipeline, plain, pipeline, ... (the host's drift shows)
        plain = run_child("plain", work / f"plain-{r}.json", work / f"plain-{r}.log")
        print(f"[bench] round {r + 1}: plain loop {plain['seconds']:.1f} s", flush=True)
        t = time.perf_counter()
        with local_prefect_server(work / "prefect_home") as api:  # up during the pipeline run only
            server_s.append(time.perf_counter() - t)
            pipe = run_child("pipeline", work / f"pipeline-{r}.json", work / f"pipeline-{r}.log",
                             {"PREFECT_API_URL": api})
        print(f"[bench] round {r + 1}: pipeline {pipe['seconds']:.1f} s", flush=True)
        pairs.append((plain, pipe))
    overheads = [(b["seconds"] - a["seconds"]) / b["seconds"] for a, b in pairs]
    overhead = float(statistics.median(overheads))

    def med(side: int, get) -> float:
        return float(statistics.median(get(p[side]) for p in pairs))

    rows = []
    for name in [n for n in pairs[0][0]["stages"] if n != "report"]:
        a, b = med(0, lambda x: x["stages"][name]), med(1, lambda x: x["stages"][name])
        rows.append({"stage": name, "plain_loop_s": a, "pipeline_s": b, "extra_s": b - a})
    a = med(0, lambda x: x["seconds"] - sum(v for k, v in x["stages"].items() if k != "report"))
    b = med(1, lambda x: x["seconds"] - sum(x["stages"].values()))
    rows.append({"stage": "rest (report; pipeline: + data check, Ray start/stop, artifacts)", "plain_loop_s": a,
                 "pipeline_s": b, "extra_s": b - a})
    a, b = med(0, lambda x: x["seconds"]), med(1, lambda x: x["seconds"])
    rows.append({"stage": "whole run", "plain_loop_s": a, "pipeline_s": b, "extra_s": b - a})
    result = {"pipeline_seconds": [p[1]["seconds"] for p in pairs], "plain_loop_seconds": [p[0]["seconds"] for p in pairs],
              "overhead_fraction": overhead, "overhead_fraction_per_round": overheads, "repeats": args.repeats,
              "prefect_server_start_seconds": server_s, "workers": args.workers, "config": args.config,
              "cpu_plain": [p[0]["cpu"] for p in pairs], "cpu_pipeline": [p[1]["cpu"] for p in pairs],
              "images": probe.data.demo.n_train, "rows": rows,
              "goal": goal(f"orchestration overhead < {GOAL:.0%} of the pipeline's wall time (median of "
                           f"{args.repeats} alternated rounds)", round(overhead, 4), overhead < GOAL)}
    rounds = "; ".join(f"round {r + 1}: plain {a['seconds']:.1f} s, pipeline {b['seconds']:.1f} s, {o:.1%}"
                       for r, ((a, b), o) in enumerate(zip(pairs, overheads)))
    cpu = " ".join(f"Round {r + 1}: {cpu_line('plain loop', a['cpu'])} {cpu_line('pipeline', b['cpu'])}"
                   for r, (a, b) in enumerate(pairs))
    notes = (f"{describe(probe)}, {args.workers} Ray worker(s) in the pipeline, training epochs "
             f"{args.train_epochs or 'as configured'}. Overhead = (pipeline - plain) / pipeline, median of "
             f"{args.repeats} alternated round(s) = {overhead:.1%} ({rounds}). Stage rows: medians over the rounds; "
             f"pipeline stage rows are the stage flows' wall times as the flow reports them. Prefect server start-up "
             f"{max(server_s):.1f} s at most, not included. {cpu}")
    report("Orchestration overhead: Prefect + Ray vs a plain loop", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

"""Pipeline: what the orchestration costs, and what a crash costs.

    python bench/pipeline.py BENCHMARK [options]      (python bench/pipeline.py BENCHMARK --help)

overhead      the Prefect pipeline flow over Ray vs the same stages in a plain loop (goal: under 5 % of the wall time)
resume        work redone after a kill -9 in the middle of a per-image stage (goal: at most one shard)
prefect-load  concurrent runs against one Prefect server on SQLite and one on PostgreSQL (the cluster's scripts):
              completed and failed runs, server errors, API latency p50/p99, wall time

Each run writes its record to bench/results/pipeline.BENCHMARK.json (docs/benchmarks.md: python scripts/bench_table.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lib.cli import Benchmark, Child, Subject  # noqa: E402
from bench._lib.common import BENCH_RUNS, ROOT  # noqa: E402
from bench._lib.demo import (PER_IMAGE_STAGES, add_config_args, bench_config, config_file, describe,  # noqa: E402
                             drop_stage, fresh_copy, prepare_upstream, shared_bench_config)
from bench._lib.records import Result, goal  # noqa: E402


# ============================================================================================ overhead
OVERHEAD_GOAL = 0.05


def overhead_child(mode: str, cfg_path: str) -> None:
    """Child: the whole run in this process, as a plain loop of stages or as the Prefect pipeline flow."""
    import torch

    from bench._lib.procs import emit

    torch.set_num_threads(1)
    from rca_core.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    stages: dict[str, float] = {}
    if mode == "plain":
        from rca_core.report import write_report
        from rca_core.stages.local import run_stage
        from rca_core.stages.registry import STAGE_NAMES

        t0 = time.perf_counter()
        for name in STAGE_NAMES:
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
    emit({"seconds": total, "stages": stages})


def overhead_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap, train_epochs=None)
    ap.add_argument("--workers", type=int, default=1, help="Ray workers of the pipeline (default 1: same parallelism "
                                                           "as the plain loop)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (plain loop, pipeline), alternated; the overhead "
                                                           "is the median of the rounds' (default 1)")


def overhead(args) -> Result:
    """Orchestration overhead: the Prefect pipeline flow over Ray vs the rca_core stages in a plain loop.

Goal: under 5 % of the demo's wall time. The same work twice, each in a fresh subprocess with its own fresh store
(the demo data set is generated once beforehand, outside both timings):
- plain loop: rca_core.stages.local.run_stage(name, with_upstream=False) for every stage in order, then the run
  report (rca_core.report.write_report), in one process;
- pipeline: flows.pipeline.pipeline(config=cfg) against a local Prefect server (127.0.0.1): a local Ray session,
  one stage flow + cached task per stage, per-image stages in shards on the run's actor pool, training stages
  as Ray tasks or under Ray Train, progress and table artifacts, the run report.
--images N scales the val split with the train split. Both use the same parallelism by default (--workers 1:
one Ray worker, and one torch thread per process on both sides), so the difference is what Prefect and Ray add
(Ray start/stop, worker processes and model loads, Prefect API calls, result persistence), not extra cores. Times
start after the imports in each subprocess. The Prefect server's start-up is reported on its own (a server
normally runs already). The CPU seconds of every kind of process are recorded during each side.
overhead = (pipeline seconds - plain loop seconds) / pipeline seconds, median over --repeats alternated rounds."""
    from bench._lib.cpu import cpu_line
    from bench._lib.procs import run_child
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

    def side(mode: str, r: int, env: dict | None = None) -> dict:
        return run_child([sys.executable, __file__, "_overhead-child", mode, str(work / f"{mode}-{r}.json")],
                         work / f"{mode}-{r}.log", env=env, cpu=True)

    pairs, server_s = [], []
    for r in range(args.repeats):  # alternated: plain, pipeline, plain, pipeline, ... (the host's drift shows)
        plain = side("plain", r)
        print(f"[bench] round {r + 1}: plain loop {plain['seconds']:.1f} s", flush=True)
        t = time.perf_counter()
        with local_prefect_server(work / "prefect_home") as api:  # up during the pipeline run only
            server_s.append(time.perf_counter() - t)
            pipe = side("pipeline", r, {"PREFECT_API_URL": api})
        print(f"[bench] round {r + 1}: pipeline {pipe['seconds']:.1f} s", flush=True)
        pairs.append((plain, pipe))
    overheads = [(b["seconds"] - a["seconds"]) / b["seconds"] for a, b in pairs]
    frac = float(statistics.median(overheads))

    def med(which: int, get) -> float:
        return float(statistics.median(get(p[which]) for p in pairs))

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
    rounds = "; ".join(f"round {r + 1}: plain {x['seconds']:.1f} s, pipeline {y['seconds']:.1f} s, {o:.1%}"
                       for r, ((x, y), o) in enumerate(zip(pairs, overheads)))
    cpu = " ".join(f"Round {r + 1}: {cpu_line('plain loop', x['cpu'])} {cpu_line('pipeline', y['cpu'])}"
                   for r, (x, y) in enumerate(pairs))
    notes = (f"{describe(probe)}, {args.workers} Ray worker(s) in the pipeline, training epochs "
             f"{args.train_epochs or 'as configured'}. Overhead = (pipeline - plain) / pipeline, median of "
             f"{args.repeats} alternated round(s) = {frac:.1%} ({rounds}). Stage rows: medians over the rounds; "
             f"pipeline stage rows are the stage flows' wall times as the flow reports them. Prefect server start-up "
             f"{max(server_s):.1f} s at most, not included. {cpu}")
    return Result(f"Orchestration overhead: Prefect + Ray vs a plain loop ({probe.data.demo.n_train} images, "
                  f"{args.repeats} round(s))", rows,
                  goals=[goal(f"orchestration overhead < {OVERHEAD_GOAL:.0%} of the pipeline's wall time (median of "
                              f"{args.repeats} alternated rounds)", round(frac, 4), frac < OVERHEAD_GOAL)],
                  headline={"overhead": f"{frac:.1%}", "images": probe.data.demo.n_train, "rounds": args.repeats},
                  notes=notes,
                  details={"pipeline_seconds": [p[1]["seconds"] for p in pairs],
                           "plain_loop_seconds": [p[0]["seconds"] for p in pairs], "overhead_fraction": frac,
                           "overhead_fraction_per_round": overheads, "repeats": args.repeats,
                           "prefect_server_start_seconds": server_s, "workers": args.workers, "config": args.config,
                           "cpu_plain": [p[0]["cpu"] for p in pairs], "cpu_pipeline": [p[1]["cpu"] for p in pairs],
                           "images": probe.data.demo.n_train})


# ============================================================================================ resume
def resume_child(cfg_path: str, stage: str) -> None:
    """Child: one per-image stage over a local Ray (as the pipeline's stage task runs it); prints its summary."""
    from bench._lib.procs import emit
    from rca_core.config import RunConfig
    from tasks.per_image import run_per_image_stage
    from tasks.ray_runtime import ray_session

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    with ray_session(cfg.ray):
        summary = run_per_image_stage(stage, cfg, cfg.store)
    emit({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


def resume_args(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--stage", default="cam_infer", choices=PER_IMAGE_STAGES)
    ap.add_argument("--kill-at", type=float, default=0.5, help="kill when this fraction of the images is in the store")
    ap.add_argument("--delay", type=float, default=0.0,
                    help="extra seconds per image in the workers (the test harness's slowdown, injected from "
                         "outside the library), for small settings")
    ap.add_argument("--timeout", type=float, default=1800)


def resume(args) -> Result:
    """Resume cost: work redone after a kill -9 in the middle of a per-image stage.

Goal: at most one shard. A child process runs one per-image stage over a local Ray (tasks.per_image.
run_per_image_stage, as the pipeline's stage task does) on finished upstream stages. When about --kill-at of the
images are in the store, the child and every process it started (its local Ray: raylet, GCS, workers) get
SIGKILL. The images finished at that moment are counted (with checksum verification). The same stage is then run
again to completion in a new child, and its summary's "recomputed_images" says how many images the resumed run
computed. redone = recomputed_images - (images - finished_at_kill): finished images that were computed again.
Image-level resume makes this 0; shard-level resume would redo up to the shards in flight, stage-level resume
everything. (Partial work on the images in flight at the kill, at most one per worker, is lost in any scheme and
is not counted.) --delay slows every image down from outside the library (the test harness's slowdown: a
sitecustomize on the children's PYTHONPATH, inherited by their Ray workers), to catch a small stage mid-way."""
    import torch

    from bench._lib.harness import slowdown_env
    from bench._lib.procs import alive, kill_tree, tree

    torch.set_num_threads(1)
    from rca_core.stages.context import make_context
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    cfg, base = shared_bench_config(args)
    prepare_upstream(cfg, list(plan(cfg)[args.stage].inputs))
    work = base / f"resume-{args.stage}"
    cfg.store = fresh_copy(cfg.store, work)
    drop_stage(cfg, args.stage)
    cfg_path = work.with_suffix(".json")
    cfg_path.write_text(cfg.model_dump_json())
    ctx = make_context(args.stage, cfg, ArtifactStore(cfg.store))
    out, ids = ctx.out, ctx.ids
    n = len(ids)
    log1, log2 = work.with_suffix(".run1.log"), work.with_suffix(".run2.log")
    env = {**os.environ, **(slowdown_env(work.with_suffix(".slowdown"), image_delay=args.delay) if args.delay else {})}

    def start(log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "_resume-child", str(cfg_path), args.stage], cwd=ROOT,
                                env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    # 1) run and kill -9 in the middle
    t0 = time.perf_counter()
    p = start(log1)
    killed_at, n_killed = None, 0
    try:
        while time.perf_counter() - t0 < args.timeout:
            if p.poll() is not None:
                break
            done = len(out.listed_ids()) if out.exists() and out.fields else 0
            if done >= args.kill_at * n:
                n_killed = kill_tree(p.pid)
                killed_at = time.perf_counter() - t0
                break
            time.sleep(0.2)
    finally:
        if p.poll() is None and killed_at is None:
            kill_tree(p.pid)
        p.wait(timeout=60)
    if killed_at is None:
        raise SystemExit(f"the stage ended (rc {p.returncode}) before {args.kill_at:.0%} of its images were in the "
                         f"store: use a larger --images or --delay. Log: {log1}\n" + log1.read_text()[-2000:])
    time.sleep(1.0)
    left = [pid for pid in tree(p.pid) if pid != p.pid and alive(pid)]
    finished_at_kill = n - len(out.pending(ids, verify=True))
    in_store_at_kill = len(out.listed_ids())
    manifest_at_kill = out.manifest().num_rows if out.exists() else 0
    complete_after_kill = out.is_complete()

    # 2) resume to completion
    t1 = time.perf_counter()
    p2 = start(log2)
    rc = p2.wait(timeout=args.timeout)
    resume_s = time.perf_counter() - t1
    if rc != 0 or not out.is_complete():
        raise SystemExit(f"the resumed run failed (rc {rc}); log {log2}:\n" + log2.read_text()[-3000:])
    summary = out.summary()
    recomputed = int(summary["recomputed_images"])
    unfinished = n - finished_at_kill
    redone = recomputed - unfinished
    shard = cfg.ray.shard_size
    manifest_rows = out.manifest().num_rows
    actors = summary.get("actors")  # the resumed run's actor pool (ray.actors, else one per CPU of the local Ray)
    row = {"stage": args.stage, "images": n, "shard_size": shard, "actors": actors,
           "killed_after_s": killed_at, "processes_killed": n_killed, "finished_at_kill": finished_at_kill,
           "recomputed_images": recomputed, "redone_images": redone, "resume_s": resume_s,
           "stage_s_in_resume": float(summary.get("seconds", 0.0)), "manifest_rows": manifest_rows}
    notes = (f"{describe(cfg)}, {actors} actors in the resumed run. Killed (SIGKILL, the stage process and its "
             f"local Ray: {n_killed} processes) when {in_store_at_kill}/{n} images were in the store; "
             f"{finished_at_kill} passed checksum verification. The resumed run computed {recomputed} images "
             f"(the {unfinished} unfinished ones would be the minimum): redone = {redone}."
             + (f" Per-image delay {args.delay} s injected (the test harness's slowdown) to catch the stage mid-way."
                if args.delay else "")
             + (f" The manifest holds {manifest_rows} rows for {n} images." if manifest_rows != n else ""))
    shutil.rmtree(work, ignore_errors=True)
    return Result(f"Resume cost after kill -9 in the middle of {args.stage}", [row],
                  goals=[goal(f"work redone after kill -9 mid-stage <= one shard ({shard} images)", redone,
                              redone <= shard)],
                  headline={"images redone": redone, "shard": shard}, notes=notes,
                  details={"config": args.config, **row, "in_store_at_kill": in_store_at_kill,
                           "manifest_rows_at_kill": manifest_at_kill, "complete_after_kill": complete_after_kill,
                           "processes_left_after_kill": len(left), "delay_per_image_s": args.delay})


# ============================================================================================ prefect-load
LOAD_BACKENDS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def prefect_load_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--runs", type=int, default=4, help="concurrent `rca run`s against each server (default 4)")
    ap.add_argument("--config", default="configs/tiny.yaml", help="run config of every run (default: the tiny one)")
    ap.add_argument("--backends", default="sqlite,postgresql",
                    help="the servers' databases, loaded one after the other in this order (default: %(default)s)")
    ap.add_argument("--interval", type=float, default=0.5,
                    help="seconds between the API poller's rounds of calls (default 0.5)")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds of polling before the runs start, for the idle latency (default 10)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds for all runs against one server; runs still going then are killed and count as "
                         "failed (default 3600)")


def _load_one(backend: str, args, cfg_path: str, data_root: str, work: Path) -> dict:
    """One server (started with deploy/prefect-server.sh, on SQLite or on a PostgreSQL of deploy/prefect-db.sh),
    args.runs concurrent `rca run`s against it, the API poller during the runs; everything stopped at the end."""
    import httpx

    from bench._lib.common import load_average
    from bench._lib.cpu import CpuSampler
    from bench._lib.prefect_servers import (CLIENT_ERRORS, ApiPoller, BenchPostgres, PrefectServer, count_matches,
                                            env_without_database, latency_summary, server_log_errors)
    from bench._lib.procs import kill_tree

    d = work / backend
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    pg = BenchPostgres() if backend == "postgresql" else None
    server = PrefectServer(d / "prefect-home", url_file=pg.url_file if pg else None,
                           prefect_bin=str(Path(sys.executable).with_name("prefect")))
    procs: list[subprocess.Popen] = []
    outs = []
    poller = None
    res: dict = {"backend": backend, "load_before": load_average()}
    try:
        if pg is not None:
            res["postgres"] = pg.start()
        t = time.perf_counter()
        res["database"] = server.start().replace(str(ROOT) + "/", "")  # paths in the record: repository-relative
        res["server_start_s"] = time.perf_counter() - t
        if not res["database"].lower().startswith(backend):
            raise SystemExit(f"deploy/prefect-server.sh says database {res['database']!r}, expected {backend}")
        print(f"[bench] {backend}: server up in {res['server_start_s']:.1f} s ({res['database']})", flush=True)
        poller = ApiPoller(server.api, args.interval)
        poller.start()
        time.sleep(args.idle)
        rca = str(Path(sys.executable).with_name("rca"))
        env = env_without_database(PREFECT_API_URL=server.api, PREFECT_HOME=str(d / "client-home"))
        ends: list[float | None] = [None] * args.runs
        loads: list[float] = []
        with CpuSampler() as cpu:
            t0, t0_wall = time.perf_counter(), time.time()
            for i in range(args.runs):
                out = open(d / f"run-{i}.out", "w")
                outs.append(out)
                procs.append(subprocess.Popen(
                    [rca, "run", "-c", cfg_path, "--set", f"store={d / f'run-{i}' / 'store'}",
                     "--set", f"data.root={data_root}"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            while time.perf_counter() - t0 < args.timeout:
                for i, p in enumerate(procs):
                    if ends[i] is None and p.poll() is not None:
                        ends[i] = time.perf_counter() - t0
                        print(f"[bench] {backend}: run {i} ended (rc {p.returncode}) after {ends[i]:.0f} s", flush=True)
                if all(e is not None for e in ends):
                    break
                loads.append(load_average())
                time.sleep(2.0)
            timed_out = [i for i, p in enumerate(procs) if p.poll() is None]
            for i in timed_out:
                kill_tree(procs[i].pid)
            wall = time.perf_counter() - t0
            t1_wall = time.time()
        poller.stop()
        poller_samples = poller.samples
        poller = None
        counts = {}
        with httpx.Client(base_url=server.api, timeout=60) as c:
            runs = c.post("/flow_runs/filter", json={"limit": 200}).json()
            for what in ("flow_runs", "task_runs", "artifacts"):
                counts[what] = c.post(f"/{what}/count", json={}).json()
        states: dict[str, int] = {}
        for fr in runs:
            states[fr["state"]["type"]] = states.get(fr["state"]["type"], 0) + 1
    finally:
        if poller is not None:
            poller.stop()
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
            p.wait(timeout=60)
        for out in outs:
            out.close()
        server.stop()
        if pg is not None:
            pg.stop()
    # what the runs, the server and the poller saw
    rcs = [p.returncode for p in procs]
    client_counts: dict[str, int] = {k: 0 for k in CLIENT_ERRORS}
    client_samples: list[str] = []
    for i in range(args.runs):
        text = (d / f"run-{i}.out").read_text(errors="replace")
        text += "".join(f.read_text(errors="replace") for f in sorted((d / f"run-{i}" / "logs").glob("*.log")))
        c, samp = count_matches(text, CLIENT_ERRORS)
        for k, v in c.items():
            client_counts[k] += v
        client_samples += [f"run {i}: {x}" for x in samp]
    server_log = server.log_text()
    server_counts, server_samples = server_log_errors(server_log)
    answers = len(re.findall(r'HTTP/[0-9.]+" \d\d\d', server_log))
    idle = latency_summary([x for x in poller_samples if x[0] < t0_wall])
    load = latency_summary([x for x in poller_samples if t0_wall <= x[0] <= t1_wall])
    res.update({"runs": args.runs, "returncodes": rcs, "timed_out": timed_out, "run_seconds": ends,
                "completed": sum(rc == 0 for rc in rcs), "failed": sum(rc != 0 for rc in rcs), "wall_s": wall,
                "server_log_errors": server_counts, "server_log_samples": server_samples,
                "client_errors": client_counts, "client_error_samples": client_samples, "requests_answered": answers,
                "latency_idle": idle, "latency_load": load, "flow_run_states": states, "counts": counts,
                "load_during_mean": round(statistics.mean(loads), 2) if loads else None,
                "load_during_max": max(loads) if loads else None, "load_after": load_average(), "cpu": cpu.result()})
    print(f"[bench] {backend}: {res['completed']}/{args.runs} completed in {wall:.0f} s; 5xx "
          f"{server_counts['5xx answers']}, database is locked {server_counts['database is locked']}, client errors "
          f"{sum(client_counts.values())}; API p50 {load['p50_ms'] or 0:.0f} ms, p99 {load['p99_ms'] or 0:.0f} ms",
          flush=True)
    return res


def prefect_load(args) -> Result:
    """Prefect server load: concurrent flow runs against a server on SQLite and one on PostgreSQL.

The cluster's own scripts start each server: deploy/prefect-server.sh with its own PREFECT_HOME and port, on
SQLite (no database URL given: its fallback) or on a PostgreSQL that deploy/prefect-db.sh starts on 127.0.0.1 (its
own data directory, a free port; as the `postgres` OS user when the bench runs as root). The servers run one
after the other, each alone with its load: --runs concurrent `rca run -c <config> --set store=<own store per run>
--set data.root=<one pre-generated data set>` with PREFECT_API_URL pointing at it (each run its own local Ray, as
`rca run` does on one machine), per-image progress on (the default: every stage's progress artifact is updated as
its images finish). Meanwhile a poller times a few representative API calls (health, and the flow runs, task runs,
artifacts and logs lists that the UI asks for) every --interval seconds; --idle seconds of polling before the runs
give the idle latency. Measured per server: runs completed (exit code 0) and failed; server errors = 5xx answers
in the server's access log (PREFECT_SERVER_LOGGING_LEVEL=INFO), and apart: log records of the server that mention
"database is locked" (Prefect answers such a request 503 and logs it only with PREFECT_SERVER_LOG_RETRYABLE_ERRORS,
set here; its client waits 2 s, then 4 s, ..., and retries, so the run goes on, later), tracebacks in that log,
and client-side errors in the runs' output and run logs (5xx, "database is locked", timeouts and lost
connections); API latency p50/p99 over the poller's calls during the runs; wall time from the first start to the
last exit. The 1-minute load average before, during (mean, max) and after each server's runs,
and CPU seconds by kind of process, say how loaded the machine was (other engineers' jobs share it)."""
    from bench._lib.common import load_average
    from rca_core.data import make_dataset

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in LOAD_BACKENDS]
    if unknown or not backends:
        raise SystemExit(f"--backends: {unknown or 'none'}; choose from {', '.join(LOAD_BACKENDS)}")
    cfg = bench_config(args.config)
    cfg_path = config_file(args.config)
    for split in sorted({cfg.data.train_split, cfg.data.eval_split, cfg.data.val_split}):
        make_dataset(cfg.data, split)  # once, before any run: the runs share it and never generate it at once
    work = BENCH_RUNS / "prefect-load"
    load0 = load_average()
    results = [_load_one(b, args, cfg_path, cfg.data.root, work) for b in backends]

    def ms(v):
        return round(v, 1) if v is not None else None

    rows, per_call = [], []
    for r in results:
        lat = r["latency_load"]
        rows.append({"backend": LOAD_BACKENDS[r["backend"]], "runs": r["runs"], "completed": r["completed"],
                     "failed": r["failed"], "server errors (5xx)": r["server_log_errors"]["5xx answers"],
                     "database is locked (server log)": r["server_log_errors"]["database is locked"],
                     "client errors (run logs)": sum(r["client_errors"].values()),
                     "API p50 ms": ms(lat["p50_ms"]), "API p99 ms": ms(lat["p99_ms"]), "wall s": round(r["wall_s"], 1)})
        for name, v in lat["by_call"].items():
            per_call.append({"backend": LOAD_BACKENDS[r["backend"]], "call": name, "calls": v["calls"],
                             "failed": v["failed"], "p50 ms": ms(v["p50_ms"]), "p99 ms": ms(v["p99_ms"]),
                             "max ms": ms(v["max_ms"]),
                             "idle p50 ms": ms(r["latency_idle"]["by_call"][name]["p50_ms"])})

    def errors(r) -> dict[str, int]:
        """Each kind of error (one failed write may show as a 5xx answer and a "database is locked" record)."""
        return {"5xx": r["server_log_errors"]["5xx answers"],
                "database is locked": r["server_log_errors"]["database is locked"],
                "client errors": sum(r["client_errors"].values()), "failed poller calls": r["latency_load"]["failed"]}

    goals = []
    for r in results:
        e = errors(r)
        ok = r["completed"] == r["runs"] and not any(e.values())
        goals.append(goal(f"{LOAD_BACKENDS[r['backend']]}: all {r['runs']} concurrent runs complete with no server "
                          f"error (no 5xx, no database is locked, no client-side error, no failed API call)",
                          f"{r['completed']}/{r['runs']} completed; " + ", ".join(f"{k} {v}" for k, v in e.items()),
                          ok, counts=r["backend"] == "postgresql"))
    parts = []
    for r in results:
        cpu = r["cpu"]
        busy = cpu["machine_busy_cpu_s"] / max(1e-9, cpu["machine_busy_cpu_s"] + cpu["machine_idle_cpu_s"])
        g = cpu["by_group_cpu_s"]
        srv = f"Prefect server {g.get('prefect server', 0.0):.0f} CPU s" + (
            f", PostgreSQL {g.get('postgresql server', 0.0):.0f} CPU s" if r["backend"] == "postgresql" else "")
        locked = r["server_log_errors"]["database is locked"]
        parts.append(
            f"{LOAD_BACKENDS[r['backend']]}: server up in {r['server_start_s']:.1f} s "
            f"({r['database'].split(' (')[0]}); "
            f"runs ended after {', '.join(f'{x:.0f}' for x in r['run_seconds'] if x is not None)} s "
            f"(exit codes {r['returncodes']}{', timed out: ' + str(r['timed_out']) if r['timed_out'] else ''}); "
            f"the server answered {r['requests_answered']} requests; afterwards it held "
            f"{r['counts']['flow_runs']} flow runs "
            f"({', '.join(f'{k} {v}' for k, v in sorted(r['flow_run_states'].items()))}), "
            f"{r['counts']['task_runs']} task runs, {r['counts']['artifacts']} artifacts; "
            f"{r['server_log_errors']['tracebacks']} tracebacks and {locked} \"database is locked\" records in its log "
            f"({'; '.join(r['server_log_samples'][:3]) or 'none'}); "
            f"client-side errors {r['client_errors']}; poller calls during the runs {r['latency_load']['calls']} "
            f"({r['latency_load']['failed']} failed), idle p50/p99 {ms(r['latency_idle']['p50_ms'])}/"
            f"{ms(r['latency_idle']['p99_ms'])} ms. Machine: 1-min load average {r['load_before']:g} before, "
            f"{r['load_during_mean']} mean and {r['load_during_max']} max during, {r['load_after']:g} after; CPU busy "
            f"{busy:.0%} of the {os.cpu_count()} cores' time during the runs; {srv}.")
    notes = (f"{args.runs} concurrent `rca run -c {args.config}` per server, each with its own store and local Ray, "
             f"one shared pre-generated data set; per-image progress on (the default). Servers loaded one after "
             f"the other ({', '.join(backends)}), each started by deploy/prefect-server.sh; API poller every "
             f"{args.interval} s (health, flow_runs/filter, task_runs/filter, artifacts/filter, logs/filter). "
             + " ".join(parts)
             + " Server errors = 5xx answers in the server's access log (Prefect answers a write that found SQLite "
               "locked with 503, and its client retries after 2 s, 4 s, ...: the run goes on, later, and its own log "
               "shows nothing); p50/p99 over every poller call during the runs. The machine is shared with other "
               "engineers' jobs: compare the two rows with the load averages in mind (a busier machine slows runs "
               "and calls on either database).")
    by = {r["backend"]: r for r in results}
    headline = {f"{LOAD_BACKENDS[b]} p99 ms": ms(r["latency_load"]["p99_ms"]) for b, r in by.items()}
    headline.update({f"{LOAD_BACKENDS[b]} 5xx": errors(r)["5xx"] for b, r in by.items()})
    headline.update({f"{LOAD_BACKENDS[b]} completed": f"{r['completed']}/{r['runs']}" for b, r in by.items()})
    return Result(f"Prefect server under {args.runs} concurrent runs: SQLite vs PostgreSQL", rows, goals=goals,
                  headline=headline, notes=notes,
                  extra_tables=[{"title": "API latency per call during the runs (idle p50: the same call before "
                                          "the runs started)", "rows": per_call}],
                  details={"config": args.config, "runs": args.runs, "interval_s": args.interval, "idle_s": args.idle,
                           "load_average_at_start": load0,
                           "results": [{k: v for k, v in r.items()} for r in results]})


SUBJECT = Subject("pipeline", __doc__, [
    Benchmark("overhead", "Prefect + Ray pipeline vs a plain loop of the stages (goal < 5 % of the wall time)",
              overhead_args, overhead, lambda a: f"{a.images}-images" if a.images else None,
              "--images N (N-images)"),
    Benchmark("resume", "work redone after kill -9 mid-stage (goal: at most one shard)", resume_args, resume),
    Benchmark("prefect-load", "concurrent runs against a Prefect server on SQLite and on PostgreSQL: errors, "
              "API latency p50/p99, wall", prefect_load_args, prefect_load,
              lambda a: f"{a.runs}-runs" if a.runs != 4 else None, "--runs N other than 4 (N-runs)"),
], children=[Child("_overhead-child", 2, overhead_child), Child("_resume-child", 2, resume_child)])

if __name__ == "__main__":
    sys.exit(SUBJECT.main())

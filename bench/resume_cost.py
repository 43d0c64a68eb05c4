"""Resume cost: work redone after a kill -9 in the middle of a per-image stage.

Goal (issue 7): at most one shard. A child process runs one per-image stage over a local Ray
(tasks.per_image.run_per_image_stage, as the pipeline's stage task does) on finished upstream stages.
When about --kill-at of the images are in the store, the child and every process it started (its
local Ray: raylet, GCS, workers) get SIGKILL. The images finished at that moment are counted (with
checksum verification). The same stage is then run again to completion in a new child, and its
summary's "recomputed_images" says how many images the resumed run computed.

redone = recomputed_images - (images - finished_at_kill): finished images that were computed again.
Image-level resume makes this 0; shard-level resume would redo up to the shards in flight, stage-level
resume everything. (Partial work on the images in flight at the kill, at most one per worker, is lost
in any scheme and is not counted.)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, goal, report  # noqa: E402
from stage_throughput import (PER_IMAGE_STAGES, add_config_args, describe, shared_bench_config,  # noqa: E402
                              drop_stage, fresh_copy, prepare_upstream, setup_env)


def child(cfg_path: str, stage: str) -> None:
    """Run one per-image stage over a local Ray; print its summary as the last line."""
    setup_env()
    from rca_core.config import RunConfig
    from tasks.per_image import run_per_image_stage
    from tasks.ray_runtime import ray_session

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    with ray_session(cfg.ray):
        summary = run_per_image_stage(stage, cfg, cfg.store)
    print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}), flush=True)


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process, None when it is gone (or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return None if rest[0] in "ZX" else (int(rest[1]), int(rest[3]))
    except (OSError, IndexError, ValueError):
        return None


def tree(root: int) -> set[int]:
    """root and every process it started (by parent links or by session: the child is a session leader)."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                procs[int(d)] = st
    out = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, sid) in procs.items():
            if pid not in out and (ppid in out or sid == root):
                out.add(pid)
                changed = True
    return out


def kill_tree(root: int) -> int:
    """SIGKILL the child and everything it started (by pid); returns how many processes were killed."""
    killed: set[int] = set()
    for _ in range(5):
        pids = {p for p in tree(root) if p not in killed or _stat(p)}
        pids = {p for p in pids if _stat(p)}
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                killed.add(p)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    return len(killed)


def start_child(cfg_path: Path, stage: str, log: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ}
    if delay:
        env["RCA_FAULT_IMAGE_DELAY"] = str(delay)  # tasks/per_image.py's fault-injection hook (slows each image)
    return subprocess.Popen([sys.executable, __file__, "--child", str(cfg_path), stage], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--stage", default="cam_infer", choices=PER_IMAGE_STAGES)
    ap.add_argument("--kill-at", type=float, default=0.5, help="kill when this fraction of the images is in the store")
    ap.add_argument("--delay", type=float, default=0.0,
                    help="extra seconds per image in the workers (RCA_FAULT_IMAGE_DELAY), for small test settings")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    setup_env()
    import torch

    torch.set_num_threads(1)
    from rca_core.stages.context import make_context
    from rca_core.stages import stage_inputs

    cfg, base = shared_bench_config(args)
    prepare_upstream(cfg, list(stage_inputs(args.stage, cfg)))
    work = base / f"resume-{args.stage}"
    cfg.store = fresh_copy(cfg.store, work)
    drop_stage(cfg, args.stage)
    cfg_path = work.with_suffix(".json")
    cfg_path.write_text(cfg.model_dump_json())
    from rca_core.store import ArtifactStore

    ctx = make_context(args.stage, cfg, ArtifactStore(cfg.store))
    out, ids = ctx.out, ctx.ids
    n = len(ids)
    log1, log2 = work.with_suffix(".run1.log"), work.with_suffix(".run2.log")

    # 1) run and kill -9 in the middle
    t0 = time.perf_counter()
    p = start_child(cfg_path, args.stage, log1, args.delay)
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
    left = [pid for pid in tree(p.pid) if pid != p.pid and _stat(pid)]
    finished_at_kill = n - len(out.pending(ids, verify=True))
    in_store_at_kill = len(out.listed_ids())
    manifest_at_kill = out.manifest().num_rows if out.exists() else 0
    complete_after_kill = out.is_complete()

    # 2) resume to completion
    t1 = time.perf_counter()
    p2 = start_child(cfg_path, args.stage, log2, args.delay)
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
    rows = [{"stage": args.stage, "images": n, "shard_size": shard, "workers": cfg.ray.num_workers,
             "killed_after_s": killed_at, "processes_killed": n_killed, "finished_at_kill": finished_at_kill,
             "recomputed_images": recomputed, "redone_images": redone, "resume_s": resume_s,
             "stage_s_in_resume": float(summary.get("seconds", 0.0)), "manifest_rows": manifest_rows}]
    result = {"config": args.config, **rows[0], "in_store_at_kill": in_store_at_kill,
              "manifest_rows_at_kill": manifest_at_kill, "complete_after_kill": complete_after_kill,
              "processes_left_after_kill": len(left), "delay_per_image_s": args.delay,
              "goal": goal(f"work redone after kill -9 mid-stage <= one shard ({shard} images)", redone,
                           redone <= shard)}
    notes = (f"{describe(cfg)}, {cfg.ray.num_workers} Ray workers. Killed (SIGKILL, the stage process and its "
             f"local Ray: {n_killed} processes) when {in_store_at_kill}/{n} images were in the store; "
             f"{finished_at_kill} passed checksum verification. The resumed run computed {recomputed} images "
             f"(the {unfinished} unfinished ones would be the minimum): redone = {redone}."
             + (f" Per-image delay {args.delay} s injected (RCA_FAULT_IMAGE_DELAY) to catch the stage mid-way."
                if args.delay else "")
             + (f" NOTE: the manifest holds {manifest_rows} rows for {n} images (rows of the killed shards' finished "
                f"images are not rewritten on resume)." if manifest_rows != n else ""))
    report(f"Resume cost after kill -9 in the middle of {args.stage}", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()

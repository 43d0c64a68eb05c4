"""Child processes of benches: a result line from a child, a forked part's time and peak memory, a process tree.

- A child prints `RESULT {json}` as its last result line (`emit`); `run_child` runs it to completion with its
  stderr in a log file and returns that object with the child's own peak RSS (os.wait4) and, on request, the
  CPU seconds every kind of process spent meanwhile (cpu.CpuSampler).
- `run_forked` runs a function in a forked process (the parent's imports shared) and returns its value, wall
  seconds, peak RSS and CPU seconds: each part of a bench measured on its own.
- `tree` / `kill_tree`: a child and every process it started (its local Ray), SIGKILLed by pid.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from .common import ROOT
from .cpu import CpuSampler

RESULT = "RESULT "


def emit(obj: dict) -> None:
    """A child's result, read by run_child."""
    print(RESULT + json.dumps(obj, default=str), flush=True)


def run_child(cmd: list[str], log: Path, env: dict | None = None, cpu: bool = False) -> dict:
    """Run `cmd` (from the repository root) to completion; its last RESULT object, with "peak_rss_mib" (the
    child's own, not its children's) and, with cpu=True, "cpu" (CPU seconds by kind of process meanwhile)."""
    sampler = CpuSampler() if cpu else contextlib.nullcontext()
    with open(log, "a") as f, sampler as s:
        f.write(f"\n=== {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=f,
                             text=True)
        if cpu:
            s.driver_pid = p.pid
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"child {' '.join(cmd[1:3])} failed (rc {p.returncode}); see {log}:\n"
                         + out[-1500:] + Path(log).read_text()[-3000:])
    res = json.loads(lines[-1][len(RESULT):])
    res["peak_rss_mib"] = ru.ru_maxrss / 1024.0
    if cpu:
        res["cpu"] = s.result()
    return res


# ----------------------------------------------------------------------------------------- forked parts
def _forked(fn, args, q) -> None:
    try:
        t = time.perf_counter()
        value = fn(*args)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        q.put(("ok", value, time.perf_counter() - t, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        q.put(("error", f"{type(e).__name__}: {e}", 0.0, 0.0, 0.0))


def run_forked(fn: Callable[..., Any], *args) -> tuple[Any, float, float, float]:
    """fn(*args) in a forked process: (its value, wall seconds, peak RSS MiB, CPU seconds) of that process."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_forked, args=(fn, args, q))
    p.start()
    while True:
        try:
            status, value, seconds, rss, cpu = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"the forked part {getattr(fn, '__name__', fn)} died (exit code {p.exitcode})")
    p.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}{args[:1]} failed: {value}")
    return value, seconds, rss, cpu


# ----------------------------------------------------------------------------------------- process trees
def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process, None when it is gone (or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return None if rest[0] in "ZX" else (int(rest[1]), int(rest[3]))
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    return _stat(pid) is not None


def tree(root: int) -> set[int]:
    """root and every process it started (by parent links or by session: start the child as a session leader)."""
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
        pids = {p for p in tree(root) if alive(p)}
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

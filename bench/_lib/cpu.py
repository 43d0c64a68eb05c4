"""CPU seconds spent by each kind of process while a benchmark runs (Linux /proc, no extra package).

A background thread (`CpuSampler`) samples /proc/<pid>/stat (utime + stime) of every process twice a second and
keeps the growth of each one since the sampler started; processes are put into groups by their command line:
the benchmark's own child (the driver), Ray worker processes (`ray::...` titles), Ray's system processes
(raylet, GCS, dashboard, monitors, agents), the Prefect server (the process tree of a given pid), a SeaweedFS
S3 server (`weed`), a PostgreSQL server (`postgres` and its backends) and everything else. The machine-wide figures come from /proc/stat (busy, idle and steal
seconds), so what the sampler missed (a process that lived less than one interval) shows as the difference
between the busy total and the groups' sum. `cpu_self` and `cpu_of` are the plain counters: this process (all
threads), or given pids.
"""
from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server",
              "agent.py", "ray/_private", "ray/autoscaler")

DRIVER = "driver (the run's own process)"
RAY_WORKERS = "ray workers (ray::...)"
RAY_SYSTEM_GROUP = "ray system (raylet, gcs, dashboard, agents)"
S3_SERVER = "s3 server (SeaweedFS)"
POSTGRES_SERVER = "postgresql server"


def _stat(pid: str) -> tuple[float, int] | None:
    """(CPU seconds, parent pid) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()  # fields after the comm: state, ppid, ...; utime/stime are 14/15 of stat
    return (int(rest[11]) + int(rest[12])) / TICK, int(rest[1])


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def machine_seconds() -> dict[str, float]:
    """Machine-wide CPU seconds since boot from /proc/stat: busy, idle, steal."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / TICK, "idle": (idle + iowait) / TICK, "steal": steal / TICK}


class CpuSampler:
    """with CpuSampler() as s: (set s.driver_pid) ...; s.result() -> CPU seconds by group and machine-wide."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.driver_pid: int | None = None  # set once the benchmark's child has started
        self._base: dict[str, float] = {}
        self._last: dict[str, tuple[float, str, int]] = {}  # pid -> (cpu s, cmdline, ppid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            st = _stat(pid)
            if st is None:
                continue
            cpu, ppid = st
            if pid not in self._last:
                self._last[pid] = (cpu, _cmdline(pid), ppid)
            else:
                self._last[pid] = (cpu, self._last[pid][1], ppid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._m0 = machine_seconds()
        self._t0 = time.perf_counter()
        self._sample()
        self._base = {pid: v[0] for pid, v in self._last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()
        self._m1 = machine_seconds()
        self._t1 = time.perf_counter()

    def _group(self, pid: str, cmd: str) -> str:
        if self.driver_pid is not None and pid == str(self.driver_pid):
            return DRIVER
        if cmd.startswith("ray::") or "workers/default_worker.py" in cmd:  # the title is set after start
            return RAY_WORKERS
        if self._descends_from_prefect_server(pid):
            return "prefect server"
        if Path(cmd.split(" ", 1)[0]).name == "weed":
            return S3_SERVER
        if Path(cmd.split(" ", 1)[0]).name in ("postgres", "postgres:"):  # the server and its backends' titles
            return POSTGRES_SERVER
        if any(k in cmd for k in RAY_SYSTEM):
            return RAY_SYSTEM_GROUP
        if pid == str(os.getpid()):
            return "the benchmark's parent"
        return "other processes"

    def _descends_from_prefect_server(self, pid: str) -> bool:
        seen = set()
        while pid not in seen and pid in self._last:
            cmd = self._last[pid][1]
            if "prefect" in cmd and "server start" in cmd:
                return True
            seen.add(pid)
            pid = str(self._last[pid][2])
        return False

    def result(self) -> dict:
        groups: dict[str, float] = defaultdict(float)
        top: list[tuple[float, str]] = []
        for pid, (cpu, cmd, _) in self._last.items():
            used = cpu - self._base.get(pid, 0.0)
            if used <= 0:
                continue
            g = self._group(pid, cmd)
            groups[g] += used
            if g == "other processes":
                top.append((used, cmd[:80]))
        m = {k: self._m1[k] - self._m0[k] for k in self._m0}
        attributed = sum(groups.values())
        return {"wall_s": self._t1 - self._t0, "machine_busy_cpu_s": m["busy"], "machine_idle_cpu_s": m["idle"],
                "machine_steal_cpu_s": m["steal"], "by_group_cpu_s": dict(sorted(groups.items())),
                "unattributed_cpu_s": m["busy"] - attributed,
                "top_other": [{"cpu_s": round(c, 2), "cmd": cmd} for c, cmd in sorted(top, reverse=True)[:5]]}




def cpu_self() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_of(pids: list[int]) -> float:
    """CPU seconds so far of the given live processes (those gone count 0)."""
    total = 0.0
    for pid in pids:
        st = _stat(str(pid))
        if st is not None:
            total += st[0]
    return total


def cpu_line(name: str, cpu: dict) -> str:
    """One sentence: the CPU seconds each kind of process spent during a run (a CpuSampler result)."""
    groups = ", ".join(f"{k} {v:.1f}" for k, v in cpu["by_group_cpu_s"].items())
    return (f"CPU seconds during the {name} ({cpu['wall_s']:.0f} s wall, machine busy {cpu['machine_busy_cpu_s']:.1f}, "
            f"steal {cpu['machine_steal_cpu_s']:.1f}): {groups}, not attributed {cpu['unattributed_cpu_s']:.1f}.")

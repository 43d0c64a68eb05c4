"""Paths, environment, timing, peak memory, the machine and its load (no torch, no Ray)."""
from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_RUNS = ROOT / "runs" / "bench"  # scratch stores, data sets and logs of the benches (not committed)

# what scripts/env.sh exports, for Ray and Prefect in this process and its children
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false", "DO_NOT_TRACK": "1",
       "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}


def setup_env() -> None:
    """scripts/env.sh's variables (kept where already set), for this process and the processes it starts."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)


class Timer:
    """with Timer() as t: ...; t.seconds"""

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load_average() -> float:
    """The 1-minute load average (other engineers' jobs share this machine: every record says it)."""
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return float("nan")

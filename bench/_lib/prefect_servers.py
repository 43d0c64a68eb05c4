"""Prefect servers for benches, started with the cluster's own scripts, and an API poller.

- `BenchPostgres`: a PostgreSQL on 127.0.0.1 (its own data directory under /tmp, a free port) started and stopped
  by deploy/prefect-db.sh, as the cluster's head does; as the `postgres` OS user when this process is root
  (PostgreSQL refuses to run as root).
- `PrefectServer`: deploy/prefect-server.sh start/stop with its own PREFECT_HOME and port, on SQLite (no URL given)
  or on the URL file of a BenchPostgres; the server logs every request (PREFECT_SERVER_LOGGING_LEVEL=INFO), so
  that its 5xx answers can be counted, and the retryable errors it answers with 503 ("database is locked").
- `ApiPoller`: a thread that times a few representative API calls (what the UI's runs, logs and artifacts pages
  ask for) every `interval` seconds; `latency_summary` gives p50/p99 in milliseconds.
- `server_log_errors`: 5xx answers, "database is locked" and tracebacks in a server's log; `count_matches`: lines
  of a run's output and log that match `CLIENT_ERRORS`.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import ROOT

DB_SH = ROOT / "deploy" / "prefect-db.sh"
SERVER_SH = ROOT / "deploy" / "prefect-server.sh"
DB_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_DB_URL_FILE")

# What counts as an error in the server's log: uvicorn's access lines with a 5xx status (one per answer), and log
# records (a line starting with a time or a level, with the traceback lines under it) that mention a locked SQLite
# database or hold a traceback. Prefect 3.8 answers a request whose SQLite write found the database locked with 503
# (the client waits, 2 s then 4 s ..., and retries) and logs it only with PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true,
# which PrefectServer sets.
ACCESS_5XX = re.compile(r'HTTP/[0-9.]+" 5\d\d\b')
RECORD_START = re.compile(r"^(\d\d:\d\d:\d\d\.\d+ \||[A-Z]+:\s)")
# Lines of a run's own log and output that say a call to the Prefect API failed.
CLIENT_ERRORS = {
    "database is locked": re.compile(r"database is locked"),
    "HTTP 5xx": re.compile(r"Server error '5\d\d|\b5\d\d (Internal Server Error|Service Unavailable|Bad Gateway|"
                           r"Gateway Timeout)"),
    "timeouts and lost connections": re.compile(r"\b(ReadTimeout|ConnectTimeout|WriteTimeout|PoolTimeout|"
                                                r"RemoteProtocolError|ConnectError)\b"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_database(**extra: str) -> dict[str, str]:
    """os.environ without any Prefect database setting or API URL (each server and run gets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in DB_VARS and k != "PREFECT_API_URL"}
    env.update(extra)
    return env


def server_log_errors(text: str) -> tuple[dict[str, int], list[str]]:
    """5xx answers, log records that mention "database is locked", log records with a traceback; up to 5 samples
    (the 5xx lines, then each such record's first line)."""
    counts = {"5xx answers": 0, "database is locked": 0, "tracebacks": 0}
    samples: list[str] = []
    records: list[list[str]] = []
    for line in text.splitlines():
        if ACCESS_5XX.search(line):
            counts["5xx answers"] += 1
            if len(samples) < 3:
                samples.append(line.strip()[:300])
        if RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    for rec in records:
        if rec[0].startswith("ERROR:    Exception in ASGI application"):
            continue  # uvicorn repeats the traceback that Prefect's exception handler has just logged
        body = "\n".join(rec)
        locked = "database is locked" in body
        counts["database is locked"] += locked
        counts["tracebacks"] += "Traceback (most recent call last)" in body
        if (locked or "Traceback" in body) and len(samples) < 5:
            samples.append(rec[0].strip()[:300])
    return counts, samples


def count_matches(text: str, patterns: dict[str, re.Pattern]) -> tuple[dict[str, int], list[str]]:
    """How many distinct lines match each pattern (a run's console output repeats lines of its run log), and up
    to 5 of the matching lines."""
    counts = {name: 0 for name in patterns}
    samples: list[str] = []
    for line in dict.fromkeys(text.splitlines()):
        hit = False
        for name, pat in patterns.items():
            if pat.search(line):
                counts[name] += 1
                hit = True
        if hit and len(samples) < 5:
            samples.append(line.strip()[:300])
    return counts, samples


class BenchPostgres:
    """A PostgreSQL on 127.0.0.1 for one bench, through deploy/prefect-db.sh (the head's script)."""

    def __init__(self):
        if not (glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl")):
            raise SystemExit("PostgreSQL's server binaries (pg_ctl, initdb) are not installed: "
                             "apt-get install postgresql (or set PG_BIN)")
        self.runner: list[str] = []
        owner = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: run it as the `postgres` OS user
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise SystemExit("running as root and there is no `postgres` OS user to run PostgreSQL as") from None
            self.runner = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="rca-bench-pg-"))
        self.dir.chmod(0o755)
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        self.url_file = self.dir / "home" / "db_url"
        self.env = env_without_database(HOME=str(self.dir), PREFECT_HOME=str(self.dir / "home"),
                                        PREFECT_PG_DATA=str(self.dir / "data"), PREFECT_PG_PORT=str(self.port),
                                        PREFECT_PG_PASSWORD_FILE=str(self.dir / "password"),
                                        PREFECT_DB_MANAGED_URL_FILE=str(self.dir / "no-managed-url"))

    def _sh(self, cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.runner, "bash", str(DB_SH), cmd], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=180)

    def start(self) -> str:
        r = self._sh("start")
        if r.returncode != 0:
            raise SystemExit(f"deploy/prefect-db.sh start failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")
        return r.stdout.strip()

    def stop(self) -> None:
        try:
            self._sh("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PrefectServer:
    """deploy/prefect-server.sh start/stop with its own PREFECT_HOME and port; on PostgreSQL when given a URL file."""

    def __init__(self, home: Path, url_file: Path | None = None, prefect_bin: str | None = None):
        self.home = Path(home)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.log = self.home / "server.log"
        extra = {"PREFECT_HOME": str(self.home), "PREFECT_PORT": str(self.port),
                 "PREFECT_SERVER_LOGGING_LEVEL": "INFO",  # uvicorn's access log: every answer's status
                 "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true"}  # "database is locked" (answered 503) in the log
        if prefect_bin:
            extra["PREFECT_BIN"] = prefect_bin
        if url_file is not None:
            extra["PREFECT_DB_URL_FILE"] = str(url_file)
        self.env = env_without_database(**extra)
        self.database = ""

    def _sh(self, cmd: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SERVER_SH), cmd], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> str:
        """Start it; returns the script's line saying which database it uses."""
        self.home.mkdir(parents=True, exist_ok=True)
        r = self._sh("start", timeout=240)  # the script waits at most 120 s for the database and 120 s for health
        if r.returncode != 0:
            raise SystemExit(f"deploy/prefect-server.sh start failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")
        self.database = next((ln.split("database: ", 1)[1] for ln in r.stdout.splitlines() if "database: " in ln), "")
        return self.database

    def stop(self) -> None:
        self._sh("stop", timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# ----------------------------------------------------------------------------------------------- API poller
POLL_CALLS = [  # (name, method, path, body): what the UI's pages ask for while runs go on
    ("health", "GET", "/health", None),
    ("flow_runs/filter", "POST", "/flow_runs/filter", {"limit": 20, "sort": "START_TIME_DESC"}),
    ("task_runs/filter", "POST", "/task_runs/filter", {"limit": 20, "sort": "EXPECTED_START_TIME_DESC"}),
    ("artifacts/filter", "POST", "/artifacts/filter", {"limit": 20, "sort": "UPDATED_DESC"}),
    ("logs/filter", "POST", "/logs/filter", {"limit": 20, "sort": "TIMESTAMP_DESC"}),
]


class ApiPoller(threading.Thread):
    """Times POLL_CALLS in turn, one round every `interval` seconds, until stop(); samples: (t, name, ms, status)
    with status the HTTP code or the exception's name."""

    def __init__(self, api: str, interval: float = 0.5, timeout: float = 30.0):
        super().__init__(daemon=True, name="api-poller")
        self.api, self.interval, self.timeout = api, interval, timeout
        self.samples: list[tuple[float, str, float, int | str]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.api, timeout=self.timeout) as client:
            while not self._stop_event.is_set():
                t_round = time.perf_counter()
                for name, method, path, body in POLL_CALLS:
                    t = time.perf_counter()
                    try:
                        status: int | str = client.request(method, path, json=body).status_code
                    except Exception as e:  # noqa: BLE001 - a failed call is a sample too
                        status = type(e).__name__
                    self.samples.append((time.time(), name, (time.perf_counter() - t) * 1000.0, status))
                self._stop_event.wait(max(0.0, self.interval - (time.perf_counter() - t_round)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout + 10)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_summary(samples: list[tuple[float, str, float, int | str]]) -> dict:
    """p50/p99 (ms) over every call and per call; failed calls (5xx or no answer) counted."""
    def summ(rows):
        ms = [r[2] for r in rows]
        failed = [r for r in rows if not isinstance(r[3], int) or r[3] >= 500]
        return {"calls": len(rows), "failed": len(failed), "p50_ms": percentile(ms, 0.5),
                "p99_ms": percentile(ms, 0.99), "max_ms": max(ms) if ms else None}

    out = summ(samples)
    out["by_call"] = {name: summ([s for s in samples if s[1] == name]) for name, *_ in POLL_CALLS}
    out["failures"] = [f"{s[1]}: {s[3]}" for s in samples if not isinstance(s[3], int) or s[3] >= 500][:10]
    return out

"""What the `rca` commands print, and the per-run log file where everything else goes.

The console shows: one line per set-up phase, one live progress line per running stage, one summary line
per finished stage, the end-of-run table, and errors. A live line needs a terminal: there it is redrawn
in place (\\r); when stdout is a pipe or a CI log, the same line is printed as a plain line at most every
RCA_PROGRESS_INTERVAL seconds (default 60; every 5 intervals while a stage reports no progress).

The run log (runs/<name>/logs/<timestamp>.log next to a local store; a local runs/<name>/logs/ when the
store is a bucket) gets, with a timestamp and the source of each line:
- the stdout/stderr of every Ray worker (our stage code's prints, Ray Train's controller and workers,
  Ray internals such as Ray Train's PlacementGroupCleaner), taken from the driver's log subscriber
  instead of being printed (see `capture_ray_logs`, used by tasks.ray_runtime.ray_session); Ray's
  error messages (a worker died, out of memory) also get one line on the console;
- Ray's driver-side logger, Prefect's loggers (Prefect's run logs still go to the API and the UI),
  Python warnings of the driver. Known-harmless warnings (HARMLESS_WARNINGS, each with the reason) stay in
  the log; any other warning also gets one line on the console.
`--verbose` (or RCA_VERBOSE=1) shows all of it live on the console as well.

Only the driver process uses this module; Ray workers write to their stdout/stderr as before.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PREFIX = "[rca] "


# ------------------------------------------------------------------------------------------- console
class LiveSource(Protocol):
    def render(self, now: float, width: int) -> str: ...


class Console:
    """stdout of the command: plain lines (`say`) and at most one live line (`set_live`).

    `stream`/`tty`/`width` are fixed for tests; by default they follow sys.stdout at write time.
    `interval`: seconds between plain progress lines when the stream is not a terminal.
    """

    def __init__(self, stream=None, tty: bool | None = None, width: int | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic, ticker: bool = True):
        self._stream, self._tty, self._width = stream, tty, width
        self._use_ticker = ticker
        self.interval = float(os.environ.get("RCA_PROGRESS_INTERVAL", "60")) if interval is None else interval
        self.clock = clock
        self._lock = threading.RLock()
        self._live: LiveSource | None = None
        self._drawn = 0          # characters of the live line now on the terminal
        self._last_plain = None  # clock time of the last plain progress line
        self._last_state = None  # the live source's state() then
        self._ticker: threading.Thread | None = None

    # -- where output goes
    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def is_tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def width(self) -> int:
        if self._width is not None:
            return self._width
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    # -- plain lines
    def say(self, msg: str, err: bool = False, log: bool = True) -> None:
        """A line for the user (kept in the run log too unless log=False)."""
        with self._lock:
            self._erase()
            stream = sys.stderr if err else self.stream
            if err:
                self._flush(self.stream)
            stream.write(msg.rstrip("\n") + "\n")
            self._flush(stream)
            self._draw()
        if log:
            log_line("console", msg)

    # -- the live line
    def set_live(self, src: LiveSource) -> None:
        with self._lock:
            self._erase()
            self._live = src
            self._last_plain = self.clock()
            self._last_state = src.state() if hasattr(src, "state") else None
            self._draw()
        if self._use_ticker:
            self._start_ticker()

    def clear_live(self, src: LiveSource) -> None:
        with self._lock:
            if self._live is src:
                self._erase()
                self._live = None

    def refresh(self) -> None:
        """Redraw the live line (a terminal) or print it as a plain line when `interval` has passed."""
        with self._lock:
            if self._live is None:
                return
            if self.is_tty():
                self._erase()
                self._draw()
            else:
                now = self.clock()
                if getattr(self._live, "finished", False):
                    return  # its summary line comes next
                state = self._live.state() if hasattr(self._live, "state") else None
                # a line every `interval` while there is progress; one every 5 intervals while there is none
                wait = self.interval if state != self._last_state else 5 * self.interval
                if self._last_plain is None or now - self._last_plain >= wait:
                    self._last_plain, self._last_state = now, state
                    text = self._live.render(now, 10_000)
                    self.stream.write(text + "\n")
                    self._flush(self.stream)
                    log_line("console", text)

    tick = refresh

    def _draw(self) -> None:
        if self._live is None or not self.is_tty():
            return
        text = self._live.render(self.clock(), self.width())[: self.width()]
        self.stream.write("\r" + text + "\x1b[K")
        self._flush(self.stream)
        self._drawn = len(text)

    def _erase(self) -> None:
        if self._drawn and self.is_tty():
            self.stream.write("\r\x1b[K")
            self._flush(self.stream)
        self._drawn = 0

    @staticmethod
    def _flush(stream) -> None:
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass

    def _start_ticker(self) -> None:
        """Once a second: redraw the live line so that elapsed time and ETA move between updates (a
        terminal), or print its periodic plain line for a stage that reports nothing new (a pipe)."""
        if self._ticker is not None and self._ticker.is_alive():
            return

        def loop():
            while True:
                time.sleep(1.0)
                with self._lock:
                    if self._live is None:
                        self._ticker = None
                        return
                self.refresh()

        self._ticker = threading.Thread(target=loop, name="rca-console-ticker", daemon=True)
        self._ticker.start()


CONSOLE = Console()


class _LogStream(io.TextIOBase):
    """A text stream whose lines go to the run log (progress bars of library code during a phase)."""

    def __init__(self, source: str):
        self.source, self._buf = source, ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if clean(line):
                log_line(self.source, line)
        return len(s)

    def flush(self) -> None:
        if clean(self._buf):
            log_line(self.source, self._buf)
        self._buf = ""

    def isatty(self) -> bool:
        return False


class Phase:
    """A set-up step shown as a live line on a terminal while it runs (`with Phase("starting X"):`);
    the caller prints the one result line after it. With a run log, what library code writes to stderr
    meanwhile (a progress bar that ignores TQDM_DISABLE) goes to the log."""

    def __init__(self, what: str, console: Console | None = None):
        self.what, self.console = what, console or CONSOLE
        self.t0 = self.console.clock()
        self._redirect = None

    def render(self, now: float, width: int) -> str:
        s = int(now - self.t0)
        return f"{PREFIX}{self.what} ... {s // 60}:{s % 60:02d}"

    def __enter__(self):
        self.t0 = self.console.clock()
        log_line("rca", self.what)
        if active() and not STATE.verbose:
            self._redirect = contextlib.redirect_stderr(_LogStream("stderr"))
            self._redirect.__enter__()
        if self.console.is_tty():
            self.console.set_live(self)
        return self

    def __exit__(self, *exc):
        self.console.clear_live(self)
        if self._redirect is not None:
            sys.stderr.flush()
            self._redirect.__exit__(*exc)
            self._redirect = None
        return False


def say(msg: str, err: bool = False, log: bool = True) -> None:
    """`[rca] msg` on the console (and in the run log)."""
    CONSOLE.say(msg if msg.startswith(PREFIX) else PREFIX + msg, err=err, log=log)


# ------------------------------------------------------------------------------------------ run log
class RunLog:
    """The per-run log file: `HH:MM:SS source | line`. Consecutive repeats from one source are folded
    into one "(last line repeated N times)" line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()
        self._last: dict[str, list] = {}  # source -> [line, repeats]

    def write(self, source: str, text: str) -> None:
        with self._lock:
            if self._f.closed:
                return
            for line in str(text).splitlines() or [""]:
                line = clean(line)
                last = self._last.get(source)
                if last is not None and last[0] == line and line:
                    last[1] += 1
                    continue
                self._fold(source)
                self._last[source] = [line, 0]
                self._f.write(f"{time.strftime('%H:%M:%S')} {source} | {line}\n")

    def _fold(self, source: str) -> None:
        last = self._last.get(source)
        if last is not None and last[1]:
            self._f.write(f"{time.strftime('%H:%M:%S')} {source} | (last line repeated {last[1]} more times)\n")
            last[1] = 0

    def close(self) -> None:
        with self._lock:
            if self._f.closed:
                return
            for s in list(self._last):
                self._fold(s)
            self._f.close()


def clean(line: str) -> str:
    """A log line without colours and without tqdm's carriage-return redraws (the last state is kept)."""
    line = ANSI.sub("", line)
    if "\r" in line:
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    return line.rstrip()


@dataclass
class _State:
    log: RunLog | None = None
    verbose: bool = False
    handler: logging.Handler | None = None
    saved: list | None = None  # (obj, attr, old value) to restore in teardown
    warnings_shown: int = 0


STATE = _State()


def active() -> bool:
    return STATE.log is not None


def verbose() -> bool:
    return STATE.verbose


def log_path() -> Path | None:
    return STATE.log.path if STATE.log else None


def log_line(source: str, text: str) -> None:
    if STATE.log is not None:
        STATE.log.write(source, text)


def run_log_location(store: str, name: str, cwd: str | Path | None = None) -> Path:
    """runs/<name>/logs/<timestamp>.log: beside a local store (its parent folder), under the working
    directory's runs/<name>/ for a bucket."""
    from rca_core import storage

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if storage.is_url(store):
        base = Path(cwd or os.getcwd()) / "runs" / name
    else:
        base = Path(storage.local_path(store)).parent
    path = base / "logs" / f"{stamp}.log"
    n = 1
    while path.exists():  # two commands in the same second
        n += 1
        path = base / "logs" / f"{stamp}-{n}.log"
    return path


# ------------------------------------------------------------------------------------------ warnings
# Warnings that the user cannot act on: kept in the run log, never on the console. Each: (category name,
# message regex, why it is harmless).
HARMLESS_WARNINGS: list[tuple[str, str, str]] = [
    ("UserWarning", r"Sparse CSR tensor support is in beta",
     "torch's notice for the random walk's sparse transition matrix (rca_core/random_walk_ops.py); the walk's "
     "results are covered by tests"),
    ("UserWarning", r"find_unused_parameters=True was specified in DDP constructor",
     "DDP's note that every parameter was used on this step; it only costs one graph traversal"),
    ("UserWarning", r"Grad strides do not match bucket view strides",
     "DDP's performance note on a memory layout; gradients are still exact"),
    ("FutureWarning", r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
     "a torch API our synced BatchNorm uses (rca_core/models/norm.py); a note for developers, not for a run"),
]
_HARMLESS = [(c, re.compile(m)) for c, m, _ in HARMLESS_WARNINGS]


def is_harmless(category: str, message: str) -> bool:
    return any(c == category and rx.search(message) for c, rx in _HARMLESS)


class RunLogHandler(logging.Handler):
    """Root logging handler: every record to the run log; to the console: warnings that are not known
    harmless (one line) and, with --verbose, everything."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            log_line(f"{record.name} {record.levelname}", msg)
            if STATE.verbose:
                CONSOLE.say(f"[{record.name}] {record.levelname}: {msg.splitlines()[0] if msg else ''}", log=False)
            elif record.name == "py.warnings":
                category, text = _warning_parts(msg)
                if not is_harmless(category, text):
                    STATE.warnings_shown += 1
                    CONSOLE.say(f"{PREFIX}warning: {category}: {text.splitlines()[0][:200]}"
                                f" (details: {log_path()})", log=False)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def _warning_parts(msg: str) -> tuple[str, str]:
    """'path:line: Category: text\\n  source' (warnings.formatwarning) -> (Category, text)."""
    m = re.match(r"^.*?:\d+: (\w+): (.*)$", msg, re.S)
    return (m.group(1), m.group(2)) if m else ("Warning", msg)


# ------------------------------------------------------------------------------------------ set-up
def setup(path: str | Path, verbose: bool = False) -> Path:
    """Start the run log at `path` and route logging/warnings there. Call before importing Prefect so
    that Prefect leaves the root logger to us (it adds its console handler only to an unconfigured
    root); called later, Prefect's console handlers are muted (unless verbose) and restored by teardown."""
    teardown()
    STATE.log = RunLog(path)
    STATE.verbose = bool(verbose)
    STATE.saved = []
    STATE.warnings_shown = 0
    # Prefect: run logs at INFO to the API/UI (and our log); Prefect's own console handler stays quiet.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    root = logging.getLogger()
    STATE.handler = RunLogHandler(level=logging.INFO)
    STATE.handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(STATE.handler)
    if not verbose:
        for h in list(root.handlers):
            if h is not STATE.handler and isinstance(h, logging.StreamHandler) and \
                    getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                _save(h, "level", h.level)
                h.setLevel(logging.CRITICAL + 1)
    logging.captureWarnings(True)
    STATE.log.write("rca", f"run log of: {' '.join(sys.argv)} (pid {os.getpid()}, cwd {os.getcwd()})")
    return STATE.log.path


def _save(obj, attr, old) -> None:
    STATE.saved.append((obj, attr, old))


def teardown() -> None:
    """Stop the run log; restore what setup changed."""
    if STATE.handler is not None:
        logging.getLogger().removeHandler(STATE.handler)
    for obj, attr, old in reversed(STATE.saved or []):
        if attr == "level":
            obj.setLevel(old)
        elif attr == "handler":
            obj.addHandler(old)
        elif attr == "remove_handler":
            obj.removeHandler(old)
        elif callable(old) and attr.startswith("call:"):
            old()
        else:
            setattr(obj, attr, old)
    if STATE.log is not None:
        logging.captureWarnings(False)
        STATE.log.close()
    STATE.log, STATE.handler, STATE.saved, STATE.verbose = None, None, None, False


def drain_prefect(timeout: float = 10.0) -> None:
    """Send Prefect's queued run logs and events before the local server stops (else Prefect prints
    '--- Error logging to API ---' at exit)."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    except Exception as e:  # noqa: BLE001
        log_line("rca", f"draining Prefect's log worker: {type(e).__name__}: {e}")
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
    except Exception as e:  # noqa: BLE001
        log_line("rca", f"draining Prefect's events worker: {type(e).__name__}: {e}")


def failure(exc: BaseException, max_lines: int = 12) -> str:
    """What the console shows of a failed command: the error's type and message (its first `max_lines`
    lines, each at most 300 characters); the whole traceback goes to the run log."""
    log_line("rca ERROR", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    lines = [ln.rstrip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
    lines = [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines]
    more = len(lines) - max_lines
    text = "\n".join(lines[:max_lines]) + (f"\n  ... ({more} more lines in the run log)" if more > 0 else "")
    return f"{PREFIX}failed: {type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------------ Ray
# For Ray workers of a run with a run log: no progress bars (the driver's live line replaces them).
WORKER_LOG_ENV = {"TQDM_DISABLE": "1", "RCA_NO_PROGRESS": "1"}


def worker_log_env() -> dict[str, str]:
    return dict(WORKER_LOG_ENV) if active() else {}


def _source(data: dict) -> str:
    if data.get("pid") in ("autoscaler", "raylet"):
        return f"({data['pid']})"
    who = data.get("actor_name") or data.get("task_name") or "worker"
    where = data.get("ip") or data.get("localhost") or ""
    return f"({who} pid={data.get('pid')}{' ip=' + where if where else ''})"


def ray_lines(data: dict) -> None:
    """Handler of Ray's worker stdout/stderr batches: to the run log; live with --verbose."""
    src = _source(data)
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # Ray prints only the autoscaler's events, not its status reports
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except ImportError:
            lines = []
    lines = [clean(ln) for ln in lines]
    for ln in lines:
        log_line(src, ln)
    if STATE.verbose:
        for ln in lines:
            if ln:
                CONSOLE.say(f"{src} {ln}", log=False)


def ray_error(data: dict) -> None:
    """Ray's error messages to the driver (a worker died, OOM): run log, plus one line on the console."""
    lines = [clean(ln) for ln in data.get("lines", []) for ln in str(ln).splitlines()]
    for ln in lines:
        log_line("(raylet)", ln)
    first = next((ln for ln in lines if ln.strip()), "")
    if first:
        CONSOLE.say(f"{PREFIX}Ray: {first[:200]}" + ("" if STATE.verbose else f" (details: {log_path()})"), log=False)


def capture_ray_logs() -> bool:
    """After ray.init(log_to_driver=True): send the workers' output to the run log instead of the
    console, and Ray's driver-side logger too. Returns False (Ray prints as usual) without a run log."""
    if not active():
        return False
    import ray._private.worker as rw
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")  # ours prints them too with --verbose (one copy, no colours)
    dispatcher.remove_handler("rca_run_log")
    dispatcher.add_handler("rca_run_log", ray_lines)
    # error messages are printed through this module function (listen_error_messages)
    if getattr(rw.print_to_stdstream, "__name__", "") != "_rca_print_to_stdstream":
        original = rw.print_to_stdstream

        def _rca_print_to_stdstream(data, ignore_prefix: bool = False):
            if active() and data.get("pid") == "raylet":
                return ray_error(data)
            return original(data, ignore_prefix)

        rw.print_to_stdstream = _rca_print_to_stdstream
        _save(rw, "print_to_stdstream", original)
    ray_logger = logging.getLogger("ray")
    if STATE.handler is not None and STATE.handler not in ray_logger.handlers:
        ray_logger.addHandler(STATE.handler)
        _save(ray_logger, "remove_handler", STATE.handler)
    if not STATE.verbose:
        for h in list(ray_logger.handlers):
            if h is not STATE.handler and isinstance(h, logging.StreamHandler):
                _save(ray_logger, "handler", h)
                ray_logger.removeHandler(h)
    try:
        session = rw._global_node.get_session_dir_path() if rw._global_node is not None else None
    except Exception:  # noqa: BLE001
        session = None
    if session:
        log_line("rca", f"Ray session directory (this node's raw Ray logs): {session}")
    return True


def release_ray_logs() -> None:
    """Before ray.shutdown: stop our dispatcher handler (Ray's own is re-added by the next ray.init)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    dispatcher.remove_handler("rca_run_log")

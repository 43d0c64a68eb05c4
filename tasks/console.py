"""What the `rca` commands print, and the per-run log file where everything else goes.

The console (the command's stdout, written with rich) shows: one line per set-up phase, one live line per
running stage, one summary line per finished stage, the end-of-run table, and errors. On a terminal the
live lines are a rich Live display, redrawn in place with the plain lines printed above it. When stdout is
a pipe or a CI log, a live line is printed as a plain line at most every RCA_PROGRESS_INTERVAL seconds
(default 60; every 5 intervals while a stage reports no progress).

The run log (runs/<name>/logs/<timestamp>.log next to a local store; a local runs/<name>/logs/ when the
store is a bucket) has one `HH:MM:SS source | line` per line. `setup` configures Python logging for it
with logging.config.dictConfig (`logging_config`):
- our notes (source `rca`) and a copy of every console line (`console`);
- Prefect's loggers: Prefect reads its logging configuration from prefect_logging.yml beside this module
  (Prefect's setting PREFECT_LOGGING_SETTINGS_PATH), its default without console output, so that run
  logs still reach the Prefect API and the UI while the terminal stays clean;
- Ray's driver-side logger and the driver's sys.stdout/sys.stderr while Ray is connected (`ray_output`):
  with ray.init(log_to_driver=True) Ray prints every worker's output there, one line per output line,
  prefixed with the worker (`(RayTrainWorker pid=12)`), which becomes the line's source in the log. Ray's
  error messages (a worker died, out of memory) also get one line on the console;
- Python warnings (logging.captureWarnings). Known-harmless ones (HARMLESS_WARNINGS, each with the
  reason) stay in the log; any other warning also gets one console line, once per message.
`--verbose` (or RCA_VERBOSE=1) shows all of it live on the console as well.

Only the driver process uses this module; Ray workers write to their stdout/stderr as usual.
"""
from __future__ import annotations

import contextlib
import io
import logging
import logging.config
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.text import Text

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PREFIX = "[rca] "
PREFECT_LOGGING_YML = Path(__file__).with_name("prefect_logging.yml")
# Set for the command (unless already set) by `setup`, restored by `teardown`: Prefect's logging without
# its console output, run logs at INFO to the API; Ray prints each worker line at once (no deduplication,
# which would hold repeated lines back and merge them) and without colour codes around the prefix.
COMMAND_ENV = {"PREFECT_LOGGING_SETTINGS_PATH": str(PREFECT_LOGGING_YML), "PREFECT_LOGGING_LEVEL": "INFO",
               "RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0"}
_RCA = logging.getLogger("rca")            # run log only: our notes and the console's lines
_OUTPUT = logging.getLogger("rca.output")  # the driver's stdout/stderr while captured: run log (+ console)


# ------------------------------------------------------------------------------------------- console
class LiveSource(Protocol):
    def render(self, now: float, width: int) -> str: ...


def _state(src) -> object:
    return src.state() if hasattr(src, "state") else None


class Console:
    """The command's stdout: plain lines (`say`) and live lines (`set_live`), through a rich Console.

    A terminal (rich's test: a tty, or FORCE_COLOR / TTY_COMPATIBLE=1; not TERM=dumb) gets a rich Live
    display of the live lines, refreshed once a second so that elapsed times and ETAs move between
    updates. Elsewhere each live line is printed as a plain line at most every
    `interval` seconds (RCA_PROGRESS_INTERVAL, default 60), every 5 intervals while its `state()` stays
    the same, by a ticker thread between updates. `file`/`force_terminal`/`width`/`clock`/`ticker` are
    for tests; by default the console follows sys.stdout until `bind` fixes its streams.
    """

    def __init__(self, file=None, *, force_terminal: bool | None = None, width: int | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic, ticker: bool = True):
        self.interval = float(os.environ.get("RCA_PROGRESS_INTERVAL", "60")) if interval is None else interval
        self.clock, self._ticker_on = clock, ticker
        self._opts = {"force_terminal": force_terminal, "width": width}
        self._lock = threading.RLock()
        self._sources: list[LiveSource] = []
        self._plain: dict[int, tuple[float, object]] = {}  # id(source) -> (time, state) of its last plain line
        self._live: Live | None = None
        self._ticker: threading.Thread | None = None
        self.bind(file)

    def bind(self, out=None, err=None) -> None:
        """Write to these streams from now on (None: sys.stdout / sys.stderr at each write)."""
        opts = dict(highlight=False, markup=False, emoji=False, soft_wrap=True, **self._opts)
        self.out = RichConsole(file=out, **opts)
        self.err = RichConsole(file=err, stderr=err is None, **opts)

    def is_tty(self) -> bool:
        return self.out.is_terminal and not self.out.is_dumb_terminal

    def say(self, msg: str, err: bool = False, log: bool = True) -> None:
        """A line for the user (kept in the run log too unless log=False). err: on stderr, except while a
        live display is on the terminal (then above it, where it stays readable)."""
        with self._lock:
            (self.err if err and self._live is None else self.out).print(msg.rstrip("\n"))
        if log:
            log_line("console", msg)

    # -- live lines
    def set_live(self, src: LiveSource) -> None:
        with self._lock:
            if src not in self._sources:
                self._sources.append(src)
            self._plain[id(src)] = (self.clock(), _state(src))
            if self.is_tty():
                if self._live is None:
                    self._live = Live(console=self.out, get_renderable=self._render, auto_refresh=self._ticker_on,
                                      refresh_per_second=1, transient=True, redirect_stdout=False,
                                      redirect_stderr=False)
                    self._live.start(refresh=True)
                else:
                    self._live.refresh()
            elif self._ticker_on:
                self._start_ticker()

    def clear_live(self, src: LiveSource) -> None:
        with self._lock:
            if src in self._sources:
                self._sources.remove(src)
            self._plain.pop(id(src), None)
            if self._live is not None:
                if self._sources:
                    self._live.refresh()
                else:
                    self._live.stop()
                    self._live = None

    def reset(self) -> None:
        """No live lines any more (a failed command: the stage's line is not finished)."""
        for src in list(self._sources):
            self.clear_live(src)

    def _render(self) -> Group:
        # called by rich's refresh thread: takes no lock of ours (a caller of `refresh` holds it)
        now, width = self.clock(), self.out.width
        return Group(*(Text(src.render(now, width)[:width], no_wrap=True, overflow="crop")
                       for src in list(self._sources)))

    def refresh(self) -> None:
        """Redraw the live lines (a terminal), or print each as a plain line whose time has come."""
        with self._lock:
            if self._live is not None:
                self._live.refresh()
                return
            now = self.clock()
            for src in list(self._sources):
                if getattr(src, "finished", False):
                    continue  # its summary line comes next
                last, last_state = self._plain[id(src)]
                state = _state(src)
                if now - last >= (self.interval if state != last_state else 5 * self.interval):
                    self._plain[id(src)] = (now, state)
                    self.say(src.render(now, 10_000))

    tick = refresh

    def _start_ticker(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            return

        def loop():
            while True:
                time.sleep(1.0)
                with self._lock:
                    if not self._sources:
                        self._ticker = None
                        return
                self.refresh()

        self._ticker = threading.Thread(target=loop, name="rca-console-ticker", daemon=True)
        self._ticker.start()


CONSOLE = Console()


def say(msg: str, err: bool = False, log: bool = True) -> None:
    """`[rca] msg` on the console (and in the run log)."""
    CONSOLE.say(msg if msg.startswith(PREFIX) else PREFIX + msg, err=err, log=log)


class Phase:
    """A set-up step shown as a live line on a terminal while it runs (`with Phase("starting X"):`);
    the caller prints the one result line after it. With a run log, what library code writes to stderr
    meanwhile (a progress bar that ignores TQDM_DISABLE) goes to the log."""

    def __init__(self, what: str, console: Console | None = None):
        self.what, self.console = what, console or CONSOLE
        self.t0 = self.console.clock()
        self._capture = capture_output(stdout=False)

    def render(self, now: float, width: int) -> str:
        s = int(now - self.t0)
        return f"{PREFIX}{self.what} ... {s // 60}:{s % 60:02d}"

    def __enter__(self):
        self.t0 = self.console.clock()
        log_line("rca", self.what)
        self._capture.__enter__()
        if self.console.is_tty():
            self.console.set_live(self)
        return self

    def __exit__(self, *exc):
        self.console.clear_live(self)
        self._capture.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------------ run log
def clean(line: str) -> str:
    """A log line without colours and without tqdm's carriage-return redraws (the last state is kept)."""
    line = ANSI.sub("", line)
    if "\r" in line:
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    return line.rstrip()


def _source(record: logging.LogRecord) -> str:
    return getattr(record, "source", None) or f"{record.name} {record.levelname}"


class RunLogFormatter(logging.Formatter):
    """`HH:MM:SS source | line` for each line of the record (its traceback included); the source is the
    record's `source` (ours: `rca`, `console`, a Ray worker) or `<logger> <LEVEL>`."""

    def __init__(self):
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        head = f"{self.formatTime(record, self.datefmt)} {_source(record)} | "
        return "\n".join(head + clean(line) for line in text.splitlines() or [""])


class RunLogHandler(logging.FileHandler):
    """The run log file. Consecutive repeats from one source are folded into one "(last line repeated N
    more times)" line. Closed by a later dictConfig (Prefect's, at its import), it reopens on the next
    record (mode "a")."""

    def __init__(self, filename: str):
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, mode="a", encoding="utf-8")
        self._last: dict[str, list] = {}  # source -> [message, repeats]

    def emit(self, record: logging.LogRecord) -> None:
        source, msg = _source(record), record.getMessage()
        last = self._last.get(source)
        if last is not None and last[0] == msg and msg.strip() and not record.exc_info:
            last[1] += 1
            return
        self._fold(source)
        self._last[source] = [msg, 0]
        super().emit(record)

    def _fold(self, source: str) -> None:
        last = self._last.get(source)
        if last is not None and last[1]:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(f"{time.strftime('%H:%M:%S')} {source} | (last line repeated {last[1]} more times)\n")
            last[1] = 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for source in list(self._last):
                self._fold(source)
        super().close()


@dataclass
class _State:
    path: Path | None = None
    verbose: bool = False
    env: dict = field(default_factory=dict)  # COMMAND_ENV's previous values
    node_ip: str = ""


STATE = _State()


def active() -> bool:
    return STATE.path is not None


def verbose() -> bool:
    return STATE.verbose


def log_path() -> Path | None:
    return STATE.path


def log_line(source: str, text: str) -> None:
    """A line (or several) in the run log, with this source."""
    if active():
        _RCA.info("%s", text, extra={"source": source})


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


def _warning_parts(msg: str) -> tuple[str, str]:
    """'path:line: Category: text\\n  source' (warnings.formatwarning) -> (Category, text)."""
    m = re.match(r"^.*?:\d+: (\w+): (.*)$", msg, re.S)
    return (m.group(1), m.group(2)) if m else ("Warning", msg)


class HarmlessWarnings(logging.Filter):
    """Keeps the known-harmless warnings (HARMLESS_WARNINGS) away from the handler it is attached to
    (the console's), except with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return STATE.verbose or record.name != "py.warnings" or not is_harmless(*_warning_parts(record.getMessage()))


class ConsoleHandler(logging.Handler):
    """The console's share of the log records: with --verbose every record (one line each); otherwise a
    warning (once per message) and Ray's error messages."""

    def __init__(self):
        super().__init__()
        self._shown: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            first = msg.splitlines()[0] if msg.strip() else ""
            if getattr(record, "ray_error", False):
                line = f"{PREFIX}Ray: {first[:200]}" + ("" if STATE.verbose else f" (details: {log_path()})")
            elif STATE.verbose:
                src = getattr(record, "source", "")
                line = (f"{src} {msg}" if src.startswith("(") else msg) if record.name == _OUTPUT.name \
                    else f"[{record.name}] {record.levelname}: {first}"
            elif record.name == "py.warnings":
                category, text = _warning_parts(msg)
                text = text.splitlines()[0][:200] if text.strip() else ""
                if (category, text) in self._shown:
                    return
                self._shown.add((category, text))
                line = f"{PREFIX}warning: {category}: {text} (details: {log_path()})"
            else:
                return
            CONSOLE.say(line, log=False)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


# ------------------------------------------------------------------------------------------ set-up
def logging_config(path: str | Path) -> dict:
    """The logging configuration of a command with a run log at `path` (for logging.config.dictConfig).
    The root logger's records (Prefect's, Ray's driver logger's, other libraries') and warnings go to the
    run log and to the console handler (which shows what --verbose asks for); `rca` (our notes, the
    console's lines) to the run log only, and `rca.output` (captured stdout/stderr) to both."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"runlog": {"()": RunLogFormatter}},
        "filters": {"harmless": {"()": HarmlessWarnings}},
        "handlers": {
            "runlog": {"()": RunLogHandler, "filename": str(path), "formatter": "runlog"},
            "console": {"()": ConsoleHandler, "level": "INFO", "filters": ["harmless"]},
        },
        "loggers": {
            "rca": {"level": "INFO", "handlers": ["runlog"], "propagate": False},
            "rca.output": {"level": "INFO", "handlers": ["console"], "propagate": True},
            "py.warnings": {"handlers": ["runlog", "console"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["runlog", "console"]},
    }


def setup(path: str | Path, verbose: bool = False) -> Path:
    """Start the run log at `path` and route logging, warnings and Prefect's logs there (COMMAND_ENV).
    Best called before Prefect and Ray are imported (Prefect then reads prefect_logging.yml at its
    import; Ray reads RAY_DEDUP_LOGS at its import); when Prefect is already imported, its loggers are
    configured from that file here."""
    teardown()
    path = Path(path)
    STATE.env = {k: os.environ.get(k) for k in COMMAND_ENV}
    for k, v in COMMAND_ENV.items():
        os.environ.setdefault(k, v)
    if "prefect" in sys.modules:
        from prefect.logging.configuration import load_logging_config

        config = load_logging_config(Path(os.environ["PREFECT_LOGGING_SETTINGS_PATH"]))
        config.pop("root", None)  # ours
        logging.config.dictConfig(config)
    STATE.path, STATE.verbose = path, bool(verbose)
    logging.config.dictConfig(logging_config(path))
    logging.captureWarnings(True)
    CONSOLE.bind(sys.stdout, sys.stderr)
    log_line("rca", f"run log of: {' '.join(sys.argv)} (pid {os.getpid()}, cwd {os.getcwd()})")
    return path


def teardown() -> None:
    """Stop the run log; restore what setup changed."""
    for k, v in STATE.env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    STATE.env = {}
    if STATE.path is None:
        return
    CONSOLE.reset()
    logging.captureWarnings(False)
    for name in (None, "rca", "rca.output", "py.warnings"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, (RunLogHandler, ConsoleHandler))]:
            logger.removeHandler(h)
            h.close()
    CONSOLE.bind()
    STATE.path, STATE.verbose = None, False


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


def worker_error(exc: BaseException) -> tuple[BaseException, str]:
    """A Ray task's error as what the worker raised (Ray wraps it in RayTaskError, whose text is Ray's traceback)
    and " (in a Ray worker)"; any other error as it is, with no place."""
    where = ""
    for _ in range(4):
        cause = getattr(exc, "cause", None)
        if not (type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException)):
            break
        exc, where = cause, " (in a Ray worker)"
    return exc, where


def failure(exc: BaseException, max_lines: int = 12) -> str:
    """What the console shows of a failed command: the error's type and message (its first `max_lines`
    lines, each at most 300 characters); the whole traceback goes to the run log. Ends the live lines."""
    CONSOLE.reset()
    log_line("rca ERROR", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    exc, where = worker_error(exc)
    lines = [ln.rstrip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
    lines[-1] += where
    lines = [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines]
    more = len(lines) - max_lines
    text = "\n".join(lines[:max_lines]) + (f"\n  ... ({more} more lines in the run log)" if more > 0 else "")
    return f"{PREFIX}failed: {type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------- stdout/stderr
# Ray's prefix of a worker's line on the driver: "(pid=7)", "(shout pid=7)", "(Talker pid=7, ip=10.0.0.2)";
# of its own messages: "(raylet)", "(raylet, ip=10.0.0.2)", "(autoscaler +1m2s)".
RAY_PREFIX = re.compile(r"^\((?:(?P<who>[^()]*?) )?pid=(?P<pid>\d+)(?:, ip=(?P<ip>[^)\s]+))?\) ?(?P<text>.*)$"
                        r"|^\((?P<ray>raylet|autoscaler)[^)]*\) ?(?P<rtext>.*)$", re.S)


class _OutputStream(io.TextIOBase):
    """sys.stdout or sys.stderr while captured: each line to the `rca.output` logger (the run log; the
    console with --verbose). A line with Ray's prefix gets that worker as its source, and so do the
    unprefixed lines of the same print (a multi-line message); the first line of a Ray error message
    (`(raylet) ...`) is marked for the console."""

    def __init__(self, name: str, original):
        self.name, self.original = name, original
        self._lock = threading.Lock()
        self._buf: dict[int, str] = {}   # thread -> unfinished line
        self._src: dict[int, str] = {}   # thread -> source of its unfinished print's Ray line
        self._inside = threading.local()

    def write(self, s: str) -> int:
        if getattr(self._inside, "on", False):  # logging's own error report: never back into logging
            return self.original.write(s)
        tid = threading.get_ident()
        with self._lock:
            *lines, self._buf[tid] = (self._buf.get(tid, "") + s).split("\n")
        for line in lines:
            self._line(tid, line)
        if lines and not self._buf[tid]:  # the print ended: its next line has no source yet
            self._src.pop(tid, None)
        return len(s)

    def _line(self, tid: int, raw: str) -> None:
        line = clean(raw)
        m = RAY_PREFIX.match(line)
        error = False
        if m and m.group("ray"):
            self._src[tid], line, error = f"({m.group('ray')})", m.group("rtext"), m.group("ray") == "raylet"
        elif m:
            who = f"{m.group('who')} " if m.group("who") else ""
            ip = m.group("ip") or STATE.node_ip
            self._src[tid] = f"({who}pid={m.group('pid')}{' ip=' + ip if ip else ''})"
            line = m.group("text")
        self._inside.on = True
        try:
            _OUTPUT.log(logging.WARNING if error else logging.INFO, "%s", line,
                        extra={"source": self._src.get(tid, self.name), "ray_error": error})
        finally:
            self._inside.on = False

    def flush(self, every_thread: bool = False) -> None:
        with self._lock:
            rests = [(t, self._buf.pop(t)) for t in list(self._buf) if every_thread or t == threading.get_ident()]
        for tid, rest in rests:
            if rest.strip():
                self._line(tid, rest)

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


@contextlib.contextmanager
def capture_output(stdout: bool = True, stderr: bool = True):
    """For the block: what this process writes to sys.stdout/sys.stderr goes to the run log (and, with
    --verbose, to the console) instead of the terminal. Nothing changes without a run log."""
    if not active():
        yield
        return
    saved = sys.stdout, sys.stderr
    if stdout:
        sys.stdout = _OutputStream("stdout", saved[0])
    if stderr:
        sys.stderr = _OutputStream("stderr", saved[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _OutputStream):
                stream.flush(every_thread=True)
        sys.stdout, sys.stderr = saved


# ------------------------------------------------------------------------------------------ Ray
# For Ray workers of a run with a run log: no progress bars (the driver's live line replaces them).
WORKER_LOG_ENV = {"TQDM_DISABLE": "1", "RCA_NO_PROGRESS": "1"}


def worker_log_env() -> dict[str, str]:
    return dict(WORKER_LOG_ENV) if active() else {}


@contextlib.contextmanager
def ray_output(session_dir: str | None = None):
    """While Ray is connected (after ray.init(log_to_driver=True), until after ray.shutdown): the workers'
    output, which Ray prints on the driver's stdout/stderr, and the records of Ray's driver logger go to
    the run log instead of the console. Worker lines from this node get this node's IP, as remote ones
    get theirs from Ray. Nothing changes without a run log."""
    if not active():
        yield
        return
    import ray

    STATE.node_ip = ray.util.get_node_ip_address()
    if session_dir:
        log_line("rca", f"Ray session directory (this node's raw Ray logs): {session_dir}")
    ray_logger = logging.getLogger("ray")  # Ray's own handler writes to stderr: the root's handlers instead
    handlers, propagate = list(ray_logger.handlers), ray_logger.propagate
    for h in handlers:
        ray_logger.removeHandler(h)
    ray_logger.propagate = True
    try:
        with capture_output():
            yield
    finally:
        STATE.node_ip = ""
        ray_logger.propagate = propagate
        for h in handlers:
            ray_logger.addHandler(h)

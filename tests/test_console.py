"""The console of the `rca` commands (tasks/console.py, tasks/progress.py): live progress lines on a
terminal (rich) and plain lines in a pipe, stage summary lines, the run log (logging.config), warnings,
Prefect's logs kept off the console (its logging configuration file), the driver's stdout/stderr and Ray
worker output routed to the run log (real Ray)."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tasks import console as con
from tasks.progress import StageProgress, finished, forget, summary_line
from terminal import screen

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<source>.+?) \| (?P<text>.*)$")


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def terminal(width: int = 120, clock=None) -> con.Console:
    return con.Console(io.StringIO(), force_terminal=True, width=width, clock=clock or FakeClock(), ticker=False)


def pipe(clock=None, interval: float = 60) -> con.Console:
    return con.Console(io.StringIO(), interval=interval, clock=clock or FakeClock(), ticker=False)


def log_lines(path: Path) -> list[tuple[str, str]]:
    """(source, text) of each run log line; every line must have the run log's format."""
    out = []
    for ln in path.read_text().splitlines():
        m = LOG_LINE.match(ln)
        assert m, f"not a run log line: {ln!r}"
        out.append((m["source"], m["text"]))
    return out


@pytest.fixture(autouse=True)
def _no_run_log(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")  # rich treats TERM=dumb as no terminal
    con.teardown()
    yield
    con.teardown()


# ------------------------------------------------------------------------------------------ live lines
def test_terminal_live_line_is_redrawn_in_place_and_replaced_by_the_summary():
    clock = FakeClock()
    c = terminal(clock=clock)
    assert c.is_tty()
    p = StageProgress("crf_labels", console=c, artifact=False, clock=clock)
    assert p.unit == "images"
    p(0, 24)
    clock.t += 2
    p(8, 24)
    clock.t += 2
    p(16, 24)
    raw = c.out.file.getvalue()
    assert "\n" not in raw, "a live line never scrolls the terminal"
    assert raw.count("\r") >= 3
    shown = screen(raw)
    assert len(shown) == 1 and shown[0].startswith("crf_labels      [#############.......] 16/24 images  67%"), shown
    assert "4.0 images/s" in shown[0] and "elapsed 0:04" in shown[0] and "ETA 0:02" in shown[0]
    c.say("[rca] a message in between")
    shown = screen(c.out.file.getvalue())
    assert shown[0] == "[rca] a message in between" and "16/24 images" in shown[1], shown
    p.close()
    c.say(summary_line("crf_labels", "ran", 4.0, {"miou_all": 0.5}, finished("crf_labels")))
    shown = screen(c.out.file.getvalue())
    assert shown == ["[rca] a message in between",
                     "crf_labels      ran         4.0 s  16/24 images  4.0 images/s  mIoU 0.500"], shown
    assert "\x1b[3" not in c.out.file.getvalue(), "no colours"


def test_terminal_shows_one_live_line_per_source_and_the_elapsed_time_moves():
    clock = FakeClock()
    c = terminal(clock=clock)
    phase = con.Phase("Prefect: starting a local server", console=c)
    with phase:
        clock.t += 65
        c.refresh()  # what rich's refresh thread does once a second
        assert screen(c.out.file.getvalue()) == ["[rca] Prefect: starting a local server ... 1:05"]
        p = StageProgress("cam_train", console=c, artifact=False, clock=clock)
        p(3, 6)
        assert [ln[:15] for ln in screen(c.out.file.getvalue())] == ["[rca] Prefect: ", "cam_train      "]
        p.close()
    assert screen(c.out.file.getvalue()) == []


def test_live_line_fits_the_terminal_width():
    clock = FakeClock()
    c = terminal(width=60, clock=clock)
    p = StageProgress("affinity_train", console=c, artifact=False, clock=clock)
    p(3, 10)
    last = screen(c.out.file.getvalue())[-1]
    assert len(last) <= 60 and last.startswith("affinity_train") and "3/10" in last and "#" not in last


def test_pipe_gets_plain_lines_at_most_every_interval_and_none_at_the_end():
    clock = FakeClock()
    c = pipe(clock, interval=30)
    assert not c.is_tty()
    p = StageProgress("cam_train", console=c, artifact=False, clock=clock)
    assert p.unit == "steps"
    p(1, 10)
    clock.t += 10
    p(2, 10)
    assert c.out.file.getvalue() == "", "nothing before the interval has passed"
    clock.t += 25
    p(3, 10)
    clock.t += 1
    p(4, 10)
    out = c.out.file.getvalue()
    assert "\r" not in out and "\x1b" not in out
    assert len(out.splitlines()) == 1 and out.startswith("cam_train       [######..............] 3/10 steps  30%")
    clock.t += 100
    c.tick()  # the ticker: the progress since the last line (4/10) is printed without a new update
    assert len(c.out.file.getvalue().splitlines()) == 2 and "4/10 steps" in c.out.file.getvalue().splitlines()[1]
    clock.t += 100
    c.tick()
    assert len(c.out.file.getvalue().splitlines()) == 2, "no progress: a line only every 5 intervals"
    clock.t += 50
    c.tick()
    assert len(c.out.file.getvalue().splitlines()) == 3, "5 intervals without progress"
    p(10, 10)
    clock.t += 100
    c.tick()
    assert len(c.out.file.getvalue().splitlines()) == 3, "a finished stage: its summary line comes next"
    p.close()
    clock.t += 1000
    c.tick()
    assert len(c.out.file.getvalue().splitlines()) == 3


def test_pipe_line_of_a_stage_that_has_not_reported_yet_comes_every_5_intervals():
    clock = FakeClock()
    c = pipe(clock, interval=60)
    StageProgress("seg_train", console=c, artifact=False, clock=clock)
    for _ in range(10):
        clock.t += 60
        c.tick()
    lines = c.out.file.getvalue().splitlines()
    assert lines == ["seg_train       running, 5:00 elapsed (no steps done yet)",
                     "seg_train       running, 10:00 elapsed (no steps done yet)"]


def test_pipe_ticker_thread_prints_between_updates():
    """The real ticker (a thread, once a second) on a pipe console with a 0.5 s interval."""
    c = con.Console(io.StringIO(), interval=0.5)
    p = StageProgress("memory_build", console=c, artifact=False)
    p(1, 4)
    deadline = time.time() + 20
    while time.time() < deadline and not c.out.file.getvalue():
        time.sleep(0.2)
    p.close()
    assert c.out.file.getvalue().startswith("memory_build    [#####...............] 1/4 images  25%")


def test_rate_leaves_out_start_up_and_resumed_units():
    clock = FakeClock()
    c = pipe(clock)
    p = StageProgress("seg_train", console=c, artifact=False, clock=clock)
    clock.t += 60  # worker group start-up, then the resumed run reports epoch 6 first
    p(6, 10)
    clock.t += 10
    p(7, 10)
    clock.t += 10
    p(8, 10)
    assert p.rate() == pytest.approx(0.1)
    assert p.eta() == pytest.approx(20.0)
    assert "10.0 s/step" in p.render(clock.t, 200) and "ETA 0:20" in p.render(clock.t, 200)
    p.set_unit("epochs")
    assert "8/10 epochs" in p.render(clock.t, 200)


def test_summary_line_and_finished_figures():
    clock = FakeClock()
    c = pipe(clock)
    forget("seg_eval")
    p = StageProgress("seg_eval", console=c, artifact=False, clock=clock)
    p(0, 8)
    clock.t += 4
    p(8, 8)
    p.epoch_metrics({"epoch": 1, "loss": 0.5})
    p.close()
    stats = finished("seg_eval")
    assert stats["done"] == 8 and stats["total"] == 8 and stats["rate"] == pytest.approx(2.0)
    assert stats["epochs"] == [{"epoch": 1, "loss": 0.5}]
    line = summary_line("seg_eval", "ran", 5.0, {"miou": 0.75, "stage_seconds": 4.0}, stats)
    assert line == "seg_eval        ran         5.0 s  8/8 images  2.0 images/s  mIoU 0.750"
    assert summary_line("cam_train", "cached", 0.3, {}, None) == "cam_train       cached      0.3 s"
    line = summary_line("cam_infer", "ran", 9.0, {"gflop_per_s": 61.2, "flop_utilisation": 0.48}, None)
    assert line.endswith("61.2 GFLOP/s per worker (48% of peak)"), line
    assert "GFLOP" not in summary_line("cam_infer", "cached", 0.3, {"gflop_per_s": 61.2}, None)


def test_plain_lines_are_not_wrapped_or_styled_in_a_pipe():
    c = pipe()
    long = "[rca] outputs: " + "/very/long/path" * 20 + " [bold]not markup[/bold] :smile: 0.5"
    c.say(long)
    assert c.out.file.getvalue() == long + "\n"


# ------------------------------------------------------------------------------------------ run log
def test_run_log_line_format_and_sources(tmp_path, capsys):
    path = con.setup(tmp_path / "logs" / "run.log")
    con.say("data: train 24 images")
    con.log_line("rca", "stage cam_train: started")
    logging.getLogger("prefect.flow_runs").warning("Beginning flow run 'x'")
    logging.getLogger("some.library").warning("two\nlines")
    logging.getLogger("some.library").info("below the root's level: not kept")
    con.teardown()
    assert capsys.readouterr().out == "[rca] data: train 24 images\n"
    lines = log_lines(path)
    assert lines[0][0] == "rca" and lines[0][1].startswith("run log of: ")
    assert lines[1:] == [("console", "[rca] data: train 24 images"), ("rca", "stage cam_train: started"),
                         ("prefect.flow_runs WARNING", "Beginning flow run 'x'"),
                         ("some.library WARNING", "two"), ("some.library WARNING", "lines")]


def test_run_log_folds_repeats_and_strips_colours_and_bars(tmp_path):
    path = con.setup(tmp_path / "x.log")
    for _ in range(5):
        con.log_line("(PlacementGroupCleaner pid=1)", "Failed to query Ray Train Controller actor state.")
    con.log_line("(RayTrainWorker pid=2)", "\x1b[36mcoloured\x1b[0m")
    con.log_line("(RayTrainWorker pid=2)", "bar   0%|  | 0/3\rbar 100%|##| 3/3")
    con.teardown()
    lines = [f"{s} | {t}" for s, t in log_lines(path)]
    assert lines.count("(PlacementGroupCleaner pid=1) | Failed to query Ray Train Controller actor state.") == 1
    assert "(PlacementGroupCleaner pid=1) | (last line repeated 4 more times)" in lines
    assert "(RayTrainWorker pid=2) | coloured" in lines
    assert "(RayTrainWorker pid=2) | bar 100%|##| 3/3" in lines


def test_run_log_location_beside_a_local_store_or_under_runs_for_a_bucket(tmp_path):
    p = con.run_log_location(str(tmp_path / "run" / "store"), "tiny")
    assert p.parent == tmp_path / "run" / "logs" and p.suffix == ".log"
    q = con.run_log_location("s3://bucket/run", "tiny", cwd=tmp_path)
    assert q.parent == tmp_path / "runs" / "tiny" / "logs"


def test_teardown_restores_logging_and_the_environment(tmp_path, monkeypatch):
    for k in con.COMMAND_ENV:
        monkeypatch.delenv(k, raising=False)
    con.setup(tmp_path / "run.log")
    assert os.environ["RAY_DEDUP_LOGS"] == "0"
    assert os.environ["PREFECT_LOGGING_SETTINGS_PATH"] == str(con.PREFECT_LOGGING_YML)
    assert any(isinstance(h, con.RunLogHandler) for h in logging.getLogger().handlers)
    con.teardown()
    assert not any(isinstance(h, (con.RunLogHandler, con.ConsoleHandler)) for h in logging.getLogger().handlers)
    assert not any(k in os.environ for k in con.COMMAND_ENV)
    assert not con.active()


# ------------------------------------------------------------------------------------------ warnings
def test_warnings_harmless_stay_in_the_log_others_get_one_console_line_once(tmp_path, capsys):
    path = con.setup(tmp_path / "logs" / "run.log")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Sparse CSR tensor support is in beta (triggered internally)", UserWarning)
        warnings.warn("rca-test: the disk is almost full", UserWarning)
        warnings.warn("rca-test: the disk is almost full", UserWarning)
        warnings.warn("rca-test: an API is going away", FutureWarning)
    con.teardown()
    out = capsys.readouterr()
    console_text = out.out + out.err
    assert "Sparse CSR" not in console_text
    assert console_text.splitlines() == [
        f"[rca] warning: UserWarning: rca-test: the disk is almost full (details: {path})",
        f"[rca] warning: FutureWarning: rca-test: an API is going away (details: {path})"]
    kept = [t for s, t in log_lines(path) if s == "py.warnings WARNING"]
    assert sum(": UserWarning: Sparse CSR tensor support is in beta" in t for t in kept) == 1
    assert sum(": UserWarning: rca-test: the disk is almost full" in t for t in kept) == 2, "the log keeps every one"


def test_verbose_shows_every_record_and_harmless_warnings_live(tmp_path, capsys):
    import prefect  # noqa: F401 - its loggers at INFO

    con.setup(tmp_path / "run.log", verbose=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Sparse CSR tensor support is in beta", UserWarning)
    logging.getLogger("prefect.engine").info("Beginning flow run 'x'\nView at http://x")
    con.teardown()
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("[py.warnings] WARNING: ") and "Sparse CSR" in shown[0]
    assert shown[1:] == ["[prefect.engine] INFO: Beginning flow run 'x'"]


# ------------------------------------------------------------------------------------------ Prefect
def test_prefect_logs_go_to_the_run_log_not_the_console(tmp_path, capsys):
    """Prefect already imported (as in this test process): setup applies prefect_logging.yml at once;
    the flow-run logger keeps Prefect's API handler (the UI), nothing of Prefect's writes to a stream."""
    import prefect  # noqa: F401
    from prefect.logging.handlers import APILogHandler

    path = con.setup(tmp_path / "run.log")
    assert any(isinstance(h, APILogHandler) for h in logging.getLogger("prefect.flow_runs").handlers)
    for name in ("prefect", "prefect._internal", "prefect.flow_runs", "prefect.task_runs", "uvicorn"):
        lg = logging.getLogger(name)
        assert not [h for h in lg.handlers if isinstance(h, logging.StreamHandler)], (name, lg.handlers)
        assert lg.propagate, name
    logging.getLogger("prefect.flow_runs").warning("rca-test prefect message")
    logging.getLogger("prefect._internal").error("rca-test internal error")
    con.teardown()
    out = capsys.readouterr()
    assert "rca-test" not in out.out + out.err
    assert ("prefect.flow_runs WARNING", "rca-test prefect message") in log_lines(path)
    assert ("prefect._internal ERROR", "rca-test internal error") in log_lines(path)


def test_prefect_imported_after_setup_reads_its_configuration_file(tmp_path):
    """The order of `rca run`: setup, then Prefect's import, whose dictConfig closes our handlers (the run
    log reopens) and leaves the root logger to us; Prefect's console stays silent."""
    path = tmp_path / "run.log"
    code = f"""
import logging, sys
from tasks import console as con
con.setup({str(path)!r})
import prefect
logging.getLogger("prefect.flow_runs").warning("rca-test flow run message")
logging.getLogger("prefect._internal").error("rca-test internal error")
logging.getLogger("uvicorn").warning("rca-test server message")
con.say("after prefect")
con.teardown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_LOGGING", "RCA_VERBOSE"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "[rca] after prefect\n" and "rca-test" not in r.stderr, (r.stdout, r.stderr[-2000:])
    lines = log_lines(path)
    for kept in [("prefect.flow_runs WARNING", "rca-test flow run message"),
                 ("prefect._internal ERROR", "rca-test internal error"),
                 ("uvicorn WARNING", "rca-test server message"), ("console", "[rca] after prefect")]:
        assert kept in lines, (kept, lines)


# ------------------------------------------------------------------------------ stdout/stderr and Ray
def test_captured_output_takes_the_source_from_rays_prefix(tmp_path, capsys):
    """What Ray prints on the driver (its format, written from Ray's own threads) and the driver's own prints."""
    import threading

    path = con.setup(tmp_path / "run.log")
    con.STATE.node_ip = "10.0.0.1"

    def ray_thread():
        print("(RayTrainWorker pid=12) Setting up process group")
        print("(Talker pid=13, ip=10.0.0.2) from another node")
        print("(pid=14) a task without a name")
        print("(raylet) A worker died or was killed while executing a task\nWorker exit type: SYSTEM_ERROR")
        print("(raylet, ip=10.0.0.2) Task was killed due to the node running low on memory.")

    with con.capture_output():
        t = threading.Thread(target=ray_thread)
        t.start()
        t.join()
        print("a print of the driver")
        sys.stderr.write("demo data: 100%|##########| 32/32\n")
    con.STATE.node_ip = ""
    con.teardown()
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.splitlines() == [
        f"[rca] Ray: A worker died or was killed while executing a task (details: {path})",
        f"[rca] Ray: Task was killed due to the node running low on memory. (details: {path})"]
    lines = log_lines(path)
    for kept in [("(RayTrainWorker pid=12 ip=10.0.0.1)", "Setting up process group"),
                 ("(Talker pid=13 ip=10.0.0.2)", "from another node"), ("(pid=14 ip=10.0.0.1)", "a task without a name"),
                 ("(raylet)", "A worker died or was killed while executing a task"),
                 ("(raylet)", "Worker exit type: SYSTEM_ERROR"),
                 ("(raylet)", "Task was killed due to the node running low on memory."),
                 ("stdout", "a print of the driver"), ("stderr", "demo data: 100%|##########| 32/32")]:
        assert kept in lines, (kept, lines)


def _wait_for(path, text: str, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s:\n{path.read_text()[-2000:]}")


def test_ray_worker_output_goes_to_the_run_log_and_live_with_verbose(tmp_path, capfd):
    """Real Ray: a task's and an actor's prints reach the run log, not the console, with the worker as the
    source and no colours; with --verbose the same lines are also shown live; a worker that dies gets one
    console line (Ray's error message)."""
    import ray

    from rca_core.config import RayConfig
    from tasks.ray_runtime import ray_session

    if ray.is_initialized():  # an earlier test of this process left its Ray running: this test needs its own
        ray.shutdown()
    path = con.setup(tmp_path / "run.log")

    @ray.remote
    def shout(word: str) -> int:
        print(f"rca-test task says {word}")
        print(f"rca-test task warns {word}", file=sys.stderr)
        return 1

    @ray.remote
    class Talker:
        def talk(self, word: str) -> int:
            print(f"rca-test actor says {word}", flush=True)
            return 1

    @ray.remote(max_retries=0)
    def die() -> None:
        os._exit(1)

    with ray_session(RayConfig(), num_cpus=1):
        assert ray.get(shout.remote("quietly"), timeout=120) == 1
        a = Talker.remote()
        assert ray.get(a.talk.remote("quietly"), timeout=120) == 1
        _wait_for(path, "rca-test task says quietly")
        _wait_for(path, "rca-test task warns quietly")
        _wait_for(path, "rca-test actor says quietly")
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(die.remote(), timeout=120)
        _wait_for(path, "A worker died")
        con.STATE.verbose = True
        assert ray.get(shout.remote("aloud"), timeout=120) == 1
        _wait_for(path, "rca-test task says aloud")
        con.STATE.verbose = False
        ray.kill(a)
    con.teardown()
    out = capfd.readouterr()
    console_text = out.out + out.err
    assert "rca-test task says quietly" not in console_text and "rca-test actor says quietly" not in console_text
    assert "rca-test task warns quietly" not in console_text
    assert re.search(r"^\(shout pid=\d+ ip=[\d.]+\) rca-test task says aloud$", console_text, re.M), console_text[-2000:]
    assert "[rca] Ray: local, 1 node(s), 1 CPUs (worker output: run log)" in console_text
    assert sum(ln.startswith("[rca] Ray: A worker died") for ln in console_text.splitlines()) == 1, console_text
    text = path.read_text()
    assert re.search(r"\(shout pid=\d+ ip=[\d.]+\) \| rca-test task says quietly", text)
    assert re.search(r"\(shout pid=\d+ ip=[\d.]+\) \| rca-test task warns quietly", text)
    assert re.search(r"\(Talker pid=\d+ ip=[\d.]+\) \| rca-test actor says quietly", text)
    assert re.search(r"\(raylet\) \| A worker died", text)
    assert "Ray session directory" in text and "\x1b[" not in text


# ------------------------------------------------------------------------------------------ failures
def test_failure_is_one_console_line_and_the_traceback_goes_to_the_log(tmp_path):
    path = con.setup(tmp_path / "run.log")
    try:
        raise RuntimeError("stage cam_train: 2 problem(s):\n  node a: no store\n  node b: no data")
    except RuntimeError as e:
        text = con.failure(e)
    try:
        raise ValueError("\n".join(f"line {i}" for i in range(40)))
    except ValueError as e:
        long = con.failure(e).splitlines()
    con.teardown()
    assert text == "[rca] failed: RuntimeError: stage cam_train: 2 problem(s):\n  node a: no store\n  node b: no data"
    assert len(long) == 13 and long[-1] == "  ... (28 more lines in the run log)"
    lines = log_lines(path)
    assert ("rca ERROR", "Traceback (most recent call last):") in lines
    assert any(s == "rca ERROR" and "test_console.py" in t for s, t in lines)


def test_failure_of_a_ray_task_shows_what_the_worker_raised(tmp_path):
    """Ray wraps a worker's error in RayTaskError, whose text is Ray's own traceback header: the console shows the
    worker's error and its message instead, and says it came from a Ray worker."""
    from ray.exceptions import RayTaskError

    class StorageUnavailable(Exception):
        pass

    cause = StorageUnavailable("object storage at http://127.0.0.1:9 gave no usable answer; last error: reset")
    wrapped = RayTaskError("StageActor.run", "Traceback ...\nConnectionResetError", cause).as_instanceof_cause()
    con.setup(tmp_path / "run.log")
    try:
        text = con.failure(wrapped)
    finally:
        con.teardown()
    assert text == ("[rca] failed: StorageUnavailable: object storage at http://127.0.0.1:9 gave no usable answer; "
                    "last error: reset (in a Ray worker)")


def test_failure_ends_the_live_line_and_goes_to_stderr(tmp_path):
    clock = FakeClock()
    c = terminal(clock=clock)
    err = io.StringIO()
    c.err = con.RichConsole(file=err, soft_wrap=True, highlight=False, markup=False)
    p = StageProgress("random_walk", console=c, artifact=False, clock=clock)
    p(2, 24)
    assert screen(c.out.file.getvalue())[0].startswith("random_walk")
    con.CONSOLE, saved = c, con.CONSOLE
    try:
        c.say(con.failure(RuntimeError("boom")), err=True)
    finally:
        con.CONSOLE = saved
    assert screen(c.out.file.getvalue()) == [] and err.getvalue() == "[rca] failed: RuntimeError: boom\n"


def test_phase_sends_library_stderr_to_the_log(tmp_path, capsys):
    """A set-up phase (data generation): a library progress bar on stderr goes to the run log."""
    path = con.setup(tmp_path / "run.log")
    with con.Phase("data: generating"):
        sys.stderr.write("demo data:  50%|#####     | 16/32\rdemo data: 100%|##########| 32/32\n")
    con.say("data: train 24 images")
    con.teardown()
    out = capsys.readouterr()
    assert "demo data" not in out.out + out.err and out.out.splitlines() == ["[rca] data: train 24 images"]
    assert ("stderr", "demo data: 100%|##########| 32/32") in log_lines(path)

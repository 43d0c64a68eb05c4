"""The console of the `rca` commands (tasks/console.py, tasks/progress.py): live progress lines on a
terminal and plain lines in a pipe, stage summary lines, the run log, warnings, Ray worker output
routed to the run log (real Ray), Prefect's logs kept off the console."""
from __future__ import annotations

import io
import logging
import re
import time
import warnings

import pytest

from tasks import console as con
from tasks.progress import StageProgress, finished, forget, summary_line


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows for `raw`: \\r returns to column 0, ESC[K erases to the end of the line."""
    lines, cur = [], ""
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            i += 3
            continue
        ch = raw[i]
        if ch == "\r":
            cur = ""
        elif ch == "\n":
            lines.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    return lines + ([cur] if cur else [])


@pytest.fixture(autouse=True)
def _no_run_log():
    con.teardown()
    yield
    con.teardown()


def test_tty_live_line_is_redrawn_in_place_and_replaced_by_the_summary():
    clock = FakeClock()
    c = con.Console(stream=TTY(), width=120, clock=clock, ticker=False)
    p = StageProgress("crf_labels", console=c, artifact=False)
    assert p.unit == "images"
    p(0, 24)
    clock.t += 2
    p(8, 24)
    clock.t += 2
    p(16, 24)
    raw = c.stream.getvalue()
    assert "\n" not in raw, "a live line never scrolls the terminal"
    assert raw.count("\r") >= 3
    shown = screen(raw)
    assert len(shown) == 1 and shown[0].startswith("crf_labels")
    assert "16/24 images" in shown[0] and "67%" in shown[0] and "4.0 images/s" in shown[0] and "ETA 0:02" in shown[0]
    c.say("[rca] a message in between")
    shown = screen(c.stream.getvalue())
    assert shown[0] == "[rca] a message in between" and "16/24 images" in shown[1], shown
    p.close()
    c.say(summary_line("crf_labels", "ran", 4.0, {"miou_all": 0.5}, finished("crf_labels")))
    shown = screen(c.stream.getvalue())
    assert shown == ["[rca] a message in between",
                     "crf_labels      ran         4.0 s  16/24 images  4.0 images/s  mIoU 0.500"], shown


def test_live_line_fits_the_terminal_width():
    clock = FakeClock()
    c = con.Console(stream=TTY(), width=60, clock=clock, ticker=False)
    p = StageProgress("affinity_train", console=c, artifact=False)
    p(3, 10)
    last = screen(c.stream.getvalue())[-1]
    assert len(last) <= 60 and last.startswith("affinity_train") and "3/10" in last


def test_pipe_gets_plain_lines_at_most_every_interval_and_none_at_the_end():
    clock = FakeClock()
    c = con.Console(stream=io.StringIO(), interval=30, clock=clock, ticker=False)
    assert not c.is_tty()
    p = StageProgress("cam_train", console=c, artifact=False)
    assert p.unit == "steps"
    p(1, 10)
    clock.t += 10
    p(2, 10)
    assert c.stream.getvalue() == "", "nothing before the interval has passed"
    clock.t += 25
    p(3, 10)
    clock.t += 1
    p(4, 10)
    out = c.stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines() == [out.splitlines()[0]] and "3/10 steps" in out
    clock.t += 100
    c.tick()  # the ticker: the progress since the last line (4/10) is printed without a new update
    assert len(c.stream.getvalue().splitlines()) == 2 and "4/10 steps" in c.stream.getvalue().splitlines()[1]
    clock.t += 100
    c.tick()
    assert len(c.stream.getvalue().splitlines()) == 2, "no progress: a line only every 5 intervals"
    clock.t += 60
    c.tick()
    assert len(c.stream.getvalue().splitlines()) == 3
    p(10, 10)
    clock.t += 100
    c.tick()
    assert len(c.stream.getvalue().splitlines()) == 3, "a finished stage: its summary line comes next"
    p.close()
    c.tick()
    assert len(c.stream.getvalue().splitlines()) == 3


def test_rate_leaves_out_start_up_and_resumed_units():
    clock = FakeClock()
    c = con.Console(stream=io.StringIO(), clock=clock, ticker=False)
    p = StageProgress("seg_train", console=c, artifact=False)
    clock.t += 60  # worker group start-up, then the resumed run reports epoch 6 first
    p(6, 10)
    clock.t += 10
    p(7, 10)
    clock.t += 10
    p(8, 10)
    assert p.rate() == pytest.approx(0.1)
    assert p.eta() == pytest.approx(20.0)
    assert "10.0 s/step" in p.render(clock.t, 200) and "ETA 0:20" in p.render(clock.t, 200)
    p.set_unit("steps")
    assert "8/10 steps" in p.render(clock.t, 200)


def test_summary_line_and_finished_figures():
    clock = FakeClock()
    c = con.Console(stream=io.StringIO(), clock=clock, ticker=False)
    forget("seg_eval")
    p = StageProgress("seg_eval", console=c, artifact=False)
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


def test_run_log_folds_repeats_and_strips_colours_and_bars(tmp_path):
    log = con.RunLog(tmp_path / "x.log")
    for _ in range(5):
        log.write("(PlacementGroupCleaner pid=1)", "Failed to query Ray Train Controller actor state.")
    log.write("(RayTrainWorker pid=2)", "\x1b[36mcoloured\x1b[0m")
    log.write("(RayTrainWorker pid=2)", "bar   0%|  | 0/3\rbar 100%|##| 3/3")
    log.close()
    lines = [ln.split(" ", 1)[1] for ln in (tmp_path / "x.log").read_text().splitlines()]
    assert lines.count("(PlacementGroupCleaner pid=1) | Failed to query Ray Train Controller actor state.") == 1
    assert "(PlacementGroupCleaner pid=1) | (last line repeated 4 more times)" in lines
    assert "(RayTrainWorker pid=2) | coloured" in lines
    assert "(RayTrainWorker pid=2) | bar 100%|##| 3/3" in lines


def test_run_log_location_beside_a_local_store_or_under_runs_for_a_bucket(tmp_path):
    p = con.run_log_location(str(tmp_path / "run" / "store"), "tiny")
    assert p.parent == tmp_path / "run" / "logs" and p.suffix == ".log"
    q = con.run_log_location("s3://bucket/run", "tiny", cwd=tmp_path)
    assert q.parent == tmp_path / "runs" / "tiny" / "logs"


def test_warnings_known_harmless_stay_in_the_log_others_get_one_console_line(tmp_path, capsys):
    path = con.setup(tmp_path / "logs" / "run.log")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Sparse CSR tensor support is in beta (triggered internally)", UserWarning)
        warnings.warn("rca-test: the disk is almost full", UserWarning)
    con.teardown()
    out = capsys.readouterr()
    console_text = out.out + out.err
    assert "Sparse CSR" not in console_text
    warn_lines = [ln for ln in console_text.splitlines() if "warning:" in ln]
    assert len(warn_lines) == 1 and "the disk is almost full" in warn_lines[0] and str(path) in warn_lines[0]
    text = path.read_text()
    assert "Sparse CSR tensor support is in beta" in text and "the disk is almost full" in text


def test_prefect_logs_go_to_the_run_log_not_the_console(tmp_path, capsys):
    """Prefect's loggers (the flow-run logger included) write to the run log; the console stays clean."""
    path = con.setup(tmp_path / "run.log")
    logging.getLogger("prefect.flow_runs").warning("rca-test prefect message")
    con.teardown()
    out = capsys.readouterr()
    assert "rca-test prefect message" not in out.out + out.err
    assert "prefect.flow_runs WARNING | rca-test prefect message" in path.read_text()


def _wait_for(path, text: str, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s:\n{path.read_text()[-2000:]}")


def test_ray_worker_output_goes_to_the_run_log_and_live_with_verbose(tmp_path, capfd):
    """Real Ray: a task's and an actor's prints reach the run log, not the console; Ray's worker prefix
    and colours are gone; with --verbose the same lines are also shown live."""
    import ray

    from rca_core.config import RayConfig
    from tasks.ray_runtime import ray_session

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    path = con.setup(tmp_path / "run.log")

    @ray.remote
    def shout(word: str) -> int:
        print(f"rca-test task says {word}")
        return 1

    @ray.remote
    class Talker:
        def talk(self, word: str) -> int:
            print(f"rca-test actor says {word}", flush=True)
            return 1

    with ray_session(RayConfig(), num_cpus=1):
        assert ray.get(shout.remote("quietly"), timeout=120) == 1
        a = Talker.remote()
        assert ray.get(a.talk.remote("quietly"), timeout=120) == 1
        _wait_for(path, "rca-test task says quietly")
        text = _wait_for(path, "rca-test actor says quietly")
        con.STATE.verbose = True
        assert ray.get(shout.remote("aloud"), timeout=120) == 1
        _wait_for(path, "rca-test task says aloud")
        con.STATE.verbose = False
        ray.kill(a)
    con.teardown()
    out = capfd.readouterr()
    console_text = out.out + out.err
    assert "rca-test task says quietly" not in console_text and "rca-test actor says quietly" not in console_text
    assert re.search(r"\(shout pid=\d+.*\) rca-test task says aloud", console_text), console_text[-2000:]
    assert "Ray: local, 1 node(s), 1 CPUs (worker output: run log)" in console_text
    assert re.search(r"\(shout pid=\d+ ip=[\d.]+\) \| rca-test task says quietly", text)
    assert re.search(r"\(Talker pid=\d+ ip=[\d.]+\) \| rca-test actor says quietly", text)
    assert "\x1b[" not in path.read_text()


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
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "test_console.py" in text


def test_phase_sends_library_stderr_to_the_log(tmp_path, capsys):
    """A set-up phase (data generation): a library progress bar on stderr goes to the run log."""
    import sys

    path = con.setup(tmp_path / "run.log")
    with con.Phase("data: generating"):
        sys.stderr.write("demo data:  50%|#####     | 16/32\rdemo data: 100%|##########| 32/32\n")
    con.say("data: train 24 images")
    con.teardown()
    out = capsys.readouterr()
    assert "demo data" not in out.out + out.err and out.out.splitlines()[-1] == "[rca] data: train 24 images"
    assert "stderr | demo data: 100%|##########| 32/32" in path.read_text()

"""The console of real commands: `rca run` in a pipe (the session's reference run) and `rca stage` in a
terminal (a pty) with --verbose. Real Prefect server, real Ray."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, copy_stages, write_config
import prefect_api
from harness.slowdown import slowdown_env
from terminal import screen

pytestmark = pytest.mark.slow
RCA = str(Path(sys.executable).with_name("rca"))
STAGES = ["cam_train", "memory_build", "cam_infer", "cam_eval", "crf_labels", "affinity_train", "random_walk",
          "seg_train", "seg_eval"]
STAGE_RX = "|".join(STAGES)
RAY_NOISE = ["PlacementGroupCleaner", "TrainController", "RayTrainWorker", "core_worker.cc", "PreemptionWatcher",
             "Checkpoint successfully created", "Reporting training result", "Warning", "warn(", "Traceback",
             "%|", "\x1b[", "pid=", "Error logging to API", "BuildBackendWarning"]


def summary_lines(out: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ln in out.splitlines():
        m = re.match(rf"^\[rca\] ({STAGE_RX})\s+(ran|cached)\s+[\d.]+ s", ln)
        if m:
            found.setdefault(m.group(1), []).append(ln)
    return found


def is_progress_line(ln: str) -> bool:
    """A plain periodic progress line (a pipe gets one every RCA_PROGRESS_INTERVAL s of a stage)."""
    return bool(re.match(rf"^({STAGE_RX})\s+(running, \d+:\d\d elapsed|(\[[#.]+\] )?\d+/\d+ \w+ )", ln))


def log_path_of(out: str) -> Path:
    paths = re.findall(r"^\[rca\] log: (\S+)$", out, re.M)
    assert paths, out[-2000:]
    return Path(paths[-1])


def test_run_console_is_short_and_free_of_ray_internals(reference_run, prefect_server):
    """`rca run` in a pipe: one line per set-up phase, one summary line per stage, the table, where the
    outputs are; no Ray internals, no warnings, no progress bars. Worker output is in the run log."""
    out = reference_run["stdout"]
    assert reference_run["rc"] == 0, out[-3000:]
    lines = out.splitlines()
    for noise in RAY_NOISE:
        assert noise not in out, f"{noise!r} on the console:\n" + "\n".join(ln for ln in lines if noise in ln)[:2000]
    found = summary_lines(out)
    assert sorted(found) == sorted(STAGES) and all(len(v) == 1 for v in found.values()), found
    for phase in ("Prefect: API http://127.0.0.1:", "data: train 24, val 8 images", "Ray: local, 1 node(s)"):
        assert sum(phase in ln for ln in lines) == 1, (phase, out)
    rest = [ln for ln in lines if not is_progress_line(ln)]
    assert len(rest) <= 40, f"{len(rest)} lines:\n{out}"
    log = log_path_of(out)
    assert log.parent == Path(reference_run["config"]).parent / "logs"
    text = log.read_text()
    # what was taken off the console is in the log, with its source
    assert re.search(r"\(RayTrainWorker pid=\d+ ip=[\d.]+\) \| ", text)
    assert re.search(r"\(TrainController pid=\d+ ip=[\d.]+\) \| ", text)
    assert re.search(r"\(_shard_fn pid=\d+ ip=[\d.]+\) \| ", text) or "stage crf_labels: 24/24 images" in text
    assert "prefect.flow_runs INFO | Beginning flow run" in text
    assert "\x1b[" not in text


def test_run_logs_stay_in_the_prefect_ui(reference_run, prefect_server):
    """Prefect's run logs (and our summary lines) reach the API at INFO: the UI shows them."""
    runs = prefect_api.flow_runs(prefect_server, "rca-pipeline")
    mine = [r for r in runs if prefect_api.created_ts(r) >= reference_run["t0"] - 1]
    assert mine, runs[:1]
    r = httpx.post(f"{prefect_server}/logs/filter", timeout=30,
                   json={"logs": {"flow_run_id": {"any_": [mine[-1]["id"]]}}, "limit": 200})
    r.raise_for_status()
    messages = [m["message"] for m in r.json()]
    assert any(m.startswith("Beginning flow run") for m in messages), messages[:5]
    assert any(re.match(r"^seg_eval\s+ran\s", m) for m in messages), messages


def _run_in_pty(args: list[str], env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run a command with a terminal (120 columns) as its stdin/stdout/stderr; returns (rc, raw output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True)
    os.close(slave)
    buf = b""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command closed the terminal (exited)
                    break
                if not chunk:
                    break
                buf += chunk
            elif p.poll() is not None:
                break
        else:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"{args} still running after {timeout:.0f} s:\n{buf.decode(errors='replace')[-3000:]}")
        rc = p.wait(timeout=60)
    finally:
        os.close(master)
    return rc, buf.decode(errors="replace").replace("\r\n", "\n")


def test_stage_in_a_terminal_live_line_and_verbose(reference_run, prefect_server, tmp_path):
    """`rca stage crf_labels --verbose` in a terminal: a live line redrawn in place (images, rate, ETA; rich's
    live display: carriage return, erase line) that ends as the summary line; --verbose shows Ray worker
    output and Prefect's logs live."""
    from rca_core.config import load_config

    assert reference_run["rc"] == 0
    cfg_path = write_config(tmp_path / "tty")
    copy_stages(load_config(reference_run["config"]), load_config(cfg_path), ["cam_train", "memory_build", "cam_infer"])
    env = {**os.environ, "PREFECT_API_URL": prefect_server, **slowdown_env(tmp_path, image_delay=0.2), "TERM": "xterm"}
    rc, raw = _run_in_pty([RCA, "stage", "crf_labels", "-c", str(cfg_path), "--no-with-upstream", "--verbose"], env)
    shown = screen(raw)
    assert rc == 0, "\n".join(shown[-60:])
    assert re.search(r"\r(\x1b\[2K)?crf_labels\s+\[[#.]+\] \d+/24 images\s+\d+%", raw), raw[-3000:]
    assert re.search(r"crf_labels\s+\[[#.]+\] \d+/24 images .*ETA \d+:\d\d", raw)
    assert not any(ln.startswith("crf_labels ") for ln in shown), "the live line is gone at the end"
    found = summary_lines("\n".join(shown))
    assert list(found) == ["crf_labels"] and "24/24 images" in found["crf_labels"][0], shown[-30:]
    assert any(ln.startswith("[prefect.flow_runs] INFO: ") for ln in shown)
    log = log_path_of("\n".join(shown))
    # every line that Ray workers wrote (in the log, by source) was also shown live, once, without colours
    worker_lines = re.findall(r"^\S+ (\(\w+ pid=\d+ ip=[\d.]+\)) \| (.+)$", log.read_text(), re.M)
    for src, text in worker_lines:
        if not text.startswith("(last line repeated"):  # the log folds repeats; the console shows each
            assert f"{src} {text}" in shown, (src, text)
    assert "\x1b[36m" not in raw

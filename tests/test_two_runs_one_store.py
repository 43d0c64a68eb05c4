"""Two runs on one store, as when two people press Run on one deployment or a retry starts while the first driver
is alive: each stage is computed once (the other run waits for its lease and finds it complete), the outputs are
those of a single run, and the two commands, started from one directory, share one local Prefect server. A driver
killed with -9 leaves a lease that the next run takes over once it expires."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RCA, write_config
from test_orchestration import per_image_outputs
from harness.slowdown import slowdown_env

pytestmark = pytest.mark.slow
STAGES = ["cam_train", "memory_build", "cam_infer"]


def _rca(args, cwd, extra_env=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the commands start their own server
    return subprocess.Popen([RCA, *args], cwd=cwd, env={**env, **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _manifest_rows(cfg_path, stage):
    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    cfg = load_config(cfg_path)
    return ArtifactStore(cfg.store).stage(stage, plan(cfg)[stage].fingerprint).manifest().to_pylist()


def test_two_runs_at_once_compute_each_stage_once(tmp_path, reference_run):
    cfg_path = write_config(tmp_path / "shared")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home = tmp_path / "prefect-home"
    args = ["run", "-c", str(cfg_path), "--stage", "cam_infer", "--prefect-home", str(home)]
    first = _rca(args, cwd)
    time.sleep(10)  # the second one starts while the first computes
    second = _rca(args, cwd)
    out1, _ = first.communicate(timeout=900)
    out2, _ = second.communicate(timeout=900)
    assert first.returncode == 0, out1[-3000:]
    assert second.returncode == 0, out2[-3000:]
    # one Prefect server for both: the second found the first's
    assert "already running (another command started it)" in out2, out2[:2000]
    assert not (home / "server.json").exists(), "the last command out stops the shared server"
    # every stage computed by one run only: the other one waited for its lease, then found it complete
    for stage in STAGES:
        ran = [o for o in (out1, out2) if f"] {stage:<15} ran" in o]
        assert len(ran) == 1, (stage, out1[-2000:], out2[-2000:])
    assert "waiting for another run that computes it" in out1 + out2
    for stage in ("memory_build", "cam_infer"):
        rows = _manifest_rows(cfg_path, stage)
        assert sorted(r["image_id"] for r in rows if r["status"] == "done") == sorted({r["image_id"] for r in rows})
    assert reference_run["rc"] == 0
    assert per_image_outputs(cfg_path, ["memory_build", "cam_infer"]) == \
        per_image_outputs(reference_run["config"], ["memory_build", "cam_infer"])


def test_the_lease_of_a_killed_driver_is_taken_over_after_it_expires(tmp_path):
    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    cfg_path = write_config(tmp_path / "killed", lease={"ttl_s": 6.0})
    cfg = load_config(cfg_path)
    cam = ArtifactStore(cfg.store).stage("cam_train", plan(cfg)["cam_train"].fingerprint)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["run", "-c", str(cfg_path), "--stage", "cam_train", "--prefect-home", str(tmp_path / "home")]
    first = _rca(args, cwd, slowdown_env(tmp_path, epoch_delay=30))  # holds cam_train's lease for a while
    deadline = time.time() + 300
    lease = Path(cfg.store) / cam.key / "_lease.json"
    while not lease.exists():
        assert time.time() < deadline and first.poll() is None, (first.stdout.read() or "")[-3000:]
        time.sleep(0.2)
    holder = json.loads(lease.read_text())
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray: the lease stays behind
    first.wait(timeout=60)
    t0 = time.time()
    second = _rca(args, cwd)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    # it waited for the lease while it was valid (if it got there in time), and took it over once it had expired
    import re

    took = re.search(rf"took over the lease of run {re.escape(holder['run_id'])} .*no heartbeat for (\d+) s", out)
    assert took and int(took.group(1)) >= 6, out[-3000:]
    assert cam.is_complete() and not lease.exists()

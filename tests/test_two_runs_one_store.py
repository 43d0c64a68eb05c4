"""Two runs on one store, as when two people press Run on one deployment or a retry starts while the first driver
is alive: each stage is computed once (the other run waits for its lease and finds it complete), the outputs are
those of a single run, and the two commands, started from one directory, share one local Prefect server. (A
driver killed with -9: tests/test_orchestration.py::test_resume_after_kill9_mid_stage, whose re-run takes over
the dead run's lease at once; an expired lease: tests/test_store_lease.py.)"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import RCA, write_config
from test_orchestration import per_image_outputs

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

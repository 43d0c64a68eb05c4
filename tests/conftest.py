"""Shared fixtures: environment for offline Prefect/Ray, tiny configs in temp dirs, a real Prefect server."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# No network here, no token auth on loopback; set before anything imports prefect or ray.
for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PREFECT_CLI_PROMPT": "false",
             "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)


def write_config(path: Path, base: str = "tiny", **overrides) -> Path:
    """A copy of configs/{base}.yaml with store/data under `path` and nested overrides applied."""
    from rca_core.config.base import deep_update

    data = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    data["store"] = str(path / "store")
    data["data"]["root"] = str(path / "data")
    data = deep_update(data, overrides)
    path.mkdir(parents=True, exist_ok=True)
    out = path / "config.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture
def tiny_config(tmp_path):
    return write_config(tmp_path / "run")


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory):
    """One generated tiny demo data set shared by the session's pipeline tests."""
    return tmp_path_factory.mktemp("tiny_data")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 for the session; PREFECT_API_URL points at it."""
    from flows.prefect_server import local_prefect_server

    home = tmp_path_factory.mktemp("prefect_home")
    with local_prefect_server(home) as api:
        yield api


RCA = str(Path(sys.executable).with_name("rca"))


def rca_run(config: Path, api: str, extra_env: dict | None = None, args: list[str] | None = None):
    """`rca run` as a user starts it, in its own process group (so a test can kill -9 all of it)."""
    import subprocess

    env = {**os.environ, "PREFECT_API_URL": api, **(extra_env or {})}
    return subprocess.Popen([RCA, "run", "-c", str(config), *(args or [])], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="session")
def reference_run(prefect_server, tmp_path_factory):
    """One uninterrupted pipeline run of the tiny config through `rca run` (Prefect server + local Ray),
    shared by the orchestration and UI tests."""
    import time

    cfg = write_config(tmp_path_factory.mktemp("reference"))
    t0 = time.time()
    p = rca_run(cfg, prefect_server)
    stdout, _ = p.communicate(timeout=1200)
    return {"config": cfg, "stdout": stdout, "rc": p.returncode, "t0": t0}


def copy_stages(src_cfg, dst_cfg, stages: list[str]) -> None:
    """Copy finished stages (same fingerprints) from one store to another: a head start for a test."""
    import shutil

    from rca_core.stages.planning import plan

    src, dst = Path(src_cfg.store), Path(dst_cfg.store)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "zarr.json", dst / "zarr.json")
    plans = plan(src_cfg)
    for name in stages:
        shutil.copytree(src / plans[name].key, dst / plans[name].key)
        shutil.copy(src / name / "zarr.json", dst / name / "zarr.json")


def pytest_configure(config):
    """Known-harmless warnings, kept out of the test run's console (`bash scripts/test.sh`); each with why."""
    for spec in (
        # a reliability test damages a store on purpose; zarr notes the half-written entry it then skips
        "ignore:Object at .* is not recognized as a component of a Zarr hierarchy:UserWarning",
        # a test reads the value of a tensor that requires grad, on purpose, to compare it with the plain mean
        "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning",
    ):
        config.addinivalue_line("filterwarnings", spec)

"""Slowing the pipeline down for a test from outside its code (tests/harness/slow_site/sitecustomize.py).

    env = slowdown_env(tmp_path, image_delay=0.5)      # for `rca run` (its local Ray workers inherit it)
    set_delays(env, image_delay=0)                     # change or end the delays while processes run
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SITE = Path(__file__).with_name("slow_site")


def slowdown_env(where: str | os.PathLike, image_delay: float = 0.0, epoch_delay: float = 0.0) -> dict[str, str]:
    """Environment variables that slow every Python process started with them: `image_delay` seconds after
    each image of a per-image stage, `epoch_delay` after each training checkpoint."""
    path = Path(where) / "slowdown.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {"RCA_TEST_SLOWDOWN": str(path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)}
    set_delays(env, image_delay, epoch_delay)
    return env


def set_delays(env: dict[str, str], image_delay: float = 0.0, epoch_delay: float = 0.0) -> None:
    Path(env["RCA_TEST_SLOWDOWN"]).write_text(json.dumps({"image_delay": image_delay, "epoch_delay": epoch_delay}))

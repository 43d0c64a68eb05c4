"""scripts/readme_figures.py: README's figures block comes from run summaries (`rca run` writes them)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "readme_figures.py"


def summary(path, cam=0.7941, seg=0.764):
    stages = [{"stage": "cam_eval", "status": "ran", "seconds": 7.2, "miou": cam, "scored_on": "train, 16 images"},
              {"stage": "random_walk", "status": "ran", "seconds": 47.0, "miou_all": 0.881,
               "scored_on": "train, 16 images"},
              {"stage": "seg_eval", "status": "ran", "seconds": 12.0, "miou": seg, "scored_on": "val, 4 images"}]
    path.write_text(json.dumps({"name": "demo", "config": "configs/demo.yaml", "set": [], "seconds": 1171.0,
                                "stages": stages, "finished": "2026-12-02 15:15:44", "cpus": 2}))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_block_is_rewritten_from_two_agreeing_runs(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- figures:begin -->\nOLD-FIGURES\n<!-- figures:end -->\ntail\n")
    a, b = summary(tmp_path / "a.json"), summary(tmp_path / "b.json")
    res = run(a, b, "--readme", readme)
    assert res.returncode == 0, res.stderr
    text = readme.read_text()
    assert "OLD-FIGURES" not in text and text.endswith("tail\n") and text.startswith("# x\n")
    assert "| cam_eval | CAM mIoU (best background threshold) | 0.7941 / 0.7941 | train, 16 images |" in text
    assert "| seg_eval | segmenter mIoU (the config's seg_eval protocol) | 0.7640 / 0.7640 | val, 4 images |" in text
    assert "same figures" in text and "19.5 min / 19.5 min" in text


def test_runs_that_differ_are_said_to_differ(tmp_path):
    a, b = summary(tmp_path / "a.json"), summary(tmp_path / "b.json", seg=0.7641)
    res = run(a, b, "--print")
    assert res.returncode == 1
    assert "**The runs differ**" in res.stdout and "0.7640 / 0.7641" in res.stdout

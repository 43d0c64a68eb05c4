"""The `rca` command line as a user runs it (subprocesses)."""
import shutil
import subprocess
import sys
from pathlib import Path

RCA = str(Path(sys.executable).with_name("rca"))


def rca(*args, cwd=None):
    return subprocess.run([RCA, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_commands():
    r = rca("--help")
    assert r.returncode == 0
    for cmd in ["data", "config", "run", "stage", "serve", "predict", "report"]:
        assert cmd in r.stdout


def test_make_demo_then_check_ok_and_damaged(tmp_path):
    d = tmp_path / "demo"
    r = rca("data", "make-demo", "--out", d, "--n-train", 8, "--n-val", 4, "--size", 48)
    assert r.returncode == 0, r.stderr
    r = rca("data", "check", d)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    victim = sorted((bad / "JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    with open(bad / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write("../escape\n")
    r = rca("data", "check", bad)
    assert r.returncode != 0
    assert victim.stem in r.stdout and "../escape" in r.stdout


def test_config_errors_exit_2_naming_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cam:\n  train:\n    epochz: 3\n")
    r = rca("config", "show", "-c", p)
    assert r.returncode == 2 and "cam.train.epochz" in r.stderr

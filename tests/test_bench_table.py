"""scripts/bench_table.py: docs/benchmarks.md is generated from the benchmarks' result records (no benchmark runs).

Also checks the bench/ layout the table rests on: one entry point per subject whose --help lists the benchmarks the
records know, no entry point imported by another module, the test harness reached through bench/_lib/harness.py only.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench._lib import records  # noqa: E402

SCRIPT = ROOT / "scripts" / "bench_table.py"


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write_three(folder):
    """A met goal, an unmet one (with a goal shown but not counted), and no goal."""
    met = records.Result("Speed-up of something", [{"stage": "a", "speedup": 1.9123}, {"stage": "b", "speedup": 2.0}],
                         goals=[records.goal("speed-up >= 1.8x", 1.912, True)], headline={"speed-up": 1.912},
                         notes="Measured on a quiet machine.")
    unmet = records.Result("Time against files", [{"layout": "x|y", "ratio": 2.843}],
                           goals=[records.goal("time <= 1.5x", 2.843, False),
                                  records.goal("other dtype <= 1.5x", 7.5, False, counts=False)],
                           headline={"time ratio": 2.843}, extra_tables=[{"title": "History", "rows": [{"v": 1}]}])
    none = records.Result("A table without a goal", [{"path": "p", "ms": 0.5}], headline={"ms": 0.5})
    common = dict(date="2026-12-06 04:53 UTC", commit="abc1234", load="load average 3 at the start, 4 at the end")
    paths = [records.write_record(records.make_record("stages", "scaling", met, command="python bench/stages.py "
                                                      "scaling --images 400 --note 'a quiet machine' --json o.json",
                                                      **common), folder),
             records.write_record(records.make_record("store", "vs-npy", unmet, command="python bench/store.py vs-npy",
                                                      note="machine shared with two test runs", **common), folder),
             records.write_record(records.make_record("store", "s3-client-cpu", none, command="python bench/store.py "
                                                      "s3-client-cpu", variant="small", **common), folder)]
    return paths


def test_table_from_records_met_unmet_and_no_goal(tmp_path):
    results, out = tmp_path / "results", tmp_path / "benchmarks.md"
    paths = write_three(results)
    assert [p.name for p in paths] == ["stages.scaling.json", "store.vs-npy.json", "store.s3-client-cpu.small.json"]
    res = run("--results", results, "--out", out)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n") and "generated** by `python scripts/bench_table.py`" in text
    table = text[text.index("## All benchmarks"):text.index("## stages")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| [")]
    assert len(rows) == 3
    assert rows[0].startswith("| [stages scaling](#stages-scaling) | speed-up >= 1.8x | met | speed-up 1.912 | "
                              "2026-12-06 |")
    assert rows[0].endswith("| `python bench/stages.py scaling --images 400` |")  # the table: no --note, --json
    assert "`python bench/stages.py scaling --images 400 --note 'a quiet machine' --json o.json`" in text  # section
    assert "| [store vs-npy](#store-vs-npy) | time <= 1.5x | **NOT met** | time ratio 2.843 |" in rows[1]
    assert "| [store s3-client-cpu (small)](#store-s3-client-cpu-small) | - | no goal | ms 0.5 |" in rows[2]
    # one section per record, in entry-point order, with its table, goals, extra tables and notes
    assert text.index('<a id="stages-scaling">') < text.index('<a id="store-vs-npy">') < \
        text.index('<a id="store-s3-client-cpu-small">')
    assert "| a | 1.912 |" in text and "| x\\|y | 2.843 |" in text  # floats to 4 digits, '|' escaped
    assert "- goal: time <= 1.5x - measured 2.843 - **NOT met**" in text
    assert "- goal: other dtype <= 1.5x - measured 7.5 - not met, shown only" in text
    assert "History:" in text and "machine shared with two test runs" in text and "Measured on a quiet machine." in text
    assert "load average 3 at the start, 4 at the end" in text


def test_regeneration_is_stable_and_check_sees_changes(tmp_path):
    results, out = tmp_path / "results", tmp_path / "benchmarks.md"
    write_three(results)
    assert run("--results", results, "--out", out).returncode == 0
    first = out.read_bytes()
    assert run("--results", results, "--out", out).returncode == 0
    assert out.read_bytes() == first
    assert run("--results", results, "--out", out, "--check").returncode == 0
    rec_path = results / "stages.scaling.json"
    rec = json.loads(rec_path.read_text())
    rec["headline"] = {"speed-up": 1.5}
    rec_path.write_text(records.dumps(rec))
    res = run("--results", results, "--out", out, "--check")
    assert res.returncode == 1 and "is not what the 3 records" in res.stderr
    assert out.read_bytes() == first  # --check writes nothing


def test_a_bad_record_is_named(tmp_path):
    results = tmp_path / "results"
    write_three(results)
    bad = json.loads((results / "store.vs-npy.json").read_text())
    bad["met"] = None  # a goal without met
    (results / "store.vs-npy.json").write_text(json.dumps(bad))
    res = run("--results", results, "--out", tmp_path / "b.md")
    assert res.returncode == 2 and "store.vs-npy.json" in res.stderr and "goal and met" in res.stderr
    (results / "store.vs-npy.json").write_text(json.dumps({**bad, "met": False, "benchmark": "s3"}))
    res = run("--results", results, "--out", tmp_path / "b.md")
    assert res.returncode == 2 and "store.s3.json" in res.stderr  # the file name must say what it holds


def test_committed_table_is_generated_from_committed_records():
    res = run("--check")
    assert res.returncode == 0, res.stderr + res.stdout


def test_entry_points_list_their_benchmarks():
    for subject, names in records.BENCHMARKS.items():
        res = subprocess.run([sys.executable, str(ROOT / "bench" / f"{subject}.py"), "--help"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        listed = re.findall(r"^    (\S+)", res.stdout[res.stdout.index("BENCHMARK\n"):], re.M)
        assert tuple(listed) == names, (subject, listed)


def _imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_bench_layout():
    """No bench module imports an entry point; only bench/_lib/harness.py reaches into tests/ (the harness package,
    the VOC-size test's writers)."""
    assert {p.stem for p in (ROOT / "bench").glob("*.py")} == set(records.SUBJECTS)
    for p in sorted((ROOT / "bench").rglob("*.py")):
        tree = ast.parse(p.read_text())
        mods = _imports(tree)
        entry_points = {m for m in mods if m.split(".")[-1] in records.SUBJECTS
                        and m.startswith(("bench", *records.SUBJECTS))}
        assert not entry_points, (p, entry_points)
        if p.name != "harness.py":
            assert not {m for m in mods if m.startswith(("harness", "test_", "tests"))}, (p, mods)
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "tests"], p

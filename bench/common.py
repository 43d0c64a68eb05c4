"""Shared helpers for bench/ scripts: timing, peak memory, tables appended to docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"


def goal(description: str, measured, met: bool) -> dict:
    return {"goal": description, "measured": measured, "met": bool(met)}


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report(title: str, rows: list[dict], result: dict, json_path: str | None, notes: str = "",
           append: bool = True) -> None:
    """Print the table, write the JSON, append a section (with the command line) to docs/benchmarks.md."""
    table = markdown_table(rows)
    goals = [v for v in result.values() if isinstance(v, dict) and "met" in v]
    goal_lines = "\n".join(f"- goal: {g['goal']} - measured {g['measured']} - **{'met' if g['met'] else 'NOT met'}**"
                           for g in goals)
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    section = (f"\n## {title}\n\n`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()})\n\n"
               f"{table}\n" + (f"\n{goal_lines}\n" if goal_lines else "") + (f"\n{notes}\n" if notes else ""))
    print(section)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    if append:
        BENCH_DOC.parent.mkdir(parents=True, exist_ok=True)
        if not BENCH_DOC.exists():
            BENCH_DOC.write_text("# Benchmarks\n\nEvery table below was produced by the command above it on "
                                 "this project's 2-core CPU machine unless it says otherwise.\n")
        with BENCH_DOC.open("a") as f:
            f.write(section)


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t

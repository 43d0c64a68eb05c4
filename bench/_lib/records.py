"""Result records: what a benchmark run leaves behind, one JSON file per benchmark (its latest result).

A benchmark returns a `Result` (its table rows, goals, headline figures, notes, the full details); the entry
point adds where and how it ran (`make_record`) and writes `bench/results/<subject>.<benchmark>[.<variant>].json`
(`write_record`), replacing the previous result of that benchmark. scripts/bench_table.py turns the records into
docs/benchmarks.md with `render_section` and `markdown_table` from this module. Standard library only: the
generator imports this module without torch or Ray.

A record (SCHEMA 1) holds:
- subject, benchmark, variant (null or a named setting kept beside the default one, e.g. "384px"), title;
- goal (the text of the goals that decide `met`, null when the benchmark has none), met (true / false / null),
  goals (every goal with its measured value; `counts: false` for the ones shown but not deciding `met`);
- headline: the figure(s) the summary table shows, {label: value};
- date (UTC), commit (the checkout's HEAD, "+ uncommitted changes" when its tracked files differed), machine,
  load (load average at the start and the end), command (exactly as typed, from the repository root);
- rows (the benchmark's table), extra_tables ([{title, rows}]), notes (markdown: what limits it, how to read it);
- source: null for a run of the entry point; for a figure transcribed from the old append-only log, where
  it was found (its date, command and commit are the original run's), and `rerun`: the same measurement with
  today's entry point;
- details: everything else the run measured (per-repeat times, CPU accounting, ...), not rendered.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT, machine

SCHEMA = 1
RESULTS = ROOT / "bench" / "results"
SUBJECTS = ("stages", "peer", "pipeline", "quality", "store")  # the entry points, in the order the table lists them
# each entry point's benchmarks in the order it lists them (bench/_lib/cli.Subject checks its list against this)
BENCHMARKS = {"stages": ("throughput", "scaling", "nodes", "ray-data", "voc-cost", "cam-sources", "growth"),
              "peer": ("irn",),
              "pipeline": ("overhead", "resume", "prefect-load"),
              "quality": ("cam-ablation", "refine", "segmenter", "workers", "precision"),
              "store": ("vs-npy", "s3", "s3-client-cpu")}
REQUIRED = ("schema", "subject", "benchmark", "variant", "title", "goal", "met", "headline", "goals", "date",
            "commit", "machine", "command", "rows", "notes", "source")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def goal(text: str, measured, met: bool, counts: bool = True) -> dict:
    """One goal: its text, the measured value, met or not; `counts=False`: shown, but not part of `met`."""
    return {"goal": text, "measured": measured, "met": bool(met), "counts": bool(counts)}


@dataclass
class Result:
    """What a benchmark function returns."""

    title: str
    rows: list[dict]
    goals: list[dict] = field(default_factory=list)
    goal_text: str | None = None  # the goal in short for the summary table (default: the deciding goals' texts)
    headline: dict = field(default_factory=dict)
    notes: str = ""
    extra_tables: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def overall(goals: list[dict]) -> tuple[str | None, bool | None]:
    """(goal text, met) of the goals that count; (None, None) when there is none."""
    deciding = [g for g in goals if g.get("counts", True)]
    if not deciding:
        return None, None
    return "; ".join(g["goal"] for g in deciding), all(bool(g["met"]) for g in deciding)


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: `python bench/<subject>.py <benchmark> ...`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(ROOT))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def git_commit() -> str:
    """HEAD of this checkout, "+ uncommitted changes" when tracked files (other than the records and the table
    they generate) differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results",
                    ":!docs/benchmarks.md")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def make_record(subject: str, benchmark: str, result: Result, *, command: str, variant: str | None = None,
                note: str = "", date: str | None = None, commit: str | None = None, load: str | None = None,
                source: str | None = None) -> dict:
    """The record of one run (or, with `source`, of a figure transcribed from elsewhere)."""
    for what, name in (("subject", subject), ("benchmark", benchmark), ("variant", variant)):
        if name is not None and not _NAME.match(name):
            raise ValueError(f"{what} {name!r}: lower-case letters, digits, '-' and '_' only")
    text, met = overall(result.goals)
    if result.goal_text and text is not None:
        text = result.goal_text
    notes = result.notes.strip()
    if note:
        notes = (notes + "\n\n" if notes else "") + note.strip()
    return {"schema": SCHEMA, "subject": subject, "benchmark": benchmark, "variant": variant, "title": result.title,
            "goal": text, "met": met, "headline": dict(result.headline), "goals": list(result.goals),
            "date": date or utc_now(), "commit": commit or git_commit(), "machine": machine(), "load": load,
            "command": command, "rows": list(result.rows), "extra_tables": list(result.extra_tables),
            "notes": notes, "source": source, "rerun": None, "details": result.details}


def slug(text: str) -> str:
    """A variant name from free text: lower-case letters, digits and '-'."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def record_name(subject: str, benchmark: str, variant: str | None = None) -> str:
    return f"{subject}.{benchmark}" + (f".{variant}" if variant else "") + ".json"


def _jsonable(obj):
    """NaN and infinities as null (JSON has none), tuples as lists, anything else as its str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


def dumps(record: dict) -> str:
    return json.dumps(_jsonable(record), indent=1, ensure_ascii=False) + "\n"


def write_record(record: dict, results_dir: str | Path = RESULTS) -> Path:
    problems = validate(record)
    if problems:
        raise ValueError("invalid record: " + "; ".join(problems))
    path = Path(results_dir) / record_name(record["subject"], record["benchmark"], record.get("variant"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(record))
    return path


def load_records(results_dir: str | Path = RESULTS) -> list[dict]:
    """Every record of the folder, checked (ValueError naming the file and what is wrong)."""
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e})") from None
        problems = validate(rec)
        expected = record_name(rec.get("subject", "?"), rec.get("benchmark", "?"), rec.get("variant"))
        if not problems and p.name != expected:
            problems.append(f"its file name should be {expected}")
        if problems:
            raise ValueError(f"{p}: " + "; ".join(problems))
        out.append(rec)
    return out


def validate(rec: dict) -> list[str]:
    """What is wrong with a record (empty: nothing)."""
    if not isinstance(rec, dict):
        return ["a record is a JSON object"]
    problems = [f"missing {k!r}" for k in REQUIRED if k not in rec]
    if problems:
        return problems
    if rec["schema"] != SCHEMA:
        problems.append(f"schema {rec['schema']!r}, expected {SCHEMA}")
    for k in ("subject", "benchmark"):
        if not isinstance(rec[k], str) or not _NAME.match(rec[k]):
            problems.append(f"{k} {rec[k]!r}: lower-case letters, digits, '-' and '_' only")
    if rec["variant"] is not None and (not isinstance(rec["variant"], str) or not _NAME.match(rec["variant"])):
        problems.append(f"variant {rec['variant']!r}: null or lower-case letters, digits, '-' and '_'")
    if rec["met"] not in (True, False, None):
        problems.append(f"met must be true, false or null, not {rec['met']!r}")
    if (rec["goal"] is None) != (rec["met"] is None):
        problems.append("goal and met are both null (no goal) or both set")
    if not isinstance(rec["headline"], dict):
        problems.append("headline is an object {label: value}")
    if not isinstance(rec["rows"], list) or not all(isinstance(r, dict) for r in rec["rows"]):
        problems.append("rows is a list of objects")
    for k in ("title", "date", "commit", "machine", "command"):
        if not isinstance(rec[k], str) or not rec[k]:
            problems.append(f"{k} is a non-empty string")
    return problems


# ----------------------------------------------------------------------------------------- rendering
def fmt(v) -> str:
    """A table cell: floats to 4 significant digits, None empty, '|' escaped."""
    if isinstance(v, bool) or v is None:
        s = "" if v is None else str(v)
    elif isinstance(v, float):
        s = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        s = ", ".join(fmt(x) for x in v)
    elif isinstance(v, dict):
        s = ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return ""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(fmt(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def met_word(met: bool | None) -> str:
    return "no goal" if met is None else ("met" if met else "**NOT met**")


def headline_text(rec: dict) -> str:
    return "; ".join(f"{k} {fmt(v)}" for k, v in rec["headline"].items())


def order_key(rec: dict) -> tuple:
    """Entry points in SUBJECTS order, their benchmarks in BENCHMARKS order, the default setting before variants;
    records of other subjects (measurements outside bench/) after them."""
    subj, bench = rec["subject"], rec["benchmark"]
    names = BENCHMARKS.get(subj, ())
    return (SUBJECTS.index(subj) if subj in SUBJECTS else len(SUBJECTS), subj,
            names.index(bench) if bench in names else len(names), bench, rec.get("variant") or "")


def anchor(rec: dict) -> str:
    return record_name(rec["subject"], rec["benchmark"], rec.get("variant"))[:-5].replace(".", "-")


def rerun_command(rec: dict) -> str:
    """The command that measures this again today (the record's own, or for a transcribed one its `rerun`), without
    the options that only say where the output goes or add a remark (--note, --json, --results): the table shows
    this; the section shows the command exactly as it ran."""
    cmd = rec.get("rerun") or rec["command"]
    try:
        words = shlex.split(cmd)
    except ValueError:
        return cmd
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in ("--note", "--json", "--results"):
            skip = True
        elif not w.startswith(("--note=", "--json=", "--results=")):
            out.append(w)
    return shlex.join(out) if out != words else cmd


def render_section(rec: dict, level: int = 2) -> str:
    """One benchmark's section: title, how it ran, goals, its table, extra tables, notes."""
    name = f"{rec['subject']} {rec['benchmark']}" + (f" ({rec['variant']})" if rec.get("variant") else "")
    out = [f'<a id="{anchor(rec)}"></a>', f"{'#' * level} {rec['title']}", "", f"`{rec['command']}`", ""]
    line = (f"{name}: {rec['date']}, commit {rec['commit']}, {rec['machine']}"
            + (f", {rec['load']}" if rec.get("load") else "") + ".")
    if rec.get("source"):
        line += f" Transcribed from the {rec['source']}"
        line += f"; re-run today with `{rec['rerun']}`." if rec.get("rerun") else "."
    out.append(line)
    if rec["goals"]:
        out.append("")
        for g in rec["goals"]:
            tag = ("**met**" if g["met"] else "**NOT met**") if g.get("counts", True) else \
                ("met" if g["met"] else "not met") + ", shown only"
            out.append(f"- goal: {g['goal']} - measured {fmt(g['measured'])} - {tag}")
    if rec["rows"]:
        out += ["", markdown_table(rec["rows"])]
    for t in rec.get("extra_tables") or []:
        out += ["", f"{t['title']}:", "", markdown_table(t["rows"])]
    if rec["notes"]:
        out += ["", rec["notes"].strip()]
    return "\n".join(out) + "\n"

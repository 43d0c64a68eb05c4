"""The entry points' command line: `python bench/<subject>.py <benchmark> [options]`.

An entry point lists its benchmarks (`Benchmark`: name, one-line help, an argument adder, the function that
runs it and returns a records.Result) and calls `Subject(...).main()`. Every benchmark gets these options:

  --json PATH      also write the full result (rows, goals, every detail) here
  --note TEXT      a remark added to the record's notes (e.g. "machine shared with two test runs")
  --variant NAME   record under bench/results/<subject>.<benchmark>.<NAME>.json, beside the default setting's
                   record (a setting kept as a figure of its own). Some options imply one (stages nodes --size 384:
                   384px; pipeline overhead --images 800: 800-images; store vs-npy --dir D: dir-<D>; quality refine
                   --noisy-cams: noisy-cams; ...; the benchmark's --help says which)
  --results DIR    where the record goes (default bench/results; a smoke run can point elsewhere)
  --no-record      write no record

Hidden subcommands (a name starting with "_") are the children that some benchmarks start as processes of
their own; they are not listed by --help.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import records
from .common import load_average, setup_env


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], records.Result]
    # the record's variant implied by the options (a setting kept beside the default one), when --variant is not given
    variant: Callable[[argparse.Namespace], str | None] = lambda args: None
    implies: str = ""  # the options that imply a variant, for --help


@dataclass(frozen=True)
class Child:
    """A hidden subcommand: a process of its own started by a benchmark (`nargs` positional strings)."""

    name: str
    nargs: int
    run: Callable[..., None]


class Subject:
    def __init__(self, name: str, doc: str, benchmarks: list[Benchmark], children: list[Child] = ()):
        self.name, self.doc = name, doc
        names = tuple(b.name for b in benchmarks)
        if names != records.BENCHMARKS.get(name):
            raise RuntimeError(f"bench/{name}.py lists {names}; bench/_lib/records.BENCHMARKS[{name!r}] says "
                               f"{records.BENCHMARKS.get(name)}: keep the two in step")
        self.benchmarks = {b.name: b for b in benchmarks}
        self.children = {c.name: c for c in children}

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(prog=f"python bench/{self.name}.py", description=self.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = ap.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True,
                                title="benchmarks (python bench/%s.py BENCHMARK --help for its options)" % self.name)
        for b in self.benchmarks.values():
            p = sub.add_parser(b.name, help=b.help.replace("%", "%%"), description=(b.run.__doc__ or b.help),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            b.add_args(p)
            g = p.add_argument_group("record")
            g.add_argument("--json", default=None, help="also write the full result here")
            g.add_argument("--note", default="", help="a remark added to the record's notes")
            g.add_argument("--variant", default=None,
                           help="record as a named setting of its own (bench/results/SUBJECT.BENCHMARK.VARIANT.json)"
                                + (f"; implied here by {b.implies}" if b.implies else ""))
            g.add_argument("--results", default=str(records.RESULTS),
                           help="folder of the record (default: bench/results)")
            g.add_argument("--no-record", action="store_true", help="write no record")
        for c in self.children.values():
            p = sub.add_parser(c.name)  # no help: not listed
            p.add_argument("child_args", nargs=c.nargs)
        return ap

    def main(self, argv: list[str] | None = None) -> int:
        args = self.parser().parse_args(argv)
        setup_env()
        if args.benchmark in self.children:
            self.children[args.benchmark].run(*args.child_args)
            return 0
        command = records.command_line([sys.argv[0]] + (list(argv) if argv is not None else sys.argv[1:]))
        load0, date, commit = load_average(), records.utc_now(), records.git_commit()  # what runs: the code now
        bench = self.benchmarks[args.benchmark]
        variant = args.variant or bench.variant(args)
        result = bench.run(args)
        load = f"load average {load0:g} at the start, {load_average():g} at the end"
        rec = records.make_record(self.name, bench.name, result, command=command, variant=variant,
                                  note=args.note, date=date, commit=commit, load=load)
        print("\n" + records.render_section(rec), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(records.dumps(rec))
        if not args.no_record:
            path = records.write_record(rec, args.results)
            print(f"[bench] record written: {path} (docs/benchmarks.md: python scripts/bench_table.py)", flush=True)
        return 0


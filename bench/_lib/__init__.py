"""Shared helpers of the benchmark entry points (bench/stages.py, pipeline.py, quality.py, store.py).

- `records`  result records (one JSON file per benchmark under bench/results/) and their markdown rendering;
             scripts/bench_table.py builds docs/benchmarks.md from them
- `cli`      the entry points' command line: one subcommand per benchmark, the options every benchmark has
             (--json, --note, --variant, --results, --no-record), writing the record after a run
- `common`   paths, environment, timing, peak memory, the machine and its load
- `cpu`      CPU seconds by kind of process (/proc), and of this process or given pids
- `demo`     bench configs on the demo data set, the shared bench store, upstream stages, synthetic CAMs,
             stage subsets (first N images) through the one per-image runner
- `ray_bench` a local Ray for benches, one measured per-image stage, speed-up tables
- `procs`    child processes: a result line from a child, peak memory of a forked part, killing a process tree
- `harness`  the only way into the test harness (tests/harness: S3 server, two-node Ray cluster, slowdown
             injection; tests/test_voc_size_run.py's VOC-size tree and weight writers)

No module here imports an entry point; the entry points import these only.
"""

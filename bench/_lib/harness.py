"""The benches' only way into the test harness (tests/harness and tests/test_voc_size_run.py's writers).

- `s3_bucket(work, bucket)`: a SeaweedFS S3 server on 127.0.0.1 (tests/harness/s3_server.py) for the block,
  the standard AWS_* variables of this process pointing s3:// at it, the bucket made;
- `two_nodes(...)`: a Ray head and a second node on 127.0.0.1 (tests/harness/ray_cluster.py), node 2 in its own
  mount namespace with private tmpfs over the hidden folders, each node's processes pinned to its own cores;
- `slowdown_env` / `set_delays` (tests/harness/slowdown.py): processes started with that environment sleep
  after each image of a per-image stage (a test hook injected from outside the library);
- `voc_tree_writers()`: the VOC-size tree and random-init weight writers of tests/test_voc_size_run.py.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .common import ROOT

TESTS = ROOT / "tests"


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


@contextlib.contextmanager
def s3_bucket(work: Path, bucket: str):
    """Yield the running SeaweedS3 (its `filesystem()`, `env`, `pid`) with `bucket` made; stopped afterwards."""
    _tests_on_path()
    from harness.s3_server import SeaweedS3

    s3 = SeaweedS3(Path(work) / "s3")
    try:
        s3.start()
        os.environ.update(s3.env)  # the standard AWS_* environment alone points s3:// at the server
        s3.make_bucket(bucket)
        yield s3
    finally:
        s3.stop()


def pinned_cpu_sets(cpus_per_node: int) -> tuple[str, str]:
    """Two disjoint core lists of `cpus_per_node` cores each (head, node 2) for taskset."""
    cores = sorted(os.sched_getaffinity(0))
    k = cpus_per_node
    if len(cores) < 2 * k:
        raise SystemExit(f"pinning needs {2 * k} cores, this host offers {len(cores)}: use --no-pin")
    return ",".join(map(str, cores[:k])), ",".join(map(str, cores[k:2 * k]))


def two_nodes(work: Path, hidden_dirs: list[Path], cpus_per_node: int, env: dict, cpu_sets=None):
    """A TwoNodeCluster (not started: call .start() and .stop())."""
    _tests_on_path()
    from harness.ray_cluster import TwoNodeCluster

    return TwoNodeCluster(Path(work), hidden_dirs=hidden_dirs, head_cpus=cpus_per_node, node2_cpus=cpus_per_node,
                          env=env, cpu_sets=cpu_sets)


def slowdown_env(where: Path, image_delay: float = 0.0, epoch_delay: float = 0.0) -> dict[str, str]:
    _tests_on_path()
    from harness.slowdown import slowdown_env as env

    return env(where, image_delay=image_delay, epoch_delay=epoch_delay)


def set_delays(env: dict[str, str], image_delay: float = 0.0, epoch_delay: float = 0.0) -> None:
    _tests_on_path()
    from harness.slowdown import set_delays as set_

    set_(env, image_delay=image_delay, epoch_delay=epoch_delay)


def voc_tree_writers():
    """(write_voc_tree, write_random_init_weights) of tests/test_voc_size_run.py."""
    _tests_on_path()
    from test_voc_size_run import write_random_init_weights, write_voc_tree

    return write_voc_tree, write_random_init_weights

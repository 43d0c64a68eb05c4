"""Fail fast when a stage asks for more than the Ray cluster holds.

Ray queues a request that no node can meet and waits for it forever (a training stage's worker group, or an
actor wider than any node): a run of configs/voc12.yaml (4 training workers) on a 2-CPU machine would sit at
cam_train without a word. Before a run starts its first stage, every stage it will compute (those not already
complete in the store) is checked against the alive nodes' total resources:

- a training stage: `ray.num_workers` workers at once, each with `ray.train_cpus_per_worker` (or
  `ray.cpus_per_worker`) CPUs and, where the stage uses a GPU, `ray.gpus_per_worker` GPUs (auto: 1 where the
  cluster has GPUs); a worker must fit on one node;
- a per-image stage: one actor of `ray.cpus_per_worker` CPUs (+ GPUs) must fit on one node (the pool takes as
  many actors as the cluster holds).

A stage that does not fit fails the run within seconds with every such stage, the config keys behind its request
and what the cluster has. An autoscaling cluster (KubeRay, `ray up` with min_workers below max) grows on demand:
`ray.resource_wait_s` > 0 asks its autoscaler for the missing bundles and waits that long for nodes to join.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rca_core.config import RunConfig
from rca_core.stages import registry
from rca_core.stages.planning import plan
from rca_core.store import ArtifactStore

from . import actor_pool, console, remote


class ClusterTooSmall(RuntimeError):
    """A stage asks for more CPUs / GPUs than the Ray cluster holds."""


@dataclass(frozen=True)
class Demand:
    """`workers` bundles of `cpus` CPUs + `gpus` GPUs that a stage needs at the same time."""
    stage: str
    workers: int
    cpus: float
    gpus: float
    keys: str  # how the config asks for it, in words

    def bundles(self) -> list[dict]:
        one = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(one) for _ in range(self.workers)]


def stage_demand(name: str, cfg: RunConfig) -> Demand:
    """What stage `name` asks of the cluster under `cfg` (GPU auto mode resolved against the connected cluster)."""
    st = registry.get(name)
    gpus = actor_pool.gpus_per_worker(cfg) if st.wants_gpu(cfg) else 0.0
    gpu_key = (f" + {gpus:g} GPU (ray.gpus_per_worker{' auto' if not cfg.ray.gpus_per_worker else ''})"
               if gpus else "")
    if st.kind == "training":
        cpu_key = "ray.train_cpus_per_worker" if cfg.ray.train_cpus_per_worker else "ray.cpus_per_worker"
        cpus = remote.train_cpus(cfg)
        n = cfg.ray.num_workers
        return Demand(name, n, cpus, gpus, f"ray.num_workers {n} x ({cpus:g} CPU ({cpu_key}){gpu_key})")
    cpus = float(cfg.ray.cpus_per_worker)
    return Demand(name, 1, cpus, gpus, f"one actor of {cpus:g} CPU (ray.cpus_per_worker){gpu_key}")


def _nodes() -> list[dict]:
    """Alive nodes' total resources: [{"CPU": .., "GPU": ..}]."""
    import ray

    return [{"CPU": float(n.get("Resources", {}).get("CPU", 0)), "GPU": float(n.get("Resources", {}).get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def capacity(d: Demand, nodes: list[dict]) -> int:
    """How many of `d`'s bundles the nodes hold at once (a bundle never spans nodes)."""
    total = 0
    for n in nodes:
        k = math.floor(n["CPU"] / d.cpus + 1e-9) if d.cpus else 10 ** 6
        if d.gpus:
            k = min(k, math.floor(n["GPU"] / d.gpus + 1e-9))
        total += k
    return total


def describe_cluster(nodes: list[dict]) -> str:
    cpus, gpus = sum(n["CPU"] for n in nodes), sum(n["GPU"] for n in nodes)
    big = max(nodes, key=lambda n: (n["GPU"], n["CPU"])) if nodes else {"CPU": 0, "GPU": 0}
    return (f"{cpus:g} CPUs, {gpus:g} GPUs on {len(nodes)} node(s) (largest: {big['CPU']:g} CPUs, "
            f"{big['GPU']:g} GPUs)")


def _why(d: Demand, nodes: list[dict]) -> str:
    have = capacity(d, nodes)
    if have == 0:
        return f"{d.stage}: {d.keys}: no node holds one"
    return f"{d.stage}: {d.keys}: the cluster holds {have} at once, not {d.workers}"


def misfits(demands: list[Demand], nodes: list[dict]) -> list[Demand]:
    return [d for d in demands if capacity(d, nodes) < d.workers]


def check_cluster_fits(cfg: RunConfig, names: list[str]) -> None:
    """`require_fit` for those of `names` that are not complete in the store (a complete stage asks for nothing)."""
    store = ArtifactStore.for_config(cfg)
    plans = plan(cfg)
    require_fit(cfg, [n for n in names if not store.stage(n, plans[n].fingerprint).is_complete()])


def require_fit(cfg: RunConfig, names: list[str]) -> None:
    """Raise ClusterTooSmall naming each of the stages `names` that asks for more than the connected Ray cluster
    holds, after waiting up to `ray.resource_wait_s` for nodes to join."""
    if not names:
        return
    demands = [stage_demand(n, cfg) for n in names]
    bad = misfits(demands, _nodes())
    wait = cfg.ray.resource_wait_s
    if bad and wait > 0:
        from ray.autoscaler.sdk import request_resources

        # the largest request first: the autoscaler keeps the last one
        biggest = max(bad, key=lambda d: d.workers * (d.cpus + 100 * d.gpus))
        console.say(f"{biggest.stage}: asking the cluster's autoscaler for {biggest.keys}; waiting up to "
                    f"{wait:g} s for nodes to join (ray.resource_wait_s)")
        request_resources(bundles=biggest.bundles())
        t_end = time.monotonic() + wait
        try:
            while bad and time.monotonic() < t_end:
                time.sleep(min(2.0, max(0.0, t_end - time.monotonic())))
                bad = misfits(demands, _nodes())
        finally:
            request_resources(bundles=[])  # the stages' own requests drive the autoscaler from here on
    if bad:
        nodes = _nodes()
        lines = "\n".join(f"  - {_why(d, nodes)}" for d in bad)
        waited = (f" after waiting {wait:g} s (ray.resource_wait_s)" if wait > 0 else
                  "; for an autoscaling cluster set ray.resource_wait_s to wait for nodes to join")
        raise ClusterTooSmall(
            f"the Ray cluster is too small for this config: it has {describe_cluster(nodes)}{waited}\n{lines}\n"
            f"Lower the numbers named above (e.g. --set ray.num_workers=N) or add nodes; these stages were not started (finished ones stay in the store).")


__all__ = ["ClusterTooSmall", "Demand", "stage_demand", "capacity", "misfits", "check_cluster_fits", "require_fit"]

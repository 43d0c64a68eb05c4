"""The run's pool of Ray actors (driver side): the one module that creates, reuses, sizes and ends them.

- Actors are `tasks.remote.StageActor`s; one per slot of the cluster (all of it by default, `ray.actors`
  caps it). A pool of one resource shape (CPUs, GPUs per actor) is reused by every later per-image stage of
  that shape (the actor swaps the stage's Worker) and hosts the run's one-worker CPU training stages
  (`training_hosts`), so its processes live for the whole run; asking for another shape ends the others.
- `run_shards` hands shards to free actors; a shard whose actor was lost (its process or node died) goes to
  another actor (a few times at most), and the lost actor leaves the pool. It is not restarted in place: on a
  lost node that would wait for the node to come back.
"""
from __future__ import annotations

import collections
import math

from rca_core.config import RunConfig
from rca_core.stages import registry

from .remote import StageActor

_POOLS: dict[tuple, list] = {}  # (GCS address, job id, cpus, gpus) -> actor handles, reused across stages


def gpus_per_worker(cfg: RunConfig) -> float:
    """Configured GPUs per worker; 0 = auto: one per worker when the cluster has GPUs."""
    import ray

    if cfg.ray.gpus_per_worker > 0:
        return cfg.ray.gpus_per_worker
    return 1.0 if float(ray.cluster_resources().get("GPU", 0)) > 0 else 0.0


def stage_resources(name: str, cfg: RunConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per actor of a per-image stage: GPUs (`ray.gpus_per_worker`; auto: 1 where the cluster has
    GPUs) when its record asks for one (`ray.stage_gpus` overrides), else none."""
    gpus = gpus_per_worker(cfg) if registry.get(name).wants_gpu(cfg) else 0.0
    return float(cfg.ray.cpus_per_worker), gpus


def pool_capacity(cpus: float, gpus: float) -> int:
    """How many actors of this shape the cluster holds at once (alive nodes' totals)."""
    import ray

    res = ray.cluster_resources()
    n = math.floor(float(res.get("CPU", 0)) / cpus + 1e-9) if cpus else 10 ** 6
    if gpus:
        n = min(n, math.floor(float(res.get("GPU", 0)) / gpus + 1e-9))
    return max(1, n)


def balanced_shards(ids: list[str], shard_size: int, slots: int) -> list[list[str]]:
    """Shards of at most `shard_size` images whose count is a multiple of `slots`, sizes differing by one
    at most (contiguous, in order)."""
    if not ids:
        return []
    n = max(1, math.ceil(len(ids) / shard_size))
    n = min(len(ids), math.ceil(n / slots) * slots)
    base, extra = divmod(len(ids), n)
    out, start = [], 0
    for k in range(n):
        size = base + (1 if k < extra else 0)
        out.append(ids[start:start + size])
        start += size
    return out


def _kill(actors) -> None:
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone, or an actor of an earlier Ray session
            pass


def release_pools() -> None:
    """End every pooled actor (before a training stage needs the CPUs/GPUs, and at the end of a run)."""
    for actors in _POOLS.values():
        _kill(actors)
    _POOLS.clear()


def _pool_key(cpus: float, gpus: float) -> tuple:
    import ray

    rc = ray.get_runtime_context()
    return (rc.gcs_address, rc.get_job_id(), cpus, gpus)


def _keep_pool(key: tuple) -> list:
    """The run's pool of this shape (created empty); pools of other shapes are released."""
    for k in [k for k in _POOLS if k != key]:
        _kill(_POOLS.pop(k))
    return _POOLS.setdefault(key, [])


def _actor_cls(cpus: float, gpus: float, strategy):
    """The pool's actor class with its resources. Two calls at once (max_concurrency 2): the driver reads a
    training stage's progress while `train` runs; it never sends an actor two shards at once."""
    import ray

    return ray.remote(StageActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=2,
                                          scheduling_strategy=strategy)


def get_pool(cpus: float, gpus: float, size: int) -> list:
    """`size` actors of this shape: the run's pool (dead ones replaced, grown if needed); pools of other
    shapes are released."""
    actors = _keep_pool(_pool_key(cpus, gpus))
    alive_by_node(actors)
    cls = _actor_cls(cpus, gpus, "SPREAD")
    while len(actors) < size:
        actors.append(cls.remote())
    return actors[:size]


def grow_pool(cpus: float, gpus: float):
    """One more actor of this shape (its shard's actor was lost and no other is free)."""
    return get_pool(cpus, gpus, len(_POOLS.get(_pool_key(cpus, gpus), [])) + 1)[-1]


def alive_by_node(actors: list, wait_s: float = 30.0) -> dict[str, list]:
    """Drop from `actors` (in place) those that died since the last stage (lost node or process); the live
    ones by node id."""
    import ray

    by_node: dict[str, list] = {}
    if not actors:
        return by_node
    pings = [a.ping.remote() for a in actors]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=wait_s)
    alive = []
    for a, p in zip(actors, pings):
        try:
            if p in ready:
                by_node.setdefault(ray.get(p), []).append(a)
                alive.append(a)
        except Exception:  # noqa: BLE001 - dead
            pass
    actors[:] = alive
    return by_node


def forget_actor(actor) -> None:
    """Drop an actor from the run's pools (it was lost); the next stage starts a new one if needed."""
    for actors in _POOLS.values():
        actors[:] = [a for a in actors if a != actor]


def training_hosts(cfg: RunConfig, cpus_needed: float, wait_s: float = 60.0) -> list | None:
    """Actors of the run's CPU pool on one node that together hold `cpus_needed` CPUs (the pool grown on that
    node if needed): the first one runs a one-worker training stage, the others stay idle meanwhile, so their
    CPUs are the training's. The worker processes (torch and rca_core imported) then live for the whole run
    instead of being started again around every training stage. None when no node can hold that many of the
    pool's actors (the caller releases the pool and runs the stage as a Ray task). CPU-only training only: a
    pooled actor's GPUs are its own share, not what a training worker asks for."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = float(cfg.ray.cpus_per_worker)
    need = max(1, math.ceil(cpus_needed / cpus - 1e-9))
    actors = _keep_pool(_pool_key(cpus, 0.0))  # a pool of another shape (GPU actors) cannot host it
    by_node = alive_by_node(actors, wait_s)
    node_cpus = {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    here = ray.get_runtime_context().get_node_id()
    fits = [n for n, c in node_cpus.items() if c + 1e-9 >= need * cpus]
    if not fits:
        return None
    # the node that already has most of the pool; with no pool yet the driver's node, else any that fits
    node = max(fits, key=lambda n: (len(by_node.get(n, [])), n == here))
    hosts = by_node.get(node, [])[:need]
    missing = need - len(hosts)
    if missing and float(ray.available_resources().get("CPU", 0)) + 1e-9 < missing * cpus:
        return None
    if missing:
        cls = _actor_cls(cpus, 0.0, NodeAffinitySchedulingStrategy(node, soft=False))
        new = [cls.remote() for _ in range(missing)]
        refs = [a.ping.remote() for a in new]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        if len(ready) < len(refs):  # the node's CPUs are held by other work: do not wait for them
            _kill(new)
            return None
        actors.extend(new)
        hosts = hosts + new
    return hosts


def actor_lost(e: BaseException) -> bool:
    """Whether a Ray error means the actor (its process or node) is gone, rather than the stage's own error."""
    import ray.exceptions as rex

    lost = tuple(c for c in (getattr(rex, "RayActorError", None), getattr(rex, "ActorDiedError", None),
                             getattr(rex, "ActorUnavailableError", None), getattr(rex, "NodeDiedError", None),
                             getattr(rex, "WorkerCrashedError", None)) if c is not None)
    return isinstance(e, lost)


def run_shards(actors: list, shards: list[list[str]], call, lost: list, max_requeue: int = 3, replace=None):
    """Yield the result of every shard, each run by a free actor (`call(actor, shard, tries)`); a shard whose actor
    was lost goes back to the queue for another actor (at most `max_requeue` times); when no actor is left,
    `replace()` makes a new one; other errors (the stage's own) are raised."""
    import ray

    queue = collections.deque((shard, 0) for shard in shards)
    free = list(actors)
    in_flight: dict = {}
    while queue or in_flight:
        while queue and free:
            actor = free.pop(0)
            shard, tries = queue.popleft()
            in_flight[call(actor, shard, tries)] = (actor, shard, tries)
        if not in_flight:
            if replace is None or len(lost) > max_requeue * max(1, len(shards)):
                raise RuntimeError(f"every actor of the stage was lost ({len(lost)}); {len(queue)} shards left")
            free.append(replace())
            continue
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            actor, shard, tries = in_flight.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                if not actor_lost(e) or tries >= max_requeue:
                    raise
                lost.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                queue.appendleft((shard, tries + 1))  # the actor stays out of the pool
                continue
            free.append(actor)
            yield res


__all__ = ["gpus_per_worker", "stage_resources", "pool_capacity", "balanced_shards", "release_pools", "get_pool",
           "grow_pool", "alive_by_node", "forget_actor", "training_hosts", "actor_lost", "run_shards"]

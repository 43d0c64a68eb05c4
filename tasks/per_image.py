"""Per-image stages over a pool of Ray actors.

- One `StageActor` per slot of the cluster (all of it by default, `ray.actors` caps it); the stage's
  Worker (its models) is built once per actor and kept for every later shard of the stage; a pool of the
  same resource shape is reused by the next per-image stage of the run (the actor swaps the stage's Worker),
  and a one-worker CPU training stage runs on it too (`training_hosts`, `StageActorImpl.train`), so the
  pool's processes live for the whole run.
- Per-stage resources: stages whose module says USES_GPU (cam_infer, memory_build, seg_eval) ask for
  `ray.gpus_per_worker` GPUs per actor (fractions allowed; 0 = one per actor when the cluster has GPUs);
  the others (crf_labels, random_walk, cam_eval) ask for CPUs only.
- Shards (`ray.shard_size` images per call at most) are balanced: their count is a multiple of the pool
  size, so the last wave is not one straggler. Inside a call, the next images' inputs are read and
  decoded while the current one is computed, and writes go out behind (rca_core.stages.process_images).
- The driver lists the stage's folder once at the start; workers verify the listed images they are given (a
  finished image is kept, not recomputed; one not listed is computed without a read) and return their
  manifest rows and the stage's statistics (confusion matrices, embeddings); the driver only merges
  them: no stage reads every image on the driver.
- A lost actor (its process or its node died) is dropped and its shard goes to another actor of the pool
  (a few times at most); images it had finished are found finished there and kept. The actor is not
  restarted in place: on a lost node that would wait for the node to come back.
The driver owns all metadata (prepare, manifest parts, finalize, completion). No Prefect call happens
in a worker.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

from rca_core.config import RunConfig
from rca_core.stages import KEPT, make_context, plan, process_images, stage_module
from rca_core.store import ArtifactStore

from .preflight import preflight
from .ray_runtime import gpus_per_worker

_POOLS: dict[tuple, list] = {}  # driver: (job id, cpus, gpus) -> actor handles, reused across stages


class StageActorImpl:
    """Runs shards of any per-image stage; keeps the current stage's Worker between calls."""

    def __init__(self):
        self.key = None
        self.worker = None
        self.builds: dict[tuple, int] = {}  # stage key -> Worker builds in this process
        self._cfg_json, self._cfg = None, None

    def run(self, name: str, cfg_json: dict, store_url: str, ids: list[str], maybe_done: list[str] | None = None) -> dict:
        """One shard. `maybe_done`: the shard's ids the driver found listed in the store at the stage's start, the
        only ones verified before computing (None: verify every id, as after a lost actor)."""
        import ray
        import torch

        if cfg_json != self._cfg_json:
            self._cfg_json, self._cfg = cfg_json, RunConfig.model_validate(cfg_json)
        cfg = self._cfg
        key = (name, plan(cfg)[name].fingerprint, store_url)
        t_build, build_s = time.perf_counter(), 0.0
        if self.key != key:
            self.worker = None  # free the previous stage's models first
            torch.set_num_threads(cfg.compute.threads or max(1, int(cfg.ray.cpus_per_worker)))
            store = ArtifactStore(store_url, cfg.storage, create=False)
            ctx = make_context(name, cfg, store, generate=False)
            if ray.get_gpu_ids() and torch.cuda.is_available():
                ctx.device = torch.device("cuda")
            self.worker = stage_module(name).Worker(cfg, ctx)
            self.key = key
            self.builds[key] = self.builds.get(key, 0) + 1
            build_s = time.perf_counter() - t_build
        worker = self.worker
        delay = float(os.environ.get("RCA_FAULT_IMAGE_DELAY", "0"))  # fault-injection hook for reliability tests
        node = ray.get_runtime_context().get_node_id()
        rows = process_images(worker, ids, out=worker.ctx.out, maybe_done=None if maybe_done is None else set(maybe_done),
                              on_done=(lambda done, total: time.sleep(delay)) if delay else None)
        rows = [{**row, "node_id": node, "pid": os.getpid()} for row in rows]
        return {"rows": rows, "partial": worker.partial() if hasattr(worker, "partial") else None,
                "builds": self.builds[key], "build_seconds": build_s, "node_id": node, "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "resources": ray.get_runtime_context().get_assigned_resources()}

    def train(self, name: str, cfg_json: dict, store_url: str) -> dict:
        """A one-worker training stage in this actor's process (tasks.training.train_in_process). The pool's
        other actors on this node stay idle meanwhile: their CPUs are the training's (see training_hosts)."""
        import gc

        from tasks.training import train_in_process

        self.drop_models()  # free the last per-image stage's models; the next one builds its own
        gc.collect()
        self._progress = {"done": 0, "total": 0}

        def progress(done: int, total: int) -> None:
            self._progress = {"done": int(done), "total": int(total)}

        try:
            return train_in_process(cfg_json, name, store_url, progress)
        finally:
            gc.collect()

    def drop_models(self) -> None:
        """Forget the current stage's Worker (its models): the next shard builds the Worker of its stage anew."""
        self.worker, self.key = None, None

    def progress(self) -> dict:
        """(done, total) steps of the training stage this actor runs (read by the driver during `train`)."""
        return dict(getattr(self, "_progress", {"done": 0, "total": 0}))

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def stage_resources(name: str, cfg: RunConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per actor of a stage: GPU stages get `ray.gpus_per_worker` (auto: 1 when the cluster
    has GPUs), the CPU-only stages none."""
    cpus = float(cfg.ray.cpus_per_worker)
    gpus = gpus_per_worker(cfg.ray) if getattr(stage_module(name), "USES_GPU", False) else 0.0
    return cpus, gpus


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


def release_pools() -> None:
    """End every pooled actor (before a training stage needs the CPUs/GPUs, and at the end of a run)."""
    import ray

    for actors in _POOLS.values():
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
    _POOLS.clear()


def _pool_key(cpus: float, gpus: float) -> tuple:
    import ray

    rc = ray.get_runtime_context()
    return (rc.gcs_address, rc.get_job_id(), cpus, gpus)


def get_pool(cfg: RunConfig, cpus: float, gpus: float, size: int) -> list:
    """`size` actors of this shape: the run's pool (dead ones replaced, grown if needed); pools of other
    shapes are released."""
    key = _pool_key(cpus, gpus)
    actors = _keep_pool(key)
    _alive_by_node(actors)
    cls = _actor_cls(cpus, gpus, "SPREAD")
    while len(actors) < size:
        actors.append(cls.remote())
    return actors[:size]


def _keep_pool(key: tuple) -> list:
    """The run's pool of this shape (created empty); pools of other shapes are released."""
    import ray

    for k in [k for k in _POOLS if k != key]:
        for a in _POOLS.pop(k):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone, or an actor of an earlier Ray session
                pass
    return _POOLS.setdefault(key, [])


def _alive_by_node(actors: list, wait_s: float = 30.0) -> dict[str, list]:
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


def _actor_cls(cpus: float, gpus: float, strategy):
    """The pool's actor class with its resources. Two calls at once (max_concurrency 2): the driver reads a
    training stage's progress while `train` runs; it never sends an actor two shards at once."""
    import ray

    return ray.remote(StageActorImpl).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=2,
                                              scheduling_strategy=strategy)


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
    by_node = _alive_by_node(actors, wait_s)
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
            for a in new:
                ray.kill(a)
            return None
        actors.extend(new)
        hosts = hosts + new
    return hosts


def _actor_lost(e: BaseException) -> bool:
    import ray.exceptions as rex

    lost = tuple(c for c in (getattr(rex, "RayActorError", None), getattr(rex, "ActorDiedError", None),
                             getattr(rex, "ActorUnavailableError", None), getattr(rex, "NodeDiedError", None),
                             getattr(rex, "WorkerCrashedError", None)) if c is not None)
    return isinstance(e, lost)


def _run_shards(actors: list, shards: list[list[str]], call, lost: list, max_requeue: int = 3, replace=None):
    """Yield the result of every shard, each run by a free actor (`call(actor, shard, tries)`); a shard whose actor
    was lost goes back to the queue for another actor (at most `max_requeue` times); when no actor is left,
    `replace()` makes a new one; other errors (the stage's own) are raised."""
    import collections

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
                if not _actor_lost(e) or tries >= max_requeue:
                    raise
                lost.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                queue.appendleft((shard, tries + 1))  # the actor stays out of the pool
                continue
            free.append(actor)
            yield res


def run_per_image_stage(name: str, cfg: RunConfig, store_url: str,
                        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) one per-image stage across the actor pool; returns its summary."""
    t_start = time.time()
    mod = stage_module(name)
    store = ArtifactStore(store_url, cfg.storage)
    plans = plan(cfg)
    ctx = make_context(name, cfg, store, plans)
    preflight(cfg, name, plans[name].split)
    out = ctx.out
    t0 = time.time()
    out.prepare(getattr(mod, "FIELDS", ()))
    listed = set(out.listed_ids())  # one listing per field; workers verify only these (a fresh stage: none)
    cpus, gpus = stage_resources(name, cfg)
    slots = pool_capacity(cpus, gpus)
    if cfg.ray.actors:
        slots = min(slots, cfg.ray.actors)
    shards = balanced_shards(ctx.ids, cfg.ray.shard_size, slots)
    actors = get_pool(cfg, cpus, gpus, min(slots, len(shards)) or 1)
    cfg_json = cfg.model_dump(mode="json")
    total = len(ctx.ids)
    done_images, computed = 0, 0
    if on_progress:
        on_progress(0, total)
    nodes: set[str] = set()
    builds: dict[tuple, int] = {}
    build_seconds: list[float] = []
    parts, gpu_ids, assigned = [], set(), set()
    manifest_has = None
    lost: list[str] = []
    def replace():
        new = get_pool(cfg, cpus, gpus, len(_POOLS.get(_pool_key(cpus, gpus), [])) + 1)[-1]
        return new

    def call(actor, shard, tries):  # a requeued shard verifies every id: the lost actor may have finished some
        maybe = [i for i in shard if i in listed] if tries == 0 else None
        return actor.run.remote(name, cfg_json, store_url, shard, maybe)

    t_shards = time.time()
    busy: dict[str, float] = {}
    for res in _run_shards(actors, shards, call, lost, replace=replace):
        rows = res["rows"]
        for r in rows:
            busy[r["node_id"]] = busy.get(r["node_id"], 0.0) + float(r.get("seconds") or 0.0)
        if any(r["status"] == KEPT for r in rows):  # kept images: rows only where the manifest lacks them
            if manifest_has is None:  # read once per stage, not per image
                manifest_has = set(out.manifest().column("image_id").to_pylist())
            rows = [r for r in rows if r["status"] != KEPT or r["image_id"] not in manifest_has]
        out.write_manifest(rows)
        nodes.update(r["node_id"] for r in res["rows"])
        computed += sum(r["status"] != KEPT for r in res["rows"])
        builds[(res["node_id"], res["pid"])] = res["builds"]
        build_seconds.append(res["build_seconds"])
        gpu_ids.update(res["gpu_ids"])
        assigned.add(float(res["resources"].get("GPU", 0.0)))
        if res["partial"] is not None:
            parts.append(res["partial"])
        done_images += len(res["rows"])
        if on_progress:
            on_progress(done_images, total)
    t_final = time.time()
    summary = dict(mod.finalize(cfg, ctx, parts) or {})
    summary.setdefault("images", total)
    # where the stage's wall time went: the driver before the first shard (data set, preflight, listing, pool),
    # the shards, the driver's merge after them; and per node the seconds its actors spent on images
    summary["phase_seconds"] = {"setup": t_shards - t_start, "shards": t_final - t_shards, "finalize": time.time() - t_final}
    summary["image_seconds_by_node"] = busy
    summary["recomputed_images"] = computed
    summary["listed_at_start"] = len(listed)
    summary["shards"] = len(shards)
    summary["actors"] = len(actors)
    summary["actors_lost"] = len(lost)
    summary["worker_builds"] = sum(builds.values())
    summary["worker_build_seconds"] = max(build_seconds, default=0.0)  # the slowest actor's model build
    summary["actor_resources"] = {"CPU": cpus, "GPU": gpus}  # asked for
    summary["assigned_gpus"] = sorted(assigned)              # what the actors got (Ray's assigned resources)
    summary["nodes"] = len(nodes)
    summary.setdefault("seconds", time.time() - t0)
    out.mark_complete(summary)
    return summary

"""A training stage over Ray (driver side): on a pooled actor, as one Ray task, or as a Ray Train worker group.

- One worker (`ray.num_workers: 1`, unless `ray.single_worker_group`): no worker group (about 15-20 s less per
  stage here). A CPU-only stage runs on one of the run's pooled per-image actors (tasks.actor_pool.training_hosts:
  the pool's actors on one node that together hold the stage's CPUs; the others stay idle meanwhile), so no
  worker process is started and the next per-image stage finds its pool alive; progress is read from that
  actor. Otherwise (a GPU stage, or no node holds that many of the pool's actors) the pool is released and the
  stage runs as one Ray task with the worker's resources, checkpointing into the stage's files/checkpoint.pt in
  the store every epoch. A lost pooled actor, or the task's worker or node: the stage goes on as a Ray task
  (retried `ray.max_failures` times), which resumes from the checkpoint.
- N workers: Ray Train's TorchTrainer (DDP; gloo on CPU, NCCL on GPU) on any nodes. Its `storage_path` is inside
  the stage's folder of the store (`<store>/<stage>/<key>/files/ray_train`), through the store's own fsspec file
  system (wrapped for pyarrow), so an S3-compatible endpoint given by AWS_ENDPOINT_URL / `storage` is honoured.
  Checkpoints are Ray Train's (tasks.remote.RayTrainCheckpointer): a new fit() of the same stage resumes from the
  last one. A fit that lost workers or nodes is started again that way (`ray.max_failures` times at most); an
  error of the stage's own code (a non-finite loss, a bad config value, a bad data file) ends the stage at once
  (TrainingStageError): a restart would fail the same way. A one-worker task is retried only when its worker or
  node is lost, never for its own exception.
- Progress reaches the driver through a small actor (rank 0 updates it, the driver polls); every rank writes
  where it runs into the store (the stage's `workers` table); rank 0 writes the summary file and the outputs.
The code that runs in the workers is tasks/remote.py.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

from rca_core import object_io, storage
from rca_core.config import RunConfig
from rca_core.stages import registry
from rca_core.stages.planning import plan
from rca_core.store import ArtifactStore

from . import actor_pool, remote
from .preflight import preflight


def pyarrow_storage(url: str, storage_cfg=None):
    """(storage_path, storage_filesystem) for Ray Train: a local path as is; a URL through the same fsspec
    file system (and options) as the store, wrapped for pyarrow (Train's own S3 client ignores
    AWS_ENDPOINT_URL)."""
    if not storage.is_url(url):
        return storage.local_path(url), None
    import pyarrow.fs

    fs, path = storage.filesystem(url, storage_cfg)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_training_stage(name: str, cfg: RunConfig, store_url: str,
                       on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) a training stage; returns its summary."""
    import ray

    storage_before = object_io.STATS.snapshot()
    store = ArtifactStore(store_url, cfg.storage)
    plans = plan(cfg)
    out = store.stage(name, plans[name].fingerprint)
    out.prepare(())
    preflight(cfg, name, plans[name].split)
    t0 = time.time()
    gpus = actor_pool.gpus_per_worker(cfg) if registry.get(name).wants_gpu(cfg) else 0.0
    resources = {"CPU": remote.train_cpus(cfg), **({"GPU": gpus} if gpus else {})}
    cfg_json = cfg.model_dump(mode="json")
    one = cfg.ray.num_workers == 1 and not cfg.ray.single_worker_group
    hosts = actor_pool.training_hosts(cfg, resources["CPU"]) if one and not gpus else None
    source: list = [None]  # () -> ObjectRef of {"done", "total"}: what the progress watcher polls
    extra: dict = {}
    progress_actors: list = []

    def as_task() -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_pool.release_pools()  # the per-image actors hold CPUs/GPUs that the task / worker group needs
        here = ray.get_runtime_context().get_node_id()  # on the driver's node: it outlives a lost worker node
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(remote.ProgressActor).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
        progress_actors.append(actor)
        source[0] = actor.get.remote
        if one:
            task = ray.remote(remote.train_task).options(num_cpus=resources["CPU"], num_gpus=gpus,
                                                          max_retries=cfg.ray.max_failures, retry_exceptions=False)
            ray.get(task.remote(cfg_json, name, store_url, actor))
        else:
            _fit_restarting_lost(name, cfg, lambda: _trainer(name, cfg, store_url, out, actor, gpus, resources))

    def on_host() -> None:
        host = hosts[0]
        source[0] = host.progress.remote
        try:
            ray.get(host.train.remote(name, cfg_json, store_url))
        except Exception as e:  # noqa: BLE001
            if not actor_pool.actor_lost(e) or cfg.ray.max_failures < 1:
                raise
            # the actor (its process or node) was lost: go on as a Ray task, which resumes from the checkpoint
            actor_pool.forget_actor(host)
            extra["lost"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            as_task()

    mode = "pool" if hosts else ("task" if one else "ray_train")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(source, on_progress, stop), daemon=True)
    if on_progress:
        watcher.start()
    try:
        on_host() if hosts else as_task()
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
        if on_progress:  # the last steps reported after the watcher's last poll (the line ends at N/N)
            _poll_progress(source, on_progress, None)
        for actor in progress_actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
    summary = json.loads(out.read_file(remote.SUMMARY_FILE))
    summary.setdefault("seconds", time.time() - t0)
    summary["train_workers"] = cfg.ray.num_workers
    summary["train_mode"] = mode
    if "lost" in extra:  # the pooled actor was lost; the stage went on as a Ray task
        summary["train_mode"], summary["host_lost"] = "pool, then task", extra["lost"]
    if mode == "pool":
        summary["host_actors"] = len(hosts)  # the pool's actors whose CPUs the training held
    rows = sorted((json.loads(out.read_file(f"workers/rank-{r}.json")) for r in range(cfg.ray.num_workers)
                   if out.has_file(f"workers/rank-{r}.json")), key=lambda r: r["rank"])
    if rows:
        out.write_table("workers", rows)
    summary["nodes"] = len({r["node_id"] for r in rows})
    summary.update(object_io.summary_fields(object_io.stats_since(storage_before), summary.pop("worker_storage", None)))
    out.mark_complete(summary)
    return summary


class TrainingStageError(RuntimeError):
    """A training stage failed with an error that a restart cannot fix (its own code's: a non-finite loss, a bad
    config value, a bad data file); raised at once, never restarted."""


def workers_lost(e: BaseException) -> bool:
    """Whether a failed fit lost workers or nodes (a restart resumes from the checkpoint) rather than failing in
    the stage's own code (a restart would fail the same way). One lost worker is enough: the surviving ranks then
    fail too, with collateral errors of the collective (a connection closed by the peer)."""
    import ray.train

    if isinstance(e, getattr(ray.train, "PreemptionError", ())):
        return True
    failures = getattr(e, "worker_failures", None)
    if not failures:
        return actor_pool.actor_lost(e)

    def lost(f) -> bool:
        # Ray Train reports a worker whose process or node died as a failed health check (its cause inside), or
        # hands the actor's own error on
        causes = [f, getattr(f, "__cause__", None), getattr(f, "health_check_failure", None)]
        return any(c is not None and actor_pool.actor_lost(c) for c in causes) or \
            type(f).__name__ in ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError")

    return any(lost(f) for f in failures.values())


def _fit_restarting_lost(name: str, cfg: RunConfig, make_trainer) -> None:
    """A Ray Train fit that is started again (resuming from its last checkpoint: same run name and storage) when it
    lost workers or nodes, at most `ray.max_failures` times; any other failure ends the stage at once."""
    lost = 0
    while True:
        try:
            make_trainer().fit()
            return
        except Exception as e:  # noqa: BLE001
            if not workers_lost(e):
                rank, err = next(iter((getattr(e, "worker_failures", None) or {None: e}).items()))
                where = f" on rank {rank}" if rank is not None else ""
                first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise TrainingStageError(
                    f"stage {name} failed{where}: {first[:500]} (not restarted: a restart cannot fix an error of the "
                    f"stage's own; restarts, ray.max_failures = {cfg.ray.max_failures}, are for lost workers and "
                    f"nodes; {lost} restart(s) before this)") from e
            if lost >= cfg.ray.max_failures:
                raise
            lost += 1
            from . import console

            console.log_line("rca", f"stage {name}: workers or nodes lost ({type(e).__name__}); restart {lost} of "
                             f"{cfg.ray.max_failures} from the last checkpoint")


# How often Ray Train's controller polls its workers (Ray's default: 2 s). A worker's report waits for the next poll,
# so at 2 s every checkpointed epoch cost up to 2 s of idle workers: a trainer with 6 reports took 26 s against 13 s
# at 0.5 s (2 workers, 2 cores). The fit() hands the driver's value to the controller (Ray propagates it); a value
# already in the environment wins.
TRAIN_POLL_S = "0.5"


def _trainer(name: str, cfg: RunConfig, store_url: str, out, actor, gpus: float, resources: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)

    storage_path, storage_fs = pyarrow_storage(out.file("ray_train").uri, cfg.storage)
    return TorchTrainer(
        remote.train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "name": name, "store": store_url, "progress": actor},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources, placement_strategy=cfg.ray.train_placement),
        run_config=RayRunConfig(storage_path=storage_path, storage_filesystem=storage_fs,
                                name=f"{name}-{out.key.split('/')[1]}",
                                failure_config=FailureConfig(max_failures=0),  # _fit_restarting_lost decides
                                checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )


def _watch_progress(source: list, on_progress: Callable[[int, int], None], stop: threading.Event) -> None:
    last = None
    while not stop.wait(1.0):
        last = _poll_progress(source, on_progress, last)


def _poll_progress(source: list, on_progress: Callable[[int, int], None], last):
    """One read of the stage's progress (source[0]: the progress actor's or the hosting actor's method); calls
    on_progress when (done, total) changed. Returns the last seen."""
    import ray

    if source[0] is None:
        return last
    try:
        p = ray.get(source[0](), timeout=10)
    except Exception:  # noqa: BLE001 - the actor is gone at the end of the stage
        return last
    if p["total"] and (p["done"], p["total"]) != last:
        last = (p["done"], p["total"])
        on_progress(p["done"], p["total"])
    return last

"""Training stages over Ray Train: TorchTrainer runs the stage's `train(cfg, ctx)` on N workers (DDP;
gloo on CPU, NCCL on GPU), on any nodes of the cluster.

- Storage: Ray Train's `storage_path` is inside the stage's folder of the artifact store
  (`<store>/<stage>/<key>/files/ray_train`), through the same fsspec file system as everything else
  (wrapped for pyarrow), so an S3-compatible endpoint given by AWS_ENDPOINT_URL / `storage` is honoured.
- Checkpoints: every epoch the stage saves through `ctx.checkpoint`, here a `RayTrainCheckpointer`:
  rank 0's state goes out with `ray.train.report(metrics, checkpoint=...)`; a restarted worker group
  (worker or node lost; FailureConfig) and a new `fit()` of the same stage (same run name and storage
  path: Ray Train restores its checkpoint manager from storage) resume from `ray.train.get_checkpoint()`.
- Progress reaches the driver through a small actor (no shared file): rank 0 calls it, the driver polls;
  the actor is restarted by Ray if its node is lost (progress then resumes with the next update).
- Every rank writes where it runs (node id, host, pid) to files/workers/rank-<r>.json in the store; the
  driver turns them into the stage's `workers` table.
- Outputs (model files, tables) are written by rank 0 through the store's URL; the summary as
  files/train_summary.json. No Prefect call happens inside Ray workers.
- One worker (`ray.num_workers: 1`, unless `ray.single_worker_group`): no worker group at all (about 15-20 s
  less per stage here, measured in docs/benchmarks.md); it checkpoints into the stage's files/checkpoint.pt in
  the store every epoch. A CPU-only stage runs on one of the run's pooled per-image actors
  (tasks.per_image.training_hosts: the pool's actors on one node that together hold the stage's CPUs; the
  others stay idle meanwhile), so no worker process is started and the next per-image stage finds its pool
  alive; progress is read from that actor. Otherwise (a GPU stage, or no node holds that many of the pool's
  actors) the pool is released and the stage runs as one Ray task with the worker's resources. A lost pooled
  actor, or the task's worker or node: the stage goes on as a Ray task (retried `ray.max_failures` times),
  which resumes from the checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from typing import Callable

from rca_core import storage
from rca_core import train_utils as tu
from rca_core.config import RunConfig
from rca_core.stages import make_context, plan, stage_module
from rca_core.store import ArtifactStore

from .preflight import preflight
from .ray_runtime import gpus_per_worker

SUMMARY_FILE = "train_summary.json"
CKPT_NAME = "checkpoint.pt"


class RayTrainCheckpointer(tu.Checkpointer):
    """Checkpoints as Ray Train checkpoints (reported every epoch, resumed with get_checkpoint); falls back
    to the stage's files/checkpoint.pt in the store (written by a local run) when Ray has none."""

    def __init__(self, fallback: storage.FileRef):
        self.fallback = fallback

    def save(self, obj: dict | None, epoch: int, metrics: dict | None = None) -> None:
        import ray.train
        import torch

        with tempfile.TemporaryDirectory(prefix="rca-ckpt-") as d:
            ckpt = None
            if obj is not None:
                torch.save(obj, os.path.join(d, CKPT_NAME))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(dict(metrics or {"epoch": epoch}), checkpoint=ckpt)  # every rank: a barrier
        delay = float(os.environ.get("RCA_FAULT_EPOCH_DELAY", "0"))  # fault-injection hook for reliability tests
        if delay:
            time.sleep(delay)

    def load(self) -> dict | None:
        import ray.train
        import torch

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                path = os.path.join(d, CKPT_NAME)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return tu.FileCheckpointer(self.fallback).load()

    def describe(self) -> str:
        return f"Ray Train checkpoint (fallback {self.fallback.uri})"


class _SlowCheckpointer(tu.Checkpointer):
    """A checkpointer that waits after every save (RCA_FAULT_EPOCH_DELAY: tests kill a worker in between)."""

    def __init__(self, inner: tu.Checkpointer, delay: float):
        self.inner, self.delay = inner, delay

    def save(self, obj: dict | None, epoch: int, metrics: dict | None = None) -> None:
        self.inner.save(obj, epoch, metrics)
        time.sleep(self.delay)

    def load(self) -> dict | None:
        return self.inner.load()

    def describe(self) -> str:
        return self.inner.describe()


def _progress_actor_cls():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class StageProgressActor:
        """Progress of a training stage: updated by rank 0, read by the driver."""

        def __init__(self):
            self.done, self.total = 0, 0

        def update(self, done: int, total: int) -> None:
            self.done, self.total = int(done), int(total)

        def get(self) -> dict:
            return {"done": self.done, "total": self.total}

    return StageProgressActor


def train_cpus(cfg: RunConfig) -> float:
    return float(cfg.ray.train_cpus_per_worker or cfg.ray.cpus_per_worker)


def _progress_sender(actor, rank: int) -> Callable[[int, int], None]:
    """ctx.progress for a training rank: rank 0 sends (step, total) to the progress actor at most twice a
    second, and always the last step; other ranks send nothing."""
    last = [float("-inf")]

    def send(done: int, total: int) -> None:
        now = time.monotonic()
        if rank == 0 and (now - last[0] >= 0.5 or done >= total):
            last[0] = now
            actor.update.remote(done, total)

    return send


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import torch

    cfg = RunConfig.model_validate(config["cfg"])
    name, store_url, actor = config["name"], config["store"], config["progress"]
    torch.set_num_threads(cfg.compute.threads or max(1, int(train_cpus(cfg))))
    store = ArtifactStore(store_url, cfg.storage, create=False)
    rank = ray.train.get_context().get_world_rank()
    _register(store, name, cfg, rank)

    ctx = make_context(name, cfg, store, progress=_progress_sender(actor, rank), generate=False)
    ctx.checkpoint = RayTrainCheckpointer(ctx.out.file(CKPT_NAME))
    if ray.train.torch.get_device().type == "cuda":
        ctx.device = ray.train.torch.get_device()
    summary = stage_module(name).train(cfg, ctx) or {}
    if rank == 0:
        ctx.out.write_file(SUMMARY_FILE, json.dumps(summary, default=str).encode())


def _register(store: ArtifactStore, name: str, cfg: RunConfig, rank: int) -> None:
    """Where this rank runs, in the store (the driver reads them after the stage)."""
    import ray

    out = store.stage(name, plan(cfg)[name].fingerprint)
    out.write_file(f"workers/rank-{rank}.json", json.dumps(
        {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": storage.host(),
         "pid": os.getpid(), "time": time.time()}).encode())


def train_in_process(cfg_json: dict, name: str, store_url: str, progress: Callable[[int, int], None]) -> dict:
    """A training stage with one worker, in this Ray worker process (a task's or a pooled actor's):
    checkpoints in the store (files/checkpoint.pt), summary as files/train_summary.json."""
    import ray
    import torch

    cfg = RunConfig.model_validate(cfg_json)
    torch.set_num_threads(cfg.compute.threads or max(1, int(train_cpus(cfg))))
    store = ArtifactStore(store_url, cfg.storage, create=False)
    _register(store, name, cfg, 0)
    ctx = make_context(name, cfg, store, progress=progress, generate=False)
    if ray.get_gpu_ids() and torch.cuda.is_available():
        ctx.device = torch.device("cuda")
    delay = float(os.environ.get("RCA_FAULT_EPOCH_DELAY", "0"))  # fault-injection hook for reliability tests
    if delay:
        ctx.checkpoint = _SlowCheckpointer(ctx.checkpointer(), delay)
    summary = stage_module(name).train(cfg, ctx) or {}
    ctx.out.write_file(SUMMARY_FILE, json.dumps(summary, default=str).encode())
    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def _train_task(cfg_json: dict, name: str, store_url: str, actor) -> dict:
    """A training stage as one Ray task (one worker, no worker group)."""
    return train_in_process(cfg_json, name, store_url, _progress_sender(actor, 0))


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
    """Run (or resume) a training stage: on one of the run's pooled actors (one worker, CPU only, when the
    pool's actors on one node hold the stage's CPUs), else as one Ray task (one worker) or a Ray Train worker
    group (N workers), after releasing the per-image actors that hold the CPUs/GPUs they need."""
    import ray

    from .per_image import forget_actor, release_pools, training_hosts

    store = ArtifactStore(store_url, cfg.storage)
    plans = plan(cfg)
    out = store.stage(name, plans[name].fingerprint)
    out.prepare(())
    preflight(cfg, name, plans[name].split)
    t0 = time.time()
    gpus = gpus_per_worker(cfg.ray)
    resources = {"CPU": train_cpus(cfg), **({"GPU": gpus} if gpus else {})}
    cfg_json = cfg.model_dump(mode="json")
    one = cfg.ray.num_workers == 1 and not cfg.ray.single_worker_group
    hosts = training_hosts(cfg, resources["CPU"]) if one and not gpus else None
    source: list = [None]  # () -> ObjectRef of {"done", "total"}: what the progress watcher polls
    extra: dict = {}
    progress_actor = []

    def as_task() -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        release_pools()  # the per-image actors hold CPUs/GPUs that the task / worker group needs
        here = ray.get_runtime_context().get_node_id()  # on the driver's node: it outlives a lost worker node
        actor = _progress_actor_cls().options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
        progress_actor.append(actor)
        source[0] = actor.get.remote
        if one:
            task = ray.remote(_train_task).options(num_cpus=resources["CPU"], num_gpus=gpus,
                                                    max_retries=cfg.ray.max_failures, retry_exceptions=False)
            ray.get(task.remote(cfg_json, name, store_url, actor))
        else:
            _trainer(name, cfg, store_url, out, actor, gpus, resources).fit()

    def on_host() -> None:
        host = hosts[0]
        source[0] = host.progress.remote
        try:
            ray.get(host.train.remote(name, cfg_json, store_url))
        except Exception as e:  # noqa: BLE001
            from .per_image import _actor_lost

            if not _actor_lost(e) or cfg.ray.max_failures < 1:
                raise
            # the actor (its process or node) was lost: go on as a Ray task, which resumes from the checkpoint
            forget_actor(host)
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
        for actor in progress_actor:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
    summary = json.loads(out.read_file(SUMMARY_FILE))
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
    out.mark_complete(summary)
    return summary


def _trainer(name: str, cfg: RunConfig, store_url: str, out, actor, gpus: float, resources: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = pyarrow_storage(out.file("ray_train").uri, cfg.storage)
    return TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "name": name, "store": store_url, "progress": actor},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources, placement_strategy=cfg.ray.train_placement),
        run_config=RayRunConfig(storage_path=storage_path, storage_filesystem=storage_fs,
                                name=f"{name}-{out.key.split('/')[1]}",
                                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
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

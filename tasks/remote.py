"""Everything that runs inside a Ray worker process: the per-image stage actor, training in a task, on a
pooled actor or as a Ray Train worker, training progress, the preflight node check.

This module imports only rca_core (and Ray/torch inside the functions): a worker never imports Prefect, the
flows or the driver-side modules of tasks/. The driver-side modules (tasks/actor_pool.py, per_image.py,
training.py, preflight.py) decorate these classes and functions with their resources and send them out.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from typing import Callable

from rca_core import object_io, storage
from rca_core import train_utils as tu
from rca_core.config import RunConfig
from rca_core.stages.context import make_context
from rca_core.stages.planning import plan
from rca_core.stages.runner import build_worker, run_shard, stage_module
from rca_core.store import ArtifactStore

SUMMARY_FILE = "train_summary.json"  # a training stage's summary, written by rank 0 into the stage's files/
CKPT_NAME = "checkpoint.pt"


def train_cpus(cfg: RunConfig) -> float:
    """CPUs (torch threads) per training worker."""
    return float(cfg.ray.train_cpus_per_worker or cfg.ray.cpus_per_worker)


def _gpu_device(device=None):
    """CUDA when Ray gave this process a GPU and torch sees one, else `device` unchanged."""
    import ray
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return device


# ------------------------------------------------------------------------------------------ per-image actor
class StageActor:
    """Runs shards of any per-image stage; keeps the current stage's Worker (its models) between calls. Also
    hosts a one-worker CPU training stage of the run (`train`), whose progress the driver reads meanwhile."""

    def __init__(self):
        self.key = None
        self.worker = None
        self.builds: dict[tuple, int] = {}  # stage key -> Worker builds in this process
        self._cfg_json, self._cfg = None, None
        self._progress = {"done": 0, "total": 0}

    def run(self, name: str, cfg_json: dict, store_url: str, ids: list[str], maybe_done: list[str] | None = None) -> dict:
        """One shard. `maybe_done`: the shard's ids listed in the store at the stage's start, the only ones
        verified before computing (None: verify every id, as after a lost actor)."""
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
            self.worker = build_worker(name, cfg, store, ctx=ctx, device=_gpu_device(ctx.device))
            self.key = key
            self.builds[key] = self.builds.get(key, 0) + 1
            build_s = time.perf_counter() - t_build
        node = ray.get_runtime_context().get_node_id()
        before = object_io.STATS.snapshot()
        res = run_shard(self.worker, ids, None if maybe_done is None else set(maybe_done))
        res["storage"] = object_io.stats_since(before)
        res["rows"] = [{**row, "node_id": node, "pid": os.getpid()} for row in res["rows"]]
        return {**res, "builds": self.builds[key], "build_seconds": build_s, "node_id": node, "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "resources": ray.get_runtime_context().get_assigned_resources()}

    def train(self, name: str, cfg_json: dict, store_url: str) -> dict:
        """A one-worker training stage in this actor's process. The pool's other actors on this node stay idle
        meanwhile: their CPUs are the training's (tasks.actor_pool.training_hosts)."""
        import gc

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
        return dict(self._progress)

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


# ------------------------------------------------------------------------------------------ training
class ProgressActor:
    """Progress of a training stage run as a task or a worker group: updated by rank 0, read by the driver."""

    def __init__(self):
        self.done, self.total = 0, 0

    def update(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)

    def get(self) -> dict:
        return {"done": self.done, "total": self.total}


def progress_sender(actor, rank: int) -> Callable[[int, int], None]:
    """ctx.progress for a training rank: rank 0 sends (step, total) to the progress actor at most twice a
    second, and always the last step; other ranks send nothing."""
    last = [float("-inf")]

    def send(done: int, total: int) -> None:
        now = time.monotonic()
        if rank == 0 and (now - last[0] >= 0.5 or done >= total):
            last[0] = now
            actor.update.remote(done, total)

    return send


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


def register_rank(store: ArtifactStore, name: str, cfg: RunConfig, rank: int) -> None:
    """Where this rank runs, in the store (the driver turns them into the stage's `workers` table)."""
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
    before = object_io.STATS.snapshot()
    store = ArtifactStore(store_url, cfg.storage, create=False)
    register_rank(store, name, cfg, 0)
    ctx = make_context(name, cfg, store, progress=progress, generate=False)
    ctx.device = _gpu_device(ctx.device)
    summary = stage_module(name).train(cfg, ctx) or {}
    summary["worker_storage"] = object_io.stats_since(before)
    ctx.out.write_file(SUMMARY_FILE, json.dumps(summary, default=str).encode())
    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def train_task(cfg_json: dict, name: str, store_url: str, actor) -> dict:
    """A training stage as one Ray task (one worker, no worker group)."""
    return train_in_process(cfg_json, name, store_url, progress_sender(actor, 0))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of a training stage (DDP rank): its checkpoints are Ray Train's."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = RunConfig.model_validate(config["cfg"])
    name, store_url, actor = config["name"], config["store"], config["progress"]
    torch.set_num_threads(cfg.compute.threads or max(1, int(train_cpus(cfg))))
    store = ArtifactStore(store_url, cfg.storage, create=False)
    rank = ray.train.get_context().get_world_rank()
    before = object_io.STATS.snapshot()
    register_rank(store, name, cfg, rank)
    ctx = make_context(name, cfg, store, progress=progress_sender(actor, rank), generate=False)
    ctx.checkpoint = RayTrainCheckpointer(ctx.out.file(CKPT_NAME))
    if ray.train.torch.get_device().type == "cuda":
        ctx.device = ray.train.torch.get_device()
    summary = stage_module(name).train(cfg, ctx) or {}
    if rank == 0:  # rank 0's requests (the other ranks make the same reads and no writes)
        summary["worker_storage"] = object_io.stats_since(before)
        ctx.out.write_file(SUMMARY_FILE, json.dumps(summary, default=str).encode())


# ------------------------------------------------------------------------------------------ preflight
def node_check(marker_uri: str, token: str, cfg_json: dict, split: str) -> dict:
    """Runs on one node: what it cannot see of the store and the data (an empty list when all is well)."""
    import ray

    from rca_core.config.run import DATA_KEYS, WEIGHT_KEYS, get_key, input_keys

    cfg = RunConfig.model_validate(cfg_json)
    problems = []
    no_credentials = {loc: why for loc in dict.fromkeys([cfg.store, cfg.data.root])
                      if (why := storage.credentials_problem(loc, cfg.storage))}
    problems += list(no_credentials.values())
    if cfg.store not in no_credentials:
        try:
            got = json.loads(storage.read_bytes(marker_uri, cfg.storage)).get("token")
            if got != token:
                problems.append(f"store marker {marker_uri} holds another run's token")
        except Exception as e:  # noqa: BLE001
            if storage.refused_credentials(e, cfg.store):
                problems.append(f"the object store refused this node's AWS credentials for {cfg.store} (wrong key, "
                                f"secret or token: {type(e).__name__}: {str(e).splitlines()[0][:200]})")
            else:
                problems.append(f"cannot read the store marker {marker_uri} ({type(e).__name__}: {e}); "
                                f"store = {cfg.store}")
    root = cfg.data.root
    if root in no_credentials:
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": storage.host(), "problems": problems}
    want = (storage.join(root, "meta.json") if cfg.data.kind == "demo"
            else storage.join(root, "ImageSets", "Segmentation", f"{split}.txt"))
    try:
        if not storage.exists(want, cfg.storage):
            problems.append(f"data.root {root}: {want} not found")
    except Exception as e:  # noqa: BLE001
        problems.append(f"data.root {root}: cannot list it ({type(e).__name__}: {e})")
    # the weights this config's stages load, and the imported CAMs' folder: read where the workers run
    for key in ["data.labels_file", "data.saliency_dir", *input_keys(cfg, WEIGHT_KEYS), *input_keys(cfg, DATA_KEYS)]:
        v = get_key(cfg, key)
        if v:
            try:
                ok = storage.exists(v, cfg.storage)
            except Exception:  # noqa: BLE001
                ok = False
            if not ok:
                problems.append(f"{key}: {v} not found")
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": storage.host(), "problems": problems}


__all__ = ["StageActor", "ProgressActor", "RayTrainCheckpointer", "progress_sender", "register_rank",
           "train_in_process", "train_task", "train_loop_per_worker", "node_check", "train_cpus", "SUMMARY_FILE",
           "CKPT_NAME"]

"""Shared helpers of the training stages (cam_train, affinity_train, seg_train).

- seeding: `seed_everything(seed)`, `rng_state()` / `set_rng_state(state)` (tensors and lists only,
  so a checkpoint loads with `torch.load(weights_only=True)`);
- checkpoints: `save_checkpoint(ckpt, model, optimizer, epoch, step, extra)` and
  `load_checkpoint(ckpt, model, optimizer)` -> dict(epoch, step, extra) or None, where `ckpt` is a
  Checkpointer (a file in the store by default; Ray Train's checkpoints under Ray, see tasks/training.py)
  or a file location; every rank calls save (a Checkpointer may need all ranks), only rank 0's state is kept;
- `save_torch(location, obj)` / `load_torch(location)`: torch files through the store's I/O layer;
- learning rate: `poly_lr(base_lr, step, max_steps, power)` and `set_poly_lr(optimizer, step, max_steps)`
  (each param group keeps its own `base_lr`, so new layers at 10x keep their ratio);
- distributed: `is_dist`, `rank`, `world_size`, `is_main`, `wrap_ddp`, `unwrap`, `make_sampler`,
  `all_reduce_mean`, `barrier` (all of them work without torch.distributed);
- batches: every training stage's `batch_size` is the global batch; `split_batch` / `rank_shares` give
  each rank's share (as even as possible), `GlobalBatchSampler` the same batches and steps for any
  worker count, `global_mean` loss terms that average over the global batch under DDP;
- `progress(iterable, ...)`: tqdm, shown on rank 0 only;
- `multilabel_map(scores, targets)`: mean average precision over classes with at least one positive.
"""
from __future__ import annotations

import io
import os
import random
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


# ----------------------------------------------------------------------------- seeding / rng
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors/lists (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def torch_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- distributed
def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP (or DataParallel) wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap when torch.distributed is initialised, else return the model unchanged."""
    if not is_dist():
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index if device.index is not None
                                                                      else torch.cuda.current_device()],
                                                   find_unused_parameters=find_unused_parameters)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def make_sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A DistributedSampler when distributed, else None (let the DataLoader shuffle with its generator)."""
    if not is_dist():
        return None
    return torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)


def rank_shares(global_batch: int, world: int) -> list[int]:
    """How a global batch is split over `world` ranks: as evenly as possible, the first
    global_batch % world ranks take one image more (16 on 4 workers: 4 each; 10 on 4: 3, 3, 2, 2)."""
    q, r = divmod(int(global_batch), int(world))
    return [q + (1 if i < r else 0) for i in range(int(world))]


def split_batch(batch_size: int, n_items: int, key: str) -> tuple[int, int]:
    """(global batch, this rank's share) for a training stage whose config `key` is the GLOBAL batch (images
    per optimizer step over all workers). Shares follow `rank_shares`; the loss terms of the stages are
    means over the global batch (`global_mean`), so unequal shares weigh as in a single-worker run.
    A split with fewer items than the batch trains on one batch of all of them per epoch. Errors name
    `key` when a worker would get no image."""
    world = world_size()
    g = min(int(batch_size), int(n_items))
    if g < world:
        raise ValueError(f"{key} = {batch_size} is the global batch (images per step over all workers); with "
                         f"{n_items} training images it gives {g} per step, fewer than the {world} training workers "
                         f"(ray.num_workers): every worker needs at least one image per step")
    return g, rank_shares(g, world)[rank()]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices that are the same for any number of workers.

    Every epoch draws one permutation of range(n) from a generator seeded by (seed, epoch); step s uses
    the global batch perm[s*G:(s+1)*G] (the incomplete last batch is dropped), and rank r gets its
    consecutive share of it (`rank_shares`). So 1 worker and N workers see the same images at every
    step, the same number of steps per epoch (n // G) and, with the same lr schedule, the same
    optimisation; a resumed run (set_epoch) repeats the uninterrupted one. A DataLoader `batch_sampler`."""

    def __init__(self, n: int, global_batch: int, seed: int = 0, shuffle: bool = True,
                 rank_: int | None = None, world: int | None = None):
        self.world = world_size() if world is None else int(world)
        self.rank = rank() if rank_ is None else int(rank_)
        if global_batch < self.world:
            raise ValueError(f"global batch {global_batch} is smaller than the world size {self.world}")
        self.n, self.global_batch, self.seed, self.shuffle, self.epoch = int(n), int(global_batch), int(seed), shuffle, 0
        shares = rank_shares(self.global_batch, self.world)
        self.per_rank = shares[self.rank]
        self.offset = sum(shares[:self.rank])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        perm = self.order()
        for s in range(len(self)):
            batch = perm[s * self.global_batch:(s + 1) * self.global_batch]
            yield batch[self.offset:self.offset + self.per_rank]

    def __len__(self) -> int:
        return self.n // self.global_batch


def global_mean(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """A loss term that is the mean over the GLOBAL batch once DDP has averaged the ranks' gradients:
    `total` is this rank's sum (with gradient), `count` this rank's number of terms; returns
    total * world / (sum of count over ranks), i.e. total / count without torch.distributed. Counts that
    differ between ranks (pixels not ignored, pairs, anchors) thus weigh as in a single-worker run."""
    c = torch.as_tensor(count, dtype=torch.float64, device=total.device).detach().reshape(())
    if is_dist():
        c = c.clone()
        dist.all_reduce(c)
        c = c / world_size()
    return total / c.clamp_min(1e-12).to(total.dtype)


def check_finite(loss: torch.Tensor, what: str, device: torch.device | None = None, hint: str = "") -> None:
    """FloatingPointError naming `what` when the loss is not finite on this rank or (torch.distributed) on any
    rank, so that every rank stops at the same step instead of one waiting for the others."""
    bad = float(not bool(torch.isfinite(loss.detach()).all()))
    if is_dist():
        bad = all_reduce_mean(bad, device)
    if bad > 0:
        raise FloatingPointError(f"{what} is not finite ({float(loss.detach())} on rank {rank()})"
                                 + (f"; {hint}" if hint else ""))


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Mean of a scalar over ranks (the value itself when not distributed)."""
    if not is_dist():
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over ranks along dim 0 (sizes may differ). Itself when not distributed."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = [torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    dist.all_gather(buf, torch.cat([t, pad]))
    return torch.cat([b[: int(s)] for b, s in zip(buf, sizes)])


# ----------------------------------------------------------------------------- checkpoints
def _ref(location):
    from rca_core import storage

    return location if isinstance(location, storage.FileRef) else storage.file_ref(location)


def save_torch(location, obj: Any) -> None:
    """torch.save to a store file / local path / URL (atomic: temp + rename locally, one PUT remotely)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _ref(location).write_bytes(buf.getvalue())


def load_torch(location, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) of a store file / local path / URL; FileNotFoundError if absent."""
    data = _ref(location).read_bytes()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


class Checkpointer:
    """Where a training stage keeps its resumable state. `save(obj, epoch, metrics)` is called on every
    rank (obj is None except on rank 0); `load()` returns the last saved obj or None."""

    def save(self, obj: dict | None, epoch: int, metrics: dict | None = None) -> None:  # pragma: no cover
        raise NotImplementedError

    def load(self) -> dict | None:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class FileCheckpointer(Checkpointer):
    """One torch file (a store file, a local path or a URL), replaced atomically at every save."""

    def __init__(self, location):
        self.ref = _ref(location)

    def save(self, obj: dict | None, epoch: int, metrics: dict | None = None) -> None:
        if obj is not None:
            save_torch(self.ref, obj)

    def load(self) -> dict | None:
        if not self.ref.exists():
            return None
        return load_torch(self.ref)

    def describe(self) -> str:
        return self.ref.uri


def as_checkpointer(ckpt) -> Checkpointer:
    return ckpt if isinstance(ckpt, Checkpointer) else FileCheckpointer(ckpt)


def save_checkpoint(ckpt, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    epoch: int, step: int, extra: dict | None = None, *, with_rng: bool = True,
                    metrics: dict | None = None) -> None:
    """Save a resumable checkpoint through `ckpt` (a Checkpointer or a file location).

    Call it on every rank: rank 0's state is the one kept. `epoch` is the number of finished epochs;
    `extra` must hold tensors / numbers / strings / lists / dicts.
    """
    obj = None
    if is_main():
        obj = {"model": unwrap(model).state_dict(), "epoch": int(epoch), "step": int(step), "extra": extra or {}}
        if optimizer is not None:
            obj["optimizer"] = optimizer.state_dict()
        if with_rng:
            obj["rng"] = rng_state()
    as_checkpointer(ckpt).save(obj, int(epoch), {"epoch": int(epoch), "step": int(step), **(metrics or {})})


def load_checkpoint(ckpt, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True,
                    map_location: str | torch.device = "cpu") -> dict | None:
    """Restore what `save_checkpoint` wrote; None when there is no checkpoint yet.

    Returns {"epoch", "step", "extra", "model"(state dict)}. A checkpoint that cannot be read raises
    RuntimeError naming it (a half-written checkpoint cannot exist: writes are atomic).
    """
    ckpt = as_checkpointer(ckpt)
    try:
        obj = ckpt.load()
    except Exception as e:
        raise RuntimeError(f"checkpoint {ckpt.describe()} could not be read ({type(e).__name__}: {e}); "
                           "delete it to start this stage afresh") from e
    if obj is None:
        return None
    if map_location != "cpu" and "model" in obj:
        obj["model"] = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in obj["model"].items()}
    try:
        if model is not None:
            unwrap(model).load_state_dict(obj["model"])
        if optimizer is not None and "optimizer" in obj:
            optimizer.load_state_dict(obj["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise RuntimeError(f"checkpoint {ckpt.describe()} does not fit this model/optimizer (config changed since it "
                           f"was written?): {type(e).__name__}: {' '.join(l.strip() for l in first[:2])} ...; delete it "
                           "to start this stage afresh") from e
    if restore_rng and "rng" in obj:
        set_rng_state(obj["rng"])
    return {"epoch": int(obj["epoch"]), "step": int(obj["step"]), "extra": obj.get("extra", {}), "model": obj["model"]}


def load_trained_weights(location, what: str, stage: str) -> dict:
    """The state dict in a file a training stage wrote (weights_only load; a checkpoint's "model" entry
    also works). A missing or unreadable file raises an error naming it, `what` it is and the `stage`
    that makes it."""
    ref = _ref(location)
    try:
        obj = load_torch(ref)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {ref.uri} (run the {stage} stage first)") from None
    except Exception as e:  # cut short, not a torch file, ...
        raise ValueError(f"{what} {ref.uri} could not be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); re-run the {stage} stage") from e
    return obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj


# ----------------------------------------------------------------------------- learning rate
def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    frac = min(max(step, 0), max_steps) / max(1, max_steps)
    return base_lr * (1.0 - frac) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, max_steps: int, power: float = 0.9) -> float:
    """Set each group's lr to poly(group['base_lr']); records base_lr on first use. Returns group 0's lr."""
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr"] = poly_lr(g["base_lr"], step, max_steps, power)
    return optimizer.param_groups[0]["lr"]


# ----------------------------------------------------------------------------- progress
def progress(iterable: Iterable, desc: str = "", total: int | None = None, leave: bool = False,
             disable: bool | None = None, **kw):
    """tqdm progress bar (rank 0 only; disabled when RCA_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = (not is_main()) or os.environ.get("RCA_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- metrics
def multilabel_map(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """Mean over classes (with at least one positive) of the average precision (sklearn's definition)."""
    from sklearn.metrics import average_precision_score

    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    t = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets) > 0.5
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be (N, classes)")
    aps = [average_precision_score(t[:, j], s[:, j]) for j in range(s.shape[1]) if t[:, j].any()]
    return float(np.mean(aps)) if aps else float("nan")


__all__ = ["seed_everything", "rng_state", "set_rng_state", "torch_generator", "is_dist", "rank", "world_size",
           "is_main", "barrier", "unwrap", "wrap_ddp", "make_sampler", "rank_shares", "split_batch", "GlobalBatchSampler",
           "global_mean", "check_finite", "all_reduce_mean", "all_gather_cat",
           "save_checkpoint", "load_checkpoint", "save_torch", "load_torch", "Checkpointer", "FileCheckpointer",
           "as_checkpointer", "load_trained_weights", "poly_lr", "set_poly_lr", "progress", "multilabel_map"]

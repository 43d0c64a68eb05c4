"""The one training loop of the training stages (cam_train, affinity_train, seg_train), in the style of the
torchvision references: `train_one_epoch(...)` runs one epoch, `fit(...)` runs the whole training.

A stage supplies a `TrainingStage` (a subclass with its own hooks):
- `setup()` -> `Setup`: the model (on the device, BatchNorm synchronised as the stage wants, not DDP-wrapped),
  the optimizer over its parameter groups (`make_optimizer`), the training data set (items are tuples of
  tensors; an optional `set_epoch(epoch)` re-seeds its augmentation) and the schedule from its config section
  (global batch, epochs, max_seconds, poly power, DataLoader workers, ...). It is called right after
  `seed_everything(seed)`, so whatever the stage draws from the global generators there (model init) comes
  in the stage's own order.
- `loss(model, batch, at)` -> dict with the scalar "loss" to minimise (plus the terms named in `loss_keys`,
  tensors or None when a term is absent at this step, and anything `after_step` needs); `model` is the
  DDP-wrapped one, `batch` the loader's tuple moved to the device, `at` a `Step`.
- optional hooks: `epoch_start(epoch)` (before the epoch's first batch is drawn), `after_step(out, at)`
  (after the optimizer step), `epoch_metrics()` (extra columns of the epoch's history row),
  `checkpoint_extra()` (kept in every checkpoint), `write_outputs(run)` (rank 0, once training is finished:
  the stage's model files in its own format) and `summary(run)` (the stage's own summary keys).

`fit(stage, ctx, seed)` owns the rest: seeding, the global batch (`split_batch`, `GlobalBatchSampler`), the
DataLoader, the DDP wrap, poly lr per step, the non-finite loss check, `ctx.progress(step, total)`, the
`max_seconds` budget counted over every call of a resumed training (all ranks stop at the same step; a call
that starts over budget trains no further), one history row per epoch (loss terms averaged over the epoch's
steps and over the ranks), a checkpoint with the RNG state every epoch through `ctx.checkpointer()` (a resumed
call continues exactly where the uninterrupted run would be), the per-epoch log line (logging, rank 0),
`stop_after_epochs`, the store table "history" and the summary keys common to every training stage
(`common_summary`).

Checkpoint `extra`: {"history", "elapsed", "finished", "stopped_early", "max_steps", **checkpoint_extra()}.
Checkpoints of earlier versions of the stages still resume: their elapsed time under "elapsed" (cam_train) or
"seconds" (affinity_train), their early stop under "stopped_by_time" (cam_train) or "stopped_early"
(affinity_train); missing keys count as zero / False.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from rca_core import flops
from rca_core import train_utils as tu
from rca_core.device import FastPath

log = logging.getLogger("rca.train")


@dataclass
class Setup:
    """What a stage's `setup()` builds; the schedule comes from its config section."""
    model: nn.Module                    # on ctx.device, not DDP-wrapped
    optimizer: torch.optim.Optimizer
    dataset: Dataset                    # items: tuples of tensors; optional set_epoch(epoch)
    batch_size: int                     # the GLOBAL batch (images per optimizer step over all ranks)
    batch_key: str                      # its config key (named in errors)
    epochs: float                       # may be fractional
    sampler_seed: int                   # seed of GlobalBatchSampler's per-epoch order
    num_workers: int = 0                # DataLoader workers
    max_seconds: float | None = None    # training time budget over all calls (None: no budget)
    poly_power: float = 0.9
    round_steps: Callable[[float], int] = round  # epochs * steps per epoch -> number of optimizer steps
    find_unused_parameters: bool = False  # DDP's option (parts of the model that do not take part in every step)


@dataclass(frozen=True)
class Step:
    """Where the loop is when it asks a stage for a batch's loss."""
    epoch: int            # 0-based
    step: int             # global optimizer step (0-based), the same on every rank
    total_steps: int
    steps_per_epoch: int


@dataclass
class Run:
    """The state of one `fit` call, handed to the stage's `write_outputs` / `summary`."""
    model: nn.Module                    # the plain model
    ddp: nn.Module                      # the model as trained (DDP-wrapped under torch.distributed)
    optimizer: torch.optim.Optimizer
    global_batch: int
    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0         # training seconds of earlier calls (from the checkpoint)
    t_start: float = field(default_factory=time.time)
    finished: bool = False
    stopped_early: bool = False         # max_seconds ended the training (in this call or an earlier one)
    resumed_from_epoch: int | None = None
    scaler: object = None               # torch.amp.GradScaler under compute.precision fp16, else None

    def elapsed(self) -> float:
        """Training seconds over every call so far."""
        return self.elapsed_before + time.time() - self.t_start

    def this_call_seconds(self) -> float:
        return time.time() - self.t_start


class TrainingStage:
    """What a training stage supplies to `fit` (see the module docstring); override the hooks it needs."""
    name = "train"                      # stage name: logs, errors, progress bars
    loss_keys: tuple[str, ...] = ("loss",)  # terms of `loss()`'s dict averaged into the history rows
    nonfinite_hint = ""                 # what to try when the loss is not finite

    def setup(self) -> Setup:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple, at: Step) -> dict:
        raise NotImplementedError

    def epoch_start(self, epoch: int) -> None:
        pass

    def after_step(self, out: dict, at: Step) -> None:
        pass

    def epoch_metrics(self) -> dict:
        return {}

    def checkpoint_extra(self) -> dict:
        return {}

    def write_outputs(self, run: Run) -> None:
        pass

    def summary(self, run: Run) -> dict:
        return {}


def make_optimizer(kind: str, groups: list[dict], *, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over parameter groups that carry their own lr (poly lr keeps the ratios)."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r} (sgd or adamw)")


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _out_of_time(run: Run, max_seconds: float | None, device: torch.device, earlier_calls_only: bool = False) -> bool:
    """Whether the training time over all calls (or only that of the earlier calls) exceeds max_seconds,
    decided by all ranks together."""
    if not max_seconds:
        return False
    over = float((run.elapsed_before if earlier_calls_only else run.elapsed()) > max_seconds)
    return tu.all_reduce_mean(over, device) > 0


def train_one_epoch(stage: TrainingStage, setup: Setup, run: Run, loader: DataLoader, epoch: int,
                    device: torch.device, progress: Callable[[int, int], None] | None = None,
                    fast: FastPath | None = None) -> dict:
    """One epoch (or what is left of the steps / the time budget): returns its history row, the loss terms
    averaged over the epoch's steps and over the ranks. Advances run.step; sets run.stopped_early when
    max_seconds ran out."""
    model, optimizer = run.ddp, run.optimizer
    fast = fast or FastPath(device)
    scaler = run.scaler
    sums = {k: 0.0 for k in stage.loss_keys}
    counts = {k: 0 for k in stage.loss_keys}
    n_steps, lr, step_gflop = 0, None, 0.0
    t_epoch = time.time()
    stage.epoch_start(epoch)
    model.train()
    bar = tu.progress(loader, desc=f"{stage.name} {epoch + 1}/{run.n_epochs}",
                      total=min(run.steps_per_epoch, run.total_steps - run.step))
    for batch in bar:
        if run.step >= run.total_steps:
            break
        batch = _to_device(batch, device)
        lr = tu.set_poly_lr(optimizer, run.step, run.total_steps, setup.poly_power)
        at = Step(epoch, run.step, run.total_steps, run.steps_per_epoch)
        # this rank's forward + backward FLOPs, counted on the epoch's first step (every step has the same shapes;
        # the counter's dispatch costs a few % of a step)
        with flops.counting() if n_steps == 0 else contextlib.nullcontext() as counted:
            with fast.autocast():  # compute.precision: the forward and the loss; backward outside, as torch advises
                out = stage.loss(model, batch, at)
            loss = out["loss"].float()
            tu.check_finite(loss, f"{stage.name}: loss at step {run.step} (epoch {epoch + 1})", device,
                            stage.nonfinite_hint)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if n_steps == 0:
            step_gflop = counted.gflop
        if scaler is not None:  # fp16: steps with inf/nan gradients are skipped, the scale adapts
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        stage.after_step(out, at)
        for k in stage.loss_keys:
            v = out.get(k)
            if v is not None:
                sums[k] += float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                counts[k] += 1
        run.step += 1
        n_steps += 1
        if progress is not None:
            progress(run.step, run.total_steps)
        if counts["loss"]:
            bar.set_postfix(loss=f"{sums['loss'] / counts['loss']:.4f}")
        if _out_of_time(run, setup.max_seconds, device):  # every rank stops at the same step (DDP)
            run.stopped_early = True
            break
    row = {"epoch": epoch + 1, "steps": n_steps, "global_step": run.step, "lr": lr if n_steps else None}
    row.update({k: sums[k] / counts[k] if counts[k] else None for k in stage.loss_keys})
    row.update(stage.epoch_metrics())
    row["seconds"] = time.time() - t_epoch
    row["gflop"] = round(step_gflop * n_steps, 1)  # this rank's model FLOPs in the epoch (forward + backward)
    # losses: mean over ranks (each rank's mean over its steps of its share of the global batch)
    return {k: (tu.all_reduce_mean(v, device) if k in sums and v is not None else v) for k, v in row.items()}


def _extra_compat(extra: dict) -> tuple[float, bool, bool]:
    """(elapsed seconds, stopped early, finished) from a checkpoint's extra, also as earlier versions wrote it."""
    elapsed = float(extra.get("elapsed", extra.get("seconds", 0.0)) or 0.0)
    stopped = bool(extra.get("stopped_early", extra.get("stopped_by_time", False)))
    return elapsed, stopped, bool(extra.get("finished", False))


def _table_rows(history: list[dict]) -> list[dict]:
    """History rows with the same columns (rows of an earlier version may lack some): missing ones are None."""
    cols = list(dict.fromkeys(k for r in history for k in r))
    return [{k: r.get(k) for k in cols} for r in history]


def fit(stage: TrainingStage, ctx, seed: int, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) a stage; returns its summary (`common_summary` + the stage's `summary`).

    `ctx` is the stage's StageContext (device, checkpointer, progress callback, output, fast path: precision and
    memory format). `stop_after_epochs`
    ends this call after that many epochs *of this call* (the checkpoint stays, a later call resumes; tests
    use it and it can split work); the final outputs (the stage's files and the "history" table) are written
    only once training is finished: all steps done, or max_seconds spent.
    """
    device = ctx.device
    tu.seed_everything(seed)
    setup = stage.setup()
    fast = ctx.fast()
    model, optimizer = fast.model(setup.model), setup.optimizer  # channels-last in place: the optimizer's params
    ckpt = ctx.checkpointer()
    state = tu.load_checkpoint(ckpt, model, optimizer, map_location=device)
    extra = state["extra"] if state else {}

    data = setup.dataset
    if len(data) == 0:
        raise ValueError(f"{stage.name}: no training images (split {ctx.extra.get('split', '?')} is empty)")
    global_batch, per_rank = tu.split_batch(setup.batch_size, len(data), setup.batch_key)
    sampler = tu.GlobalBatchSampler(len(data), global_batch, setup.sampler_seed)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=setup.num_workers,
                        pin_memory=device.type == "cuda")
    steps_per_epoch = len(sampler)
    total_steps = max(1, int(setup.round_steps(setup.epochs * steps_per_epoch)))
    if extra.get("max_steps") not in (None, total_steps):
        raise RuntimeError(f"checkpoint {ckpt.describe()} was written for {extra['max_steps']} steps but this run "
                           f"has {total_steps}; delete it to start afresh")
    ddp = tu.wrap_ddp(model, device, find_unused_parameters=setup.find_unused_parameters)
    run = Run(model=model, ddp=ddp, optimizer=optimizer, global_batch=global_batch, per_rank_batch=per_rank,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              n_epochs=math.ceil(total_steps / steps_per_epoch), scaler=fast.grad_scaler())
    start_epoch = 0
    if state:
        start_epoch, run.step, run.resumed_from_epoch = state["epoch"], state["step"], state["epoch"]
        run.history = list(extra.get("history", []))
        run.elapsed_before, run.stopped_early, run.finished = _extra_compat(extra)
        log.info("%s: resumed from %s at epoch %d, step %d", stage.name, ckpt.describe(), start_epoch, run.step)
    run.t_start = time.time()
    run.finished = run.finished or run.stopped_early or run.step >= total_steps
    if state and not run.finished and _out_of_time(run, setup.max_seconds, device, earlier_calls_only=True):
        run.finished = run.stopped_early = True  # the budget was spent by earlier calls: no step more

    epochs_this_call = 0
    for epoch in range(start_epoch, run.n_epochs):
        if run.finished:
            break
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        row = train_one_epoch(stage, setup, run, loader, epoch, device, ctx.progress, fast)
        run.history.append(row)
        if tu.is_main():
            log.info("%s epoch %d/%d: %s", stage.name, epoch + 1, run.n_epochs,
                     {k: v for k, v in row.items() if v is not None})
        run.finished = run.stopped_early or run.step >= total_steps
        tu.save_checkpoint(ckpt, model, optimizer, epoch + 1, run.step,
                           extra={"history": run.history, "elapsed": run.elapsed(), "finished": run.finished,
                                  "stopped_early": run.stopped_early, "max_steps": total_steps,
                                  **stage.checkpoint_extra()})
        epochs_this_call += 1
        if not run.finished and stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
    run.finished = run.finished or run.step >= total_steps

    if run.finished and tu.is_main():
        stage.write_outputs(run)
        if run.history:
            ctx.out.write_table("history", _table_rows(run.history))
    tu.barrier()
    return {**common_summary(run), "compute_precision": fast.precision, "channels_last": fast.channels_last,
            **stage.summary(run)}


def common_summary(run: Run) -> dict:
    """The summary keys of every training stage."""
    last = run.history[-1] if run.history else {}
    gflop = sum(r.get("gflop") or 0.0 for r in run.history)
    seconds = sum(r.get("seconds") or 0.0 for r in run.history if r.get("gflop"))
    peak = flops.matmul_peak_gflops(next(run.model.parameters()).device) if gflop else None
    return {**flops.utilisation(gflop, seconds, peak), "finished": run.finished, "epochs_done": len(run.history), "steps": run.step,
            "max_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
            "global_batch": run.global_batch, "per_rank_batch": run.per_rank_batch, "world_size": tu.world_size(),
            "trainable_parameters": sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]),
            "resumed_from_epoch": run.resumed_from_epoch, "stopped_early": run.stopped_early,
            "train_seconds": run.elapsed(), "final_loss": last.get("loss"), "history": run.history}


__all__ = ["Setup", "Step", "Run", "TrainingStage", "make_optimizer", "train_one_epoch", "fit", "common_summary"]

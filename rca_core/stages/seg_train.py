"""Training stage: the DeepLab segmenter on pseudo-masks (or ground truth: the fully supervised upper bound).

Masks: `cfg.segmenter.labels == "pseudo"` reads each training image's "pseudo_mask" from the random_walk
stage (`ctx.inputs["masks"]`); `"gt"` reads the data set's ground truth (`ctx.dataset.mask`).
255 is ignored by the loss. Augmentation (method.md section 6 / torchvision references): random rescale
in `scale_range`, horizontal flip, pad (image with the mean colour, mask with 255) and random crop to
`crop_size`. Every random choice of an item comes from a generator seeded with (seed, epoch, index) and
the shuffle order from (seed + epoch), so a resumed run sees the same batches as an uninterrupted one.

Optimiser: SGD (momentum 0.9) or AdamW; the head gets `lr_mult_head` x lr; poly decay per step
(power `poly_power`) over `epochs` x steps-per-epoch steps (`epochs` may be fractional).
Checkpoint every epoch to `checkpoint.pt` (atomic, with optimiser and RNG state; resumed from
automatically); at the end `segmenter.pt` holds the weights + metadata that `rca_core.predict` needs.
`max_seconds` stops training early (the summary says so). Under torch.distributed: DDP, the global
batch `segmenter.batch_size` split over the ranks as evenly as possible by train_utils.GlobalBatchSampler
(same images per step, same steps and lr schedule for any worker count), the loss a mean over the global batch's labelled pixels
(train_utils.global_mean), trainable BatchNorm synchronised (models.norm.sync_batchnorm; with
`freeze_bn` the backbone's BatchNorm is torchvision's FrozenBatchNorm2d), and only rank 0 writes.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rca_core import train_utils as tu
from rca_core.config import RunConfig
from rca_core.models.deeplab import build_segmenter, model_meta
from rca_core.models.norm import sync_batchnorm

from .context import StageContext

STAGE = "seg_train"
CODE_VERSION = "2"  # 2: batch_size is the global batch; freeze_bn = FrozenBatchNorm2d
INPUTS = ["random_walk"]
IGNORE = 255
CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "segmenter.pt"


# ----------------------------------------------------------------------------- data
class SegTrainSet(torch.utils.data.Dataset):
    """(image uint8 (3, crop, crop), mask uint8 (crop, crop)) pairs with rescale / flip / pad / crop."""

    def __init__(self, ids: list[str], read_image, read_mask, crop_size: int, scale_range: tuple[float, float],
                 seed: int = 0, mean: tuple[float, float, float] = (0.485, 0.456, 0.406)):
        self.ids, self.read_image, self.read_mask = list(ids), read_image, read_mask
        self.crop, self.scale_range, self.seed, self.epoch = int(crop_size), tuple(scale_range), int(seed), 0
        self.fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        img = np.asarray(self.read_image(image_id))
        mask = np.asarray(self.read_mask(image_id))
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {image_id}: expected (H, W, 3), got shape {img.shape}")
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask of image {image_id} has shape {mask.shape}, image is {img.shape[:2]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)   # (3, H, W) uint8
        y = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))    # (H, W) uint8
        s = rng.uniform(*self.scale_range)
        h, w = max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s))
        if (h, w) != tuple(img.shape[:2]):
            x = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
            x = x.round_().clamp_(0, 255).to(torch.uint8)
            y = F.interpolate(y[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(torch.uint8)
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            xp = self.fill.expand(3, h + ph, w + pw).clone()
            xp[:, :h, :w] = x
            yp = torch.full((h + ph, w + pw), IGNORE, dtype=torch.uint8)
            yp[:h, :w] = y
            x, y = xp, yp
        top = int(rng.integers(0, x.shape[1] - self.crop + 1))
        left = int(rng.integers(0, x.shape[2] - self.crop + 1))
        x = x[:, top:top + self.crop, left:left + self.crop].contiguous()
        y = y[top:top + self.crop, left:left + self.crop].contiguous()
        return x, y


def mask_reader(cfg: RunConfig, ctx: StageContext):
    """The function image_id -> training mask, by cfg.segmenter.labels."""
    if cfg.segmenter.labels == "gt":
        return ctx.dataset.mask
    src = ctx.inputs.get("masks")
    if src is None:
        raise RuntimeError("seg_train with segmenter.labels='pseudo' needs the random_walk stage's pseudo-masks "
                           "(ctx.inputs['masks']); set segmenter.labels: gt for the fully supervised bound")
    return PseudoMasks(src)


class PseudoMasks:
    """Reads "pseudo_mask" of an image from the random_walk stage output (picklable for DataLoader workers)."""

    def __init__(self, out):
        self.out = out

    def __call__(self, image_id: str) -> np.ndarray:
        return self.out.read(image_id, "pseudo_mask")[0]


# ----------------------------------------------------------------------------- helpers
def make_optimizer(model: nn.Module, seg) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.backbone_parameters() if p.requires_grad], "lr": seg.lr},
              {"params": [p for p in model.head_parameters() if p.requires_grad], "lr": seg.lr * seg.lr_mult_head}]
    if seg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=seg.lr, momentum=0.9, weight_decay=seg.weight_decay)
    return torch.optim.AdamW(groups, lr=seg.lr, weight_decay=seg.weight_decay)


def save_model(location, model: nn.Module, meta: dict, extra: dict | None = None) -> None:
    """The inference checkpoint: {"model", "meta", ...} to a store file / path / URL (atomic), rank 0 only."""
    if not tu.is_main():
        return
    tu.save_torch(location, {"model": tu.unwrap(model).state_dict(), "meta": meta, **(extra or {})})


def loss_table(history: list[dict]) -> str:
    lines = ["| epoch | loss | lr | steps | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['loss']:.4f} | {h['lr']:.3g} | {h['steps']} | {h['seconds']:.1f} |" for h in history]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage
def train(cfg: RunConfig, ctx: StageContext) -> dict:
    seg = cfg.segmenter
    device = ctx.device
    t_start = time.time()
    tu.seed_everything(cfg.seed)
    num_classes = cfg.data.num_classes
    names = list(getattr(ctx.dataset, "class_names", None) or cfg.data.class_names or [])
    meta = model_meta(seg, num_classes, names or None)
    model = sync_batchnorm(build_segmenter(seg, num_classes), device).to(device)  # freeze_bn: in the builder
    optimizer = make_optimizer(model, seg)
    mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)

    if not ctx.ids:
        raise ValueError("seg_train: no training images (empty split)")
    data = SegTrainSet(ctx.ids, ctx.dataset.image, mask_reader(cfg, ctx), seg.crop_size, seg.scale_range,
                       seed=cfg.seed, mean=tuple(meta["mean"]))
    world = tu.world_size()
    global_batch, per_rank = tu.split_batch(seg.batch_size, len(data), "segmenter.batch_size")
    sampler = tu.GlobalBatchSampler(len(data), global_batch, cfg.seed)
    steps_per_epoch = len(sampler)
    max_steps = max(1, round(seg.epochs * steps_per_epoch))
    n_epochs = math.ceil(max_steps / steps_per_epoch)

    ckpt = ctx.checkpointer()
    info = tu.load_checkpoint(ckpt, model, optimizer, map_location="cpu")
    start_epoch, step, history = 0, 0, []
    if info is not None:
        start_epoch, step = info["epoch"], info["step"]
        history = list(info["extra"].get("history", []))
        if info["extra"].get("max_steps") not in (None, max_steps):
            raise RuntimeError(f"checkpoint {ckpt.describe()} was written for {info['extra']['max_steps']} steps but this run "
                               f"has {max_steps}; delete it to start afresh")
    resumed_from = start_epoch if info is not None else None
    ddp = tu.wrap_ddp(model, device)
    stopped_early = False
    t_train = time.time()
    for epoch in range(start_epoch, n_epochs):
        if step >= max_steps:
            break
        t_epoch = time.time()
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=seg.num_workers,
                                             pin_memory=device.type == "cuda")
        ddp.train()
        loss_sum, loss_n, steps_here = 0.0, 0, 0
        bar = tu.progress(loader, desc=f"seg_train {epoch + 1}/{n_epochs}", total=min(len(loader), max_steps - step))
        for img, mask in bar:
            if step >= max_steps:
                break
            lr = tu.set_poly_lr(optimizer, step, max_steps, seg.poly_power)
            x = (img.to(device, non_blocking=True).float().div_(255.0) - mean) / std
            y = mask.to(device, non_blocking=True).long()
            logits = ddp(x)
            # mean over the labelled pixels of the global batch (all ignored: a zero loss with a graph)
            loss = tu.global_mean(F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum"),
                                  (y != IGNORE).sum())
            tu.check_finite(loss, f"seg_train: loss at step {step} (epoch {epoch + 1})", device,
                            f"lower segmenter.lr (now {seg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            steps_here += 1
            if ctx.progress is not None:
                ctx.progress(step, max_steps)
            loss_sum += float(loss.detach())
            loss_n += 1
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}")
            if seg.max_seconds is not None:
                over = float(time.time() - t_start > seg.max_seconds)
                if tu.all_reduce_mean(over, device) > 0:  # every rank stops at the same step (DDP)
                    stopped_early = True
                    break
        row = {"epoch": epoch + 1, "loss": tu.all_reduce_mean(loss_sum / max(1, loss_n), device),
               "lr": float(lr) if steps_here else float("nan"), "steps": steps_here,
               "seconds": time.time() - t_epoch}
        history.append(row)
        if tu.is_main():
            print(f"seg_train epoch {row['epoch']}/{n_epochs}: loss {row['loss']:.4f}, {row['steps']} steps, "
                  f"{row['seconds']:.1f} s", flush=True)
        if stopped_early:
            break
        tu.save_checkpoint(ckpt, ddp, optimizer, epoch + 1, step,
                           extra={"meta": meta, "history": history, "max_steps": max_steps})
    train_seconds = time.time() - t_train

    model_path = ctx.out.file(MODEL_FILE)
    save_model(model_path, ddp, meta, {"history": history, "labels": seg.labels, "steps": step})
    if tu.is_main():
        if history:
            ctx.out.write_table("epochs", history)
        print("seg_train per-epoch loss (" + ("ground truth" if seg.labels == "gt" else "pseudo-masks") + "):\n"
              + loss_table(history), flush=True)
    tu.barrier()
    full = [h for h in history if h["steps"] == steps_per_epoch]
    return {"labels": seg.labels, "arch": seg.arch, "epochs_done": len(history), "steps": step,
            "max_steps": max_steps, "steps_per_epoch": steps_per_epoch, "global_batch": global_batch,
            "per_rank_batch": per_rank, "freeze_bn": seg.freeze_bn,
            "trainable_parameters": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
            "resumed_from_epoch": resumed_from,
            "stopped_early": stopped_early, "train_seconds": sum(h["seconds"] for h in history),
            "this_run_seconds": train_seconds,
            "seconds_per_epoch": (sum(h["seconds"] for h in full) / len(full)) if full else None,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "epoch_losses": [h["loss"] for h in history], "epoch_lrs": [h["lr"] for h in history], "model": model_path.uri, "world_size": world}

"""Stage affinity_train: train AffinityNet on the affinity labels of the confident CRF label maps (PSA recipe).

Per training crop: random rescale (refine.affinity.scale_range), horizontal flip, random crop of
crop_size (image padded with the mean, labels with 255); the label crop is sampled to the affinity grid
(stride feature_stride, nearest, as IRN) and turned into bg_pos / fg_pos / neg pair labels within the
radius; PSA's balanced loss. Poly lr; optimizer "auto" = PSA's SGD (new layers 10x) when the backbone starts
from pretrained weights, AdamW (new layers 1x) from scratch (the demo's small backbone: SGD at the demo's
lr 1e-3 left the affinities nearly unseparated - pos 0.45-0.58 vs neg 0.38 - after 3 epochs).
Checkpoint every epoch to files/checkpoint.pt (atomic), resumed from there; final weights files/model.pt;
per-epoch losses in the table "history".

Workers: `refine.affinity.batch_size` is the global batch, split as evenly as possible over the ranks by
train_utils.GlobalBatchSampler (same images per step, same steps and lr schedule for any worker count);
each loss term is a mean over the global batch's pairs (train_utils.global_mean); trainable BatchNorm
is synchronised (models.norm.sync_batchnorm). With IRN's frozen backbone (backbone.frozen_stages 4)
only the affinity head trains.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rca_core import train_utils as tu
from rca_core.affinity_labels import IGNORE, affinity_labels, downsample_labels
from rca_core.config import RunConfig
from rca_core.config.refine import AffinityConfig
from rca_core.models.affinity_net import AffinityNet, affinity_loss, image_to_tensor
from rca_core.models.norm import sync_batchnorm
from rca_core.stages.context import StageContext

STAGE = "affinity_train"
CODE_VERSION = "2"  # 2: batch_size is the global batch; backbone batchnorm / frozen_stages
INPUTS = ("crf_labels",)


class AffinityCrops(Dataset):
    """(image tensor (3, S, S), grid label (S/stride, S/stride) long) training crops; seeded per (epoch, index)."""

    def __init__(self, dataset, ids: list[str], labels_out, cfg: AffinityConfig, seed: int):
        self.dataset, self.ids, self.labels, self.cfg, self.seed = dataset, list(ids), labels_out, cfg, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        image_id = self.ids[k]
        rng = np.random.default_rng([self.seed, self.epoch, k])
        image = self.dataset.image(image_id)
        label, _ = self.labels.read(image_id, "crf_label")
        if label.shape != image.shape[:2]:
            raise ValueError(f"crf_label of {image_id} is {label.shape}, image is {image.shape[:2]}")
        lo, hi = self.cfg.scale_range
        s = rng.uniform(lo, hi)
        h, w = label.shape
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        x = image_to_tensor(image)
        y = torch.from_numpy(np.array(label, dtype=np.int64))
        c = self.cfg.crop_size
        ph, pw = max(c - nh, 0), max(c - nw, 0)
        if ph or pw:  # pad: image with 0 (= the mean after normalisation), labels with 255
            x = torch.nn.functional.pad(x, (0, pw, 0, ph))
            y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE)
        top = int(rng.integers(0, x.shape[1] - c + 1))
        left = int(rng.integers(0, x.shape[2] - c + 1))
        x = x[:, top:top + c, left:left + c]
        y = y[top:top + c, left:left + c]
        return x, downsample_labels(y, self.cfg.feature_stride)


def optimizer_kind(cfg: AffinityConfig) -> str:
    """"auto" -> PSA's SGD recipe when the backbone starts from pretrained weights, AdamW from scratch."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "sgd" if cfg.backbone.pretrained else "adamw"


def build_optimizer(net: AffinityNet, cfg: AffinityConfig) -> torch.optim.Optimizer:
    kind = optimizer_kind(cfg)
    mult = cfg.lr_mult_new if cfg.lr_mult_new is not None else (10.0 if kind == "sgd" else 1.0)
    backbone, new = net.parameter_groups()
    groups = [{"params": backbone, "lr": cfg.lr}, {"params": new, "lr": cfg.lr * mult}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train(cfg: RunConfig, ctx: StageContext) -> dict:
    acfg = cfg.refine.affinity
    device = ctx.device
    tu.seed_everything(cfg.seed)
    data = AffinityCrops(ctx.dataset, ctx.ids, ctx.inputs["labels"], acfg, cfg.seed)
    global_batch, per_rank = tu.split_batch(acfg.batch_size, len(data), "refine.affinity.batch_size")
    sampler = tu.GlobalBatchSampler(len(data), global_batch, cfg.seed * 1000 + 1)
    net = sync_batchnorm(AffinityNet(acfg), device).to(device)
    opt = build_optimizer(net, acfg)
    model = tu.wrap_ddp(net, device)
    steps_per_epoch = len(sampler)
    max_steps = max(1, int(round(acfg.epochs * steps_per_epoch)))
    n_epochs = math.ceil(max_steps / steps_per_epoch)

    ckpt = ctx.checkpointer()
    state = tu.load_checkpoint(ckpt, net, opt)
    start_epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    history = list(state["extra"].get("history", [])) if state else []
    elapsed = float(state["extra"].get("seconds", 0.0)) if state else 0.0
    stopped_early = bool(state["extra"].get("stopped_early", False)) if state else False

    for epoch in range(start_epoch, n_epochs):
        if stopped_early or step >= max_steps:
            break
        data.epoch = epoch
        sampler.set_epoch(epoch)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=acfg.num_workers)
        model.train()
        t0 = time.time()
        sums = {"loss": 0.0, "bg_pos": 0.0, "fg_pos": 0.0, "neg": 0.0}
        n, lr = 0, None
        for x, y in tu.progress(loader, desc=f"affinity_train epoch {epoch + 1}/{n_epochs}"):
            if step >= max_steps:
                break
            lr = tu.set_poly_lr(opt, step, max_steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses = affinity_loss(model(x), affinity_labels(y, acfg.radius), mean=tu.global_mean)
            tu.check_finite(losses["loss"], f"affinity_train: loss at step {step} (epoch {epoch + 1})", device,
                            "lower refine.affinity.lr; a frozen backbone needs weights whose BatchNorm statistics fit "
                            "them (refine.affinity.backbone.pretrained)")
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            n += 1
            if ctx.progress is not None:
                ctx.progress(step, max_steps)
            for k in sums:
                sums[k] += float(losses[k].detach())
            if acfg.max_seconds:  # every rank stops at the same step (DDP)
                over = float(elapsed + time.time() - t0 > acfg.max_seconds)
                if tu.all_reduce_mean(over, device) > 0:
                    stopped_early = True
                    break
        elapsed += time.time() - t0
        history.append({"epoch": epoch + 1, "steps": n, "global_step": step, "lr": lr, **{k: tu.all_reduce_mean(v / max(n, 1), device)
                                                           for k, v in sums.items()}})
        tu.save_checkpoint(ckpt, net, opt, epoch + 1, step,
                           extra={"history": history, "seconds": elapsed, "stopped_early": stopped_early})

    if tu.is_main():
        tu.save_checkpoint(ctx.out.file("model.pt"), net, None, len(history), step, with_rng=False)
        if history:
            ctx.out.write_table("history", history)  # per-epoch losses (the run report plots "loss")
    tu.barrier()
    return {"steps": step, "max_steps": max_steps, "epochs": len(history), "train_seconds": elapsed,
            "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "per_rank_batch": per_rank,
            "world_size": tu.world_size(),
            "trainable_parameters": sum(p.numel() for g in opt.param_groups for p in g["params"]),
            "resumed_from_epoch": state["epoch"] if state else None,
            "stopped_early": stopped_early, "history": history,
            "final_loss": history[-1]["loss"] if history else None}

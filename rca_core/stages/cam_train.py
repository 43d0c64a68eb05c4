"""Stage cam_train: train the CAM network (with the switched-on RCA parts) on image tags.

Loss per step (method.md sections 1-4):
    L = MLSM(logits) [+ aux_weight * MLSM(logits_plain) when aggregation is on]
        [+ contrast.weight * L_SC once step >= warmup_epochs * steps_per_epoch]
The memory bank is written after each step (no gradient; GT classes with sigmoid score above the
threshold); with aggregation on, the training prototypes are re-computed by per-class k-means of the
memory at the start of every `refresh_every_epochs`-th epoch (from epoch 1 on: epoch 0 has no memory yet).

Determinism: the model is initialised from cfg.seed; each epoch's image order and every image's
augmentation are drawn from generators seeded by (seed, epoch, index), so a run resumed from its
epoch checkpoint repeats exactly what the uninterrupted run does.

Workers: `cam.train.batch_size` is the global batch. With N workers (torch.distributed) each rank takes
its share (batch_size / N, as even as possible) of the same global batch (train_utils.GlobalBatchSampler),
so the steps per epoch, the poly lr schedule and the images of every step do not depend on N;
trainable BatchNorm layers are synchronised over the ranks (rca_core.models.norm.sync_batchnorm) and
every loss term is a mean over the global batch (train_utils.global_mean: images, contrast anchors),
so DDP's gradient average is the single-worker gradient.

The checkpoint (every epoch, atomic) holds the model (incl. memory queues and prototypes), optimizer, epoch, step, RNG states,
the per-epoch history and the elapsed time. Outputs: files/model.pt (state dict), table `history`
(one row per epoch: losses, classification mAP on the training batches, memory fill, seconds).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rca_core import train_utils as tu
from rca_core.cam_ops import normalize_image, tags_to_indices
from rca_core.losses.contrast import semantic_contrast_loss
from rca_core.models.cam_net import CamNet
from rca_core.models.norm import sync_batchnorm
from rca_core.models.projection import region_embeddings, region_masks

STAGE = "cam_train"
CODE_VERSION = "2"  # 2: batch_size is the global batch; batchnorm / frozen_stages
INPUTS: tuple[str, ...] = ()
log = logging.getLogger("rca.cam_train")


class CamTrainSet(Dataset):
    """Tag-labelled crops: random long-side resize, horizontal flip, random crop (zero pad), normalise."""

    def __init__(self, dataset, ids: list[str], num_classes: int, crop: int, resize_long: tuple[int, int],
                 seed: int = 0):
        self.ds, self.ids, self.num_fg = dataset, list(ids), num_classes - 1
        self.crop, self.resize_long, self.seed = crop, tuple(resize_long), seed
        self.epoch = 0
        if self.resize_long[0] > self.resize_long[1]:
            raise ValueError(f"cam.train.resize_long must be (low, high), got {self.resize_long}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: str) -> np.ndarray:
        t = np.zeros(self.num_fg, dtype=np.float32)
        t[tags_to_indices(self.ds.tags(image_id), self.num_fg + 1)] = 1.0
        return t

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = self.ds.image(image_id)
        h, w = img.shape[:2]
        long_side = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
        s = long_side / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        x = normalize_image(np.ascontiguousarray(img))
        c = self.crop
        out = np.zeros((3, c, c), dtype=np.float32)
        # IRN-style random crop: pick a window in the padded frame, image placed at a random offset
        ch, cw = min(c, nh), min(c, nw)
        top, left = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
        oy, ox = int(rng.integers(0, c - ch + 1)), int(rng.integers(0, c - cw + 1))
        out[:, oy:oy + ch, ox:ox + cw] = x[:, top:top + ch, left:left + cw]
        return torch.from_numpy(out), torch.from_numpy(self.target(image_id))


def build_optimizer(model: CamNet, tc) -> torch.optim.Optimizer:
    bb, _ = model.parameter_groups()
    head, rca = model.head_and_rca_parameters()
    mult_rca = tc.lr_mult_new if tc.lr_mult_rca is None else tc.lr_mult_rca
    groups = [{"params": bb, "lr": tc.lr}, {"params": head, "lr": tc.lr * tc.lr_mult_new},
              {"params": rca, "lr": tc.lr * mult_rca}]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def _gather(t: torch.Tensor) -> torch.Tensor:
    return tu.all_gather_cat(t) if tu.is_dist() else t


def train(cfg, ctx, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) the CAM network; returns the stage summary.

    `stop_after_epochs` ends this call after that many epochs *of this call* (the checkpoint stays,
    a later call resumes) - used by tests and to split work; the final model is written only when
    training is finished.
    """
    tc, cam_cfg = cfg.cam.train, cfg.cam
    device = ctx.device
    tu.seed_everything(cfg.seed)
    model = sync_batchnorm(CamNet(cam_cfg, cfg.data.num_classes), device).to(device)
    opt = build_optimizer(model, tc)
    ckpt = ctx.checkpointer()
    state = tu.load_checkpoint(ckpt, model, opt, map_location=device)
    start_epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    extra = state["extra"] if state else {}
    history: list[dict] = list(extra.get("history", []))
    elapsed0 = float(extra.get("elapsed", 0.0))
    finished = bool(extra.get("finished", False))
    if state:
        log.info("cam_train: resumed from %s at epoch %d, step %d", ckpt.describe(), start_epoch, step)

    data = CamTrainSet(ctx.dataset, ctx.ids, cfg.data.num_classes, tc.crop_size, tc.resize_long, cfg.seed)
    if len(data) == 0:
        raise ValueError(f"cam_train: split {ctx.extra.get('split', '?')} has no images")
    global_batch, per_rank = tu.split_batch(tc.batch_size, len(data), "cam.train.batch_size")
    sampler = tu.GlobalBatchSampler(len(data), global_batch, cfg.seed)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=tc.num_workers, persistent_workers=False)
    steps_per_epoch = len(loader)
    total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = cam_cfg.contrast.warmup_epochs * steps_per_epoch
    ddp = tu.wrap_ddp(model, device, find_unused_parameters=cam_cfg.rca_enabled)
    t_start = time.time()
    epochs_this_call = 0
    stopped_by_time = False

    for epoch in range(start_epoch, n_epochs):
        if finished or step >= total_steps:
            break
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        if model.use_aggregation and epoch >= 1 and epoch % cam_cfg.aggregation.refresh_every_epochs == 0:
            model.refresh_prototypes(seed=cfg.seed + epoch)
        ddp.train()
        sums = {"loss": 0.0, "loss_cls": 0.0, "loss_plain": 0.0, "loss_sc": 0.0}
        n_steps, n_sc, scores, targets, writes = 0, 0, [], [], 0
        t_epoch = time.time()
        for x, y in tu.progress(loader, desc=f"cam_train {epoch + 1}/{n_epochs}", total=steps_per_epoch):
            if step >= total_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = tu.set_poly_lr(opt, step, total_steps)
            out = ddp(x, with_embeddings=model.use_memory)
            n_img = x.shape[0]  # this rank's share of the global batch: means are over the global batch
            loss_cls = tu.global_mean(F.multilabel_soft_margin_loss(out["logits"], y, reduction="sum"), n_img)
            loss = loss_cls
            if model.use_aggregation:
                loss_plain = tu.global_mean(F.multilabel_soft_margin_loss(out["logits_plain"], y, reduction="sum"),
                                            n_img)
                loss = loss + tc.aux_weight * loss_plain
                sums["loss_plain"] += float(loss_plain.detach())
            if model.use_memory:
                masks, index = region_masks(out["cam_plain"], y)
                emb = region_embeddings(out["emb"], masks, index)
                if model.use_contrast and step >= warmup_steps:
                    mem_e, mem_c = model.memory.entries()
                    loss_sc = semantic_contrast_loss(emb, index[:, 1], mem_e, mem_c, cam_cfg.contrast.temperature,
                                                     mixup_alpha=8.0 if cam_cfg.contrast.mixup else None)
                    if tu.is_dist() and not cam_cfg.contrast.mixup:  # mean over the global batch's anchors
                        n_anchor = torch.isin(index[:, 1], mem_c).sum()
                        loss_sc = tu.global_mean(loss_sc * n_anchor, n_anchor)
                    loss = loss + cam_cfg.contrast.weight * loss_sc
                    sums["loss_sc"] += float(loss_sc.detach())
                    n_sc += 1
            tu.check_finite(loss, f"cam_train: loss at step {step} (epoch {epoch + 1})", device,
                            "lower cam.train.lr; with cam.backbone.batchnorm frozen/frozen_stats the backbone needs "
                            "weights whose BatchNorm statistics fit them (cam.backbone.pretrained)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if model.use_memory:
                with torch.no_grad():
                    region_score = torch.sigmoid(out["logits"].detach())[index[:, 0], index[:, 1]]
                    writes += model.memory.write_regions(_gather(F.normalize(emb.detach(), dim=1)),
                                                         _gather(index[:, 1]), _gather(region_score))
            sums["loss"] += float(loss.detach())
            sums["loss_cls"] += float(loss_cls.detach())
            scores.append(torch.sigmoid(out["logits"].detach()).cpu())
            targets.append(y.cpu())
            step += 1
            n_steps += 1
            if ctx.progress is not None:
                ctx.progress(step, total_steps)
            if tc.max_seconds:  # every rank stops at the same step (DDP)
                over = float(elapsed0 + time.time() - t_start > tc.max_seconds)
                if tu.all_reduce_mean(over, device) > 0:
                    stopped_by_time = True
                    break
        row = {"epoch": epoch + 1, "steps": n_steps, "global_step": step, "lr": lr if n_steps else None,
               "loss": sums["loss"] / max(1, n_steps), "loss_cls": sums["loss_cls"] / max(1, n_steps),
               "loss_plain": sums["loss_plain"] / max(1, n_steps) if model.use_aggregation else None,
               "loss_sc": sums["loss_sc"] / n_sc if n_sc else None,
               "map": tu.multilabel_map(torch.cat(scores), torch.cat(targets)) if scores else None,
               "memory_writes": writes if model.use_memory else None,
               "memory_fill": float(np.mean(model.memory.fill_fraction())) if model.use_memory else None,
               "prototypes_valid": int(model.prototype_valid.sum()) if model.use_aggregation else None,
               "seconds": time.time() - t_epoch}
        row = {k: (tu.all_reduce_mean(v, device) if isinstance(v, float) and k.startswith(("loss", "map")) else v)
               for k, v in row.items()}
        history.append(row)
        if tu.is_main():
            log.info("cam_train epoch %d: %s", epoch + 1, {k: v for k, v in row.items() if v is not None})
        finished = stopped_by_time or step >= total_steps
        tu.save_checkpoint(ckpt, model, opt, epoch + 1, step,
                           extra={"history": history, "elapsed": elapsed0 + time.time() - t_start,
                                  "finished": finished, "stopped_by_time": stopped_by_time})
        epochs_this_call += 1
        if finished:
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            tu.barrier()
            return {"finished": False, "epochs_done": epoch + 1, "steps": step, "history": history}

    elapsed = elapsed0 + time.time() - t_start
    if tu.is_main():
        tu.save_torch(ctx.out.file("model.pt"), model.state_dict())
        if history:
            ctx.out.write_table("history", history)
    tu.barrier()
    last = history[-1] if history else {}
    return {"finished": True, "epochs_done": len(history), "steps": step, "total_steps": total_steps,
            "resumed_from_epoch": state["epoch"] if state else None,
            "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "per_rank_batch": per_rank,
            "world_size": tu.world_size(), "trainable_parameters": sum(p.numel() for g in opt.param_groups
                                                                      for p in g["params"]),
            "stopped_by_time": bool(stopped_by_time or extra.get("stopped_by_time")),
            "train_seconds": elapsed, "final_loss": last.get("loss"), "final_map": last.get("map"),
            "rca": {"memory": model.use_memory, "contrast": model.use_contrast, "aggregation": model.use_aggregation},
            "history": history}

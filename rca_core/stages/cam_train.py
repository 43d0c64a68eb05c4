"""Stage cam_train: train the CAM network (with the switched-on RCA parts) on image tags.

Loss per step (docs/method.md: CAM network, Memory bank, Semantic contrast, Semantic aggregation):
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

The loop itself (batches, DDP, poly lr, checkpoint + RNG state every epoch, max_seconds, history) is
rca_core.training_loop; this module supplies `CamTraining`: the model and optimizer groups, the loss of a
batch, the prototype refresh at epoch start, the memory-bank writes after each optimizer step and the
per-epoch mAP / memory metrics. The checkpoint holds the model incl. memory queues and prototypes.
Outputs: files/model.pt (state dict), table `history` (one row per epoch: losses, classification mAP on
the training batches, memory writes / fill, valid prototypes, seconds).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from rca_core import train_utils as tu
from rca_core.cam_ops import normalize_image, tags_to_indices
from rca_core.losses.contrast import semantic_contrast_loss
from rca_core.models.cam_net import CamNet
from rca_core.models.norm import sync_batchnorm
from rca_core.training_loop import Run, Setup, Step, TrainingStage, fit, make_optimizer



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
    return make_optimizer(tc.optimizer, groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def _gather(t: torch.Tensor) -> torch.Tensor:
    return tu.all_gather_cat(t) if tu.is_dist() else t


class CamTraining(TrainingStage):
    """cam_train's part of the training loop: CamNet, its loss terms and the memory bank / prototype hooks."""
    name = "cam_train"
    loss_keys = ("loss", "loss_cls", "loss_plain", "loss_sc")
    nonfinite_hint = ("lower cam.train.lr; with cam.backbone.batchnorm frozen/frozen_stats the backbone needs "
                      "weights whose BatchNorm statistics fit them (cam.backbone.pretrained)")

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx

    def setup(self) -> Setup:
        cfg, tc, device = self.cfg, self.cfg.cam.train, self.ctx.device
        self.model = model = sync_batchnorm(CamNet(cfg.cam, cfg.data.num_classes), device).to(device)
        opt = build_optimizer(model, tc)
        data = CamTrainSet(self.ctx.dataset, self.ctx.ids, cfg.data.num_classes, tc.crop_size, tc.resize_long, cfg.seed)
        return Setup(model, opt, data, batch_size=tc.batch_size, batch_key="cam.train.batch_size", epochs=tc.epochs,
                     sampler_seed=cfg.seed, num_workers=tc.num_workers, max_seconds=tc.max_seconds,
                     round_steps=math.ceil, find_unused_parameters=cfg.cam.rca_enabled)

    def epoch_start(self, epoch: int) -> None:
        model, cam_cfg = self.model, self.cfg.cam
        if model.use_aggregation and epoch >= 1 and epoch % cam_cfg.aggregation.refresh_every_epochs == 0:
            model.refresh_prototypes(seed=self.cfg.seed + epoch)
        self.scores, self.targets, self.writes = [], [], 0

    def loss(self, ddp, batch, at: Step) -> dict:
        model, cam_cfg, tc = self.model, self.cfg.cam, self.cfg.cam.train
        x, y = batch
        out = ddp(x, with_embeddings=model.use_memory, tags=y if model.use_memory else None)
        # under compute.precision bf16/fp16: the heads' results as float32
        out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
        n_img = x.shape[0]  # this rank's share of the global batch: means are over the global batch
        loss_cls = tu.global_mean(F.multilabel_soft_margin_loss(out["logits"], y, reduction="sum"), n_img)
        terms = {"loss_cls": loss_cls, "loss_plain": None, "loss_sc": None, "logits": out["logits"], "target": y}
        loss = loss_cls
        if model.use_aggregation:
            terms["loss_plain"] = tu.global_mean(F.multilabel_soft_margin_loss(out["logits_plain"], y, reduction="sum"),
                                                 n_img)
            loss = loss + tc.aux_weight * terms["loss_plain"]
        if model.use_memory:
            emb, index = out["emb"], out["index"]  # region embeddings of every (image, tag): in the forward
            terms["emb"], terms["index"] = emb, index  # written into the memory after the optimizer step
            if model.use_contrast and at.step >= cam_cfg.contrast.warmup_epochs * at.steps_per_epoch:
                mem_e, mem_c = model.memory.entries()
                loss_sc = semantic_contrast_loss(emb, index[:, 1], mem_e, mem_c, cam_cfg.contrast.temperature,
                                                 mixup_alpha=8.0 if cam_cfg.contrast.mixup else None)
                if tu.is_dist() and not cam_cfg.contrast.mixup:  # mean over the global batch's anchors
                    n_anchor = torch.isin(index[:, 1], mem_c).sum()
                    loss_sc = tu.global_mean(loss_sc * n_anchor, n_anchor)
                loss = loss + cam_cfg.contrast.weight * loss_sc
                terms["loss_sc"] = loss_sc
        return {"loss": loss, **terms}

    def after_step(self, out: dict, at: Step) -> None:
        model = self.model
        if model.use_memory:  # write the step's regions (all ranks' ones) into the memory bank
            with torch.no_grad():
                index = out["index"]
                region_score = torch.sigmoid(out["logits"].detach())[index[:, 0], index[:, 1]]
                self.writes += model.memory.write_regions(_gather(F.normalize(out["emb"].detach(), dim=1)),
                                                          _gather(index[:, 1]), _gather(region_score))
        self.scores.append(torch.sigmoid(out["logits"].detach()).cpu())
        self.targets.append(out["target"].cpu())

    def epoch_metrics(self) -> dict:
        model, device = self.model, self.ctx.device
        m = tu.multilabel_map(torch.cat(self.scores), torch.cat(self.targets)) if self.scores else None
        return {"map": tu.all_reduce_mean(m, device) if m is not None else None,
                "memory_writes": self.writes if model.use_memory else None,
                "memory_fill": float(np.mean(model.memory.fill_fraction())) if model.use_memory else None,
                "prototypes_valid": int(model.prototype_valid.sum()) if model.use_aggregation else None}

    def write_outputs(self, run: Run) -> None:
        tu.save_torch(self.ctx.out.file("model.pt"), self.model.state_dict())

    def summary(self, run: Run) -> dict:
        last, model = run.history[-1] if run.history else {}, self.model
        return {"total_steps": run.total_steps, "stopped_by_time": run.stopped_early, "final_map": last.get("map"),
                "rca": {"memory": model.use_memory, "contrast": model.use_contrast,
                        "aggregation": model.use_aggregation}}


def train(cfg, ctx, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) the CAM network; returns the stage summary.

    `stop_after_epochs` ends this call after that many epochs *of this call* (the checkpoint stays,
    a later call resumes) - used by tests and to split work; the final model is written only when
    training is finished.
    """
    if cfg.cam.checkpoint:
        return from_checkpoint(cfg, ctx)
    return fit(CamTraining(cfg, ctx), ctx, cfg.seed, stop_after_epochs=stop_after_epochs)


def from_checkpoint(cfg, ctx) -> dict:
    """cam.checkpoint: a CAM network trained before (another run's cam_train files/model.pt, or a checkpoint.pt):
    loaded into the configured network (an error names cam.checkpoint when it does not fit) and written as this
    stage's model.pt; nothing is trained, and memory_build and cam_infer start from it."""
    from rca_core.models.cam_net import load_cam_net

    net = load_cam_net(cfg.cam, cfg.data.num_classes, cfg.cam.checkpoint, what="cam.checkpoint",
                       stage="cam_train (of the run that trained it)")
    if tu.is_main():
        tu.save_torch(ctx.out.file("model.pt"), net.state_dict())
    return {"from_checkpoint": str(cfg.cam.checkpoint), "trained": False, "steps": 0}

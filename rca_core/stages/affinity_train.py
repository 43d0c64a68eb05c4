"""Stage affinity_train: train AffinityNet on the affinity labels of the confident CRF label maps (PSA recipe).

Per training crop: random rescale (refine.affinity.scale_range), horizontal flip, random crop of
crop_size (image padded with the mean, labels with 255); the label crop is sampled to the affinity grid
(stride feature_stride, nearest, as IRN) and turned into bg_pos / fg_pos / neg pair labels within the
radius; PSA's balanced loss. Poly lr; optimizer "auto" = PSA's SGD (new layers 10x) when the backbone starts
from pretrained weights, AdamW (new layers 1x) from scratch (the demo's small backbone: SGD at the demo's
lr 1e-3 left the affinities nearly unseparated - pos 0.45-0.58 vs neg 0.38 - after 3 epochs).
The loop (batches, DDP, poly lr, checkpoint + RNG state every epoch to files/checkpoint.pt, resume,
max_seconds, per-epoch history) is rca_core.training_loop; this module supplies `AffinityTraining`: the data
set, the network and optimizer groups and the loss terms. Final weights files/model.pt (save_checkpoint
format: {"model", "epoch", "step", "extra"}); per-epoch losses in the table "history".

Workers: `refine.affinity.batch_size` is the global batch, split as evenly as possible over the ranks by
train_utils.GlobalBatchSampler (same images per step, same steps and lr schedule for any worker count);
each loss term is a mean over the global batch's pairs (train_utils.global_mean); trainable BatchNorm
is synchronised (models.norm.sync_batchnorm). With IRN's frozen backbone (backbone.frozen_stages 4)
only the affinity head trains.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rca_core import train_utils as tu
from rca_core.affinity_labels import IGNORE, affinity_labels, downsample_labels
from rca_core.config import RunConfig
from rca_core.config.refine import AffinityConfig
from rca_core.models.affinity_net import AffinityNet, affinity_loss, image_to_tensor
from rca_core.models.norm import sync_batchnorm
from rca_core.stages.context import StageContext
from rca_core.training_loop import Run, Setup, Step, TrainingStage, fit, make_optimizer



class AffinityCrops(Dataset):
    """(image tensor (3, S, S), grid label (S/stride, S/stride) long) training crops; seeded per (epoch, index)."""

    def __init__(self, dataset, ids: list[str], labels_out, cfg: AffinityConfig, seed: int):
        self.dataset, self.ids, self.labels, self.cfg, self.seed = dataset, list(ids), labels_out, cfg, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
    return make_optimizer(kind, groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class AffinityTraining(TrainingStage):
    """affinity_train's part of the training loop: AffinityNet and PSA's balanced loss terms."""
    name = "affinity_train"
    loss_keys = ("loss", "bg_pos", "fg_pos", "neg")
    nonfinite_hint = ("lower refine.affinity.lr; a frozen backbone needs weights whose BatchNorm statistics fit "
                      "them (refine.affinity.backbone.pretrained)")

    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx

    def setup(self) -> Setup:
        cfg, acfg, device = self.cfg, self.cfg.refine.affinity, self.ctx.device
        data = AffinityCrops(self.ctx.dataset, self.ctx.ids, self.ctx.inputs["labels"], acfg, cfg.seed)
        self.net = net = sync_batchnorm(AffinityNet(acfg), device).to(device)
        return Setup(net, build_optimizer(net, acfg), data, batch_size=acfg.batch_size,
                     batch_key="refine.affinity.batch_size", epochs=acfg.epochs, sampler_seed=cfg.seed * 1000 + 1,
                     num_workers=acfg.num_workers, max_seconds=acfg.max_seconds)

    def loss(self, model, batch, at: Step) -> dict:
        x, y = batch
        return affinity_loss(model(x).float(), affinity_labels(y, self.cfg.refine.affinity.radius), mean=tu.global_mean)

    def write_outputs(self, run: Run) -> None:
        tu.save_checkpoint(self.ctx.out.file("model.pt"), self.net, None, len(run.history), run.step, with_rng=False)

    def summary(self, run: Run) -> dict:
        return {"epochs": len(run.history)}


def train(cfg: RunConfig, ctx: StageContext, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) AffinityNet; returns the stage summary. `stop_after_epochs`: as in
    rca_core.training_loop.fit (files/model.pt is written only once training is finished)."""
    return fit(AffinityTraining(cfg, ctx), ctx, cfg.seed, stop_after_epochs=stop_after_epochs)

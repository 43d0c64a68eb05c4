"""Training stage: the DeepLab segmenter on pseudo-masks (or ground truth: the fully supervised upper bound).

Masks: `cfg.segmenter.labels == "pseudo"` reads each training image's "pseudo_mask" from the random_walk
stage (`ctx.inputs["masks"]`); `"gt"` reads the data set's ground truth (`ctx.dataset.mask`).
255 is ignored by the loss. Augmentation (docs/method.md, Segmenter; torchvision references): random rescale
in `scale_range`, horizontal flip, pad (image with the mean colour, mask with 255) and random crop to
`crop_size`. Every random choice of an item comes from a generator seeded with (seed, epoch, index) and
the shuffle order from (seed + epoch), so a resumed run sees the same batches as an uninterrupted one.

Optimiser: SGD (momentum 0.9) or AdamW; the head gets `lr_mult_head` x lr; poly decay per step
(power `poly_power`) over `epochs` x steps-per-epoch steps (`epochs` may be fractional).
The loop is rca_core.training_loop (this module supplies `SegTraining`: data, model, loss, output file):
checkpoint every epoch to `checkpoint.pt` (atomic, with optimiser and RNG state; resumed from
automatically), per-epoch table `history` (loss, lr, steps, seconds); at the end `segmenter.pt` holds
{"model", "meta", "history", "labels", "steps"}: the weights + metadata that `rca_core.predict` needs.
`max_seconds` stops training early, counted over every call of a resumed run (the summary says so).
Under torch.distributed: DDP, the global
batch `segmenter.batch_size` split over the ranks as evenly as possible by train_utils.GlobalBatchSampler
(same images per step, same steps and lr schedule for any worker count), the loss a mean over the global batch's labelled pixels
(train_utils.global_mean), trainable BatchNorm synchronised (models.norm.sync_batchnorm; with
`freeze_bn` the backbone's BatchNorm is torchvision's FrozenBatchNorm2d), and only rank 0 writes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rca_core import train_utils as tu
from rca_core import training_loop as tl
from rca_core.config import RunConfig
from rca_core.models.deeplab import build_segmenter, model_meta
from rca_core.models.norm import sync_batchnorm

from .context import StageContext

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
    return tl.make_optimizer(seg.optimizer, groups, lr=seg.lr, momentum=0.9, weight_decay=seg.weight_decay)


def save_model(location, model: nn.Module, meta: dict, extra: dict | None = None) -> None:
    """The inference checkpoint: {"model", "meta", ...} to a store file / path / URL (atomic), rank 0 only."""
    if not tu.is_main():
        return
    tu.save_torch(location, {"model": tu.unwrap(model).state_dict(), "meta": meta, **(extra or {})})


# ----------------------------------------------------------------------------- the stage
class SegTraining(tl.TrainingStage):
    """seg_train's part of the training loop: the segmenter, the masks, the cross-entropy of a batch and the
    segmenter file (weights + the metadata rca_core.predict needs)."""
    name = "seg_train"

    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.nonfinite_hint = f"lower segmenter.lr (now {cfg.segmenter.lr})"

    def setup(self) -> tl.Setup:
        cfg, seg, ctx, device = self.cfg, self.cfg.segmenter, self.ctx, self.ctx.device
        num_classes = cfg.data.num_classes
        names = list(getattr(ctx.dataset, "class_names", None) or cfg.data.class_names or [])
        self.meta = meta = model_meta(seg, num_classes, names or None)
        # freeze_bn: in the builder
        self.model = model = sync_batchnorm(build_segmenter(seg, num_classes), device).to(device)
        optimizer = make_optimizer(model, seg)
        self.mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)
        if not ctx.ids:
            raise ValueError("seg_train: no training images (empty split)")
        data = SegTrainSet(ctx.ids, ctx.dataset.image, mask_reader(cfg, ctx), seg.crop_size, seg.scale_range,
                           seed=cfg.seed, mean=tuple(meta["mean"]))
        return tl.Setup(model, optimizer, data, batch_size=seg.batch_size, batch_key="segmenter.batch_size",
                        epochs=seg.epochs, sampler_seed=cfg.seed, num_workers=seg.num_workers,
                        max_seconds=seg.max_seconds, poly_power=seg.poly_power)

    def loss(self, model, batch, at: tl.Step) -> dict:
        img, mask = batch
        x = (img.float().div_(255.0) - self.mean) / self.std
        y = mask.long()
        logits = model(x).float()
        # mean over the labelled pixels of the global batch (all ignored: a zero loss with a graph)
        return {"loss": tu.global_mean(F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum"),
                                       (y != IGNORE).sum())}

    def checkpoint_extra(self) -> dict:
        return {"meta": self.meta}

    def write_outputs(self, run: tl.Run) -> None:
        save_model(self.ctx.out.file(MODEL_FILE), self.model, self.meta,
                   {"history": run.history, "labels": self.cfg.segmenter.labels, "steps": run.step})

    def summary(self, run: tl.Run) -> dict:
        seg, history = self.cfg.segmenter, run.history
        full = [h for h in history if h["steps"] == run.steps_per_epoch and h.get("seconds") is not None]
        return {"labels": seg.labels, "arch": seg.arch, "freeze_bn": seg.freeze_bn,
                "this_run_seconds": run.this_call_seconds(),
                "seconds_per_epoch": (sum(h["seconds"] for h in full) / len(full)) if full else None,
                "first_loss": history[0]["loss"] if history else None,
                "epoch_losses": [h["loss"] for h in history], "epoch_lrs": [h["lr"] for h in history],
                "model": self.ctx.out.file(MODEL_FILE).uri}


def train(cfg: RunConfig, ctx: StageContext, stop_after_epochs: int | None = None) -> dict:
    """Train (or resume) the segmenter; returns the stage summary. `stop_after_epochs`: as in
    rca_core.training_loop.fit (segmenter.pt is written only once training is finished)."""
    return tl.fit(SegTraining(cfg, ctx), ctx, cfg.seed, stop_after_epochs=stop_after_epochs)

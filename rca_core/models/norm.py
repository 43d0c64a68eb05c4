"""BatchNorm variants for the training recipes: frozen, fixed-statistics, and synchronised over workers.

- `frozen`: torchvision's `FrozenBatchNorm2d` - running statistics and affine weight/bias are buffers,
  nothing about the layer changes during training (PSA, DeepLab-v2, detectron-style fine-tuning).
- `frozen_stats`: `FixedStatsBatchNorm2d` - IRN's `FixedBatchNorm` (jiwoon-ahn/irn net/resnet50.py): always
  normalises with the running statistics (never updated), the affine weight/bias stay trainable.
- `train`: plain `nn.BatchNorm2d` (batch statistics in training). With more than one worker the statistics
  must cover the global batch, not each rank's share: `sync_batchnorm(model, device)` swaps every trainable
  BatchNorm for `torch.nn.SyncBatchNorm` on CUDA (NCCL) and for `DistBatchNorm2d` elsewhere (torch's
  SyncBatchNorm refuses CPU tensors; this one reduces the sums with the differentiable
  `torch.distributed.nn.functional.all_reduce`, so it works over gloo).

`freeze_batchnorm(module, mode)` converts in place and keeps every statistic and affine value.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

BN_MODES = ("train", "frozen", "frozen_stats")
# torch 2.14 marks torch.distributed.nn.functional.all_reduce (public, differentiable) deprecated in favour of
# the private torch.distributed._functional_collectives; it still works (tests/test_recipe_workers.py): keep it.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


class FixedStatsBatchNorm2d(nn.BatchNorm2d):
    """IRN's FixedBatchNorm: normalise with the running statistics in training too (they never change);
    weight and bias are ordinary parameters. Same state-dict keys as nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _frozen_from(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    out = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight.detach())
            out.bias.copy_(bn.bias.detach())
        if bn.track_running_stats and bn.running_mean is not None:
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
    return out.to(bn.weight.device if bn.affine else bn.running_mean.device)


def _fixed_from(bn: nn.BatchNorm2d) -> FixedStatsBatchNorm2d:
    out = FixedStatsBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                track_running_stats=True)
    out.load_state_dict(bn.state_dict())
    for p, q in zip(out.parameters(), bn.parameters()):
        p.requires_grad_(q.requires_grad)
    return out.to(bn.running_mean.device)


def _is_plain_bn(m: nn.Module) -> bool:
    """A BatchNorm that uses batch statistics in training (not FixedStats / Frozen)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, FixedStatsBatchNorm2d)


def freeze_batchnorm(module: nn.Module, mode: str = "frozen") -> nn.Module:
    """Replace every BatchNorm2d under `module` (in place; also `module` itself, returned) by its frozen
    ('frozen') or fixed-statistics ('frozen_stats') version; 'train' leaves it as it is."""
    if mode not in BN_MODES:
        raise ValueError(f"batchnorm mode must be one of {BN_MODES}, got {mode!r}")
    if mode == "train":
        return module
    make = _frozen_from if mode == "frozen" else _fixed_from

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.BatchNorm2d) and (mode == "frozen" or not isinstance(m, FixedStatsBatchNorm2d)):
            return make(m)
        for name, child in list(m._modules.items()):
            if child is not None:
                m._modules[name] = convert(child)
        return m

    return convert(module)


class DistBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch of every rank of torch.distributed
    (any backend, CPU included). Outside training or without torch.distributed it is nn.BatchNorm2d.
    Mean and variance come from two differentiable all-reduces (sum and count, then the sum of squared
    deviations); the gradient through them is the gradient of the global-batch BatchNorm. Running
    statistics are updated exactly as nn.BatchNorm2d would with the whole batch (unbiased variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        n_local = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        s = all_reduce(torch.cat([x.sum(dims), n_local]))
        n = s[c]
        mean = s[:c] / n
        shape = (1, c) + (1,) * (x.dim() - 2)
        xc = x - mean.view(shape)
        var = all_reduce((xc * xc).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                nn_ = float(n)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (nn_ / max(nn_ - 1, 1.0)), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """With torch.distributed on more than one rank: every trainable BatchNorm (batch statistics) becomes
    one synchronised over the ranks - torch.nn.SyncBatchNorm on CUDA, DistBatchNorm2d otherwise. Frozen
    and fixed-statistics layers stay. Returns the model (converted in place where possible)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    cuda = torch.device(device).type == "cuda"

    def convert(m: nn.Module) -> nn.Module:
        if _is_plain_bn(m) and not isinstance(m, (nn.SyncBatchNorm, DistBatchNorm2d)):
            if cuda:
                new: nn.Module = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            elif isinstance(m, nn.BatchNorm2d):
                new = DistBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            else:  # 1d/3d BatchNorm off CUDA: not used by any model here
                raise TypeError(f"sync_batchnorm: {type(m).__name__} cannot be synchronised off CUDA")
            new.load_state_dict(m.state_dict())
            for p, q in zip(new.parameters(), m.parameters()):
                p.requires_grad_(q.requires_grad)
            new.train(m.training)
            return new.to(next(iter(m.buffers())).device)
        for name, child in list(m._modules.items()):
            if child is not None:
                m._modules[name] = convert(child)
        return m

    return convert(model)


__all__ = ["BN_MODES", "FrozenBatchNorm2d", "FixedStatsBatchNorm2d", "DistBatchNorm2d", "freeze_batchnorm",
           "sync_batchnorm"]

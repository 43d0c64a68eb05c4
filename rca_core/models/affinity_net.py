"""AffinityNet (PSA style): backbone features -> per-level 1x1 convs -> one feature map f on the affinity grid;
affinity of a pixel pair = exp(-mean_c |f_i - f_j|) for the radius-r pair offsets.

Differences from PSA (jiwoon-ahn/psa, network/resnet38_aff.py), all small:
- the last len(level_dims) stages of any `rca_core.models.backbones` backbone (PSA: ResNet-38 conv4/5/6,
  widths 64/128/256; by default PSA's widths capped at a quarter of the stage width, see `level_dims`:
  the full 448-channel head made a demo training step 3x slower for a 96 px image), each 1x1 conv +
  GroupNorm + ReLU, bilinearly resized to the grid of stride
  `feature_stride` (IRN's 4, PSA's 8), concatenated, then PSA's final 1x1 conv + ELU;
- the grid is ceil(H / stride) x ceil(W / stride) for any input size (no padding to a multiple of 8);
- the L1 distance is averaged over channels as in PSA's code (`torch.mean(torch.abs(ft - ff), dim=1)`).
Loss (PSA train_aff.py): bg_pos/4 + fg_pos/4 + neg/2, each a mean of -log over its pairs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rca_core.affinity_labels import grid_size, pair_offsets
from rca_core.config.refine import AffinityConfig
from rca_core.models.backbones import build_backbone
from rca_core.train_utils import load_trained_weights

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PSA_DIMS = (64, 128, 256)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float, ImageNet-normalised."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


class AffinityNet(nn.Module):
    def __init__(self, cfg: AffinityConfig):
        super().__init__()
        self.cfg = cfg
        self.radius = cfg.radius
        self.stride = cfg.feature_stride
        self.offsets = pair_offsets(cfg.radius)
        self.backbone = build_backbone(cfg.backbone)
        dims = level_dims(cfg, self.backbone.stage_channels)
        chans = self.backbone.stage_channels[-len(dims):]
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1, bias=False), nn.GroupNorm(_groups(d), d), nn.ReLU(inplace=True))
            for c, d in zip(chans, dims))
        dim = sum(dims)
        self.fuse = nn.Conv2d(dim, dim, 1, bias=False)
        for m in self.levels.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # PSA's f9 init
        self.out_channels = dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, ceil(H/s), ceil(W/s)) affinity features."""
        grid = grid_size(x.shape[-2], x.shape[-1], self.stride)
        feats = self.backbone.forward_features(x)[-len(self.levels):]
        ups = [F.interpolate(conv(f), size=grid, mode="bilinear", align_corners=False)
               for conv, f in zip(self.levels, feats)]
        return F.elu(self.fuse(torch.cat(ups, 1)))

    def affinities(self, f: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features -> (B, P, h, w) pair affinities (meaningless where the pair leaves the grid)."""
        return pair_affinities(f, self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affinities(self.features(x))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new layers) for the 1x / lr_mult_new x learning rates; with
        refine.affinity.backbone.frozen_stages 4 (IRN) the first list is empty."""
        ids = {id(p) for p in self.backbone.parameters()}
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        return bb, [p for p in self.parameters() if id(p) not in ids and p.requires_grad]


def level_dims(cfg: AffinityConfig, stage_channels: list[int]) -> list[int]:
    """cfg.level_dims, or (None) PSA's 64/128/256 capped at a quarter of each stage's width: the PSA widths for
    ResNet-50/101 (512/1024/2048 channels), 16/32/64 for the small demo backbone (64/128/256 channels)."""
    if cfg.level_dims is not None:
        if len(cfg.level_dims) > len(stage_channels):
            raise ValueError(f"refine.affinity.level_dims has {len(cfg.level_dims)} entries; the backbone has "
                             f"{len(stage_channels)} stages")
        return list(cfg.level_dims)
    return [max(8, min(d, c // 4)) for d, c in zip(PSA_DIMS, stage_channels[-len(PSA_DIMS):])]


def _groups(d: int) -> int:
    for g in (8, 4, 2):
        if d % g == 0:
            return g
    return 1


def _one_offset(f: torch.Tensor, fp: torch.Tensor, dy: int, dx: int, r: int) -> torch.Tensor:
    h, w = f.shape[-2:]
    return torch.exp(-(f - fp[:, :, dy:dy + h, r + dx:r + dx + w]).abs().mean(1))


def pair_affinities(f: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """exp(-mean_c |f(p) - f(p + o)|) for every offset o: (B, D, h, w) -> (B, P, h, w).

    One offset at a time; with gradients each offset is checkpointed, so memory stays at a few feature
    maps instead of P of them (a 512 crop at stride 4 with D = 448 would otherwise keep ~8 GB for backward).
    """
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    fp = F.pad(f, (r, r, 0, r))
    grad = torch.is_grad_enabled() and f.requires_grad
    out = [checkpoint(_one_offset, f, fp, dy, dx, r, use_reentrant=False) if grad else _one_offset(f, fp, dy, dx, r)
           for dy, dx in offsets]
    return torch.stack(out, 1)


def affinity_loss(aff: torch.Tensor, labels: dict[str, torch.Tensor], mean=None) -> dict[str, torch.Tensor]:
    """PSA's balanced loss. aff (B, P, h, w) in (0, 1]; labels bool masks of the same shape.
    `mean(total, count)` turns each term's sum over its pairs into a mean (default: over this batch;
    the training stage passes train_utils.global_mean so that under DDP it is over the global batch)."""
    eps = 1e-5
    terms = {}
    for name, target in labels.items():
        m = target.float()
        nll = -torch.log(aff + eps) if name != "neg" else -torch.log(1.0 + eps - aff)
        total, count = (nll * m).sum(), m.sum()
        terms[name] = total / (count + eps) if mean is None else mean(total, count)
    loss = terms["bg_pos"] / 4 + terms["fg_pos"] / 4 + terms["neg"] / 2
    return {"loss": loss, **terms}


def load_affinity_net(cfg: AffinityConfig, path: str, device: torch.device | str = "cpu") -> AffinityNet:
    """An AffinityNet with weights from an affinity_train checkpoint (weights_only load), in eval mode."""
    net = AffinityNet(cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"pretrained": None})}))
    sd = load_trained_weights(path, "trained AffinityNet", "affinity_train")
    try:
        net.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"trained AffinityNet {path} does not fit the configured network (refine.affinity "
                         f"changed?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return net.to(device).eval()

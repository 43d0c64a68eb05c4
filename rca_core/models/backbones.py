"""Feature extractors: torchvision ResNet-50/101 (output stride 8/16/32) and a small CPU ResNet.

`build_backbone(cfg)` returns a module with
- `forward(x)` -> the last feature map (B, out_channels, H/os, W/os),
- `forward_features(x)` -> [stage1, stage2, stage3, stage4] feature maps (for AffinityNet / segmenters),
- `out_channels`, `stage_channels` (4 ints), `stage_strides` (4 ints), `output_stride`.

ResNet output stride 16 follows IRN: the last stage has stride 1 (torchvision's
`replace_stride_with_dilation`, so the last stage is dilated by 2 to keep its receptive field).
The small backbone (for the demo, trained from scratch): stem conv, one basic block per stage, widths w, 2w, 4w, 8w
(w = 32 -> about 1.2 M parameters), output stride 8 by default.

Pretrained weights come only from a local file (`cfg.pretrained`); nothing is ever downloaded.
A missing file, an unreadable file, or keys/shapes that do not fit raise `PretrainedWeightsError`
naming the path. Without a path the weights are randomly initialised.

Training recipe switches (applied after the weights are loaded, so ImageNet statistics are what is frozen):
- `cfg.frozen_stages = N`: the stem and stages 1..N get `requires_grad = False` and their BatchNorm
  layers become `FrozenBatchNorm2d`; no gradient reaches them (IRN's CAM net detaches after stage 2
  and fixes conv1/bn1: N = 2; IRN's AffinityNet detaches every stage: N = 4).
- `cfg.batchnorm`: 'frozen' (FrozenBatchNorm2d everywhere), 'frozen_stats' (IRN's FixedBatchNorm: running
  statistics, trainable affine) or 'train' (rca_core.models.norm).
`trainable_parameters(net)` lists what an optimiser should get.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torchvision

from rca_core.config.cam import BackboneConfig
from rca_core.models.norm import freeze_batchnorm


class PretrainedWeightsError(ValueError):
    """Pretrained weights missing, unreadable, or not matching the backbone."""


# ----------------------------------------------------------------------------- ResNet-50/101
_DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk without avgpool/fc. Parameter names match torchvision's state dict."""

    def __init__(self, depth: int = 50, output_stride: int = 16):
        super().__init__()
        if output_stride not in _DILATION:
            raise ValueError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
        ctor = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
        net = ctor(weights=None, replace_stride_with_dilation=_DILATION[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.stage_channels = [256, 512, 1024, 2048]
        s3 = 16 if output_stride >= 16 else 8
        self.stage_strides = [4, 8, s3, output_stride]
        self.out_channels = 2048
        self.output_stride = output_stride

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules of stages 1-4 (stage 1 includes the stem), for `frozen_stages`."""
        return [[self.conv1, self.bn1, self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1]


# ----------------------------------------------------------------------------- small CPU backbone
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class SmallBackbone(nn.Module):
    """Stem (conv3x3 stride 2) + 4 stages of one basic block; widths w, 2w, 4w, 8w.

    Strides per stage for output stride 8: 1, 2, 2, 1 (last stage dilated 2); 16: 1, 2, 2, 2;
    32: 2, 2, 2, 2.
    """

    def __init__(self, width: int = 32, output_stride: int = 8):
        super().__init__()
        strides = {8: [1, 2, 2, 1], 16: [1, 2, 2, 2], 32: [2, 2, 2, 2]}.get(output_stride)
        if strides is None:
            raise ValueError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        cin, total, layers = width, 2, []
        for w, s in zip(widths, strides):
            dil = 2 if (s == 1 and total >= 8 and w == widths[-1]) else 1
            layers.append(BasicBlock(cin, w, s, dil))
            total *= s
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_channels = widths
        acc, self.stage_strides = 2, []
        for s in strides:
            acc *= s
            self.stage_strides.append(acc)
        self.out_channels = widths[-1]
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules of stages 1-4 (stage 1 includes the stem), for `frozen_stages`."""
        return [[self.stem, self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1]


# ----------------------------------------------------------------------------- factory + weights
def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone named by `cfg.name`, with local pretrained weights when `cfg.pretrained` is set."""
    if cfg.name == "resnet50":
        net: nn.Module = ResNetBackbone(50, cfg.output_stride)
    elif cfg.name == "resnet101":
        net = ResNetBackbone(101, cfg.output_stride)
    elif cfg.name == "small":
        net = SmallBackbone(cfg.width, cfg.output_stride)
    else:  # pragma: no cover - the config model already restricts the names
        raise ValueError(f"backbone.name: unknown backbone {cfg.name!r}")
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained)
    apply_recipe(net, cfg.batchnorm, cfg.frozen_stages)
    return net


def apply_recipe(net: nn.Module, batchnorm: str = "train", frozen_stages: int = 0) -> nn.Module:
    """Freeze the stem + the first `frozen_stages` stages (no gradient, FrozenBatchNorm2d) and convert the
    remaining BatchNorm layers by `batchnorm` ('train' / 'frozen' / 'frozen_stats'), in place."""
    stages = net.stage_modules()
    if not 0 <= frozen_stages <= len(stages):
        raise ValueError(f"backbone.frozen_stages must be 0..{len(stages)}, got {frozen_stages}")
    for mods in stages[:frozen_stages]:
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(False)
    # a frozen stage is fixed entirely, its BatchNorm statistics included
    for name in _stage_attr_names(net, stages[:frozen_stages]):
        setattr(net, name, freeze_batchnorm(getattr(net, name), "frozen"))
    freeze_batchnorm(net, batchnorm)
    return net


def _stage_attr_names(net: nn.Module, stages: list[list[nn.Module]]) -> list[str]:
    ids = {id(m) for mods in stages for m in mods}
    return [name for name, child in net.named_children() if id(child) in ids]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (frozen stages and frozen BatchNorm hold none)."""
    return [p for p in module.parameters() if p.requires_grad]


def _unwrap_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"pretrained weights {path}: expected a state dict of tensors "
                                     f"(or a dict with 'state_dict'/'model'), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load a state dict (a local file, or a URL such as the copy the driver staged into the store) into
    `net` (classifier keys like fc.* are ignored). Strict otherwise."""
    from rca_core import storage
    from rca_core.train_utils import load_torch

    ref = storage.file_ref(path)
    if not ref.exists():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path} (backbone.pretrained; on host "
                                     f"{storage.host()}; nothing is downloaded - give a local file or leave it empty)")
    try:
        obj = load_torch(ref)
    except Exception as e:
        raise PretrainedWeightsError(f"pretrained weights {path} could not be read: {type(e).__name__}: {e}") from e
    sd = {k: v for k, v in _unwrap_state_dict(obj, path).items() if not k.startswith("fc.")}
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:2]})")
        raise PretrainedWeightsError(f"pretrained weights {path} do not fit backbone "
                                     f"{type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(sd, strict=True)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = ["build_backbone", "apply_recipe", "trainable_parameters", "load_pretrained", "PretrainedWeightsError", "ResNetBackbone", "SmallBackbone",
           "count_parameters"]

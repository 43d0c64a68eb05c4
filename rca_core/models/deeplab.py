"""DeepLab segmenters: v2 (the paper's), v3 (torchvision, the modern default) and a small CPU model.

Every model maps a normalised image batch (B, 3, H, W) to logits (B, num_classes, H, W) (bilinear
upsampling inside), and exposes `backbone_parameters()` / `head_parameters()` so the trainer can give
the new layers `lr_mult_head` x the learning rate.

- `DeepLabV2`: ResNet-101 (or -50) with output stride 8 (torchvision dilation) and ASPP of four 3x3
  convolutions with rates 6/12/18/24 straight to class scores, summed (Chen et al. 2017, as the
  widely used kazuto1011/deeplab-pytorch port: each branch is one conv, weights N(0, 0.01), bias 0).
- `DeepLabV3`: `torchvision.models.segmentation.deeplabv3_resnet50/101(weights=None,
  weights_backbone=None)` (output stride 8, ASPP 12/24/36 + image pooling); local backbone weights are
  loaded into its ResNet trunk, strictly (a missing or mismatched file raises PretrainedWeightsError).
- `SmallDeepLab`: the project's small ResNet (rca_core.models.backbones, output stride 8) + ASPP-lite
  (1x1, three 3x3 dilated branches at rates 2/4/6 and image pooling, 64 channels each) + a light
  DeepLab-v3+-style decoder that adds the stride-4 stage-2 features back (the 12x12 feature map of a
  96 px demo image is too coarse on its own).

`build_segmenter(cfg, num_classes)` picks one from a SegmenterConfig; `model_meta(...)` is the metadata
stored with a checkpoint so that `build_from_meta(meta)` rebuilds the same network without the config.

`freeze_bn` (segmenter.freeze_bn, stored in the metadata): every BatchNorm of the backbone becomes
torchvision's FrozenBatchNorm2d after the ImageNet weights are loaded (statistics and affine fixed; the
DeepLab-v2 recipe, whose Caffe original keeps BatchNorm at its ImageNet values). Head BatchNorm layers
(v3's ASPP, the small model's) still train.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from rca_core.config.cam import BackboneConfig
from rca_core.config.segmenter import SegmenterConfig
from rca_core.models.backbones import build_backbone, load_pretrained
from rca_core.models.norm import freeze_batchnorm

# ImageNet normalisation (the torchvision convention), stored in every checkpoint's metadata.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_RATES = {"deeplabv2": [6, 12, 18, 24], "deeplabv3": [12, 24, 36], "small": [2, 4, 6]}


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class _Segmenter(nn.Module):
    """Common parts: parameter groups for the trainer."""

    backbone: nn.Module

    def backbone_parameters(self) -> Iterable[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterable[nn.Parameter]:
        ids = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in ids)


# ----------------------------------------------------------------------------- DeepLab-v2
class ASPPv2(nn.Module):
    """Parallel 3x3 dilated convolutions straight to class scores, summed (DeepLab-v2 ASPP)."""

    def __init__(self, in_channels: int, num_classes: int, rates: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
                                      for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(_Segmenter):
    def __init__(self, num_classes: int, depth: int = 101, rates: list[int] | None = None,
                 pretrained: str | None = None, freeze_bn: bool = False):
        super().__init__()
        self.backbone = build_backbone(BackboneConfig(name=f"resnet{depth}", output_stride=8, pretrained=pretrained,
                                                      batchnorm="frozen" if freeze_bn else "train"))
        self.aspp = ASPPv2(self.backbone.out_channels, num_classes, rates or DEFAULT_RATES["deeplabv2"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.aspp(self.backbone(x)), x.shape[-2:])


# ----------------------------------------------------------------------------- DeepLab-v3 (torchvision)
class DeepLabV3(_Segmenter):
    def __init__(self, num_classes: int, depth: int = 101, rates: list[int] | None = None,
                 pretrained: str | None = None, freeze_bn: bool = False):
        super().__init__()
        ctor = {50: torchvision.models.segmentation.deeplabv3_resnet50,
                101: torchvision.models.segmentation.deeplabv3_resnet101}[depth]
        net = ctor(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        if rates is not None and list(rates) != DEFAULT_RATES["deeplabv3"]:
            net.classifier = torchvision.models.segmentation.deeplabv3.DeepLabHead(2048, num_classes, tuple(rates))
        if pretrained:
            load_pretrained(net.backbone, pretrained)  # strict; clear error naming the file
        if freeze_bn:
            freeze_batchnorm(net.backbone, "frozen")
        self.backbone = net.backbone      # IntermediateLayerGetter over the ResNet trunk
        self.classifier = net.classifier  # DeepLabHead: ASPP + 3x3 conv + 1x1 classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.classifier(self.backbone(x)["out"]), x.shape[-2:])


# ----------------------------------------------------------------------------- small CPU model
def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPLite(nn.Module):
    """1x1 + 3x3 dilated branches + image pooling, concatenated and projected (DeepLab-v3 ASPP, narrow)."""

    def __init__(self, in_channels: int, channels: int, rates: list[int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)] +
                                      [_conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                  nn.ReLU(inplace=True))  # no BN: batch of 1x1 maps
        self.project = _conv_bn_relu(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class SmallDeepLab(_Segmenter):
    def __init__(self, num_classes: int, width: int = 32, rates: list[int] | None = None,
                 pretrained: str | None = None, channels: int = 64, low_channels: int = 16, freeze_bn: bool = False):
        super().__init__()
        self.backbone = build_backbone(BackboneConfig(name="small", output_stride=8, width=width,
                                                      pretrained=pretrained,
                                                      batchnorm="frozen" if freeze_bn else "train"))
        self.aspp = ASPPLite(self.backbone.out_channels, channels, rates or DEFAULT_RATES["small"])
        self.low = _conv_bn_relu(self.backbone.stage_channels[1], low_channels, 1)
        self.fuse = _conv_bn_relu(channels + low_channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, f2, _, f4 = self.backbone.forward_features(x)
        y = self.aspp(f4)
        y = F.interpolate(y, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([y, self.low(f2)], 1))
        return _upsample(self.classifier(y), x.shape[-2:])


# ----------------------------------------------------------------------------- factory + metadata
def model_meta(cfg: SegmenterConfig, num_classes: int, class_names: list[str] | None = None) -> dict:
    """What a checkpoint must carry so that prediction needs nothing else (JSON-able, weights_only-safe)."""
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return {"arch": cfg.arch, "backbone": cfg.backbone, "width": int(cfg.width),
            "aspp_rates": list(cfg.aspp_rates) if cfg.aspp_rates else None, "num_classes": int(num_classes),
            "class_names": names, "mean": list(MEAN), "std": list(STD), "freeze_bn": bool(cfg.freeze_bn)}


def build_from_meta(meta: dict, pretrained: str | None = None) -> _Segmenter:
    arch, n, rates = meta["arch"], int(meta["num_classes"]), meta.get("aspp_rates")
    fz = bool(meta.get("freeze_bn", False))  # checkpoints from before the switch: BatchNorm2d
    if arch == "small":
        return SmallDeepLab(n, width=int(meta.get("width", 32)), rates=rates, pretrained=pretrained, freeze_bn=fz)
    depth = {"resnet50": 50, "resnet101": 101}.get(meta.get("backbone"))
    if depth is None:
        raise ValueError(f"segmenter arch {arch!r} needs backbone resnet50 or resnet101, got {meta.get('backbone')!r}")
    if arch == "deeplabv2":
        return DeepLabV2(n, depth, rates, pretrained, freeze_bn=fz)
    if arch == "deeplabv3":
        return DeepLabV3(n, depth, rates, pretrained, freeze_bn=fz)
    raise ValueError(f"unknown segmenter arch {arch!r} (deeplabv2, deeplabv3, small)")


def build_segmenter(cfg: SegmenterConfig, num_classes: int) -> _Segmenter:
    """The segmenter named by cfg.arch, with local backbone weights when cfg.pretrained is set."""
    return build_from_meta(model_meta(cfg, num_classes), pretrained=cfg.pretrained)


__all__ = ["DeepLabV2", "DeepLabV3", "SmallDeepLab", "ASPPv2", "ASPPLite", "build_segmenter", "build_from_meta",
           "model_meta", "MEAN", "STD", "DEFAULT_RATES"]

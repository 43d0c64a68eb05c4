"""Segmenter configuration: DeepLab on pseudo-masks (or ground truth for the upper bound).

Defaults follow the VOC recipe (docs/method.md, Segmenter); configs/demo.yaml scales them down.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .refine import CrfConfig


def segmenter_crf_defaults() -> CrfConfig:
    """DeepLab's CRF post-processing (docs/method.md, Segmenter): 10 iterations, Gaussian w 3 xy 1,
    bilateral w 4 xy 67 rgb 3. (fg_alpha/bg_alpha of CrfConfig are unused here.)"""
    return CrfConfig(iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                     bilateral_compat=4)


class SegmenterConfig(StrictModel):
    arch: Literal["deeplabv2", "deeplabv3", "small"] = Field(
        "deeplabv3", description="deeplabv2 = paper (ResNet + ASPP 6/12/18/24 summed), deeplabv3 = torchvision, "
                                 "small = small CPU backbone + ASPP-lite + light decoder")
    backbone: Literal["resnet50", "resnet101", "small"] = Field(
        "resnet101", description="resnet50/resnet101 for deeplabv2/v3; 'small' only with arch small")
    width: int = Field(32, ge=8, description="first-stage width of the small backbone (arch small)")
    aspp_rates: list[int] | None = Field(
        None, description="ASPP dilation rates; None = the arch default (v2: 6,12,18,24; v3: 12,24,36; small: 2,4,6)")
    pretrained: str | None = Field(None, description="local path of backbone weights (no download)")
    freeze_bn: bool = Field(False, description="the backbone's BatchNorm statistics and affine fixed at their "
                                               "(ImageNet) values: torchvision FrozenBatchNorm2d (DeepLab-v2 recipe)")
    labels: Literal["pseudo", "gt"] = Field("pseudo", description="train on pseudo-masks or ground truth")
    epochs: float = Field(20, gt=0)
    batch_size: int = Field(10, ge=1, description="global batch: images per optimizer step over all workers "
                                                   "(a multiple of the number of training workers)")
    crop_size: int = Field(321, ge=16)
    scale_range: tuple[float, float] = Field((0.5, 1.5), description="random rescale range before the crop")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum 0.9, paper) or adamw")
    lr: float = Field(2.5e-4, gt=0)
    lr_mult_head: float = Field(10.0, gt=0, description="lr multiplier of the new (head) layers")
    weight_decay: float = Field(5e-4, ge=0)
    poly_power: float = 0.9
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    eval_scales: list[float] = Field([1.0], min_length=1)
    eval_flip: bool = False
    eval_crf: bool = False
    eval_crf_params: CrfConfig = Field(default_factory=segmenter_crf_defaults,
                                       description="dense CRF post-processing parameters (when eval_crf)")
    max_seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if (self.arch == "small") != (self.backbone == "small"):
            raise ValueError(f"segmenter.backbone {self.backbone!r} does not fit segmenter.arch {self.arch!r}: "
                             "arch small needs backbone small; deeplabv2/deeplabv3 need resnet50 or resnet101")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"segmenter.scale_range must be 0 < low <= high, got {self.scale_range}")
        if self.aspp_rates is not None and (not self.aspp_rates or min(self.aspp_rates) < 1):
            raise ValueError(f"segmenter.aspp_rates must be positive integers, got {self.aspp_rates}")
        if any(s <= 0 for s in self.eval_scales):
            raise ValueError(f"segmenter.eval_scales must be positive, got {self.eval_scales}")
        return self

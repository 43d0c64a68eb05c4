"""Segmenter configuration: DeepLab on pseudo-masks (or ground truth for the upper bound)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel


class SegmenterConfig(StrictModel):
    arch: Literal["deeplabv2", "deeplabv3", "small"] = Field("deeplabv3", description="segmenter architecture")
    backbone: Literal["resnet50", "resnet101", "small"] = "resnet101"
    pretrained: str | None = Field(None, description="local path of backbone weights (no download)")
    labels: Literal["pseudo", "gt"] = Field("pseudo", description="train on pseudo-masks or ground truth")
    epochs: float = Field(20, gt=0)
    batch_size: int = Field(10, ge=1)
    crop_size: int = Field(321, ge=16)
    lr: float = Field(2.5e-4, gt=0)
    lr_mult_head: float = 10.0
    weight_decay: float = Field(5e-4, ge=0)
    poly_power: float = 0.9
    eval_scales: list[float] = Field([1.0], min_length=1)
    eval_flip: bool = False
    eval_crf: bool = False
    max_seconds: float | None = Field(None, gt=0)

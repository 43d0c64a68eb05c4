"""Refinement configuration: dense CRF, affinity labels, AffinityNet, random walk, saliency fusion."""
from __future__ import annotations

from pydantic import Field

from .base import StrictModel
from .cam import BackboneConfig


class CrfConfig(StrictModel):
    iterations: int = Field(10, ge=1)
    gaussian_sxy: float = 3
    gaussian_compat: float = 3
    bilateral_sxy: float = 80
    bilateral_srgb: float = 13
    bilateral_compat: float = 10
    fg_alpha: float = Field(4, description="low alpha: confident foreground")
    bg_alpha: float = Field(32, description="high alpha: confident background")


class AffinityConfig(StrictModel):
    radius: int = Field(5, ge=1, description="pair radius on the feature grid")
    backbone: BackboneConfig = BackboneConfig()
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(8, ge=1)
    crop_size: int = Field(512, ge=16)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_seconds: float | None = Field(None, gt=0)


class RandomWalkConfig(StrictModel):
    beta: float = Field(8, gt=0)
    logt: int = Field(8, ge=0, description="2^logt propagation steps")
    bg_alpha: float = Field(16, gt=0, description="background score (1 - max CAM)^alpha")
    uncertain_threshold: float | None = Field(None, description="score below which a pixel gets 255")
    export_png: bool = Field(True, description="also write VOC palette PNGs of the pseudo-masks")


class SaliencyConfig(StrictModel):
    enabled: bool = False
    conflict_threshold: float = 0.9
    bg_saliency_max: int = 32
    min_fg_fraction: float = 0.01


class RefineConfig(StrictModel):
    crf: CrfConfig = CrfConfig()
    affinity: AffinityConfig = AffinityConfig()
    random_walk: RandomWalkConfig = RandomWalkConfig()
    saliency: SaliencyConfig = SaliencyConfig()

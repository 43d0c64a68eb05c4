"""Refinement configuration: dense CRF, affinity labels, AffinityNet, random walk, saliency fusion."""
from __future__ import annotations

from typing import Literal

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
    radius: int = Field(5, ge=2, description="pair radius on the feature grid")
    feature_stride: int = Field(4, ge=1, description="stride of the affinity feature grid (IRN: 4); the random walk runs on it")
    level_dims: list[int] | None = Field(None, min_length=1, max_length=4,
                                         description="1x1-conv widths for the last len(level_dims) backbone stages; "
                                                     "None = PSA's 64/128/256 capped at a quarter of each stage's width")
    backbone: BackboneConfig = BackboneConfig()
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(8, ge=1, description="global batch: images per optimizer step over all workers "
                                                 "(a multiple of the number of training workers)")
    crop_size: int = Field(512, ge=16)
    lr: float = Field(0.1, gt=0, description="base lr (backbone); new layers get lr_mult_new x")
    optimizer: Literal["auto", "sgd", "adamw"] = Field(
        "auto", description="auto: PSA's SGD (momentum 0.9) with pretrained backbone weights, AdamW from scratch")
    lr_mult_new: float | None = Field(None, gt=0, description="lr multiplier of the new layers; None: 10 (SGD), 1 (AdamW)")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (IRN's/PSA's effective value: their weight decay, "
                                                         "1e-4 / 5e-4, through a positional-argument slip)")
    scale_range: tuple[float, float] = Field((0.9, 1.1), description="random rescale of training images")
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    max_seconds: float | None = Field(None, gt=0)


class RandomWalkConfig(StrictModel):
    beta: float = Field(8, gt=0)
    logt: int = Field(8, ge=0, description="2^logt propagation steps")
    bg_alpha: float = Field(16, gt=0, description="background score (1 - max CAM)^alpha")
    uncertain_threshold: float | None = Field(None, ge=0, le=1,
                                              description="a pixel whose winning share of the propagated scores is below this gets 255")
    method: Literal["sparse", "banded", "dense"] = Field("sparse", description="how the transition matrix is applied")
    crf_postprocess: bool = Field(False, description="dense CRF (refine.crf kernels) on the normalised walk scores "
                                                     "before the argmax (PSA's 'AffinityNet + dCRF')")
    export_png: bool = Field(True, description="also write VOC palette PNGs of the pseudo-masks")


class SaliencyConfig(StrictModel):
    enabled: bool = Field(False, description="pseudo-masks from RCA's gen_labels fusion (needs data.saliency_dir)")
    conflict_threshold: float = Field(0.9, description="more than one channel above this -> 255")
    bg_saliency_max: int = Field(32, description="background pixels with saliency >= this -> 255")
    att_threshold: float = Field(0.8, description="CRF'd CAM above this counts as salient (gen_labels att_thr)")
    min_fg_fraction: float = Field(0.01, description="images with less foreground -> all 255")
    crf_alpha: float = Field(4, description="alpha of the CRF applied to the CAMs before fusion")


class RefineConfig(StrictModel):
    crf: CrfConfig = CrfConfig()
    affinity: AffinityConfig = AffinityConfig()
    random_walk: RandomWalkConfig = RandomWalkConfig()
    saliency: SaliencyConfig = SaliencyConfig()

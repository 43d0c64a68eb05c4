"""CAM stage configuration: network, RCA parts, training, memory-bank construction, CAM inference, CAM evaluation.

Defaults follow the paper's VOC recipe (docs/method.md: CAM network, Memory bank, Semantic contrast, Semantic aggregation); configs/demo.yaml scales them down.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class BackboneConfig(StrictModel):
    name: Literal["resnet50", "resnet101", "small"] = Field("resnet50", description="feature extractor")
    output_stride: Literal[8, 16, 32] = Field(16, description="total stride of the feature map")
    pretrained: str | None = Field(None, description="local path of ImageNet weights (no download)")
    width: int = Field(32, ge=8, description="first-stage width of the 'small' backbone")
    batchnorm: Literal["train", "frozen", "frozen_stats"] = Field("train", description=(
        "BatchNorm in training: 'train' = batch statistics (synchronised over the workers when there are several); "
        "'frozen' = running statistics and affine fixed (torchvision FrozenBatchNorm2d; PSA, DeepLab-v2); "
        "'frozen_stats' = running statistics fixed, affine trained (IRN's FixedBatchNorm)"))
    frozen_stages: int = Field(0, ge=0, le=4, description=(
        "the stem and the first N of the 4 stages are not trained (parameters fixed, their BatchNorm frozen): "
        "IRN's CAM net 2 (conv1 + layer1-2), IRN's AffinityNet 4 (the whole backbone), 0 = all trained"))


class MemoryBankConfig(StrictModel):
    enabled: bool = Field(True, description="regional memory bank + semantic contrast")
    size: int = Field(500, ge=1, description="entries per class")
    dim: int = Field(512, ge=8, description="projected embedding size")
    score_threshold: float = Field(0.7, ge=0, le=1, description="write only GT classes with sigmoid score above this")


class ContrastConfig(StrictModel):
    enabled: bool = Field(True, description="semantic contrast loss (needs the memory bank)")
    temperature: float = Field(0.07, gt=0)
    weight: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(2, ge=0, description="epochs before the contrast loss is switched on")
    mixup: bool = Field(False, description="official code's embedding mixup, lambda ~ Beta(8, 8)")


class AggregationConfig(StrictModel):
    enabled: bool = Field(True, description="semantic aggregation over per-class prototypes")
    prototypes_per_class: int = Field(10, ge=1, description="K of the per-class k-means")
    softmax: bool = Field(True, description="softmax attention (paper) or none (official code)")
    refresh_every_epochs: int = Field(1, ge=1, description="k-means refresh of training prototypes")
    kmeans_iters: int = Field(20, ge=1, description="Lloyd iterations of each per-class k-means")
    fusion_init: Literal["identity", "default"] = Field("identity", description=(
        "start of the fusion conv1x1([x ; conv1x1(a)]): 'identity' = identity on x, zero on the context "
        "(the aggregated branch starts as the plain one); 'default' = PyTorch's default init of every weight"))


class CamTrainConfig(StrictModel):
    epochs: float = Field(5, gt=0)
    batch_size: int = Field(16, ge=1, description="global batch: images per optimizer step over all workers "
                                                  "(a multiple of the number of training workers)")
    crop_size: int = Field(512, ge=16)
    resize_long: tuple[int, int] = Field((320, 640), description="random long-side resize range")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="base lr (new layers get lr_mult_new x)")
    lr_mult_new: float = Field(10.0, gt=0, description="lr multiplier of the CAM classifier (IRN: 10)")
    lr_mult_rca: float | None = Field(None, gt=0, description=(
        "lr multiplier of the RCA modules (projection head, aggregation, aggregated classifier); None = lr_mult_new. "
        "voc12: 1 - at IRN's 10x (lr 1.0) the 2048x4096 fusion conv diverged within 3 steps"))
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description=(
        "SGD momentum. IRN's and PSA's PolyOptimizer pass weight_decay where torch's SGD takes momentum, so their "
        "published runs used momentum = 1e-4 (IRN) / 5e-4 (PSA); configs/voc12.yaml sets IRN's effective value"))
    aux_weight: float = Field(0.4, ge=0, description=(
        "weight of the plain (coarse) CAM branch trained beside the aggregated branch (official code: 0.4); "
        "it gives the region masks and must be > 0 when aggregation is on; unused when aggregation is off"))
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    max_seconds: float | None = Field(None, gt=0, description="stop training after this wall time")


# CLIP-ES's background words (the official code's list for VOC): CLIP scores an image region against these as
# well as the class names, and the softmax over both keeps a class's CAM off the ground, sky, water, ...
CLIP_BACKGROUND = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                   "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
                   "street", "valley", "bridge", "sign"]


RANDOM_WEIGHTS = "random"  # cam.clip.weights: a random-init CLIP (no file)


class ClipConfig(StrictModel):
    """The frozen-CLIP CAM source (cam.source: clip; CLIP-ES, docs/method.md "CLIP CAM source")."""

    weights: str | None = Field(None, description=(
        "CLIP weights: a local file (or a store URL) - OpenAI's ViT-B-16.pt (TorchScript or state dict) or an "
        "open_clip checkpoint of `model`; 'random' = a random-init CLIP for tests and demos (its CAMs mean "
        "nothing). Nothing is downloaded"))
    model: str = Field("ViT-B-16", description="open_clip architecture of an open_clip checkpoint (OpenAI files "
                                                "carry their own) and of random weights when random_arch is 'model'")
    random_arch: Literal["small", "model"] = Field("small", description=(
        "architecture of random weights: 'small' (4 layers of width 64: seconds on a CPU) or `model` (the "
        "real one's cost, for benchmarks)"))
    templates: list[str] = Field(["a clean origami {}."], min_length=1, description=(
        "prompt templates ('{}' = the class name); a class's text embedding is the mean over them"))
    prompt_names: dict[str, str] = Field(default_factory=dict, description=(
        "class name -> the words put in the prompt (CLIP-ES: person -> 'person with clothes,people,human')"))
    background: list[str] = Field(CLIP_BACKGROUND, description=(
        "background words scored beside the classes (the softmax over both suppresses background regions)"))
    scales: list[float] = Field([1.0], min_length=1, description="image scales (CLIP-ES: 1.0 only)")
    flip: bool = Field(False, description="also the flipped image (CLIP-ES: no)")
    caa: bool = Field(True, description="class-aware attention affinity refinement (CAA) of the GradCAM")
    caa_layers: int = Field(8, ge=1, description="CAA: attention of the last N transformer blocks, averaged")
    caa_box_threshold: float = Field(0.4, gt=0, lt=1, description=(
        "CAA: a class's boxes are the bounding boxes of the regions where its CAM > threshold x its max"))
    sinkhorn_iters: int = Field(3, ge=1, description="CAA: column/row normalisations of the attention")
    seed: int = Field(0, description="seed of random weights (every worker builds the same random CLIP)")


class ExternalCamConfig(StrictModel):
    """CAMs made elsewhere (cam.source: external): a folder of IRN-layout .npy files, one per image."""

    dir: str | None = Field(None, description=(
        "folder (local, or a URL the workers can read) of <image_id>.npy files, each a saved dict with 'keys' "
        "(0-based foreground class indices, IRN's make_cam.py) and the CAM array under `field`"))
    field: str = Field("high_res", description=(
        "the dict entry with the (n_keys, H, W) image-resolution CAMs: IRN 'high_res', CLIP-ES 'attn_highres'"))
    keys_base: Literal[0, 1] = Field(0, description="0: keys are foreground indices (class id - 1; IRN, CLIP-ES); "
                                                    "1: keys are class ids")


class CamConfig(StrictModel):
    source: Literal["rca", "clip", "external"] = Field("rca", description=(
        "where the CAMs come from: rca (cam_train -> memory_build -> cam_infer), clip (clip_cam: a frozen CLIP, "
        "no CAM training) or external (cam_import: .npy CAMs made elsewhere); every later stage is the same"))
    clip: ClipConfig = ClipConfig()
    external: ExternalCamConfig = ExternalCamConfig()
    checkpoint: str | None = Field(None, description=(
        "cam.source rca: a CAM network trained before (a cam_train files/model.pt of this cam section): "
        "cam_train trains nothing and passes it on, memory_build and cam_infer start from it"))
    backbone: BackboneConfig = BackboneConfig()
    memory: MemoryBankConfig = MemoryBankConfig()
    contrast: ContrastConfig = ContrastConfig()
    aggregation: AggregationConfig = AggregationConfig()
    train: CamTrainConfig = CamTrainConfig()

    @model_validator(mode="after")
    def _parts(self):
        if self.source == "clip" and not self.clip.weights:
            raise ValueError("cam.source clip needs cam.clip.weights: a local CLIP weights file (OpenAI's "
                             "ViT-B-16.pt) or 'random' (tests and demos)")
        if self.source == "external" and not self.external.dir:
            raise ValueError("cam.source external needs cam.external.dir: the folder of .npy CAMs")
        if self.checkpoint and self.source != "rca":
            raise ValueError(f"cam.checkpoint is a trained RCA network: it is read with cam.source rca only (this "
                             f"config's cam.source is {self.source!r})")
        if self.contrast.enabled and not self.memory.enabled:
            raise ValueError("cam.contrast.enabled needs cam.memory.enabled (the contrast is against the memory)")
        if self.aggregation.enabled and not self.memory.enabled:
            raise ValueError("cam.aggregation.enabled needs cam.memory.enabled (prototypes are k-means of the memory)")
        if self.aggregation.enabled and self.train.aux_weight <= 0:
            raise ValueError("cam.aggregation.enabled needs cam.train.aux_weight > 0 (the plain branch gives the region masks)")
        return self

    @property
    def rca_enabled(self) -> bool:
        return self.memory.enabled or self.contrast.enabled or self.aggregation.enabled


class CamInferConfig(StrictModel):
    scales: list[float] = Field([1.0, 0.5, 1.5, 2.0], min_length=1)
    flip: bool = True
    dtype: Literal["float16", "uint8"] = Field(
        "uint8", description="how CAMs are stored: uint8 (round(255 * cam); the default: every stage's mIoU within "
                             "0.0001 of float16 on the demo, docs/benchmarks.md) or float16 (twice the bytes)")


class CamEvalConfig(StrictModel):
    thresholds: list[float] = Field([round(0.05 * i, 2) for i in range(1, 20)], min_length=1,
                                    description="background thresholds swept")

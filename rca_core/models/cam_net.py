"""The CAM network with the RCA parts (docs/method.md: CAM network to Semantic aggregation).

    features x = backbone(image)                                   (B, C, h, w)
    plain branch:       cam_plain = conv1x1(x)  (bias-free)         (B, n_fg, h, w); logits = GAP
    projection head:    emb = g(x)                                  (B, D, h, w)   [memory on]
    aggregated branch:  x_agg = fuse([x ; attend(x, prototypes)]);  cam = conv1x1(x_agg)  [aggregation on]

The CAM used downstream (`out["cam"]`, `cam_maps`) is the aggregated branch's when aggregation is on,
the plain branch's otherwise. The plain branch also gives the region masks of the memory/contrast
(as the official code's coarse branch does). With every RCA part off this is a plain CAM network.

The memory queues and the current prototypes are buffers: they are saved with the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rca_core.config.cam import CamConfig
from rca_core.kmeans import class_prototypes
from rca_core.memory_bank import RegionMemory
from rca_core.models.aggregation import SemanticAggregation
from rca_core.models.backbones import build_backbone
from rca_core.models.projection import ProjectionHead, region_embeddings, region_masks
from rca_core.train_utils import load_trained_weights


class CamNet(nn.Module):
    def __init__(self, cfg: CamConfig, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must include background and at least one class, got {num_classes}")
        self.cfg = cfg
        self.num_fg = num_classes - 1
        self.backbone = build_backbone(cfg.backbone)
        c = self.backbone.out_channels
        self.classifier = nn.Conv2d(c, self.num_fg, 1, bias=False)
        self.use_memory = cfg.memory.enabled
        self.use_contrast = cfg.contrast.enabled
        self.use_aggregation = cfg.aggregation.enabled
        if self.use_memory:
            d = cfg.memory.dim
            self.projection = ProjectionHead(c, d)
            self.memory = RegionMemory(self.num_fg, cfg.memory.size, d, cfg.memory.score_threshold)
        if self.use_aggregation:
            k = cfg.aggregation.prototypes_per_class
            self.aggregation = SemanticAggregation(c, cfg.memory.dim, cfg.aggregation.softmax,
                                                   cfg.aggregation.fusion_init)
            self.agg_classifier = nn.Conv2d(c, self.num_fg, 1, bias=False)
            self.register_buffer("prototypes", torch.zeros(self.num_fg * k, cfg.memory.dim))
            self.register_buffer("prototype_valid", torch.zeros(self.num_fg * k, dtype=torch.bool))
        for m in [self.classifier] + ([self.agg_classifier] if self.use_aggregation else []):
            nn.init.xavier_uniform_(m.weight)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, with_embeddings: bool = False,
                tags: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`tags` (B, n_fg) multi-hot, with `with_embeddings`: also the region embeddings "emb" (R, D) of every
        (image, tag) pair "index" (R, 2) and their masks "masks" (R, h, w) (region_masks of the plain CAM), inside
        the forward so that DDP sees every parameter used there."""
        feat = self.backbone(x)
        cam_plain = self.classifier(feat)
        out = {"feat": feat, "cam_plain": cam_plain, "logits_plain": cam_plain.mean(dim=(2, 3))}
        if self.use_aggregation:  # = agg_classifier(aggregation(feat, ...)), the 1x1 maps folded (SemanticAggregation.classify)
            cam = self.aggregation.classify(feat, self.prototypes, self.prototype_valid, self.agg_classifier.weight)
        else:
            cam = cam_plain
        out["cam"] = cam
        out["logits"] = cam.mean(dim=(2, 3))
        if with_embeddings and self.use_memory:  # the projection head's map before its last conv: see region_embeddings
            out["emb_hidden"] = self.projection.hidden(feat)
        if with_embeddings and tags is not None:
            out["masks"], out["index"] = region_masks(cam_plain, tags)
            out["emb"] = self.region_embeddings(out, out["masks"], out["index"])
        return out

    def region_embeddings(self, out: dict, masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Region embeddings (R, D) of a forward's output: the projection head's output averaged over each region
        (ProjectionHead.region_embeddings, its last conv applied to the region averages); without the memory
        (no head), the backbone features' averages."""
        if "emb_hidden" in out:
            return self.projection.region_embeddings(out["emb_hidden"], masks, index)
        return region_embeddings(out["feat"], masks, index)

    @torch.no_grad()
    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU CAMs of the downstream branch (B, n_fg, h, w) - what CAM inference uses."""
        return F.relu(self.forward(x)["cam"])

    # ------------------------------------------------------------------ prototypes
    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor, valid: torch.Tensor) -> None:
        """prototypes (n_fg, K, D) and valid (n_fg, K) - from training memory or the memory-build stage."""
        if not self.use_aggregation:
            raise RuntimeError("set_prototypes: aggregation is off in this model")
        k = self.cfg.aggregation.prototypes_per_class
        expect = (self.num_fg, k, self.cfg.memory.dim)
        if tuple(prototypes.shape) != expect or tuple(valid.shape) != expect[:2]:
            raise ValueError(f"prototypes must be {expect} with valid {expect[:2]}, got "
                             f"{tuple(prototypes.shape)} and {tuple(valid.shape)}")
        self.prototypes.copy_(prototypes.reshape(-1, expect[2]))
        self.prototype_valid.copy_(valid.reshape(-1))

    @torch.no_grad()
    def refresh_prototypes(self, seed: int = 0) -> int:
        """Per-class k-means of the filled memory slots -> prototypes. Returns the number of valid prototypes."""
        emb, labels = self.memory.entries()
        protos, valid = class_prototypes(emb, labels, self.num_fg, self.cfg.aggregation.prototypes_per_class,
                                         self.cfg.aggregation.kmeans_iters, seed)
        self.set_prototypes(protos, valid)
        return int(valid.sum())

    # ------------------------------------------------------------------ optimiser groups
    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new-layer parameters): new layers get lr x lr_mult_new.
        Frozen stages / frozen BatchNorm (cam.backbone.frozen_stages, batchnorm) hold no trainable parameter."""
        ids = {id(p) for p in self.backbone.parameters()}
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        return bb, [p for p in self.parameters() if id(p) not in ids and p.requires_grad]

    def head_and_rca_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The new layers split in two: (the plain CAM classifier, the RCA modules: projection head,
        aggregation, aggregated classifier) - cam.train.lr_mult_new / lr_mult_rca."""
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        ids = {id(p) for p in head} | {id(p) for p in self.backbone.parameters()}
        return head, [p for p in self.parameters() if id(p) not in ids and p.requires_grad]


def load_cam_net(cfg: CamConfig, num_classes: int, path: str, device: torch.device | str = "cpu",
                 what: str = "trained CAM model", stage: str = "cam_train") -> CamNet:
    """A trained CamNet from a state-dict file written by the cam_train stage (weights_only load); errors name
    the file as `what` and the `stage` that makes it."""
    import copy

    bb = cfg.backbone.model_copy(update={"pretrained": None})  # weights come from the file
    cfg = copy.deepcopy(cfg)
    cfg.backbone = bb
    net = CamNet(cfg, num_classes)
    sd = load_trained_weights(path, what, stage)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{what} {path} does not fit the configured network (cam section changed?): "
                         f"{str(e).splitlines()[0]}") from e
    return net.to(device).eval()

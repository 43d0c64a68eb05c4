"""Stage random_walk: per image, AffinityNet affinities on the feature grid, random walk of the CAM scores
([(1 - max)^bg_alpha ; CAMs], area-pooled to the grid), bilinear upsampling, argmax -> "pseudo_mask"
(H, W) uint8, 255 where the winning share of the propagated scores is under
refine.random_walk.uncertain_threshold (off by default, as PSA/IRN). With refine.random_walk.crf_postprocess
the per-pixel normalised walk scores go through the dense CRF (refine.crf kernels) before the argmax.

With refine.saliency.enabled, the pseudo-mask is instead RCA's gen_labels fusion of the CRF'd CAMs with
the saliency map data.saliency_dir/<id>.png (rca_core/saliency.py); AffinityNet is then not used.
With refine.random_walk.export_png, each pseudo-mask is also written as a VOC palette PNG to
files/png/<id>.png of this stage.
"""
from __future__ import annotations

import numpy as np
import torch

from rca_core.config import RunConfig
from rca_core.crf import IGNORE
from rca_core.models.affinity_net import image_to_tensor, load_affinity_net
from rca_core.random_walk_ops import random_walk_mask
from rca_core.saliency import fuse_saliency, read_saliency
from rca_core.stages.context import StageContext
from rca_core.stages.crf_labels import read_cams
from rca_core.stages.label_scoring import LabelScorer, merge_scores



class Worker:
    def __init__(self, cfg: RunConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.cams = ctx.inputs["cams"]
        self.scorer = LabelScorer(ctx, cfg.data.num_classes)
        self.saliency = cfg.refine.saliency.enabled
        if self.saliency and not cfg.data.saliency_dir:
            raise ValueError("refine.saliency.enabled needs data.saliency_dir (a folder of <id>.png saliency maps)")
        self.net = None
        if not self.saliency:
            aff_out = ctx.inputs["affinity"]
            if not aff_out.has_file("model.pt"):
                raise FileNotFoundError(f"no trained AffinityNet in {aff_out.uri}/files/model.pt")
            self.fast = ctx.fast()
            self.net = self.fast.model(load_affinity_net(cfg.refine.affinity, aff_out.file("model.pt"), ctx.device))

    @torch.no_grad()
    def affinities(self, image: np.ndarray) -> torch.Tensor:
        x = image_to_tensor(image).unsqueeze(0).to(self.ctx.device)
        with self.fast.autocast():  # the network in compute.precision; the walk in float32
            return self.net(x)[0].float()

    def process(self, image_id: str) -> dict:
        cams, classes = read_cams(self.cams, image_id)
        image = self.ctx.dataset.image(image_id)
        if image.shape[:2] != cams.shape[1:]:
            raise ValueError(f"CAM of {image_id} is {cams.shape[1:]}, image is {image.shape[:2]}")
        if self.saliency:
            sal = read_saliency(self.cfg.data.saliency_dir, image_id, image.shape[:2])
            mask = fuse_saliency(image, cams, classes, sal, self.cfg.refine.saliency, self.cfg.refine.crf)
        else:
            rw = self.cfg.refine.random_walk
            mask = random_walk_mask(torch.from_numpy(cams), classes, self.affinities(image),
                                    radius=self.cfg.refine.affinity.radius, beta=rw.beta, logt=rw.logt,
                                    bg_alpha=rw.bg_alpha, uncertain_threshold=rw.uncertain_threshold, method=rw.method,
                                    crf=(image, self.cfg.refine.crf) if rw.crf_postprocess else None)
        self.ctx.out.write(image_id, {"pseudo_mask": mask}, attrs={"classes": classes})
        self.scorer.add(image_id, mask)
        if self.cfg.refine.random_walk.export_png:
            export_png(self.ctx.out, image_id, mask)
        return {"fg_fraction": float(((mask > 0) & (mask != IGNORE)).mean()),
                "ignore_fraction": float((mask == IGNORE).mean())}

    def account(self, image_id: str) -> None:
        """Fold an image finished in an earlier run into the score."""
        if self.scorer.wants(image_id):
            self.scorer.add(image_id, self.ctx.out.read(image_id, "pseudo_mask")[0])

    def partial(self) -> dict:
        return self.scorer.take()


def export_png(out, image_id: str, mask: np.ndarray) -> None:
    """VOC palette PNG at files/png/<id>.png of the stage, through the store (atomic locally)."""
    from rca_core.data.palette import palette_png_bytes

    out.write_file(f"png/{image_id}.png", palette_png_bytes(mask))


def finalize(cfg: RunConfig, ctx: StageContext, parts: list | None = None) -> dict:
    res = merge_scores(parts or [], ctx.extra.get("eval_split", ctx.extra.get("split", "?")))
    return {"metrics": res} if res else {}

"""Stage cam_infer: multi-scale + flip CAMs of every training image, ground-truth classes only.

The CAM comes from the aggregated branch when aggregation is on, with the dataset-level prototypes of
memory_build (docs/method.md, Semantic aggregation); from the plain branch otherwise. Per image: field `cam` (n_tags, H, W)
at image resolution, max-normalised per class, stored as cam_infer.dtype (uint8 =
round(255 * cam) by default, or float16; readers decode with rca_core.cam_ops.decode_cam), attrs `classes` (1-based ids,
ascending). An image without tags gets a (0, H, W) array. (The low-resolution copy earlier versions
stored for the random walk was read by nothing: the walk downsamples `cam` to its own feature grid.)
"""
from __future__ import annotations

import numpy as np
import torch

from rca_core.cam_ops import encode_cam, multiscale_cam, tags_to_indices
from rca_core.models.cam_net import load_cam_net
from rca_core.stages.memory_build import load_prototypes



class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.num_classes = cfg.data.num_classes
        self.fast = ctx.fast()
        self.model = self.fast.model(load_cam_net(cfg.cam, self.num_classes, ctx.inputs["model"].file("model.pt"),
                                                  ctx.device))
        if self.model.use_aggregation:
            protos, valid = load_prototypes(ctx.inputs["prototypes"])
            self.model.set_prototypes(protos.to(ctx.device), valid.to(ctx.device))

    def cams(self, image_id: str) -> tuple[np.ndarray, list[int]]:
        ds = self.ctx.dataset
        classes = sorted(set(int(t) for t in ds.tags(image_id)))
        ic = self.cfg.cam_infer
        with self.fast.autocast():  # the network in compute.precision; the CAMs are summed in float32
            cam = multiscale_cam(self.model, ds.image(image_id), tags_to_indices(classes, self.num_classes),
                                 ic.scales, ic.flip, self.ctx.device)
        return cam, classes

    def process(self, image_id: str) -> dict:
        cam, classes = self.cams(image_id)
        self.ctx.out.write(image_id, {"cam": encode_cam(cam, self.cfg.cam_infer.dtype)}, attrs={"classes": classes})
        return {"n_classes": len(classes)}


def finalize(cfg, ctx, parts: list | None = None) -> dict:
    return {"scales": list(cfg.cam_infer.scales), "flip": cfg.cam_infer.flip, "dtype": cfg.cam_infer.dtype}

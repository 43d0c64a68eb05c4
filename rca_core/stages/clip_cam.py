"""Stage clip_cam (cam.source: clip): CLIP-ES CAMs from a frozen CLIP, no CAM training.

Writes the same per-image field as cam_infer, so cam_eval, crf_labels and random_walk read either: `cam`
(n_tags, H, W) at image resolution, max-normalised per class, stored as cam_infer.dtype; attrs `classes`
(1-based ids, ascending). The method is rca_core.models.clip_es (docs/method.md, "CLIP CAM source").
"""
from __future__ import annotations

import numpy as np

from rca_core.cam_ops import encode_cam, tags_to_indices
from rca_core.config.cam import RANDOM_WEIGHTS
from rca_core.models.clip_es import ClipCam, build_clip, text_embeddings


def prompt_names(cfg, ctx) -> list[str]:
    """The words put in the prompts for each foreground class (class id 1..C-1): data.class_names (or the data
    set's), each replaced by cam.clip.prompt_names where given."""
    names = list(cfg.data.class_names or getattr(ctx.dataset, "class_names", None) or [])
    if len(names) != cfg.data.num_classes:
        raise ValueError(f"clip_cam needs the class names (data.class_names, background first, "
                         f"{cfg.data.num_classes} entries): CLIP scores the image against them")
    unknown = sorted(set(cfg.cam.clip.prompt_names) - set(names))
    if unknown:
        raise ValueError(f"cam.clip.prompt_names names unknown classes {unknown}; classes: {names[1:]}")
    return [cfg.cam.clip.prompt_names.get(n, n) for n in names[1:]]


class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        c = cfg.cam.clip
        model = build_clip(c, cfg.storage).to(ctx.device)
        fg = text_embeddings(model, prompt_names(cfg, ctx), c.templates)
        bg = text_embeddings(model, c.background, c.templates) if c.background else fg[:0]
        self.cam = ClipCam(model, fg, bg, c, ctx.device)

    def cams(self, image_id: str) -> tuple[np.ndarray, list[int]]:
        ds = self.ctx.dataset
        classes = sorted(set(int(t) for t in ds.tags(image_id)))
        return self.cam(ds.image(image_id), tags_to_indices(classes, self.cfg.data.num_classes)), classes

    def process(self, image_id: str) -> dict:
        cam, classes = self.cams(image_id)
        self.ctx.out.write(image_id, {"cam": encode_cam(cam, self.cfg.cam_infer.dtype)}, attrs={"classes": classes})
        return {"n_classes": len(classes)}


def finalize(cfg, ctx, parts: list | None = None) -> dict:
    c = cfg.cam.clip
    random = c.weights == RANDOM_WEIGHTS
    return {"weights": RANDOM_WEIGHTS if random else "file",
            "model": "small" if random and c.random_arch == "small" else c.model,
            "scales": list(c.scales), "flip": c.flip, "caa": c.caa, "dtype": cfg.cam_infer.dtype}

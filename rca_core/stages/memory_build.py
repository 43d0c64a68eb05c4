"""Stage memory_build: the dataset-level regional memory and its per-class prototypes (docs/method.md: Memory bank, Semantic aggregation).

Per image (Worker.process): one forward pass of the trained network at scale 1 (no flip); for every
ground-truth class the region mask_c = P_c > mean(P_c) of the plain branch and the masked average of
the projected embedding map, L2-normalised -> field `emb` (n_tags, D) float32, attrs `classes`.
Without a projection head (memory off) the masked average of the backbone features is stored instead.
The workers hand their embeddings back with each shard (no per-image reads on the driver).
Driver (finalize): all region embeddings, in the split's order -> arrays `embeddings` (N, D), `embedding_classes` (N,)
(1-based class ids), `embedding_images` (N,) (index into the table `regions`), then per-class k-means
-> `prototypes` (num_fg, K, D) float32 and `prototype_valid` (num_fg, K) uint8, used by cam_infer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rca_core.cam_ops import normalize_image, tags_to_indices
from rca_core.kmeans import class_prototypes
from rca_core.models.cam_net import load_cam_net



class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.num_classes = cfg.data.num_classes
        self.fast = ctx.fast()
        self.model = self.fast.model(load_cam_net(cfg.cam, self.num_classes, ctx.inputs["model"].file("model.pt"),
                                                  ctx.device))
        self._part: list = []

    @torch.no_grad()
    def embed(self, image_id: str) -> tuple[np.ndarray, list[int]]:
        ds = self.ctx.dataset
        classes = sorted(set(int(t) for t in ds.tags(image_id)))
        chans = tags_to_indices(classes, self.num_classes)
        x = torch.from_numpy(normalize_image(ds.image(image_id))).unsqueeze(0).to(self.ctx.device)
        tags = torch.zeros(1, self.num_classes - 1, device=x.device)
        tags[0, chans] = 1
        with self.fast.autocast():
            out = self.model(x, with_embeddings=True, tags=tags)
        emb = F.normalize(out["emb"].float(), dim=1)
        return emb.float().cpu().numpy(), classes

    def process(self, image_id: str) -> dict:
        emb, classes = self.embed(image_id)
        self.ctx.out.write(image_id, {"emb": emb}, attrs={"classes": classes})
        self._part.append((image_id, emb, classes))
        return {"regions": len(classes)}

    def account(self, image_id: str) -> None:
        """An image embedded in an earlier run: its stored embeddings join the table."""
        e, attrs = self.ctx.out.read(image_id, "emb")
        self._part.append((image_id, e, [int(c) for c in attrs["classes"]]))

    def partial(self) -> list:
        part, self._part = self._part, []
        return part


def finalize(cfg, ctx, parts: list | None = None) -> dict:
    num_fg = cfg.data.num_classes - 1
    got = {image_id: (e, classes) for part in (parts or []) for image_id, e, classes in part}
    missing = [i for i in ctx.ids if i not in got]
    if missing:
        raise RuntimeError(f"memory_build: no embeddings came back for {len(missing)} images (e.g. {missing[:3]})")
    embs, cls, img_idx, rows = [], [], [], []
    for i, image_id in enumerate(ctx.ids):
        e, classes = got[image_id]
        embs.append(e)
        cls += list(classes)
        img_idx += [i] * len(classes)
        rows += [{"image_id": image_id, "class_id": int(c)} for c in classes]
    dim = embs[0].shape[1] if embs else 0
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    cls_arr = np.asarray(cls, dtype=np.int64)
    ctx.out.put_array("embeddings", emb.astype(np.float32))
    ctx.out.put_array("embedding_classes", cls_arr)
    ctx.out.put_array("embedding_images", np.asarray(img_idx, dtype=np.int64))
    if rows:
        ctx.out.write_table("regions", rows)
    k = cfg.cam.aggregation.prototypes_per_class
    protos, valid = class_prototypes(torch.from_numpy(emb), torch.from_numpy(cls_arr - 1), num_fg, k,
                                     cfg.cam.aggregation.kmeans_iters, seed=cfg.seed)
    ctx.out.put_array("prototypes", protos.numpy().astype(np.float32), attrs={"k": k, "dim": int(dim)})
    ctx.out.put_array("prototype_valid", valid.numpy().astype(np.uint8))
    counts = np.bincount(cls_arr, minlength=cfg.data.num_classes)[1:].tolist() if len(cls_arr) else [0] * num_fg
    return {"regions": int(len(cls_arr)), "regions_per_class": counts, "dim": int(dim),
            "prototypes_valid": int(valid.sum()), "prototypes_per_class": k}


def load_prototypes(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes (num_fg, K, D), valid (num_fg, K) bool) from a memory_build StageOutput."""
    p, _ = out.get_array("prototypes")
    v, _ = out.get_array("prototype_valid")
    return torch.from_numpy(np.asarray(p, np.float32)), torch.from_numpy(np.asarray(v).astype(bool))

"""Per-class k-means (docs/method.md, Semantic aggregation): compress region embeddings to K prototypes per class.

`kmeans(x, k, iters, seed)` is a small deterministic Lloyd's k-means (k-means++ seeding from a
seeded generator) in torch, so the same embeddings always give the same prototypes, on CPU or GPU.
`class_prototypes(emb, labels, num_classes, k)` -> (num_classes, k, D) prototypes and a (num_classes, k)
validity mask: a class with fewer than k embeddings keeps its embeddings as prototypes and marks the
rest invalid; a class with none has no valid prototype.
"""
from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Centres (k, D) of x (N, D), N >= k. Empty clusters are re-seeded with the farthest point."""
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, D), got {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans needs at least k={k} points, got {n}")
    x = x.float()
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    # k-means++ seeding
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        w = d2.clamp_min(0).cpu()
        if float(w.sum()) <= 0:
            j = int(torch.randint(n, (1,), generator=g))
        else:
            j = int(torch.multinomial(w / w.sum(), 1, generator=g))
        idx.append(j)
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    centres = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.zeros_like(centres).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = cnt == 0
        new = new / cnt.clamp_min(1).unsqueeze(1)
        if empty.any():
            far = torch.cdist(x, new[~empty]).min(1).values.argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new, centres):
            centres = new
            break
        centres = new
    return centres


def class_prototypes(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, iters: int = 20,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class k-means of emb (N, D) with labels (N,) in [0, num_classes).

    Returns prototypes (num_classes, k, D) and valid (num_classes, k) bool.
    """
    d = emb.shape[1]
    protos = emb.new_zeros((num_classes, k, d), dtype=torch.float32)
    valid = torch.zeros(num_classes, k, dtype=torch.bool, device=emb.device)
    for c in range(num_classes):
        xc = emb[labels == c].float()
        if xc.shape[0] == 0:
            continue
        if xc.shape[0] <= k:
            protos[c, : xc.shape[0]] = xc
            valid[c, : xc.shape[0]] = True
        else:
            protos[c] = kmeans(xc, k, iters, seed + c)
            valid[c] = True
    return protos, valid

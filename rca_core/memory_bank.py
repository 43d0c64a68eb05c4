"""The regional memory bank used during CAM training (docs/method.md, Memory bank: "online memory").

Per foreground class a FIFO queue of `size` projected, L2-normalised region embeddings of
dimension `dim`. Writes are gradient-free and happen only for an image's ground-truth classes whose
sigmoid score is above `score_threshold`; the contrast loss and the k-means prototypes only ever see
*filled* slots (`entries()`), never the unused part of a queue.

Deviation from the official code (recorded in docs/method.md): the code keeps a ring buffer of EMA
slots (momentum 0.99) initialised with N(0, 1) noise and stores raw backbone features; here a slot
holds one projected embedding as it was written (plain FIFO), and empty slots do not exist for the loss.

The queues are registered buffers, so they travel with the model's state dict (checkpoints, DDP).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RegionMemory(nn.Module):
    def __init__(self, num_classes: int, size: int, dim: int, score_threshold: float = 0.7):
        super().__init__()
        if num_classes < 1 or size < 1 or dim < 1:
            raise ValueError(f"RegionMemory needs positive num_classes/size/dim, got {num_classes}/{size}/{dim}")
        self.num_classes, self.size, self.dim = int(num_classes), int(size), int(dim)
        self.score_threshold = float(score_threshold)
        self.register_buffer("queue", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))     # next slot to write
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))   # filled slots (<= size)
        self.register_buffer("writes", torch.zeros(num_classes, dtype=torch.long))  # total writes ever

    @torch.no_grad()
    def push(self, emb: torch.Tensor, cls: torch.Tensor) -> int:
        """Append embeddings (N, dim) of classes cls (N,) (0-based foreground index), oldest out first.

        The embeddings are L2-normalised here. Returns the number written.
        """
        if emb.numel() == 0:
            return 0
        if emb.ndim != 2 or emb.shape[1] != self.dim or cls.shape != emb.shape[:1]:
            raise ValueError(f"push expects emb (N, {self.dim}) and cls (N,), got {tuple(emb.shape)}, {tuple(cls.shape)}")
        emb = F.normalize(emb.detach().to(self.queue.dtype), dim=1)
        cls = cls.to(torch.long)
        if (cls < 0).any() or (cls >= self.num_classes).any():
            raise ValueError(f"class index out of range [0, {self.num_classes})")
        for e, c in zip(emb, cls.tolist()):
            p = int(self.ptr[c])
            self.queue[c, p] = e
            self.ptr[c] = (p + 1) % self.size
            self.count[c] = min(int(self.count[c]) + 1, self.size)
            self.writes[c] += 1
        return int(emb.shape[0])

    @torch.no_grad()
    def write_regions(self, emb: torch.Tensor, cls: torch.Tensor, scores: torch.Tensor) -> int:
        """Write only the regions whose classification score (sigmoid, per region) exceeds the threshold."""
        keep = scores.detach() > self.score_threshold
        return self.push(emb[keep], cls[keep])

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All filled slots: (K, dim) embeddings and (K,) class indices."""
        embs, labels = [], []
        for c in range(self.num_classes):
            n = int(self.count[c])
            if n:
                embs.append(self.queue[c, :n])
                labels.append(torch.full((n,), c, dtype=torch.long, device=self.queue.device))
        if not embs:
            return self.queue.new_zeros((0, self.dim)), torch.zeros(0, dtype=torch.long, device=self.queue.device)
        return torch.cat(embs), torch.cat(labels)

    def class_entries(self, c: int) -> torch.Tensor:
        return self.queue[c, : int(self.count[c])]

    def fill_fraction(self) -> list[float]:
        return [float(n) / self.size for n in self.count.tolist()]

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, size={self.size}, dim={self.dim}, threshold={self.score_threshold}"

"""Semantic aggregation (docs/method.md, Semantic aggregation): pixel features attend over the memory's prototypes.

    q = W_q x (1x1 conv),  k = W_k C,  v = W_v C     (C: prototypes, P x D, from per-class k-means)
    a = softmax(q k^T / sqrt(D)) v                   (softmax=True, the paper)
    a = (q k^T / sqrt(D)) v / P_valid                (softmax=False: the official code has no softmax;
                                                      we divide by the number of prototypes to keep the
                                                      scale bounded; the code multiplies by 20/K)
    x_agg = conv1x1([x ; conv1x1(a)])

Only valid prototypes take part (a class with fewer embeddings than K has fewer prototypes; before
the first k-means there are none and a = 0). The fusion conv starts as the identity on x and zero on
the aggregated part, so at initialisation the aggregated branch sees exactly the backbone features;
the aggregated part is learnt from there (an initialisation choice; the operator is the paper's).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SemanticAggregation(nn.Module):
    def __init__(self, in_channels: int, dim: int, softmax: bool = True, fusion_init: str = "identity"):
        super().__init__()
        if fusion_init not in ("identity", "default"):
            raise ValueError(f"fusion_init must be 'identity' or 'default', got {fusion_init!r}")
        self.dim, self.softmax = dim, softmax
        self.query = nn.Conv2d(in_channels, dim, 1)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Conv2d(dim, in_channels, 1)
        self.fuse = nn.Conv2d(2 * in_channels, in_channels, 1)
        if fusion_init == "identity":
            self._identity_fusion(in_channels)

    @torch.no_grad()
    def _identity_fusion(self, in_channels: int) -> None:
        self.fuse.weight.zero_()
        self.fuse.weight[:, :in_channels, 0, 0].copy_(torch.eye(in_channels))
        self.fuse.bias.zero_()

    def attend(self, x: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The aggregated context a (B, D, h, w) for features x (B, C, h, w) and prototypes (P, D)."""
        b, _, h, w = x.shape
        if valid is None:
            valid = torch.ones(prototypes.shape[0], dtype=torch.bool, device=x.device)
        if not bool(valid.any()):
            return x.new_zeros((b, self.dim, h, w))
        protos = prototypes[valid].to(x.dtype)
        q = self.query(x).flatten(2).transpose(1, 2)                # (B, hw, D)
        k = self.key(protos)                                        # (P, D)
        v = self.value(protos)                                      # (P, D)
        att = q @ k.t() / math.sqrt(self.dim)                       # (B, hw, P)
        att = att.softmax(dim=-1) if self.softmax else att / protos.shape[0]
        a = att @ v                                                 # (B, hw, D)
        return a.transpose(1, 2).reshape(b, self.dim, h, w)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        a = self.out(self.attend(x, prototypes, valid))
        return self.fuse(torch.cat([x, a], dim=1))

    def classify(self, x: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor | None,
                 weight: torch.Tensor) -> torch.Tensor:
        """`conv2d(forward(x, prototypes, valid), weight)` for a bias-free 1x1 classifier `weight` (n, C, 1, 1),
        without the C x 2C fusion conv and the D -> C output conv over every pixel: fuse, out and the classifier
        are linear 1x1 maps in a row, so their product (n x C for x, n x D for the aggregated context, computed
        once per call) is applied instead. The same values and gradients, up to float rounding; for n = 20
        classes and C = 2048 it removes ~19 GFLOP per 32 x 32 feature map from the forward pass."""
        c = x.shape[1]
        wc = weight.flatten(1)                                              # (n, C)
        wf = self.fuse.weight.flatten(1)                                    # (C, 2C): [on x | on the context]
        wca = wc @ wf[:, c:]                                                # (n, C)
        w_x = wc @ wf[:, :c]                                                # (n, C)
        w_att = wca @ self.out.weight.flatten(1)                            # (n, D)
        bias = wca @ self.out.bias + wc @ self.fuse.bias                    # (n,)
        att = self.attend(x, prototypes, valid)                             # (B, D, h, w)
        return (F.conv2d(x, w_x[:, :, None, None].to(x.dtype)) + F.conv2d(att, w_att[:, :, None, None].to(att.dtype))
                + bias.view(1, -1, 1, 1).to(x.dtype))

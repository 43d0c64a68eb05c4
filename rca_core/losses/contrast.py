"""Semantic contrast (docs/method.md, Semantic contrast): InfoNCE of region embeddings against the memory bank.

For an anchor u (L2-normalised) of class c and memory entries m (L2-normalised, filled slots only):
    loss(u) = mean over positives p (entries of class c) of
              -log( exp(u.m_p / tau) / (exp(u.m_p / tau) + sum_{n: class(n) != c} exp(u.m_n / tau)) )
and the batch loss is the mean over anchors that have at least one positive in the memory
(anchors without a positive contribute nothing; with no such anchor the loss is 0 with a graph).

Optional embedding mixup (official code): the anchor is mixed with a partner region,
u = normalise(lam * r_i + (1 - lam) * r_j), lam ~ Beta(alpha, alpha), and the loss is
lam * loss(u; c_i) + (1 - lam) * loss(u; c_j).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_anchor(anchors: torch.Tensor, anchor_cls: torch.Tensor, mem: torch.Tensor, mem_cls: torch.Tensor,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per anchor (N,) and whether it had a positive (N,) bool."""
    logits = anchors @ mem.t() / tau                                   # (N, K)
    pos = anchor_cls.unsqueeze(1) == mem_cls.unsqueeze(0)              # (N, K)
    neg_lse = torch.logsumexp(logits.masked_fill(pos, float("-inf")), dim=1, keepdim=True)  # (N, 1), -inf if none
    # -log(e^p / (e^p + sum_n e^n)) = logaddexp(p, lse_n) - p
    per = torch.logaddexp(logits, neg_lse.expand_as(logits)) - logits  # (N, K)
    npos = pos.sum(1)
    loss = (per * pos).sum(1) / npos.clamp_min(1)
    return loss, npos > 0


def semantic_contrast_loss(anchors: torch.Tensor, anchor_cls: torch.Tensor, mem: torch.Tensor,
                           mem_cls: torch.Tensor, tau: float = 0.07, mixup_alpha: float | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """anchors (N, D) (normalised here), anchor_cls (N,), mem (K, D) normalised entries, mem_cls (K,)."""
    if anchors.shape[0] == 0 or mem.shape[0] == 0:
        return anchors.sum() * 0.0
    anchors = F.normalize(anchors, dim=1)
    mem = mem.detach()
    if not mixup_alpha:
        loss, has = _per_anchor(anchors, anchor_cls, mem, mem_cls, tau)
        return loss[has].mean() if has.any() else anchors.sum() * 0.0
    n = anchors.shape[0]
    partner = torch.randperm(n, generator=generator).to(anchors.device)
    beta = torch.distributions.Beta(torch.tensor(float(mixup_alpha)), torch.tensor(float(mixup_alpha)))
    lam = beta.sample((n,)).to(anchors.device).unsqueeze(1)
    mixed = F.normalize(lam * anchors + (1 - lam) * anchors[partner], dim=1)
    l1, h1 = _per_anchor(mixed, anchor_cls, mem, mem_cls, tau)
    l2, h2 = _per_anchor(mixed, anchor_cls[partner], mem, mem_cls, tau)
    lam = lam.squeeze(1)
    has = h1 & h2
    loss = lam * l1 + (1 - lam) * l2
    return loss[has].mean() if has.any() else anchors.sum() * 0.0

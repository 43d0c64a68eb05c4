"""Pixel-pair affinity labels from a confident label map (PSA's ExtractAffinityLabelInRadius, vectorised).

Pairs: every grid cell p and every offset o of `pair_offsets(radius)` (the half-disc of PSA/IRN:
(0, dx) for 0 < dx < r, and (dy, dx) for 0 < dy < r, |dx| < r, with dy^2 + dx^2 < r^2; 34 offsets for
r = 5), pair (p, p + o). The other half of the disc is the same pairs seen from the other end.
Pair tensors have shape (..., P, h, w): entry [k, y, x] is the pair ((y, x), (y, x) + offsets[k]);
pairs that leave the grid are invalid (never labelled, never used by the random walk).

Labels (as PSA): same label and background -> bg_pos; same foreground label -> fg_pos; different
labels -> neg; a pair with an end labelled 255 (or outside the grid) is in none of the three.
The label map is first brought to the feature grid by nearest sampling (IRN: pil_rescale(label, 1/4, 0)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

IGNORE = 255


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) offsets of the half-disc of radius `radius` (exclusive), in PSA's order."""
    if radius < 2:
        raise ValueError(f"affinity radius must be >= 2, got {radius}")
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                out.append((dy, dx))
    return out


def grid_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Feature-grid size of an image: ceil(H / stride), ceil(W / stride)."""
    return math.ceil(height / stride), math.ceil(width / stride)


def downsample_labels(label: np.ndarray | torch.Tensor, stride: int) -> np.ndarray | torch.Tensor:
    """Nearest sampling of a (..., H, W) label map at the centre of each stride x stride cell."""
    h, w = label.shape[-2:]
    gh, gw = grid_size(h, w, stride)
    ys = np.minimum(np.arange(gh) * stride + stride // 2, h - 1)
    xs = np.minimum(np.arange(gw) * stride + stride // 2, w - 1)
    if isinstance(label, torch.Tensor):
        ys_t = torch.as_tensor(ys, device=label.device)
        xs_t = torch.as_tensor(xs, device=label.device)
        return label.index_select(-2, ys_t).index_select(-1, xs_t)
    return label[..., ys[:, None], xs[None, :]]


def shifted(x: torch.Tensor, offsets: list[tuple[int, int]], fill: float) -> torch.Tensor:
    """x (..., h, w) -> (..., P, h, w) with out[..., k, y, x] = x[..., y + dy_k, x + dx_k] (fill outside)."""
    h, w = x.shape[-2:]
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    xp = torch.nn.functional.pad(x, (r, r, 0, r), value=fill)
    return torch.stack([xp[..., dy:dy + h, r + dx:r + dx + w] for dy, dx in offsets], dim=-3)


def valid_pairs(h: int, w: int, offsets: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(P, h, w) bool: the pair's second end is inside the grid."""
    ones = torch.ones((h, w), dtype=torch.float32, device=device)
    return shifted(ones, offsets, 0.0) > 0


def affinity_labels(label: np.ndarray | torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    """Grid label map (..., h, w) with 255 = ignore -> {"bg_pos", "fg_pos", "neg"} bool (..., P, h, w)."""
    lab = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).long()
    offsets = pair_offsets(radius)
    to = shifted(lab, offsets, IGNORE)
    frm = lab.unsqueeze(-3)
    valid = (frm != IGNORE) & (to != IGNORE)
    same = (frm == to) & valid
    return {"bg_pos": same & (frm == 0), "fg_pos": same & (frm != 0), "neg": valid & (frm != to)}

"""Random walk of CAM scores over predicted pixel affinities (PSA's infer_aff.py / IRN's propagate), in torch.

The affinity matrix A (N x N over the N = h * w cells of the feature grid) is symmetric, with A_ii = 1 and
A_ij = aff(i, j) for the pairs within the radius (`rca_core.affinity_labels.pair_offsets`), 0 elsewhere.
PSA: T = A^beta / column sums, T <- T @ T logt times, scores <- scores @ T. Because A is symmetric,
scores @ T = (M @ scores^T)^T with M = D^-1 A^beta the row-normalised matrix (D = row sums), so
applying T^(2^logt) is the same as applying M 2^logt times to the (N, C) score columns.

Methods (the same numbers up to float rounding; tests check all against a plain dense reference):
- "sparse": M as a torch sparse CSR matrix (N * (2P + 1) non-zeros), 2^logt sparse mat-muls. Memory
  O(N * P): a 500 x 500 image at stride 4 is N = 15,625 cells, about 1.1 M non-zeros. Works on GPU.
- "banded": M stored as 2P + 1 per-offset weight maps, each step a sum of shifted score maps.
- "dense": PSA/IRN exactly: dense T and logt repeated squarings. O(N^2) memory, O(N^3 logt) time:
  only for small grids (refused above `DENSE_MAX_CELLS`).
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from rca_core.affinity_labels import IGNORE, pair_offsets, valid_pairs

Method = Literal["sparse", "banded", "dense"]
DENSE_MAX_CELLS = 4096


def _check(aff: torch.Tensor, offsets: list[tuple[int, int]]) -> None:
    if aff.ndim != 3 or aff.shape[0] != len(offsets):
        raise ValueError(f"affinities must be (P={len(offsets)}, h, w), got {tuple(aff.shape)}")


def _pair_index(h: int, w: int, offsets: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (src, dst) indices of every valid pair, and the boolean (P, h, w) mask that selects them."""
    valid = valid_pairs(h, w, offsets, device=device)
    idx = torch.arange(h * w, device=device).view(h, w)
    step = torch.tensor([dy * w + dx for dy, dx in offsets], device=device).view(-1, 1, 1)
    src = idx.unsqueeze(0).expand_as(valid)[valid]
    dst = (idx.unsqueeze(0) + step)[valid]
    return src, dst, valid


def transition_sparse(aff: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """Row-stochastic M = D^-1 A^beta (N x N) as a sparse CSR tensor. aff: (P, h, w) in [0, 1]."""
    offsets = pair_offsets(radius)
    _check(aff, offsets)
    _, h, w = aff.shape
    n = h * w
    src, dst, valid = _pair_index(h, w, offsets, aff.device)
    a = aff[valid].float().clamp_min(0).pow(beta)
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([a, a, torch.ones(n, device=aff.device)])
    rowsum = torch.zeros(n, device=aff.device).index_add_(0, rows, vals)
    vals = vals / rowsum[rows]
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


def transition_banded(aff: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """M as per-offset weights: W (2P+1, h, w), all_offsets; (M x)[p] = sum_k W[k, p] x[p + all_offsets[k]]."""
    offsets = pair_offsets(radius)
    _check(aff, offsets)
    _, h, w = aff.shape
    valid = valid_pairs(h, w, offsets, device=aff.device)
    fwd = torch.where(valid, aff.float().clamp_min(0).pow(beta), torch.zeros((), device=aff.device))
    # the pair (p - o, p) seen from p: weight fwd[k] at p - o, moved to p
    back = torch.stack([_shift_map(fwd[k], -dy, -dx) for k, (dy, dx) in enumerate(offsets)])
    weights = torch.cat([torch.ones(1, h, w, device=aff.device), fwd, back])
    weights = weights / weights.sum(0, keepdim=True)
    all_offsets = [(0, 0)] + list(offsets) + [(-dy, -dx) for dy, dx in offsets]
    return weights, all_offsets


def _shift_map(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = x[..., y + dy, x + dx], zero outside."""
    h, w = x.shape[-2:]
    r = max(abs(dy), abs(dx))
    xp = F.pad(x, (r, r, r, r))
    return xp[..., r + dy:r + dy + h, r + dx:r + dx + w]


def transition_dense(aff: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """PSA's column-normalised dense T = A^beta / sum_i A^beta (N x N)."""
    offsets = pair_offsets(radius)
    _check(aff, offsets)
    _, h, w = aff.shape
    n = h * w
    if n > DENSE_MAX_CELLS:
        raise ValueError(f"dense random walk on {n} cells (> {DENSE_MAX_CELLS}) would need {n * n * 4 / 2**20:.0f} MiB per "
                         "matrix; use method 'sparse' or 'banded'")
    src, dst, valid = _pair_index(h, w, offsets, aff.device)
    a_mat = torch.eye(n, device=aff.device)
    a = aff[valid].float().clamp_min(0)
    a_mat[src, dst] = a
    a_mat[dst, src] = a
    a_mat = a_mat.pow(beta)
    return a_mat / a_mat.sum(0, keepdim=True)


def propagate(scores: torch.Tensor, aff: torch.Tensor, radius: int, beta: float, logt: int,
              method: Method = "sparse") -> torch.Tensor:
    """Random walk of (C, h, w) grid scores over (P, h, w) affinities: scores @ T^(2^logt), as (C, h, w)."""
    c, h, w = scores.shape
    if aff.shape[1:] != (h, w):
        raise ValueError(f"scores grid {(h, w)} != affinity grid {tuple(aff.shape[1:])}")
    x = scores.float().reshape(c, h * w)
    steps = 2 ** logt
    if method == "dense":
        t = transition_dense(aff, radius, beta)
        for _ in range(logt):
            t = t @ t
        return (x @ t).view(c, h, w)
    if method == "sparse":
        m = transition_sparse(aff, radius, beta)
        xt = x.t().contiguous()
        for _ in range(steps):
            xt = m @ xt
        return xt.t().reshape(c, h, w)
    if method == "banded":
        wts, offs = transition_banded(aff, radius, beta)
        r = radius
        y = x.view(c, h, w)
        for _ in range(steps):
            yp = F.pad(y, (r, r, r, r))
            y = sum(wts[k] * yp[:, r + dy:r + dy + h, r + dx:r + dx + w] for k, (dy, dx) in enumerate(offs))
        return y
    raise ValueError(f"random_walk.method must be 'sparse', 'banded' or 'dense', got {method!r}")


def cam_scores_on_grid(cams: torch.Tensor, bg_alpha: float, grid: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) CAMs in [0, 1] -> (K+1, h, w): [(1 - max)^bg_alpha ; CAMs] at full size, area-pooled to the grid."""
    cams = cams.float().clamp(0, 1)
    if cams.shape[0]:
        bg = (1 - cams.max(0, keepdim=True).values).pow(bg_alpha)
    else:
        bg = torch.ones((1,) + tuple(cams.shape[1:]), device=cams.device)
    scores = torch.cat([bg, cams], 0)
    return F.adaptive_avg_pool2d(scores.unsqueeze(0), grid)[0]


def scores_to_mask(scores: torch.Tensor, classes: list[int], size: tuple[int, int],
                   uncertain_threshold: float | None = None, crf=None) -> np.ndarray:
    """(K+1, h, w) propagated scores -> (H, W) uint8 class-id mask (bilinear upsampling, argmax).

    With `uncertain_threshold`, a pixel whose winning share of the summed scores is below it gets 255.
    With `crf` = (image, CrfConfig), the per-pixel normalised scores first go through the dense CRF.
    """
    up = F.interpolate(scores.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0]
    if crf is not None:
        from rca_core.crf import dense_crf

        image, crf_cfg = crf
        up = up.clamp_min(0)
        probs = (up / up.sum(0, keepdim=True).clamp_min(1e-12)).cpu().numpy()
        up = torch.from_numpy(dense_crf(image, probs, crf_cfg))
    best, arg = up.max(0)
    keys = torch.as_tensor([0] + list(classes), device=arg.device)
    mask = keys[arg].to(torch.uint8)
    if uncertain_threshold is not None:
        share = best / up.clamp_min(0).sum(0).clamp_min(1e-12)
        mask[share < uncertain_threshold] = IGNORE
    return mask.cpu().numpy()


def random_walk_mask(cams: torch.Tensor, classes: list[int], aff: torch.Tensor, *, radius: int, beta: float,
                     logt: int, bg_alpha: float, uncertain_threshold: float | None = None,
                     method: Method = "sparse", crf=None) -> np.ndarray:
    """Full-size CAMs (K, H, W) + grid affinities (P, h, w) -> pseudo-mask (H, W) uint8 (255 = uncertain).

    `crf`: optional (image, CrfConfig) for a dense CRF on the walk's scores before the argmax."""
    grid = tuple(aff.shape[1:])
    scores = cam_scores_on_grid(cams.to(aff.device), bg_alpha, grid)
    rw = propagate(scores, aff, radius, beta, logt, method)
    return scores_to_mask(rw, classes, tuple(cams.shape[1:]), uncertain_threshold, crf)

"""Random walk: every method equals a plain dense-matrix reference; propagation fills affinity regions."""
import numpy as np
import pytest
import torch

from rca_core.affinity_labels import IGNORE, pair_offsets
from rca_core.random_walk_ops import cam_scores_on_grid, propagate, random_walk_mask, scores_to_mask


def _reference(scores, aff, radius, beta, logt):
    """PSA infer_aff.py with plain numpy matrices, built pair by pair."""
    c, h, w = scores.shape
    n = h * w
    a = np.eye(n)
    for k, (dy, dx) in enumerate(pair_offsets(radius)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + (x + dx)
                    a[i, j] = a[j, i] = aff[k, y, x]
    a = a ** beta
    t = a / a.sum(0, keepdims=True)
    t = np.linalg.matrix_power(t, 2 ** logt)
    return (scores.reshape(c, n) @ t).reshape(c, h, w)


@pytest.mark.parametrize("method", ["sparse", "banded", "dense"])
@pytest.mark.parametrize("h,w,radius,beta,logt", [(7, 9, 3, 8, 3), (10, 8, 5, 8, 8), (6, 6, 2, 2.5, 0)])
def test_equals_dense_reference(method, h, w, radius, beta, logt):
    g = torch.Generator().manual_seed(h * w + radius)
    p = len(pair_offsets(radius))
    aff = torch.rand((p, h, w), generator=g) ** 0.3
    scores = torch.rand((3, h, w), generator=g)
    ref = _reference(scores.double().numpy(), aff.double().numpy(), radius, beta, logt)
    out = propagate(scores, aff, radius, beta, logt, method)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_dense_refuses_large_grids_and_bad_method():
    aff = torch.rand(len(pair_offsets(5)), 70, 70)
    with pytest.raises(ValueError, match="dense"):
        propagate(torch.rand(2, 70, 70), aff, 5, 8, 1, "dense")
    with pytest.raises(ValueError, match="method"):
        propagate(torch.rand(2, 70, 70), aff, 5, 8, 1, "magic")
    with pytest.raises(ValueError, match="affinities"):
        propagate(torch.rand(2, 8, 8), torch.rand(3, 8, 8), 5, 8, 1)


def test_walk_fills_regions_and_stops_at_boundaries():
    h, w, r = 12, 16, 5
    region = np.zeros((h, w), int)
    region[:, 8:] = 1                                # two regions: left, right
    off = pair_offsets(r)
    aff = np.zeros((len(off), h, w), np.float32)
    for k, (dy, dx) in enumerate(off):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    aff[k, y, x] = 1.0 if region[y, x] == region[y + dy, x + dx] else 0.01
    # CAM of class 3 on the right region with holes (a quarter of its cells), and a weak spurious spot on the left
    rng = np.random.default_rng(0)
    cam = np.zeros((1, h, w), np.float32)
    cam[0, :, 8:] = 0.6 * (rng.random((h, 8)) > 0.25)
    cam[0, 5:7, 2:4] = 0.4
    before = scores_to_mask(cam_scores_on_grid(torch.from_numpy(cam), 16, (h, w)), [3], (h, w))  # no walk
    mask = random_walk_mask(torch.from_numpy(cam), [3], torch.from_numpy(aff), radius=r, beta=8, logt=6,
                            bg_alpha=16)
    assert (before[:, 8:] == 3).mean() < 0.85 and (before[:, :8] == 3).any()   # holes + a false positive
    assert (mask[:, 8:] == 3).all()                  # holes filled over the whole right region
    assert (mask[:, :8] == 0).all()                  # spurious spot removed, nothing crosses the boundary


def test_scores_to_mask_uncertain():
    s = torch.zeros(3, 2, 2)
    s[0, 0, 0], s[1, 0, 1], s[2, 1, 0] = 1.0, 1.0, 1.0
    s[1, 1, 1], s[2, 1, 1] = 0.5, 0.5               # a tie: share 0.5
    m = scores_to_mask(s, [4, 6], (2, 2))
    assert m[0, 0] == 0 and m[0, 1] == 4 and m[1, 0] == 6
    m = scores_to_mask(s, [4, 6], (2, 2), uncertain_threshold=0.6)
    assert m[1, 1] == IGNORE and m[0, 1] == 4


def test_crf_postprocess_snaps_to_colour_edges():
    from rca_core.config.refine import CrfConfig

    h, w = 32, 32
    img = np.full((h, w, 3), 30, np.uint8)
    img[:, 13:] = 220                                 # colour edge at x = 13
    s = torch.zeros(2, 8, 8)                          # coarse scores: class boundary at x = 16
    s[0, :, :4] = 1.0
    s[1, :, 4:] = 1.0
    plain = scores_to_mask(s, [2], (h, w))
    snapped = scores_to_mask(s, [2], (h, w), crf=(img, CrfConfig()))
    truth = np.zeros((h, w), np.uint8)
    truth[:, 13:] = 2
    assert (plain != truth).sum() > 0
    assert (snapped != truth).sum() < (plain != truth).sum()

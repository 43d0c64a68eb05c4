"""Affinity labels vs a brute-force loop over pixel pairs."""
import numpy as np
import pytest
import torch

from rca_core.affinity_labels import IGNORE, affinity_labels, downsample_labels, pair_offsets, shifted, valid_pairs


def test_offsets_half_disc():
    off = pair_offsets(5)
    assert len(off) == 34 and len(set(off)) == 34 and (0, 0) not in off
    full = set(off) | {(-dy, -dx) for dy, dx in off}
    disc = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert full == disc and not (set(off) & {(-dy, -dx) for dy, dx in off})
    with pytest.raises(ValueError):
        pair_offsets(1)


def test_labels_equal_brute_force():
    rng = np.random.default_rng(1)
    lab = rng.choice([0, 0, 2, 5, IGNORE], size=(9, 11)).astype(np.uint8)
    r = 4
    out = affinity_labels(lab, r)
    off = pair_offsets(r)
    h, w = lab.shape
    for k, (dy, dx) in enumerate(off):
        for y in range(h):
            for x in range(w):
                y2, x2 = y + dy, x + dx
                inside = 0 <= y2 < h and 0 <= x2 < w
                a = int(lab[y, x])
                b = int(lab[y2, x2]) if inside else IGNORE
                ok = a != IGNORE and b != IGNORE
                assert out["bg_pos"][k, y, x] == (ok and a == b == 0)
                assert out["fg_pos"][k, y, x] == (ok and a == b != 0)
                assert out["neg"][k, y, x] == (ok and a != b)
    # every valid pair gets exactly one label
    total = out["bg_pos"].int() + out["fg_pos"].int() + out["neg"].int()
    assert total.max() == 1


def test_batched_and_valid_pairs():
    lab = torch.randint(0, 3, (2, 6, 7))
    out = affinity_labels(lab, 3)
    assert out["neg"].shape == (2, len(pair_offsets(3)), 6, 7)
    single = affinity_labels(lab[1], 3)
    assert torch.equal(out["fg_pos"][1], single["fg_pos"])
    v = valid_pairs(6, 7, pair_offsets(3))
    labelled = single["bg_pos"] | single["fg_pos"] | single["neg"]
    assert torch.equal(labelled, v)  # no 255 in lab: labelled pairs = pairs inside the grid
    x = torch.arange(42.).view(6, 7)
    s = shifted(x, [(1, -1)], -1.0)[0]
    assert s[0, 1] == x[1, 0] and s[0, 0] == -1 and s[5, 3] == -1


def test_downsample_labels_picks_cell_centres():
    lab = np.arange(100).reshape(10, 10).astype(np.uint8)
    d = downsample_labels(lab, 4)
    assert d.shape == (3, 3)
    assert d[0, 0] == lab[2, 2] and d[1, 2] == lab[6, 9] and d[2, 2] == lab[9, 9]
    t = downsample_labels(torch.as_tensor(lab).unsqueeze(0), 4)
    assert np.array_equal(t[0].numpy(), d)

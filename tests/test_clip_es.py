"""The CLIP-ES method's parts on hand-made inputs (rca_core/models/clip_es.py), and the random / file weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rca_core.config import load_config
from rca_core.models.clip_es import (ClipCam, ClipWeightsError, affinity, boxes_mask, build_clip, caa_refine, gradcam,
                                     softmax_gradcams, text_embeddings)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _clip_cfg(**over):
    data = {"cam": {"source": "clip", "clip": {"weights": "random", **over}}}
    return load_config(ROOT / "configs/tiny.yaml", data).cam.clip


def test_gradcam_of_a_known_linear_head():
    """score = sum_c v_c * mean(A_c): the gradient is v_c / (h w) everywhere, so GradCAM = ReLU(sum_c v_c A_c),
    min-max normalised."""
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(5, 4, 6, generator=g).requires_grad_(True)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    (grad,) = torch.autograd.grad((v * acts.mean(dim=(1, 2))).sum(), acts)
    want = F.relu((v[:, None, None] * acts.detach()).sum(0))
    want = (want - want.min()) / (want.max() - want.min())
    assert torch.allclose(gradcam(acts.detach(), grad), want, atol=1e-5)


def test_caa_on_a_known_attention_map():
    """Two groups of tokens that attend only within their group: the affinity is block-diagonal, symmetric and
    doubly stochastic, and a CAM peak in group 1 spreads over group 1 only."""
    h, w = 4, 4
    n = h * w
    group = (torch.arange(n) % w) < 2  # left half of the grid vs right half
    attn = (group[:, None] == group[None, :]).float() * torch.rand(n, n, generator=torch.Generator().manual_seed(1))
    attn = attn + attn.T
    aff = affinity(attn, sinkhorn_iters=20)
    assert torch.allclose(aff, aff.T, atol=1e-6)
    assert torch.allclose(aff.sum(0), torch.ones(n), atol=1e-3) and torch.allclose(aff.sum(1), torch.ones(n), atol=1e-3)
    assert aff[group][:, ~group].abs().max() == 0
    cam = torch.zeros(h, w)
    cam[1, 0] = 1.0  # one token of the left group
    refined = caa_refine(cam, aff, box_threshold=0.4)
    assert refined.reshape(-1)[group].min() > 0        # spread over the whole left group ...
    assert refined.reshape(-1)[~group].abs().max() == 0  # ... and nowhere else


def test_caa_uses_only_the_class_boxes():
    """Columns outside the class's boxes are cut: a CAM value outside the boxes reaches no token."""
    cam = np.zeros((6, 6), np.float32)
    cam[0:2, 0:2] = 1.0
    cam[5, 5] = 0.3  # below 0.4 x max: outside every box
    m = boxes_mask(cam, 0.4)
    assert m[0:2, 0:2].all() and m.sum() == 4
    aff = torch.ones(36, 36) / 36
    refined = caa_refine(torch.from_numpy(cam), aff, 0.4)
    assert torch.allclose(refined, torch.full((6, 6), 4 / 36))  # only the 4 in-box values propagate
    assert boxes_mask(np.zeros((3, 3), np.float32), 0.4).all()  # no region: the whole map


def test_background_words_lower_a_background_score():
    """Patches that look like a background word: with that word among the scores the class's CAM drops there."""
    d = 8
    e = torch.eye(d)
    cls, other, sky = e[0], e[1], e[2]
    # grid rows: 0 the class, 1 the class on sky, 2 another class (the min-max's floor)
    tokens = torch.stack([cls] * 4 + [0.7 * cls + sky] * 4 + [other] * 4)
    y = torch.cat([torch.zeros(1, d), tokens])[None]

    def embed(t):
        return t[:, 1:].mean(dim=1)

    fg = torch.stack([cls, other])
    without = softmax_gradcams(y, embed, fg, torch.zeros(0, d), 10.0, (3, 4))[0]
    with_bg = softmax_gradcams(y, embed, fg, sky[None], 10.0, (3, 4))[0]
    assert torch.allclose(without[0], torch.ones(4), atol=1e-3) and torch.allclose(with_bg[0], torch.ones(4), atol=1e-3)
    assert without[1].min() > 0.4                        # without the word, the sky row counts as the class
    assert with_bg[1].max() < 0.1                        # with it, the sky row loses the class
    assert without[2].max() == 0 and with_bg[2].max() == 0


def test_random_weights_are_the_same_in_every_worker_and_cams_have_the_right_shape():
    c = _clip_cfg()
    a, b = build_clip(c), build_clip(c)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters())
    fg = text_embeddings(a, ["disc", "square", "triangle"], c.templates)
    bg = text_embeddings(a, c.background, c.templates)
    assert fg.shape == (3, 64) and torch.allclose(fg.norm(dim=1), torch.ones(3), atol=1e-5)
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)  # not multiples of 16
    cam = ClipCam(a, fg, bg, c)(img, [2, 0])
    assert cam.shape == (2, 37, 53) and cam.dtype == np.float32
    assert cam.min() >= 0
    assert ClipCam(a, fg, bg, c)(img, []).shape == (0, 37, 53)
    ms = ClipCam(a, fg, bg, _clip_cfg(scales=[1.0, 0.5], flip=True, caa=False))(img, [1])
    assert ms.shape == (1, 37, 53) and np.isclose(ms.max(), 1.0)


def test_weights_from_a_file_give_the_same_cams_and_bad_files_name_the_key(tmp_path):
    c = _clip_cfg()
    model = build_clip(c)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)  # OpenAI's layout: the architecture comes from the file
    loaded = build_clip(c.model_copy(update={"weights": str(path)}))
    img = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    fg = text_embeddings(model, ["disc", "square"], c.templates)
    fg2 = text_embeddings(loaded, ["disc", "square"], c.templates)
    assert torch.allclose(fg, fg2, atol=1e-5)
    np.testing.assert_allclose(ClipCam(model, fg, fg[:0], c)(img, [0, 1]), ClipCam(loaded, fg2, fg2[:0], c)(img, [0, 1]),
                               atol=1e-4)
    sd = {k: v for k, v in model.state_dict().items() if k != "visual.proj"}
    torch.save(sd, tmp_path / "other.pt")  # not OpenAI's layout: read as an open_clip checkpoint of cam.clip.model
    with pytest.raises(ClipWeightsError, match=r"cam.clip.weights: .*other.pt does not fit CLIP 'ViT-B-16'"):
        build_clip(c.model_copy(update={"weights": str(tmp_path / "other.pt")}))
    with pytest.raises(ClipWeightsError, match=r"cam.clip.weights: file not found: .*nothere.pt"):
        build_clip(c.model_copy(update={"weights": str(tmp_path / "nothere.pt")}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClipWeightsError, match=r"cam.clip.weights: .*junk.pt could not be read as CLIP weights"):
        build_clip(c.model_copy(update={"weights": str(tmp_path / "junk.pt")}))


def test_our_forward_is_open_clips_and_openai_torchscript_files_load(tmp_path):
    """The hand-written pass over open_clip's blocks (kept for the attention maps and the last block's input)
    gives open_clip's own image embedding (class token, at CLIP's 224 px); a TorchScript archive, the format of
    OpenAI's ViT-B-16.pt, loads through cam.clip.weights to the same network."""
    import warnings

    c = _clip_cfg()
    model = build_clip(c)
    fg = text_embeddings(model, ["disc"], c.templates)
    cam = ClipCam(model, fg, fg[:0], c)
    img = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    x, attns = cam.encode(img)
    last = model.visual.transformer.resblocks[-1]
    out, _, _ = ClipCam._attend(last, x)
    ours = model.visual.ln_post(out[:, 0]) @ model.visual.proj
    with torch.no_grad():
        theirs = model.encode_image(img)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert len(attns) == len(model.visual.transformer.resblocks) - 1 and attns[0].shape == (196, 196)
    assert attns[0].min() >= 0  # softmax weights (the class token's row and column dropped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(tmp_path / "ViT-tiny.pt"))
    loaded = build_clip(c.model_copy(update={"weights": str(tmp_path / "ViT-tiny.pt")}))
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k

"""Dense CRF wrapper vs a direct pydensecrf call, and the confident-label rule."""
import numpy as np
import pydensecrf.densecrf as dcrf
import pytest

from rca_core.config.refine import CrfConfig
from rca_core.crf import IGNORE, bg_cam_scores, combine_confident, confident_labels, crf_with_alpha, dense_crf


def _scene(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (40, 90, 160), np.uint8)
    obj = np.zeros((h, w), bool)
    obj[10:30, 12:34] = True
    img[obj] = (220, 60, 30)
    img = np.clip(img.astype(int) + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cam = np.exp(-(((yy - 20) / 9.0) ** 2 + ((xx - 23) / 10.0) ** 2))  # blob roughly on the object
    cam = (cam / cam.max()).astype(np.float32)
    return img, obj, cam


def _direct(img, scores, sxy_g, compat_g, sxy_b, srgb, compat_b, t):
    n, h, w = scores.shape
    d = dcrf.DenseCRF2D(w, h, n)
    unary = -np.log(np.clip(scores, 1e-5, None)).reshape(n, -1)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=sxy_g, compat=compat_g)
    d.addPairwiseBilateral(sxy=sxy_b, srgb=srgb, rgbim=np.ascontiguousarray(img), compat=compat_b)
    return np.asarray(d.inference(t), np.float32).reshape(n, h, w)


@pytest.mark.parametrize("cfg", [CrfConfig(), CrfConfig(iterations=3, gaussian_sxy=2, gaussian_compat=5,
                                                         bilateral_sxy=30, bilateral_srgb=7, bilateral_compat=4)])
def test_wrapper_equals_direct_pydensecrf(cfg):
    img, _, cam = _scene()
    cams = np.stack([cam, np.roll(cam, 7, axis=1) * 0.6])
    for alpha in (4, 32):
        scores = np.concatenate([(1 - cams.max(0, keepdims=True)) ** alpha, cams]).astype(np.float32)
        ref = _direct(img, scores, cfg.gaussian_sxy, cfg.gaussian_compat, cfg.bilateral_sxy,
                      cfg.bilateral_srgb, cfg.bilateral_compat, cfg.iterations)
        np.testing.assert_allclose(crf_with_alpha(img, cams, alpha, cfg), ref, rtol=0, atol=1e-6)
    # non-contiguous input (a transposed view) is handled
    ref = _direct(img, scores, cfg.gaussian_sxy, cfg.gaussian_compat, cfg.bilateral_sxy,
                  cfg.bilateral_srgb, cfg.bilateral_compat, cfg.iterations)
    view = np.ascontiguousarray(scores.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_allclose(dense_crf(img, view, cfg), ref, atol=1e-6)


def test_bg_scores_and_bad_input():
    cams = np.array([[[0.0, 0.5]], [[1.0, 0.25]]], np.float32)
    s = bg_cam_scores(cams, 2)
    np.testing.assert_allclose(s[0], [[0.0, 0.25]])
    np.testing.assert_allclose(s[1:], cams)
    with pytest.raises(ValueError, match="image"):
        dense_crf(np.zeros((4, 4), np.uint8), np.ones((2, 4, 4), np.float32), CrfConfig())
    with pytest.raises(ValueError, match="probs"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 5, 4), np.float32), CrfConfig())


def test_combine_rule():
    la = np.array([[3, 0, 0, 3, 5]], np.uint8)   # low alpha: confident fg
    ha = np.array([[3, 3, 0, 0, 3]], np.uint8)   # high alpha: confident bg
    np.testing.assert_array_equal(combine_confident(la, ha), [[3, IGNORE, 0, 0, 5]])


def test_confident_labels_on_a_scene():
    img, obj, cam = _scene()
    out = confident_labels(img, cam[None], [4], CrfConfig())
    lab = out["label"]
    assert set(np.unique(lab)) <= {0, 4, IGNORE}
    fg = lab == 4
    assert fg.any() and (lab == 0).any()
    # confident foreground lies on the object, confident background off it
    assert (fg & obj).sum() / fg.sum() > 0.95
    assert ((lab == 0) & ~obj).sum() / (lab == 0).sum() > 0.95
    # the CRF snaps to the colour edge: better than the thresholded CAM
    iou = lambda a, b: (a & b).sum() / (a | b).sum()
    assert iou(out["la"] == 4, obj) > iou(cam > 0.5, obj)
    # the high-alpha map has at least as much foreground as the low-alpha one
    assert (out["ha"] > 0).sum() >= (out["la"] > 0).sum()


def test_no_tags_gives_background():
    img, _, _ = _scene()
    out = confident_labels(img, np.zeros((0,) + img.shape[:2], np.float32), [], CrfConfig())
    assert (out["label"] == 0).all()

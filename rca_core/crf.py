"""Dense CRF on CAMs (pydensecrf, from the pydensecrf2 package) and the confident label map built from two CRFs.

Follows PSA (jiwoon-ahn/psa, infer_cls.py + tool/imutils.py) and RCA's gen_labels.py:
- scores = [bg ; CAMs] with bg = (1 - max_c CAM_c)^alpha, CAMs in [0, 1];
- unary = pydensecrf's `unary_from_softmax(scores)` = -log(clip(scores, 1e-5)). The scores are not
  renormalised: a per-pixel constant added to every label's unary does not change mean-field inference,
  so this equals the unary of the normalised distribution up to the clip (PSA does the same);
- Gaussian kernel (sxy 3, compat 3) + bilateral kernel (sxy 80, srgb 13, compat 10), 10 iterations.

Confident labels (PSA's rule, the one its AffinityNet data loader applies to the two CRF outputs):
- la = argmax of the CRF with the low alpha (fg_alpha = 4: large background score -> only confident
  foreground survives), ha = argmax of the CRF with the high alpha (bg_alpha = 32: small background
  score -> only confident background survives);
- label = la where la is foreground; 255 where la is background; then 0 wherever ha is background
  (this last step wins, so a pixel that even the background-averse CRF calls background is background).
So: confident foreground = la fg and ha fg (class from la); confident background = ha bg;
disagreement (la bg, ha fg) -> 255.
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from rca_core.config.refine import CrfConfig

IGNORE = 255


def bg_cam_scores(cams: np.ndarray, alpha: float) -> np.ndarray:
    """(K, H, W) CAMs in [0, 1] -> (K+1, H, W) float32 [(1 - max CAM)^alpha ; CAMs]."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    if cams.shape[0] == 0:
        return np.ones((1,) + cams.shape[1:], np.float32)
    cams = np.clip(cams, 0.0, 1.0)
    bg = np.power(1.0 - cams.max(0, keepdims=True), alpha)
    return np.concatenate([bg, cams], 0).astype(np.float32)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Mean-field dense CRF. image (H, W, 3) uint8 RGB, probs (L, H, W) scores -> (L, H, W) float32 marginals."""
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (L, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    n_labels, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs), dtype=np.float32))
    d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image), compat=cfg.bilateral_compat)
    q = d.inference(cfg.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_with_alpha(image: np.ndarray, cams: np.ndarray, alpha: float, cfg: CrfConfig) -> np.ndarray:
    """CRF marginals (K+1, H, W) of [bg ; CAMs] with background score (1 - max)^alpha."""
    return dense_crf(image, bg_cam_scores(cams, alpha), cfg)


def to_label_map(index_map: np.ndarray, classes: list[int] | np.ndarray) -> np.ndarray:
    """Channel index (0 = bg, k = k-th CAM) -> class id map (uint8)."""
    keys = np.concatenate([[0], np.asarray(classes, dtype=np.int64)])
    return keys[index_map].astype(np.uint8)


def combine_confident(la: np.ndarray, ha: np.ndarray) -> np.ndarray:
    """PSA's rule on two class-id maps: la (low alpha, fg-confident), ha (high alpha, bg-confident)."""
    label = la.astype(np.uint8).copy()
    label[la == 0] = IGNORE
    label[ha == 0] = 0
    return label


def confident_labels(image: np.ndarray, cams: np.ndarray, classes: list[int], cfg: CrfConfig) -> dict:
    """The confident label map of one image: {"label": (H, W) uint8 with 255, "la": ..., "ha": ...}."""
    cams = np.asarray(cams, dtype=np.float32)
    if len(classes) != cams.shape[0]:
        raise ValueError(f"{cams.shape[0]} CAM channels but {len(classes)} class ids")
    la = to_label_map(crf_with_alpha(image, cams, cfg.fg_alpha, cfg).argmax(0), classes)
    ha = to_label_map(crf_with_alpha(image, cams, cfg.bg_alpha, cfg).argmax(0), classes)
    return {"label": combine_confident(la, ha), "la": la, "ha": ha}

"""Optional saliency fusion: RCA's released gen_labels.py rule for pseudo-masks from CAMs + a saliency map.

For one image with CAMs of its tag classes and a saliency map `sal` (H, W) in 0..255:
1. each CAM is min-max normalised, then dense CRF (alpha = `crf_alpha`, 4) on [(1 - max)^alpha ; CAMs];
2. channel 0 = 1 - sal / 255, channel k = the CRF marginal of the k-th tag class;
3. sal_att = max(sal, 255 * [any CRF'd CAM > att_threshold (0.8)]);
4. label = argmax over channels; pixels where more than one channel exceeds `conflict_threshold` (0.9) -> 255;
5. pixels labelled background whose sal_att >= `bg_saliency_max` (32) -> 255;
6. an image whose foreground (not 0, not 255) is under `min_fg_fraction` (1 %) of its pixels -> all 255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rca_core.config.refine import CrfConfig, SaliencyConfig
from rca_core.crf import IGNORE, crf_with_alpha


def read_saliency(saliency_dir: str | Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """<saliency_dir>/<image_id>.png as (H, W) uint8 (grey; colour files are converted)."""
    from PIL import Image

    path = Path(saliency_dir) / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"saliency map not found: {path} (data.saliency_dir)")
    with Image.open(path) as im:
        sal = np.asarray(im.convert("L"))
    if sal.shape != tuple(size):
        raise ValueError(f"saliency map {path} has size {sal.shape}, image has {tuple(size)}")
    return sal


def fuse_saliency(image: np.ndarray, cams: np.ndarray, classes: list[int], sal: np.ndarray,
                  cfg: SaliencyConfig, crf_cfg: CrfConfig) -> np.ndarray:
    """gen_labels: (H, W) uint8 pseudo-mask with class ids and 255."""
    cams = np.asarray(cams, dtype=np.float32)
    sal = np.asarray(sal, dtype=np.float32)
    if sal.shape != cams.shape[1:]:
        raise ValueError(f"saliency map {sal.shape} and CAMs {cams.shape[1:]} differ in size")
    if cams.shape[0]:
        lo = cams.min(axis=(1, 2), keepdims=True)
        hi = cams.max(axis=(1, 2), keepdims=True)
        cams = (cams - lo) / (hi - lo + 1e-8)
        crf = crf_with_alpha(image, cams, cfg.crf_alpha, crf_cfg)[1:]
    else:
        crf = np.zeros((0,) + sal.shape, np.float32)
    scores = np.concatenate([(1.0 - sal / 255.0)[None], crf], 0)
    sal_att = sal.copy()
    if crf.shape[0]:
        sal_att = np.maximum(sal_att, (crf > cfg.att_threshold).any(0) * 255.0)
    conflict = (scores > cfg.conflict_threshold).sum(0) > 1
    keys = np.asarray([0] + list(classes), dtype=np.int64)
    label = keys[scores.argmax(0)].astype(np.uint8)
    label[conflict] = IGNORE
    label[(sal_att >= cfg.bg_saliency_max) & (label == 0)] = IGNORE
    fg = ((label > 0) & (label < IGNORE)).sum()
    if fg < cfg.min_fg_fraction * label.size:
        label[...] = IGNORE
    return label

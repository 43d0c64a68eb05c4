"""Saliency fusion (RCA gen_labels rule)."""
import numpy as np
import pytest
from PIL import Image

from rca_core.config.refine import CrfConfig, SaliencyConfig
from rca_core.crf import IGNORE
from rca_core.saliency import fuse_saliency, read_saliency


def _scene(h=32, w=40):
    img = np.full((h, w, 3), (30, 100, 160), np.uint8)
    obj = np.zeros((h, w), bool)
    obj[8:24, 10:30] = True
    img[obj] = (230, 50, 40)
    sal = np.where(obj, 255, 0).astype(np.uint8)
    cam = np.where(obj, 1.0, 0.0).astype(np.float32)
    return img, obj, sal, cam


def test_object_background_and_uncertain_halo():
    img, obj, sal, cam = _scene()
    sal[2:5, 2:5] = 100                                # salient but no CAM: background there is unsure
    lab = fuse_saliency(img, cam[None], [5], sal, SaliencyConfig(), CrfConfig())
    assert (lab[obj] == 5).mean() > 0.95
    assert (lab[2:5, 2:5] == IGNORE).all()
    far = ~obj
    far[2:5, 2:5] = False
    assert (lab[far] == 0).mean() > 0.95


def test_conflicts_and_small_foreground():
    img, obj, sal, cam = _scene()
    cams = np.stack([cam, cam])                        # two classes claim the same object
    lab = fuse_saliency(img, cams, [2, 3], sal, SaliencyConfig(conflict_threshold=0.3), CrfConfig())
    assert (lab[obj] == IGNORE).mean() > 0.9
    tiny = np.zeros_like(cam)
    tiny[0, 0] = 1.0
    sal_tiny = np.zeros_like(sal)
    sal_tiny[0, 0] = 255
    lab = fuse_saliency(img, tiny[None], [1], sal_tiny, SaliencyConfig(), CrfConfig())
    assert (lab == IGNORE).all()                       # under 1 % foreground: whole image ignored


def test_read_saliency(tmp_path):
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "a.png")
    assert read_saliency(tmp_path, "a", (4, 5))[0, 0] == 77
    with pytest.raises(FileNotFoundError, match="b.png"):
        read_saliency(tmp_path, "b", (4, 5))
    with pytest.raises(ValueError, match="size"):
        read_saliency(tmp_path, "a", (5, 5))

"""The shipped VOC / COCO configs carry the recipe docs/method.md describes (a wrong key or a lost switch
fails here, not after hours on a GPU)."""
from pathlib import Path

import pytest

from rca_core.config import config_from_dict
from rca_core.config.base import read_yaml

ROOT = Path(__file__).resolve().parents[1]


def cfg(name: str):
    return config_from_dict(read_yaml(ROOT / "configs" / f"{name}.yaml"), name)  # no path checks: no data here


@pytest.mark.parametrize("name", ["voc12", "voc12_saliency", "coco14"])
def test_reference_recipe(name):
    c = cfg(name)
    # CAM net: IRN's ResNet-50 (OS16, fixed BatchNorm statistics, conv1 + stages 1-2 frozen, momentum as run)
    b = c.cam.backbone
    assert (b.name, b.output_stride, b.batchnorm, b.frozen_stages) == ("resnet50", 16, "frozen_stats", 2)
    t = c.cam.train
    assert (t.batch_size, t.epochs, t.crop_size, t.lr, t.lr_mult_new, t.momentum) == (16, 5, 512, 0.1, 10.0, 1e-4)
    assert t.lr_mult_rca == 1.0  # RCA's modules at the base lr (10x diverged)
    # AffinityNet: IRN's frozen backbone, stride-4 grid, only the head trains at lr 0.1
    a = c.refine.affinity
    assert (a.backbone.batchnorm, a.backbone.frozen_stages, a.feature_stride) == ("frozen", 4, 4)
    assert (a.batch_size, a.epochs, a.crop_size, a.lr, a.lr_mult_new) == (32, 3, 512, 0.1, 1.0)
    # DeepLab-v2 ResNet-101 with frozen BatchNorm; multi-scale + flip + CRF evaluation
    s = c.segmenter
    assert (s.arch, s.backbone, s.freeze_bn, s.batch_size, s.crop_size) == ("deeplabv2", "resnet101", True, 10, 321)
    assert len(s.eval_scales) > 1 and s.eval_flip and s.eval_crf
    # every pretrained weight is a local file, none downloaded
    assert all(p and p.startswith("weights/") for p in (b.pretrained, a.backbone.pretrained, s.pretrained))


def test_tracks():
    assert not cfg("voc12").refine.saliency.enabled and cfg("voc12").data.saliency_dir is None
    sal = cfg("voc12_saliency")
    assert sal.refine.saliency.enabled and sal.data.saliency_dir
    assert sal.store != cfg("voc12").store
    assert cfg("coco14").data.num_classes == 81


def test_demo_keeps_trained_batchnorm():
    # from-scratch small backbone: frozen init statistics measured worse (docs/benchmarks.md)
    c = cfg("demo")
    assert c.cam.backbone.batchnorm == "train" and c.cam.backbone.frozen_stages == 0


def test_clip_recipe_is_clip_es_with_voc12s_refinement_and_segmenter():
    c, v = cfg("voc12_clip"), cfg("voc12")
    k = c.cam.clip
    assert c.cam.source == "clip" and k.weights == "weights/clip-vit-b-16.pt" and k.model == "ViT-B-16"
    assert k.templates == ["a clean origami {}."] and len(k.background) == 25 and "sky" in k.background
    assert (k.scales, k.flip, k.caa, k.caa_layers, k.caa_box_threshold) == ([1.0], False, True, 8, 0.4)
    assert k.prompt_names["person"] == "person with clothes,people,human"
    assert set(k.prompt_names) <= set(c.data.class_names)
    # the same data, refinement and segmenter as voc12: only the CAM source differs
    assert c.data == v.data and c.refine == v.refine and c.segmenter == v.segmenter

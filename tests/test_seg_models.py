"""Segmenter models: output shapes of DeepLab-v2, DeepLab-v3 and the small model, parameter groups,
local backbone weights (round trip and clear errors), metadata round trip, config checks."""
import pytest
import torch
import torchvision
from pydantic import ValidationError

from rca_core.config.segmenter import SegmenterConfig
from rca_core.models.backbones import PretrainedWeightsError
from rca_core.models.deeplab import DeepLabV2, DeepLabV3, SmallDeepLab, build_from_meta, build_segmenter, model_meta


@pytest.mark.parametrize("arch,backbone,cls", [("small", "small", SmallDeepLab), ("deeplabv2", "resnet101", DeepLabV2),
                                               ("deeplabv3", "resnet101", DeepLabV3)])
def test_logits_have_input_size_and_num_classes(arch, backbone, cls):
    torch.manual_seed(0)
    net = build_segmenter(SegmenterConfig(arch=arch, backbone=backbone, width=8), num_classes=5).eval()
    assert isinstance(net, cls)
    with torch.no_grad():
        y = net(torch.randn(2, 3, 50, 37))  # odd sizes: upsampled back exactly
    assert y.shape == (2, 5, 50, 37) and torch.isfinite(y).all()
    # backbone and head parameters partition the model's parameters
    b = {id(p) for p in net.backbone_parameters()}
    h = {id(p) for p in net.head_parameters()}
    assert b and h and not (b & h) and b | h == {id(p) for p in net.parameters()}


def test_deeplabv2_aspp_is_four_summed_branches():
    net = DeepLabV2(num_classes=3, depth=101)
    assert [c.dilation[0] for c in net.aspp.branches] == [6, 12, 18, 24]
    assert all(c.in_channels == 2048 and c.out_channels == 3 for c in net.aspp.branches)
    x = torch.randn(1, 2048, 5, 5)
    assert torch.allclose(net.aspp(x), sum(c(x) for c in net.aspp.branches))
    assert net.backbone.output_stride == 8


def test_deeplabv3_local_backbone_weights_roundtrip_and_errors(tmp_path):
    trunk = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(trunk.state_dict(), path)  # includes fc.*, which is ignored
    net = DeepLabV3(num_classes=4, depth=50, pretrained=str(path))
    assert torch.equal(net.backbone.conv1.weight, trunk.conv1.weight)
    assert torch.equal(net.backbone.layer4[2].conv3.weight, trunk.layer4[2].conv3.weight)

    with pytest.raises(PretrainedWeightsError, match="not found.*missing.pth"):
        DeepLabV3(num_classes=4, depth=50, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsError, match="resnet50.pth.*do not fit"):
        DeepLabV3(num_classes=4, depth=101, pretrained=str(path))  # a ResNet-50 file for a ResNet-101
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        DeepLabV3(num_classes=4, depth=50, pretrained=str(bad))


def test_build_from_meta_rebuilds_the_same_network():
    cfg = SegmenterConfig(arch="small", backbone="small", width=8, aspp_rates=[1, 3])
    torch.manual_seed(0)
    a = build_segmenter(cfg, 3).eval()
    meta = model_meta(cfg, 3, ["bg", "a", "b"])
    b = build_from_meta(meta)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b.eval()(x))
    assert meta["class_names"] == ["bg", "a", "b"] and len(meta["mean"]) == 3
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        model_meta(cfg, 3, ["bg", "a"])


def test_config_rejects_arch_backbone_mismatch():
    with pytest.raises(ValidationError, match="arch small needs backbone small"):
        SegmenterConfig(arch="small", backbone="resnet101")
    with pytest.raises(ValidationError, match="scale_range"):
        SegmenterConfig(scale_range=(1.5, 0.5))

"""Backbones: shapes and strides, stage features, local pretrained weights and their errors."""
import pytest
import torch

from rca_core.config.cam import BackboneConfig
from rca_core.models.backbones import PretrainedWeightsError, build_backbone, count_parameters


@pytest.mark.parametrize("os_", [8, 16])
def test_small_backbone_shapes(os_):
    net = build_backbone(BackboneConfig(name="small", output_stride=os_, width=32)).eval()
    assert 1.0e6 < count_parameters(net) < 1.4e6
    feats = net.forward_features(torch.zeros(2, 3, 96, 96))
    assert [f.shape[1] for f in feats] == net.stage_channels == [32, 64, 128, 256]
    assert [96 // f.shape[-1] for f in feats] == net.stage_strides
    assert net(torch.zeros(1, 3, 96, 96)).shape == (1, 256, 96 // os_, 96 // os_)
    assert net.out_channels == 256 and net.output_stride == os_


def test_resnet50_output_stride_16():
    net = build_backbone(BackboneConfig(name="resnet50", output_stride=16)).eval()
    with torch.no_grad():
        y = net(torch.zeros(1, 3, 64, 64))
    assert y.shape == (1, 2048, 4, 4) and net.out_channels == 2048


def test_pretrained_roundtrip_and_errors(tmp_path):
    cfg = BackboneConfig(name="small", width=8)
    a = build_backbone(cfg)
    path = tmp_path / "w.pt"
    sd = dict(a.state_dict())
    sd["fc.weight"] = torch.zeros(10, 64)  # a classifier head in the file is ignored
    torch.save({"state_dict": sd}, path)
    b = build_backbone(BackboneConfig(name="small", width=8, pretrained=str(path)))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    with pytest.raises(PretrainedWeightsError, match="not found.*missing.pt"):
        build_backbone(BackboneConfig(name="small", width=8, pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(PretrainedWeightsError, match=r"w\.pt do not fit.*shape mismatches"):
        build_backbone(BackboneConfig(name="small", width=16, pretrained=str(path)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="bad.pt could not be read"):
        build_backbone(BackboneConfig(name="small", width=8, pretrained=str(bad)))

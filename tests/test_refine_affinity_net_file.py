"""load_affinity_net: a missing, cut-short or mismatched weights file is named in the error."""
import pytest
import torch

from rca_core.config.cam import BackboneConfig
from rca_core.config.refine import AffinityConfig
from rca_core.models.affinity_net import AffinityNet, load_affinity_net


def _cfg(width: int = 8) -> AffinityConfig:
    return AffinityConfig(backbone=BackboneConfig(name="small", output_stride=8, width=width))


def test_roundtrip(tmp_path):
    net = AffinityNet(_cfg())
    path = tmp_path / "affinity.pt"
    torch.save({"model": net.state_dict()}, path)
    loaded = load_affinity_net(_cfg(), str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["missing", "truncated", "other_architecture"])
def test_bad_file_is_named(tmp_path, kind):
    path = tmp_path / "affinity.pt"
    if kind == "truncated":
        torch.save({"model": AffinityNet(_cfg()).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "other_architecture":
        torch.save({"model": AffinityNet(_cfg(width=16)).state_dict()}, path)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        load_affinity_net(_cfg(), str(path))
    assert str(path) in str(e.value)

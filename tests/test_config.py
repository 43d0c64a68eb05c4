"""Config loading: strict keys, types and paths fail at load time naming the file and key."""
from pathlib import Path

import pytest

from rca_core.config import ConfigError, load_config, parse_overrides
from rca_core.stages.planning import plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.kind == "demo"
    assert len(cfg.fingerprint()) == 16


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_named(tmp_path):
    p = write(tmp_path, "cam:\n  train:\n    epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "cam.train.epochz" in str(e.value) and str(p) in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_named(tmp_path):
    p = write(tmp_path, "cam:\n  train:\n    batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "cam.train.batch_size" in str(e.value) and "'many'" in str(e.value)


def test_missing_paths_named(tmp_path):
    p = write(tmp_path, "data:\n  kind: voc\n  root: /nonexistent/VOC\n  num_classes: 21\n"
                        "cam:\n  backbone:\n    pretrained: /nonexistent/w.pth\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "data.root" in msg and "/nonexistent/VOC" in msg and "cam.backbone.pretrained" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "cam: [\n"))


def test_overrides():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", parse_overrides(["cam.train.epochs=5", "seed=3"]))
    assert cfg.cam.train.epochs == 5 and cfg.seed == 3
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_fingerprints_change_only_downstream():
    base = load_config(ROOT / "configs" / "tiny.yaml")
    changed = load_config(ROOT / "configs" / "tiny.yaml", {"refine": {"crf": {"iterations": 7}}})
    a, b = plan(base), plan(changed)
    same = [n for n in a if a[n].fingerprint == b[n].fingerprint]
    assert same == ["cam_train", "memory_build", "cam_infer", "cam_eval"]
    # compute/ray settings do not change any stage key
    moved = load_config(ROOT / "configs" / "tiny.yaml", {"ray": {"num_workers": 1}, "compute": {"threads": 2}})
    assert all(plan(moved)[n].fingerprint == a[n].fingerprint for n in a)


def test_fingerprints_survive_a_json_round_trip():
    """Ray workers rebuild the config from JSON: every stage key must come out the same."""
    from rca_core.config import RunConfig

    for name in ("tiny", "demo"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        again = RunConfig.model_validate_json(cfg.model_dump_json())
        assert {n: p.fingerprint for n, p in plan(cfg).items()} == {n: p.fingerprint for n, p in plan(again).items()}

"""The training recipe on 1 vs 2 workers (torch.distributed gloo, 2 CPU processes) and its frozen parts.

Every training stage (cam_train, affinity_train, seg_train) runs on the tiny demo once without
torch.distributed and once on 2 ranks, from the same seed and the same local "ImageNet" weights file
(a small backbone whose BatchNorm statistics are not the init values, so frozen statistics are visible):
- same global batch, each rank half of it, same number of optimizer steps, same lr at every epoch;
- the same weights at the end (the two runs see the same images at every step, DDP averages
  gradients of global-batch means, trainable BatchNorm is synchronised over the ranks);
- what is frozen does not move: BatchNorm statistics under batchnorm frozen / frozen_stats /
  segmenter.freeze_bn, and every parameter of a frozen stage.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def overrides(tmp, tag):
        with open(tmp + "/overrides_" + tag + ".json") as f:
            return json.load(f)

    def train_all(tmp, tag, rank):
        os.environ["RCA_NO_PROGRESS"] = "1"
        torch.set_num_threads(1)
        from rca_core.config import load_config
        from rca_core.stages.context import make_context
        from rca_core.stages import affinity_train, cam_train, seg_train
        from rca_core.store import ArtifactStore
        cfg = load_config({tiny!r}, overrides(tmp, tag))
        store = ArtifactStore(cfg.store)
        out = {{}}
        for name, mod in [("cam_train", cam_train), ("affinity_train", affinity_train), ("seg_train", seg_train)]:
            ctx = make_context(name, cfg, store)
            if rank == 0:
                ctx.out.prepare(())
            if dist.is_initialized():
                dist.barrier()
            s = mod.train(cfg, ctx)
            out[name] = {{k: s.get(k) for k in ("steps", "max_steps", "total_steps", "global_batch",
                                               "per_rank_batch", "steps_per_epoch")}}
            out[name]["lrs"] = s["epoch_lrs"] if name == "seg_train" else [h["lr"] for h in s["history"]]
            out[name]["model"] = ctx.out.file("segmenter.pt" if name == "seg_train" else "model.pt").uri
        with open(f"{{tmp}}/{{tag}}_rank{{rank}}.json", "w") as f:
            json.dump(out, f)

    def ddp(rank, world, tmp, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        train_all(tmp, "w2", rank)
        dist.destroy_process_group()

    if __name__ == "__main__":
        tmp, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        if world == 1:
            train_all(tmp, "w1", 0)
        else:
            mp.spawn(ddp, args=(world, tmp, port), nprocs=world)
''')


def overrides(tmp: Path, tag: str) -> dict:
    w = str(tmp / "small_w8.pt")
    return {"store": str(tmp / f"store_{tag}"), "data": {"root": str(tmp / "data")}, "compute": {"device": "cpu"},
            "cam": {"backbone": {"pretrained": w, "batchnorm": "train", "frozen_stages": 1},
                    "train": {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.02, "lr_mult_new": 1.0}},
            "refine": {"affinity": {"backbone": {"pretrained": w, "batchnorm": "frozen_stats", "frozen_stages": 2},
                                    "epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.02}},
            "segmenter": {"labels": "gt", "width": 8, "pretrained": w, "freeze_bn": True, "epochs": 2,
                          "batch_size": 8, "optimizer": "sgd", "lr": 0.02, "lr_mult_head": 1.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_weights(path: Path) -> dict:
    """A small width-8 backbone's state dict with BatchNorm statistics and affine values unlike the init ones."""
    from rca_core.config.cam import BackboneConfig
    from rca_core.models.backbones import build_backbone

    torch.manual_seed(123)
    sd = build_backbone(BackboneConfig(name="small", width=8)).state_dict()
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var") or (k.endswith(".weight") and v.dim() == 1):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    torch.save(sd, path)
    return sd


def write_crf_labels(tmp: Path, tag: str) -> None:
    """The affinity stage's input (crf_labels) in this run's store: the ground-truth masks, a 255 band at
    each object boundary (like confident-region labels)."""
    from scipy import ndimage

    from rca_core.config import load_config
    from rca_core.stages.context import make_context
    from rca_core.store import ArtifactStore

    sys.path.insert(0, str(ROOT))
    (tmp / f"overrides_{tag}.json").write_text(json.dumps(overrides(tmp, tag)))
    cfg = load_config(TINY, overrides(tmp, tag))
    ctx = make_context("crf_labels", cfg, ArtifactStore(cfg.store))
    ctx.out.prepare(["crf_label"])
    for i in ctx.ids:
        m = ctx.dataset.mask(i).copy()
        edge = ndimage.morphological_gradient(m, size=3) > 0
        m[edge] = 255
        ctx.out.write(i, {"crf_label": m})
    ctx.out.mark_complete({"note": "ground-truth masks written by the test"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    from rca_core.config import load_config
    from rca_core.data import make_dataset

    make_dataset(load_config(TINY, {"data": {"root": str(tmp / "data")}}).data, "train", progress=False)
    weights = small_weights(tmp / "small_w8.pt")
    script = tmp / "workers.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tiny=str(TINY)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for world in (1, 2):
        tag = f"w{world}"
        write_crf_labels(tmp, tag)
        r = subprocess.run([sys.executable, str(script), str(tmp), str(world), str(free_port())],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-4000:]
        out[tag] = [json.loads((tmp / f"{tag}_rank{k}.json").read_text()) for k in range(world)]
    return out, weights


def _state(uri: str) -> dict:
    obj = torch.load(uri.removeprefix("file://"), map_location="cpu", weights_only=True)
    return obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj


STAGES = ["cam_train", "affinity_train", "seg_train"]


@pytest.mark.parametrize("stage", STAGES)
def test_same_batches_steps_and_learning_rates(runs, stage):
    (w1,), (r0, r1) = runs[0]["w1"], runs[0]["w2"]
    a, b, c = w1[stage], r0[stage], r1[stage]
    assert a["global_batch"] == b["global_batch"] == c["global_batch"] == 8
    assert a["per_rank_batch"] == 8 and b["per_rank_batch"] == c["per_rank_batch"] == 4
    assert a["steps_per_epoch"] == b["steps_per_epoch"] == 3  # 24 images / global batch 8, on any worker count
    assert a["steps"] == b["steps"] == c["steps"] == 6
    assert a["lrs"] == b["lrs"] == c["lrs"] and len(a["lrs"]) == 2 and a["lrs"][0] > a["lrs"][1] > 0


@pytest.mark.parametrize("stage", STAGES)
def test_one_and_two_workers_train_the_same_weights(runs, stage):
    """Same images per step and global-batch gradients: the weights agree up to float rounding. The bound is
    relative to how far training moved them (reduction order differs between 1 and 2 ranks)."""
    a = _state(runs[0]["w1"][0][stage]["model"])
    b = _state(runs[0]["w2"][0][stage]["model"])
    assert a.keys() == b.keys()
    worst = 0.0
    moved = 0.0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        worst = max(worst, float((a[k] - b[k]).abs().max()))
        moved = max(moved, float(a[k].abs().max()))
    print(stage, "max |w1 - w2|", worst, "max |w|", moved)
    assert worst <= 1e-5 * max(moved, 1.0), (stage, worst, moved)


def _bn_prefixes(sd: dict, prefix: str) -> list[str]:
    return sorted({k[: -len("running_mean")] for k in sd if k.startswith(prefix) and k.endswith("running_mean")})


def test_frozen_parts_do_not_move(runs):
    out, w = runs
    for tag in ("w1", "w2"):
        cam = _state(out[tag][0]["cam_train"]["model"])
        aff = _state(out[tag][0]["affinity_train"]["model"])
        seg = _state(out[tag][0]["seg_train"]["model"])
        # CAM net: frozen_stages 1 -> stem + layer1 exactly as loaded (BatchNorm statistics too); later stages train
        for k, v in w.items():
            if k.startswith(("stem.", "layer1.")) and not k.endswith("num_batches_tracked"):  # FrozenBatchNorm2d has none
                assert torch.equal(cam["backbone." + k], v), (tag, k)
        assert not torch.equal(cam["backbone.layer4.bn1.running_mean"], w["layer4.bn1.running_mean"])  # batchnorm train
        assert not torch.equal(cam["backbone.layer4.conv1.weight"], w["layer4.conv1.weight"])
        # AffinityNet: batchnorm frozen_stats -> every running statistic as loaded; affine trains after stage 2
        for p in _bn_prefixes(w, ""):
            for s in ("running_mean", "running_var"):
                assert torch.equal(aff["backbone." + p + s], w[p + s]), (tag, p)
        assert not torch.equal(aff["backbone.layer3.bn1.weight"], w["layer3.bn1.weight"])
        for k, v in w.items():
            if k.startswith(("stem.", "layer1.", "layer2.")) and not k.endswith("num_batches_tracked"):
                assert torch.equal(aff["backbone." + k], v), (tag, k)
        # segmenter.freeze_bn -> FrozenBatchNorm2d in the backbone: statistics and affine as loaded
        for p in _bn_prefixes(w, ""):
            for s in ("running_mean", "running_var", "weight", "bias"):
                assert torch.equal(seg["backbone." + p + s], w[p + s]), (tag, p, s)
        assert not torch.equal(seg["backbone.layer4.conv1.weight"], w["layer4.conv1.weight"])


def test_global_batch_sampler_is_the_same_batches_for_any_world_size():
    from rca_core.train_utils import GlobalBatchSampler, rank_shares

    one = GlobalBatchSampler(23, 6, seed=3, rank_=0, world=1)
    for world in (2, 3, 4):
        parts = [GlobalBatchSampler(23, 6, seed=3, rank_=r, world=world) for r in range(world)]
        for e in (0, 5):
            one.set_epoch(e)
            for p in parts:
                p.set_epoch(e)
            joined = [sum(bs, []) for bs in zip(*[list(p) for p in parts])]
            assert joined == list(one) and len(joined) == len(one) == 23 // 6
        assert [p.per_rank for p in parts] == rank_shares(6, world)
    assert rank_shares(10, 4) == [3, 3, 2, 2] and rank_shares(16, 4) == [4, 4, 4, 4]
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # a new order every epoch
    one.set_epoch(0)
    assert list(one) == first  # and the same one again (resume)


def test_split_batch_names_the_key():
    from rca_core import train_utils as tu

    assert tu.split_batch(16, 100, "cam.train.batch_size") == (16, 16)
    assert tu.split_batch(16, 5, "cam.train.batch_size") == (5, 5)  # fewer images than the batch: all of them
    with pytest.raises(ValueError, match="segmenter.batch_size"):
        tu.split_batch(4, 0, "segmenter.batch_size")


def test_global_mean_without_distributed_is_the_plain_mean():
    from rca_core.train_utils import global_mean

    x = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    m = global_mean(x.sum(), 3)
    m.backward()
    assert float(m) == pytest.approx(3.0) and torch.allclose(x.grad, torch.full((3,), 1 / 3))
    assert float(global_mean(torch.tensor(0.0), torch.tensor(0))) == 0.0  # no terms: zero, not nan
    np.testing.assert_allclose(float(global_mean(torch.tensor(5.0), torch.tensor(2))), 2.5)

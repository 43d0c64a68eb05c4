"""train_utils: rng round trip through a weights_only checkpoint, atomic save, poly lr, mAP."""
import random

import numpy as np
import torch

from rca_core import train_utils as tu


def test_checkpoint_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    tu.seed_everything(3)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ck" / "checkpoint.pt"
    tu.save_checkpoint(path, model, opt, epoch=2, step=17, extra={"history": [{"loss": 0.5}]})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    # scramble everything, then restore
    tu.seed_everything(99)
    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    info = tu.load_checkpoint(path, model2, opt2)
    assert info["epoch"] == 2 and info["step"] == 17 and info["extra"]["history"][0]["loss"] == 0.5
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert tu.load_checkpoint(tmp_path / "none.pt", model2) is None


def test_poly_lr_keeps_group_ratio():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 1.0}])
    tu.set_poly_lr(opt, 0, 10)
    assert opt.param_groups[0]["lr"] == 0.1
    tu.set_poly_lr(opt, 5, 10)
    assert abs(opt.param_groups[0]["lr"] - 0.1 * 0.5 ** 0.9) < 1e-12
    assert abs(opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] - 10) < 1e-9
    assert tu.poly_lr(1.0, 10, 10) == 0.0


def test_multilabel_map_perfect_and_skips_empty_classes():
    t = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert tu.multilabel_map(t.astype(float), t) == 1.0
    s = np.array([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.5, 0.5, 0.0]])
    m = tu.multilabel_map(s, t)
    assert 0 < m < 1


def test_not_distributed_defaults():
    assert not tu.is_dist() and tu.rank() == 0 and tu.world_size() == 1 and tu.is_main()
    m = torch.nn.Linear(2, 2)
    assert tu.wrap_ddp(m, torch.device("cpu")) is m and tu.unwrap(m) is m
    assert tu.make_sampler(list(range(4))) is None
    assert tu.all_reduce_mean(2.5) == 2.5

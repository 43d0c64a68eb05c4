"""rca_core.training_loop on a toy stage (a small regression net with dropout, so the global RNG matters):
stop + resume equals an uninterrupted fit, max_seconds is a budget over all calls, checkpoints written by the
stages' earlier loops (their own extra keys) resume, and a checkpoint for another schedule is refused."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from rca_core import train_utils as tu
from rca_core import training_loop as tl


class Points(Dataset):
    def __init__(self, n=20):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Toy(tl.TrainingStage):
    name = "toy_train"
    loss_keys = ("loss", "loss_odd")

    def __init__(self, epochs=3.0, max_seconds=None):
        self.epochs, self.max_seconds, self.outputs = epochs, max_seconds, []

    def setup(self):
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        opt = tl.make_optimizer("sgd", [{"params": self.model.parameters(), "lr": 0.05}], lr=0.05, weight_decay=0.0)
        return tl.Setup(self.model, opt, Points(), batch_size=6, batch_key="toy.batch_size", epochs=self.epochs,
                        sampler_seed=1, max_seconds=self.max_seconds, round_steps=math.ceil)

    def loss(self, model, batch, at):
        x, y = batch
        loss = F.mse_loss(model(x)[:, 0], y)
        return {"loss": loss, "loss_odd": loss.detach() if at.step % 2 else None}

    def epoch_metrics(self):
        return {"weight_norm": float(self.model[0].weight.norm())}

    def write_outputs(self, run):
        self.outputs.append({k: v.clone() for k, v in self.model.state_dict().items()})


class Out:
    def __init__(self):
        self.tables = {}

    def write_table(self, name, rows):
        self.tables[name] = rows


class Ctx:
    def __init__(self, path):
        self.out, self.device, self.progress, self.extra = Out(), torch.device("cpu"), None, {}
        self.path = path

    def checkpointer(self):
        return tu.FileCheckpointer(self.path)

    def fast(self):
        from rca_core.device import FastPath

        return FastPath(self.device)


def _no_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_stop_and_resume_equals_an_uninterrupted_fit(tmp_path):
    straight, ctx_a = Toy(), Ctx(tmp_path / "a.pt")
    full = tl.fit(straight, ctx_a, seed=3)
    assert full["finished"] and full["steps"] == full["max_steps"] == 9 and full["epochs_done"] == 3
    assert [r["epoch"] for r in ctx_a.out.tables["history"]] == [1, 2, 3]
    row = full["history"][0]
    assert row["steps"] == 3 and row["global_step"] == 3 and row["lr"] > 0 and row["loss_odd"] is not None

    ctx_b = Ctx(tmp_path / "b.pt")
    first = tl.fit(Toy(), ctx_b, seed=3, stop_after_epochs=1)
    assert not first["finished"] and first["epochs_done"] == 1 and "history" not in ctx_b.out.tables
    torch.manual_seed(999)  # a fresh process would not share our RNG state
    resumed_stage = Toy()
    resumed = tl.fit(resumed_stage, ctx_b, seed=3)
    assert resumed["finished"] and resumed["resumed_from_epoch"] == 1 and resumed["steps"] == 9
    assert _no_seconds(resumed["history"]) == _no_seconds(full["history"])
    for k, v in straight.outputs[0].items():
        assert torch.equal(v, resumed_stage.outputs[0][k]), k
    # a finished training called again trains no further
    again = tl.fit(Toy(), ctx_b, seed=3)
    assert again["steps"] == 9 and again["epochs_done"] == 3


def test_fractional_epochs_round_as_the_stage_says(tmp_path):
    s = tl.fit(Toy(epochs=1.5), Ctx(tmp_path / "c.pt"), seed=0)  # 3 steps per epoch: ceil(4.5) = 5
    assert s["steps"] == 5 and [r["steps"] for r in s["history"]] == [3, 2]


@pytest.mark.parametrize("extra", [
    {"elapsed": 5000.0, "finished": False, "stopped_by_time": False},  # cam_train's earlier loop
    {"seconds": 5000.0, "stopped_early": False},                        # affinity_train's earlier loop
    {"elapsed": 5000.0, "finished": False, "stopped_early": False},     # the shared loop
])
def test_max_seconds_is_a_budget_over_all_calls(tmp_path, extra):
    ctx = Ctx(tmp_path / "d.pt")
    tl.fit(Toy(max_seconds=1000.0), ctx, seed=0, stop_after_epochs=1)
    ck = torch.load(ctx.path, weights_only=True)
    assert ck["extra"]["elapsed"] < 1000.0
    hist = ck["extra"]["history"]
    ck["extra"] = {"history": hist, **extra}  # recorded time of earlier calls is over the budget
    torch.save(ck, ctx.path)
    stage = Toy(max_seconds=1000.0)
    s = tl.fit(stage, ctx, seed=0)
    assert s["stopped_early"] and s["finished"] and s["steps"] == 3 and s["train_seconds"] >= 5000.0
    assert len(stage.outputs) == 1 and len(ctx.out.tables["history"]) == 1


def test_an_earlier_stop_by_time_stays_final(tmp_path):
    ctx = Ctx(tmp_path / "e.pt")
    tl.fit(Toy(), ctx, seed=0, stop_after_epochs=1)
    ck = torch.load(ctx.path, weights_only=True)
    ck["extra"] = {"history": ck["extra"]["history"], "elapsed": 1.0, "finished": True, "stopped_by_time": True}
    torch.save(ck, ctx.path)
    s = tl.fit(Toy(), ctx, seed=0)
    assert s["steps"] == 3 and s["stopped_early"] and s["finished"]


def test_a_checkpoint_of_another_schedule_is_refused(tmp_path):
    ctx = Ctx(tmp_path / "f.pt")
    tl.fit(Toy(epochs=3), ctx, seed=0, stop_after_epochs=1)
    with pytest.raises(RuntimeError, match="written for 9 steps but this run has 12"):
        tl.fit(Toy(epochs=4), ctx, seed=0)


def test_a_non_finite_loss_names_the_stage_and_step(tmp_path):
    class Bad(Toy):
        nonfinite_hint = "lower toy.lr"

        def loss(self, model, batch, at):
            out = super().loss(model, batch, at)
            return {**out, "loss": out["loss"] * float("nan") if at.step == 4 else out["loss"]}

    with pytest.raises(FloatingPointError, match=r"toy_train: loss at step 4 \(epoch 2\).*lower toy.lr"):
        tl.fit(Bad(), Ctx(tmp_path / "g.pt"), seed=0)

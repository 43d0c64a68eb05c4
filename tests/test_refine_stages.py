"""crf_labels -> affinity_train -> random_walk on the tiny demo, with CAMs made from the masks (blurred, shifted)."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from rca_core.config import load_config
from rca_core.crf import IGNORE
from rca_core.stages.context import make_context
from rca_core.stages.planning import plan
from rca_core.stages.local import run_stage
from rca_core.stages import affinity_train
from rca_core.store import ArtifactStore

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _cams(mask, tags, k):
    out = []
    for c in tags:
        m = np.roll((mask == c).astype(np.float32), (k % 3 - 1, k % 5 - 2), (0, 1))
        m = ndimage.gaussian_filter(m, 3.0)
        out.append(m / max(m.max(), 1e-6))
    return np.stack(out).astype(np.float16) if out else np.zeros((0,) + mask.shape, np.float16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"store": str(tmp / "store"), "data": {"root": str(tmp / "data")},
                                                       "refine": {"affinity": {"epochs": 2}}})
    store = ArtifactStore(cfg.store)
    p = plan(cfg)
    ctx = make_context("cam_infer", cfg, store, p)
    ctx.out.prepare(["cam"])
    for k, i in enumerate(ctx.ids):
        tags = sorted(ctx.dataset.tags(i))
        ctx.out.write(i, {"cam": _cams(ctx.dataset.mask(i), tags, k)}, attrs={"classes": tags})
    ctx.out.mark_complete({"note": "CAMs made from the masks by the test"})
    torch.set_num_threads(1)
    return cfg, store, p, ctx


def test_crf_labels_stage(setup):
    cfg, store, p, cam_ctx = setup
    summary = run_stage("crf_labels", cfg, store, with_upstream=False, show_progress=False)
    out = store.stage("crf_labels", p["crf_labels"].fingerprint)
    assert out.is_complete() and summary["images"] == len(cam_ctx.ids)
    for i in cam_ctx.ids:
        lab, attrs = out.read(i, "crf_label")
        assert lab.dtype == np.uint8 and lab.shape == cam_ctx.dataset.size(i)
        assert set(np.unique(lab)) <= {0, IGNORE, *attrs["classes"]}
    m = summary["metrics"]
    assert 0 < m["kept_fraction"] < 1 and m["miou_confident"] > 0.5


class _Failing:
    """A data set whose image() raises after `n` calls: kills training mid-run."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def image(self, i):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated kill")
        return self.ds.image(i)

    def __getattr__(self, name):
        return getattr(self.ds, name)


def test_affinity_train_checkpoint_resume(setup, tmp_path):
    cfg, store, p, cam_ctx = setup
    for name in ("crf_labels", "affinity_train"):
        full = run_stage(name, cfg, store, with_upstream=False, show_progress=False)
    ctx = make_context("affinity_train", cfg, store, p)
    assert full["epochs"] == 2 and full["steps"] == full["max_steps"] > 0
    hist = ctx.out.read_table("history").to_pylist()
    assert [r["epoch"] for r in hist] == [1, 2] and all(np.isfinite(r["loss"]) for r in hist)
    w_full = torch.load(ctx.out.file("model.pt").path, weights_only=True)["model"]

    other = ArtifactStore(tmp_path / "store2")
    # the resumed run reads the same crf labels; only its own outputs go to the other store
    ctx2 = make_context("affinity_train", cfg, other, p)
    ctx2.inputs = ctx.inputs
    ctx2.out.prepare(())
    n_first_epoch = len(cam_ctx.ids) // cfg.refine.affinity.batch_size * cfg.refine.affinity.batch_size
    ctx2.dataset = _Failing(ctx.dataset, n_first_epoch + 3)
    with pytest.raises(KeyboardInterrupt):
        affinity_train.train(cfg, ctx2)
    assert not ctx2.out.has_file("model.pt") and ctx2.out.has_file("checkpoint.pt")
    ctx2.dataset = ctx.dataset
    resumed = affinity_train.train(cfg, ctx2)
    assert resumed["steps"] == full["steps"]
    assert {k: v for k, v in resumed["history"][0].items() if k != "seconds"} == \
        {k: v for k, v in full["history"][0].items() if k != "seconds"}  # rows hold the epoch's wall time
    w_res = torch.load(ctx2.out.file("model.pt").path, weights_only=True)["model"]
    for k in w_full:
        assert torch.allclose(w_full[k].float(), w_res[k].float(), atol=1e-6), k


def test_random_walk_stage_and_png(setup):
    cfg, store, p, cam_ctx = setup
    for name in ("crf_labels", "affinity_train", "random_walk"):  # the first two are reused when complete
        summary = run_stage(name, cfg, store, with_upstream=False, show_progress=False)
    out = store.stage("random_walk", p["random_walk"].fingerprint)
    assert summary["images"] == len(cam_ctx.ids)
    for i in cam_ctx.ids:
        mask, attrs = out.read(i, "pseudo_mask")
        assert mask.shape == cam_ctx.dataset.size(i)
        assert set(np.unique(mask)) <= {0, *attrs["classes"]}   # no uncertain threshold: no 255
        png = Image.open(out.file(f"png/{i}.png").path)
        assert png.mode == "P" and np.array_equal(np.asarray(png), mask)
    assert summary["metrics"]["miou_all"] > 0.3

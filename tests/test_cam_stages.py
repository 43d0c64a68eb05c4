"""CAM stages on the tiny config: resume after a stop equals an uninterrupted run; memory build,
CAM inference and CAM evaluation write what the stage contract says."""

import numpy as np
import pytest
import torch

from rca_core.config import load_config
from rca_core.kmeans import class_prototypes
from rca_core.stages.context import make_context
from rca_core.stages.planning import plan
from rca_core.stages.local import run_stage
from rca_core.stages import cam_train
from rca_core.store import ArtifactStore

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tinydata") / "demo")


def tiny(data_root, store, **cam):
    over = {"store": str(store), "data": {"root": data_root}, "compute": {"threads": 1}}
    if cam:
        over["cam"] = cam
    return load_config(ROOT / "configs" / "tiny.yaml", over)


def train_ctx(cfg):
    store = ArtifactStore(cfg.store)
    ctx = make_context("cam_train", cfg, store, plan(cfg))
    ctx.out.prepare(())
    return ctx


def test_resumed_training_continues_where_it_stopped(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RCA_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    # contrast from the start and mixup on, so memory, k-means and the global RNG all matter
    cfg_a = tiny(data_root, tmp_path / "a", contrast={"warmup_epochs": 0.5, "mixup": True})
    cfg_b = tiny(data_root, tmp_path / "b", contrast={"warmup_epochs": 0.5, "mixup": True})
    ctx_a = train_ctx(cfg_a)
    first = cam_train.train(cfg_a, ctx_a, stop_after_epochs=1)
    assert first["finished"] is False and first["epochs_done"] == 1
    assert not ctx_a.out.has_file("model.pt") and ctx_a.out.has_file("checkpoint.pt")
    torch.manual_seed(12345)  # a fresh process would not share our RNG state: scramble it
    resumed = cam_train.train(cfg_a, train_ctx(cfg_a))
    straight = cam_train.train(cfg_b, train_ctx(cfg_b))
    assert resumed["finished"] and straight["finished"] and resumed["epochs_done"] == straight["epochs_done"] == 2
    assert resumed["steps"] == straight["steps"]
    sa = torch.load(ctx_a.out.file("model.pt").path, weights_only=True)
    sb = torch.load(train_ctx(cfg_b).out.file("model.pt").path, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert int(sa["memory.count"].sum()) > 0 and bool(sa["prototype_valid"].any())
    for ra, rb in zip(resumed["history"], straight["history"]):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    hist = ctx_a.out.read_table("history").to_pylist()
    assert [r["epoch"] for r in hist] == [1, 2] and hist[1]["loss_sc"] is not None
    # a finished run called again does not train further
    again = cam_train.train(cfg_a, train_ctx(cfg_a))
    assert again["steps"] == resumed["steps"] and len(again["history"]) == 2


def test_max_seconds_stops_training(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RCA_NO_PROGRESS", "1")
    cfg = tiny(data_root, tmp_path / "s", train={"epochs": 50, "max_seconds": 1e-3})
    out = cam_train.train(cfg, train_ctx(cfg))
    assert out["finished"] and out["stopped_by_time"] and out["steps"] == 1


@pytest.mark.parametrize("rca", [True, False])
def test_cam_pipeline_outputs(data_root, tmp_path, monkeypatch, rca):
    monkeypatch.setenv("RCA_NO_PROGRESS", "1")
    parts = {} if rca else {"memory": {"enabled": False}, "contrast": {"enabled": False},
                            "aggregation": {"enabled": False}}
    cfg = tiny(data_root, tmp_path / "p", **parts)
    summary = run_stage("cam_eval", cfg, show_progress=False)
    store = ArtifactStore(cfg.store)
    plans = plan(cfg)
    ds = make_context("cam_infer", cfg, store, plans).dataset
    mem = store.stage("memory_build", plans["memory_build"].fingerprint)
    cams = store.stage("cam_infer", plans["cam_infer"].fingerprint)
    # memory build: one embedding per (image, tag); prototypes are the k-means of those embeddings
    emb, _ = mem.get_array("embeddings")
    cls, _ = mem.get_array("embedding_classes")
    assert emb.shape[0] == sum(len(ds.tags(i)) for i in ds.ids) == len(cls)
    protos, _ = mem.get_array("prototypes")
    valid, _ = mem.get_array("prototype_valid")
    k = cfg.cam.aggregation.prototypes_per_class
    expect, expect_valid = class_prototypes(torch.from_numpy(emb), torch.from_numpy(cls - 1), 3, k,
                                            cfg.cam.aggregation.kmeans_iters, seed=cfg.seed)
    assert protos.shape == (3, k, emb.shape[1]) and np.allclose(protos, expect.numpy())
    assert (valid.astype(bool) == expect_valid.numpy()).all()
    # CAM inference: GT classes only, image resolution, uint8 (the default), max-normalised; nothing else stored
    assert cams.fields == ["cam"]
    for image_id in ds.ids[:6]:
        cam, attrs = cams.read(image_id, "cam")
        h, w = ds.size(image_id)
        tags = sorted(ds.tags(image_id))
        assert attrs["classes"] == tags and cam.dtype == np.uint8
        assert cam.shape == (len(tags), h, w)
        assert (cam.reshape(len(tags), -1).max(1) >= 254).all()  # max-normalised: 1 - 2e-3 or more
    # CAM evaluation: the whole curve, best threshold = best point of the curve
    curve = summary["curve"]
    assert [c["threshold"] for c in curve] == sorted(cfg.cam_eval.thresholds)
    assert summary["miou"] == max(c["miou"] for c in curve)
    assert summary["best_threshold"] in cfg.cam_eval.thresholds and 0 <= summary["miou"] <= 1
    table = store.stage("cam_eval", plans["cam_eval"].fingerprint).read_table("curve").to_pylist()
    assert len(table) == len(curve) and all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in table)


def test_uint8_cams_round_trip_within_half_a_step_and_every_reader_decodes_them(tmp_path):
    from rca_core.cam_ops import decode_cam, encode_cam
    from rca_core.stages.crf_labels import read_cams
    from rca_core.store import ArtifactStore

    cam = np.random.default_rng(0).random((2, 7, 9), dtype=np.float32)
    cam[0, 0, 0], cam[1, 0, 0] = 1.0, 0.0
    q = encode_cam(cam, "uint8")
    assert q.dtype == np.uint8 and q[0, 0, 0] == 255 and q[1, 0, 0] == 0
    assert np.abs(decode_cam(q) - cam).max() <= 0.5 / 255 + 1e-7
    assert np.array_equal(decode_cam(encode_cam(cam, "float16")), cam.astype(np.float16).astype(np.float32))
    every = np.arange(256, dtype=np.uint8)  # every stored value decodes to float32(x) * float32(1/255), bit for bit,
    ref = every.astype(np.float32) * np.float32(1.0 / 255.0)  # from any layout (strided, read-only)
    assert np.array_equal(decode_cam(every), ref) and decode_cam(every).dtype == np.float32
    strided = np.stack([every, every])[:, ::3]
    ro = every.copy(); ro.flags.writeable = False
    assert np.array_equal(decode_cam(strided), ref[::3][None].repeat(2, 0)) and np.array_equal(decode_cam(ro), ref)
    with pytest.raises(ValueError, match="cam_infer.dtype"):
        encode_cam(cam, "int8")
    out = ArtifactStore(tmp_path / "s").stage("cam_infer", "x").prepare(["cam"])
    out.write("a", {"cam": q}, attrs={"classes": [1, 4]})
    got, classes = read_cams(out, "a")
    assert classes == [1, 4] and got.dtype == np.float32 and np.array_equal(got, decode_cam(q))


def cams_of_a_trained_run(data_root, where, monkeypatch):
    """(config, plans, cam_train output) of a tiny run trained and inferred at `where`, one torch thread."""
    monkeypatch.setenv("RCA_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    cfg = tiny(data_root, where)
    run_stage("cam_infer", cfg, show_progress=False)
    plans = plan(cfg)
    return cfg, plans, ArtifactStore(cfg.store).stage("cam_train", plans["cam_train"].fingerprint)


def test_cam_infer_starts_from_a_given_checkpoint_without_training(data_root, tmp_path, monkeypatch):
    """cam.checkpoint: another run's cam_train model.pt is passed on untrained; memory_build and cam_infer give
    the CAMs of the run that trained it, under keys of their own (the key hashes the file's content)."""
    first, fp, trained = cams_of_a_trained_run(data_root, tmp_path / "trained", monkeypatch)
    given = tiny(data_root, tmp_path / "given", checkpoint=trained.file("model.pt").path)
    gp = plan(given)
    assert gp["cam_train"].key != fp["cam_train"].key and gp["cam_infer"].key != fp["cam_infer"].key
    assert {n: p.key for n, p in plan(tiny(data_root, tmp_path / "trained")).items()} == \
        {n: p.key for n, p in fp.items()}  # an unset checkpoint leaves every key as it was
    run_stage("cam_infer", given, show_progress=False)
    store = ArtifactStore(given.store)
    summary = store.stage("cam_train", gp["cam_train"].fingerprint).summary()
    assert summary["trained"] is False and summary["steps"] == 0
    a = ArtifactStore(first.store).stage("cam_infer", fp["cam_infer"].fingerprint)
    b = store.stage("cam_infer", gp["cam_infer"].fingerprint)
    for i in a.listed_ids():
        assert np.array_equal(a.read(i, "cam")[0], b.read(i, "cam")[0]), i
    wrong = tiny(data_root, tmp_path / "wrong", checkpoint=trained.file("model.pt").path,
                 backbone={"name": "small", "output_stride": 8, "width": 16})
    with pytest.raises(ValueError, match=r"cam.checkpoint .*model.pt does not fit the configured network"):
        run_stage("cam_train", wrong, show_progress=False)


def test_bf16_cam_inference_stays_close_to_fp32_and_reports_its_flops(data_root, tmp_path, monkeypatch):
    """compute.precision bf16 (autocast; runs on CPU too) on the same trained model: CAMs within a few hundredths
    of fp32's, under keys of their own; the summaries say the precision, the memory format and the model FLOPs."""
    from rca_core.cam_ops import decode_cam
    from rca_core.device import fast_path

    first, fp, trained = cams_of_a_trained_run(data_root, tmp_path / "fp32", monkeypatch)
    over = {"store": str(tmp_path / "bf16"), "data": {"root": data_root},
            "compute": {"threads": 1, "precision": "bf16"}, "cam": {"checkpoint": trained.file("model.pt").path}}
    low = load_config(ROOT / "configs" / "tiny.yaml", over)
    lp = plan(low)
    assert lp["cam_infer"].key != fp["cam_infer"].key  # an explicit precision is part of the key
    run_stage("cam_infer", low, show_progress=False)
    a = ArtifactStore(first.store).stage("cam_infer", fp["cam_infer"].fingerprint)
    b = ArtifactStore(low.store).stage("cam_infer", lp["cam_infer"].fingerprint)
    diffs = [np.abs(decode_cam(a.read(i, "cam")[0]) - decode_cam(b.read(i, "cam")[0])).mean() for i in a.listed_ids()]
    assert max(diffs) < 0.03, diffs
    sa, sb = a.summary(), b.summary()
    assert sa["compute_precision"] == "fp32" and sb["compute_precision"] == "bf16" and sb["channels_last"] is True
    assert sa["gflop_per_image"] > 0 and 0 < sa["flop_utilisation"] < 5 and sa["peak_gflop_per_s"] > 0
    train = ArtifactStore(first.store).stage("cam_train", fp["cam_train"].fingerprint).summary()
    assert train["compute_precision"] == "fp32" and train["gflop"] > 0 and train["flop_utilisation"] > 0
    assert fast_path(first.compute, "cpu").precision == "fp32"  # auto on CPU
    with pytest.raises(ValueError, match="compute.precision fp16 runs on GPUs only"):
        fast_path(low.compute.model_copy(update={"precision": "fp16"}), "cpu")

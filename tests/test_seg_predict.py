"""predict_folder: masks + overlays for every readable image, corrupt / missing files named in the errors,
results independent of the batch size; bad checkpoints give clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from rca_core.config.segmenter import SegmenterConfig
from rca_core.models.deeplab import build_segmenter, model_meta
from rca_core.predict import CheckpointError, Predictor, load_segmenter, predict_folder
from rca_core.stages.seg_train import save_model


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = SegmenterConfig(arch="small", backbone="small", width=8)
    model = build_segmenter(cfg, 4)
    # non-trivial BN statistics so that predictions vary over the image
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    path = tmp_path / "segmenter.pt"
    save_model(path, model, model_meta(cfg, 4, ["background", "a", "b", "c"]))
    return path


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(d / "c.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(d / "grey.png")  # 1 channel: converted
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image, skipped by extension")
    return d


def test_folder_with_a_corrupt_file(checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    errors = predict_folder(checkpoint, folder, out, batch_size=2, device="cpu", show_progress=False)
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == ["a.png", "b.png", "c.png", "grey.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == masks
    m = Image.open(out / "masks" / "c.png")
    assert m.mode == "P" and m.size == (50, 30)
    arr = np.asarray(m)
    assert arr.max() < 4
    ov = Image.open(out / "overlays" / "c.png")
    assert ov.mode == "RGB" and ov.size == (50, 30)


def test_same_masks_whatever_the_batch_size(checkpoint, folder, tmp_path):
    predict_folder(checkpoint, folder, tmp_path / "b1", batch_size=1, device="cpu", show_progress=False)
    predict_folder(checkpoint, folder, tmp_path / "b4", batch_size=4, device="cpu", show_progress=False)
    for name in ["a.png", "b.png", "c.png"]:
        a = np.asarray(Image.open(tmp_path / "b1" / "masks" / name))
        b = np.asarray(Image.open(tmp_path / "b4" / "masks" / name))
        assert np.array_equal(a, b), name
    # and the same labels as the Predictor gives for that image alone
    model, meta = load_segmenter(checkpoint, "cpu")
    img = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    assert np.array_equal(Predictor(model, meta, "cpu").predict(img[None])[0],
                          np.asarray(Image.open(tmp_path / "b1" / "masks" / "a.png")))


def test_list_of_files_with_a_missing_one(checkpoint, folder, tmp_path):
    errors = predict_folder(checkpoint, [folder / "a.png", folder / "nope.png"], tmp_path / "o", device="cpu",
                            overlays=False, show_progress=False)
    assert len(errors) == 1 and "nope.png" in errors[0] and "not found" in errors[0]
    assert [p.name for p in (tmp_path / "o" / "masks").iterdir()] == ["a.png"]
    # a list may mix files and folders (as `rca predict a.png folder/` passes them)
    other = tmp_path / "more"
    other.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(other / "z.png")
    errors = predict_folder(checkpoint, [folder / "a.png", other], tmp_path / "o2", device="cpu",
                            overlays=False, show_progress=False)
    assert errors == [] and sorted(p.name for p in (tmp_path / "o2" / "masks").iterdir()) == ["a.png", "z.png"]


def test_multiscale_flip_probabilities_are_a_distribution(checkpoint):
    model, meta = load_segmenter(checkpoint, "cpu")
    p = Predictor(model, meta, "cpu", scales=[1.0, 0.5, 1.5], flip=True)
    probs = p.probs(np.random.default_rng(1).integers(0, 256, (2, 33, 27, 3), dtype=np.uint8))
    assert probs.shape == (2, 4, 33, 27)
    assert torch.allclose(probs.sum(1), torch.ones(2, 33, 27), atol=1e-5)


def test_bad_checkpoints_are_named(tmp_path, folder):
    with pytest.raises(CheckpointError, match="not found.*missing.pt"):
        load_segmenter(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_segmenter(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt.*not a segmenter checkpoint"):
        load_segmenter(plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files.*empty"):
        predict_folder(junk, empty, tmp_path / "o")

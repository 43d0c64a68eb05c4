"""The synthetic demo data set: a valid VOC tree, read back by the reader, deterministic for a seed."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rca_core.config.data import DataConfig, DemoConfig
from rca_core.data import make_dataset
from rca_core.data.check import check_dataset
from rca_core.data.demo import _encode, ensure_demo, is_current, make_demo, render
from rca_core.data.voc import VOCDataset

TINY = DemoConfig(n_train=32, n_val=8, size=48, num_object_classes=3, max_objects=3, seed=0)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "tiny", TINY, progress=False)


def test_layout_and_meta(tiny):
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        assert len(list((tiny / d).iterdir())) == 40
    assert (tiny / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:05d}" for i in range(32)]
    assert len((tiny / "ImageSets/Segmentation/val.txt").read_text().split()) == 8
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["class_names"] == ["background", "disc", "square", "triangle"]
    assert meta["size"] == 48 and meta["seed"] == 0 and meta["num_classes"] == 4
    assert meta["demo"] == TINY.model_dump(mode="json") and "version" in meta
    assert Image.open(tiny / "SegmentationClass/train_00000.png").mode == "P"
    assert Image.open(tiny / "SegmentationClassAug/train_00000.png").mode == "L"
    assert Image.open(tiny / "JPEGImages/train_00000.jpg").format == "JPEG"
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


def test_check_accepts_and_reader_reads_back(tiny):
    assert check_dataset(tiny, 4, progress=False) == []
    fg, n_labels = [], []
    for split, n in (("train", 32), ("val", 8)):
        for flavour in ("SegmentationClassAug", "SegmentationClass"):
            ds = VOCDataset(tiny, split, num_classes=4, mask_dir=flavour)
            assert len(ds) == n and ds.class_names[1] == "disc"
            for i in ds.ids:
                img, m = ds.image(i), ds.mask(i)
                assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and m.shape == (48, 48)
                assert ds.size(i) == (48, 48)
                labels = sorted(int(c) for c in np.unique(m) if c not in (0, 255))
                assert ds.tags(i) == labels and 1 <= len(labels) <= 3
                assert (m == 255).any(), "objects have a 255 border band"
                if flavour == "SegmentationClassAug":
                    fg.append(float(((m != 0) & (m != 255)).mean()))
                    n_labels.append(len(labels))
                else:
                    np.testing.assert_array_equal(m, VOCDataset(tiny, split, 4, mask_dir="SegmentationClassAug").mask(i))
    # objects are neither specks nor the whole image
    assert 0.05 < np.mean(fg) < 0.45 and max(n_labels) >= 2


def test_border_band_is_thin_and_on_outlines(tiny):
    ds = VOCDataset(tiny, "train", num_classes=4)
    for i in ds.ids[:8]:
        m = ds.mask(i)
        ign = m == 255
        p = np.pad(m, 1, mode="edge")
        touches_label = np.zeros_like(ign)   # some 3x3 neighbour carries a label (not 255)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                touches_label |= p[1 + dy:1 + dy + 48, 1 + dx:1 + dx + 48] != 255
        assert touches_label[ign].all(), "the ignore band is one pixel wide at 48 px"
        assert 0 < ign.mean() < 0.2


def test_same_seed_same_bytes_different_seed_different(tmp_path, tiny):
    again = make_demo(tmp_path / "again", TINY, workers=2, progress=False)  # parallel: same bytes as serial
    assert tree_digest(again) == tree_digest(tiny)
    other = make_demo(tmp_path / "other", TINY.model_copy(update={"seed": 1}), progress=False)
    d0, d1 = tree_digest(tiny), tree_digest(other)
    jpgs = [k for k in d0 if k.endswith(".jpg")]
    assert sum(d0[k] != d1[k] for k in jpgs) == len(jpgs)


def test_partial_generation_matches_tree(tiny):
    img, mask = render(TINY, "val", 5)
    ds = VOCDataset(tiny, "val", num_classes=4)
    np.testing.assert_array_equal(mask, ds.mask("val_00005"))
    assert np.abs(img.astype(int) - ds.image("val_00005").astype(int)).mean() < 6  # JPEG error only
    assert _encode(TINY, "val", 5)[1] == (tiny / "JPEGImages" / "val_00005.jpg").read_bytes()


def test_ensure_demo_generates_reuses_and_regenerates(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "d"), num_classes=4, demo=TINY.model_copy(update={"n_train": 6, "n_val": 2}))
    root = ensure_demo(cfg, progress=False)
    assert is_current(root, cfg.demo)
    marker = root / "JPEGImages" / "train_00000.jpg"
    mtime = marker.stat().st_mtime_ns
    assert ensure_demo(cfg, progress=False) == root and marker.stat().st_mtime_ns == mtime  # reused
    cfg2 = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"n_train": 9})})
    ensure_demo(cfg2, progress=False)  # other config: regenerated in place
    assert len((root / "ImageSets/Segmentation/train.txt").read_text().split()) == 9
    assert is_current(root, cfg2.demo) and not is_current(root, cfg.demo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_ensure_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    cfg = DataConfig(root=str(tmp_path / "mine"), num_classes=4, demo=TINY)
    with pytest.raises(FileExistsError, match="mine"):
        ensure_demo(cfg, progress=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "x"


def test_interrupted_generation_leaves_no_tree(tmp_path, monkeypatch):
    import rca_core.data.demo as demo

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "_swap_in", boom)
    with pytest.raises(KeyboardInterrupt):
        make_demo(tmp_path / "half", TINY.model_copy(update={"n_train": 4, "n_val": 2}), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_make_dataset_demo_and_max_images(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "d"), num_classes=4, max_images=5,
                     class_names=["bg", "a", "b", "c"], demo=TINY.model_copy(update={"n_train": 8, "n_val": 2}))
    ds = make_dataset(cfg, "train", progress=False)
    assert ds.ids == [f"train_{i:05d}" for i in range(5)] and ds.class_names == ["bg", "a", "b", "c"]
    assert make_dataset(cfg, "val", progress=False).ids == ["val_00000", "val_00001"]


def test_make_demo_repairs_a_damaged_tree(tmp_path):
    cfg = TINY.model_copy(update={"n_train": 4, "n_val": 2})
    root = make_demo(tmp_path / "d", cfg, progress=False)
    (root / "JPEGImages" / "train_00001.jpg").write_bytes(b"junk")
    make_demo(root, cfg, progress=False)
    assert check_dataset(root, 4, progress=False) == []


def _ensure(root):
    ensure_demo(DataConfig(root=root, num_classes=4, demo=TINY.model_copy(update={"n_train": 24})), progress=False)


def test_concurrent_ensure_demo_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path / "d"),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert check_dataset(tmp_path / "d", 4, progress=False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("w", [1, 2, 3])
def test_border_band_filter_matches_brute_force(w):
    from rca_core.data.demo import _min_filter

    a = np.random.default_rng(w).integers(0, 4, (13, 17))
    p = np.pad(a, w, mode="edge")
    ref = np.array([[p[y:y + 2 * w + 1, x:x + 2 * w + 1].min() for x in range(17)] for y in range(13)])
    np.testing.assert_array_equal(_min_filter(a, w), ref)

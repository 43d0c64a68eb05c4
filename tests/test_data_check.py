"""check_dataset: a clean demo tree passes; a damaged copy lists every problem at once, each with its id."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rca_core.config.data import DemoConfig
from rca_core.data.check import check_dataset, format_problems
from rca_core.data.demo import make_demo
from rca_core.data.palette import save_palette_png

CFG = DemoConfig(n_train=12, n_val=4, size=48, num_object_classes=3, max_objects=2, seed=3)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("check") / "demo", CFG, progress=False)


def test_clean_tree_passes(clean):
    assert check_dataset(clean, progress=False) == []          # num_classes from meta.json
    assert check_dataset(clean, 4, ["val"], progress=False) == []
    assert format_problems([]) == "no problems"


def test_damaged_copy_lists_every_problem(clean, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(clean, root)
    jp, seg, aug = root / "JPEGImages", root / "SegmentationClass", root / "SegmentationClassAug"
    # 1 truncated JPEG
    data = (jp / "train_00001.jpg").read_bytes()
    (jp / "train_00001.jpg").write_bytes(data[: len(data) // 2])
    # 2 mask of the wrong size (both flavours, so auto sees it)
    for d in (seg, aug):
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(d / "train_00002.png")
    # 3 listed id without a file
    (jp / "train_00003.jpg").unlink()
    # 4 class id outside the class list
    m = np.asarray(Image.open(aug / "train_00004.png")).copy()
    m[0, :5] = 9
    Image.fromarray(m).save(aug / "train_00004.png")
    save_palette_png(m, seg / "train_00004.png")
    # 5 id with '../' and 6 a listed id with no mask
    (aug / "val_00001.png").unlink()
    (seg / "val_00001.png").unlink()
    split = root / "ImageSets/Segmentation/train.txt"
    split.write_text(split.read_text() + "../../etc/passwd\n")
    # 7 a labels-file tag outside the class list
    labels = json.loads((root / "labels.json").read_text())
    labels["train_00005"] = [1, 12]
    (root / "labels.json").write_text(json.dumps(labels))

    problems = check_dataset(root, 4, progress=False)
    got = {(p.image_id, p.kind) for p in problems}
    expected = {("train_00001", "unreadable_image"), ("train_00002", "size_mismatch"),
                ("train_00003", "missing_image"), ("train_00004", "bad_label"),
                ("../../etc/passwd", "bad_id"), ("val_00001", "missing_mask"), ("train_00005", "bad_tag")}
    assert expected <= got
    # the zeroed mask of train_00002 no longer agrees with the labels file: reported too, nothing else
    assert got - expected == {("train_00002", "tag_mismatch")}
    text = format_problems(problems)
    for iid, kind in expected:
        assert repr(iid) in text and kind in text
    assert "value" in text and "[9]" in text and "40x48" in text
    assert {p.split for p in problems} == {"train", "val"}


def test_missing_split_and_root(tmp_path, clean):
    assert [p.kind for p in check_dataset(tmp_path / "nope", progress=False)] == ["missing_root"]
    probs = check_dataset(clean, 4, ["train", "test"], progress=False)
    assert [(p.kind, p.split) for p in probs] == [("missing_split", "test")]


def test_num_classes_smaller_than_the_data_is_reported(clean):
    probs = check_dataset(clean, 3, ["train"], progress=False)    # class 3 now outside 0..2
    assert probs and all(p.kind in ("bad_label", "bad_tag") for p in probs)
    assert all(p.image_id.startswith("train_") for p in probs)

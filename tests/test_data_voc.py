"""The VOC-layout reader on trees written here, in both PNG flavours, and its errors on bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rca_core.data.palette import PALETTE, colourise, save_palette_png
from rca_core.data.voc import DataError, VOCDataset, read_split

IDS = ["2007_000032", "2007_000039", "2008_000123", "2011_003276"]


def write_tree(root: Path, flavour: str, ids=IDS, num_classes=21, seed=0, size=(20, 30)) -> dict:
    """A VOC tree with random images and block masks (with 255 borders); returns id -> mask."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / flavour).mkdir(exist_ok=True)
    (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    masks = {}
    for k, iid in enumerate(ids):
        h, w = size[0] + k, size[1] - k
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{iid}.jpg")
        m = np.zeros((h, w), np.uint8)
        a, b = rng.choice(np.arange(1, num_classes), 2, replace=False)
        m[2:9, 3:12] = a
        m[10:, 15:] = b
        m[1, 3:12] = 255
        masks[iid] = m
        if flavour == "SegmentationClass":
            save_palette_png(m, root / flavour / f"{iid}.png")
        else:
            Image.fromarray(m).save(root / flavour / f"{iid}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return masks


@pytest.mark.parametrize("flavour", ["SegmentationClass", "SegmentationClassAug"])
def test_reads_both_png_flavours(tmp_path, flavour):
    masks = write_tree(tmp_path, flavour)
    ds = VOCDataset(tmp_path, "train", num_classes=21)
    assert ds.ids == IDS and ds.class_names[15] == "person" and len(ds) == 4
    for k, iid in enumerate(IDS):
        np.testing.assert_array_equal(ds.mask(iid), masks[iid])
        assert ds.image(iid).shape == (20 + k, 30 - k, 3) and ds.size(iid) == (20 + k, 30 - k)
        assert ds.tags(iid) == sorted(int(c) for c in np.unique(masks[iid]) if c not in (0, 255))
        assert ds.tags(k) == ds.tags(iid)  # integer index works too
        assert ds.tag_vector(iid).sum() == 2


def test_palette_png_is_the_voc_palette(tmp_path):
    m = np.array([[0, 1, 15], [255, 20, 2]], np.uint8)
    save_palette_png(m, tmp_path / "m.png")
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P"
    assert tuple(PALETTE[1]) == (128, 0, 0) and tuple(PALETTE[15]) == (192, 128, 128)
    assert tuple(PALETTE[255]) == (224, 224, 192)
    rgb = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(rgb, colourise(m))


def test_auto_prefers_aug_and_falls_back(tmp_path):
    aug = write_tree(tmp_path, "SegmentationClassAug", seed=1)
    pal = write_tree(tmp_path, "SegmentationClass", seed=2)
    (tmp_path / "SegmentationClassAug" / f"{IDS[0]}.png").unlink()
    ds = VOCDataset(tmp_path, "train")
    np.testing.assert_array_equal(ds.mask(IDS[1]), aug[IDS[1]])        # Aug preferred when it has the file
    np.testing.assert_array_equal(ds.mask(IDS[0]), pal[IDS[0]])        # else SegmentationClass
    forced = VOCDataset(tmp_path, "train", mask_dir="SegmentationClass")
    np.testing.assert_array_equal(forced.mask(IDS[1]), pal[IDS[1]])
    with pytest.raises(DataError, match=IDS[0]):
        VOCDataset(tmp_path, "train", mask_dir="SegmentationClassAug").mask(IDS[0])


def test_rgb_colour_mask_is_mapped_to_indices(tmp_path):
    masks = write_tree(tmp_path, "SegmentationClassAug")
    iid = IDS[2]
    Image.fromarray(colourise(masks[iid])).save(tmp_path / "SegmentationClassAug" / f"{iid}.png")
    np.testing.assert_array_equal(VOCDataset(tmp_path).mask(iid), masks[iid])


def test_tags_from_json_labels_file(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    (tmp_path / "labels.json").write_text(json.dumps({i: [3, 1] for i in IDS}))
    assert VOCDataset(tmp_path).tags(IDS[0]) == [1, 3]        # root/labels.json is found by default
    other = tmp_path / "other.json"
    other.write_text(json.dumps({i: [7] for i in IDS}))
    assert VOCDataset(tmp_path, labels_file=other).tags(IDS[3]) == [7]
    other.write_text(json.dumps({i: [25] for i in IDS}))
    with pytest.raises(DataError, match=r"2007_000032.*25"):
        VOCDataset(tmp_path, labels_file=other).tags(IDS[0])


def test_tags_from_irn_cls_labels_npy(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    d = {}
    for k, iid in enumerate(IDS):
        v = np.zeros(20, np.float32)
        v[k] = 1
        v[19] = 1
        d[int(iid.replace("_", ""))] = v          # IRN's integer keys
    np.save(tmp_path / "cls_labels.npy", d)
    ds = VOCDataset(tmp_path, labels_file=tmp_path / "cls_labels.npy")
    assert [ds.tags(i) for i in IDS] == [[1, 20], [2, 20], [3, 20], [4, 20]]
    with pytest.raises(DataError, match="21 classes|20 values|expected 9"):
        VOCDataset(tmp_path, num_classes=10, labels_file=tmp_path / "cls_labels.npy")


def test_deeplab_style_list_lines(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    (tmp_path / "ImageSets/Segmentation/train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in IDS))
    assert read_split(tmp_path, "train_aug") == IDS


def test_max_images(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    assert VOCDataset(tmp_path, max_images=2).ids == IDS[:2]


# ------------------------------------------------------------------------------------- bad input
def test_truncated_jpeg_names_the_file(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    p = tmp_path / "JPEGImages" / f"{IDS[1]}.jpg"
    data = p.read_bytes()
    p.write_bytes(data[: data.find(b"\xff\xda") + 40])  # header kept, scan data cut short
    ds = VOCDataset(tmp_path)
    assert ds.size(IDS[1]) == (21, 29)  # the header is still readable
    with pytest.raises(DataError, match=rf"{IDS[1]}.*{p.name}"):
        ds.image(IDS[1])


def test_wrong_size_mask_names_the_id(tmp_path):
    write_tree(tmp_path, "SegmentationClass")
    save_palette_png(np.zeros((5, 5), np.uint8), tmp_path / "SegmentationClass" / f"{IDS[2]}.png")
    with pytest.raises(DataError, match=rf"{IDS[2]}.*5x5"):
        VOCDataset(tmp_path).mask(IDS[2])


def test_listed_id_without_file_names_id_and_file(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    (tmp_path / "JPEGImages" / f"{IDS[3]}.jpg").unlink()
    with pytest.raises(DataError, match=rf"{IDS[3]}.*JPEGImages/{IDS[3]}\.jpg"):
        VOCDataset(tmp_path)


def test_class_id_outside_the_list_names_id_and_value(tmp_path):
    masks = write_tree(tmp_path, "SegmentationClassAug", num_classes=5)
    m = masks[IDS[0]].copy()
    m[0, 0] = 7
    Image.fromarray(m).save(tmp_path / "SegmentationClassAug" / f"{IDS[0]}.png")
    ds = VOCDataset(tmp_path, num_classes=5)
    with pytest.raises(DataError, match=rf"{IDS[0]}.*value 7"):
        ds.mask(IDS[0])
    with pytest.raises(DataError, match=IDS[0]):
        ds.tags(IDS[0])
    ds.mask(IDS[1])  # the others are fine


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "a\\b", "x\x00y", ".."])
def test_bad_ids_are_refused(tmp_path, bad):
    write_tree(tmp_path, "SegmentationClassAug")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("\n".join(IDS[:2] + [bad]) + "\n")
    with pytest.raises(DataError, match="bad image id") as e:
        VOCDataset(tmp_path)
    assert repr(bad) in str(e.value) and "train.txt" in str(e.value)
    (tmp_path / "ImageSets/Segmentation/ok.txt").write_text(IDS[0] + "\n")
    with pytest.raises(DataError, match="bad image id"):   # asked for directly: refused, no path built
        VOCDataset(tmp_path, "ok").image(bad)


def test_missing_split_and_root(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    with pytest.raises(DataError, match="val.txt"):
        VOCDataset(tmp_path, "val")
    with pytest.raises(DataError, match="nowhere"):
        VOCDataset(tmp_path / "nowhere")


def test_duplicate_id_is_refused(tmp_path):
    write_tree(tmp_path, "SegmentationClassAug")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("\n".join(IDS + IDS[:1]) + "\n")
    with pytest.raises(DataError, match=rf"{IDS[0]}.*twice"):
        VOCDataset(tmp_path)

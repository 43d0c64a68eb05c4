"""COCO instances -> VOC-style semantic PNGs: RLE codecs, polygon fill, overlap/crowd rules, the tree."""
import json

import numpy as np
import pytest
from PIL import Image

from rca_core.data.check import check_dataset
from rca_core.data.coco import (convert_coco, counts_to_rle_string, polygons_to_mask, rle_decode, rle_encode,
                                rle_string_to_counts)
from rca_core.data.voc import DataError, VOCDataset


def test_compressed_rle_hand_computed_vector():
    # worked through maskApi.c by hand: 40 -> 'X1' (two 5-bit groups); 35 is stored as 35-40=-5 -> 'K'
    assert counts_to_rle_string([2, 40, 3, 35]) == "2X13K"
    assert rle_string_to_counts("2X13K") == [2, 40, 3, 35]
    m = rle_decode("2X13K", 8, 10)
    assert m.sum() == 40 + 35 and m[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]   # column-major


@pytest.mark.parametrize("seed", range(6))
def test_rle_round_trip_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, 2)
    m = (rng.random((h, w)) < rng.uniform(0.05, 0.95)).astype(np.uint8)
    if seed == 4:
        m[:] = 1
    if seed == 5:
        m[:] = 0
    counts = rle_encode(m)
    assert sum(counts) == h * w
    np.testing.assert_array_equal(rle_decode(counts, h, w), m)
    np.testing.assert_array_equal(rle_decode(counts_to_rle_string(counts), h, w), m)


def test_rle_errors():
    with pytest.raises(DataError, match="expected 3x3"):
        rle_decode([1, 2], 3, 3)
    with pytest.raises(DataError, match="invalid character"):
        rle_string_to_counts("2X1\x013K")


def test_polygon_fill_follows_coco_pixel_convention():
    m = polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)   # a 6 x 4 box
    assert m.sum() == 24 and m[2:6, 2:8].all()


CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def coco_fixture(tmp_path):
    """Three images: overlapping polygons + a crowd RLE; a compressed-RLE instance; no annotations."""
    imgs = tmp_path / "train2014"
    imgs.mkdir()
    images = []
    for k, (h, w) in enumerate([(20, 30), (16, 16), (10, 10)], 1):
        name = f"COCO_train2014_{k:012d}.jpg"
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(imgs / name)
        images.append({"id": k, "file_name": name, "height": h, "width": w})
    crowd = np.zeros((20, 30), np.uint8)
    crowd[:, 14:26] = 1
    blob = np.zeros((16, 16), np.uint8)
    blob[3:9, 5:12] = 1
    anns = [
        {"id": 11, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 80.0,
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
        {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 64.0,
         "segmentation": [[8, 6, 16, 6, 16, 14, 8, 14]]},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 240.0,
         "segmentation": {"counts": rle_encode(crowd), "size": [20, 30]}},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 42.0,
         "segmentation": {"counts": counts_to_rle_string(rle_encode(blob)), "size": [16, 16]}},
    ]
    js = tmp_path / "instances_train2014.json"
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return js, imgs, blob


def expected_mask_1():
    m = np.zeros((20, 30), np.uint8)
    m[2:10, 2:12] = 2            # airplane (cat 5 -> class 2), the larger one, drawn first
    m[6:14, 8:16] = 3            # toothbrush (cat 90 -> class 3), smaller: wins the overlap
    crowd = np.zeros((20, 30), bool)
    crowd[:, 14:26] = True
    m[crowd & (m == 0)] = 255    # crowd -> ignore, except where an instance already is
    return m


def test_convert_writes_a_voc_tree_the_reader_reads(tmp_path):
    js, imgs, blob = coco_fixture(tmp_path)
    out = tmp_path / "coco_voc"
    assert convert_coco(js, imgs, out, "train", progress=False) == 2      # the empty image is left out
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == [
        "COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    ds = VOCDataset(out, "train", num_classes=4)
    assert ds.class_names == ["background", "person", "airplane", "toothbrush"]   # sorted category ids
    i1, i2 = ds.ids
    np.testing.assert_array_equal(ds.mask(i1), expected_mask_1())
    np.testing.assert_array_equal(ds.mask(i2), blob)                             # person = class 1
    assert ds.tags(i1) == [2, 3] and ds.tags(i2) == [1]
    assert ds.image(i1).shape == (20, 30, 3) and (out / "JPEGImages" / f"{i1}.jpg").is_symlink()
    assert check_dataset(out, progress=False) == []
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 4 and meta["category_ids"] == [1, 5, 90]


def test_convert_keep_empty_copy_and_second_split(tmp_path):
    js, imgs, _ = coco_fixture(tmp_path)
    out = tmp_path / "o"
    assert convert_coco(js, imgs, out, "val", link="copy", skip_empty=False, progress=False) == 3
    assert not (out / "JPEGImages" / "COCO_train2014_000000000003.jpg").is_symlink()
    ds = VOCDataset(out, "val", num_classes=4)
    assert ds.tags("COCO_train2014_000000000003") == [] and (ds.mask(2) == 0).all()
    convert_coco(js, imgs, out, "train", progress=False)
    assert json.loads((out / "meta.json").read_text())["splits"] == {"val": 3, "train": 2}
    assert check_dataset(out, progress=False) == []


def test_convert_errors_name_the_item(tmp_path):
    js, imgs, _ = coco_fixture(tmp_path)
    (imgs / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(DataError, match="COCO_train2014_000000000002"):
        convert_coco(js, imgs, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "ImageSets/Segmentation/train.txt").exists()   # nothing listed half-done
    data = json.loads(js.read_text())
    data["annotations"][0]["category_id"] = 77
    js.write_text(json.dumps(data))
    with pytest.raises(DataError, match="category 77"):
        convert_coco(js, None, tmp_path / "p", link="none", progress=False)


def test_polygon_fill_matches_point_in_polygon_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(3, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(3, 9, n)
        poly = np.stack([12 + rad * np.cos(ang), 10 + rad * np.sin(ang)], 1).ravel().tolist()
        m = polygons_to_mask([poly], 20, 25)
        pts = np.asarray(poly).reshape(-1, 2)
        for y in range(20):
            for x in range(25):
                px, py, inside = x + 0.5, y + 0.5, False       # classic ray casting
                for i in range(n):
                    (xa, ya), (xb, yb) = pts[i], pts[(i + 1) % n]
                    if (ya <= py) != (yb <= py) and px < xa + (py - ya) * (xb - xa) / (yb - ya):
                        inside = not inside
                assert m[y, x] == inside, (x, y)

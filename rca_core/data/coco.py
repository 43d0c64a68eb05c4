"""COCO 2014 instances JSON -> per-image semantic PNGs in a VOC-layout tree (81 classes, VOC-style).

Rules (docs/data.md):
- class 0 is background; the 80 categories map to 1..80 in sorted category-id order;
- non-crowd instances are drawn largest first, so a smaller instance lying on a larger one wins the
  overlap (later-drawn wins; smaller objects are usually in front);
- crowd regions (iscrowd=1) become 255 (ignore), except pixels a non-crowd instance already claims;
- polygons are filled by a small scanline rasteriser (pixel (x, y) covers [x, x+1) x [y, y+1) as in
  COCO; a pixel is inside when its centre is); RLE (uncompressed counts lists and COCO's compressed strings) is decoded here; no pycocotools;
- tags (labels.json) are the classes left in the mask; images with no foreground are left out of the
  split list unless skip_empty=False.
The tree: JPEGImages/{stem}.jpg (symlink or copy of the COCO image), SegmentationClassAug/{stem}.png
(grey), ImageSets/Segmentation/{split}.txt, labels.json, meta.json. Read it with VOCDataset(num_classes=81).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .voc import DataError, validate_id

GENERATOR = "rca_core.data.coco"
NUM_CLASSES = 81


# ------------------------------------------------------------------------------------------ RLE
def rle_string_to_counts(s: str) -> list[int]:
    """COCO's compressed RLE string (maskApi.c rleFrString) -> run lengths."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            if p >= len(s):
                raise DataError(f"compressed RLE string ends inside a number: {s[:40]!r}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"compressed RLE string has an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Run lengths -> COCO's compressed RLE string (maskApi.c rleToString)."""
    out = []
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_encode(mask: np.ndarray) -> list[int]:
    """Binary (H, W) mask -> run lengths in COCO order (column-major, starting with a 0-run)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return [int(r) for r in runs]


def rle_decode(counts: list[int] | str, h: int, w: int) -> np.ndarray:
    """Run lengths (or a compressed string) -> uint8 (H, W) binary mask."""
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise DataError(f"RLE counts sum to {int(counts.sum())} (or are negative), expected {h}x{w} = {h * w}")
    vals = (np.arange(len(counts)) % 2).astype(np.uint8)
    return np.repeat(vals, counts).reshape((h, w), order="F")


def _polygon_inside(poly: list[float], h: int, w: int) -> np.ndarray:
    """Pixels whose centre (x + 0.5, y + 0.5) lies inside the polygon (even-odd rule), scanline by scanline."""
    pts = np.asarray(poly, np.float64).reshape(-1, 2)
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    out = np.zeros((h, w), bool)
    lo, hi = max(0, int(np.floor(y0.min() - 0.5))), min(h, int(np.ceil(y0.max() + 0.5)))
    xc = np.arange(w) + 0.5
    for y in range(lo, hi):
        yc = y + 0.5
        cross = (y0 <= yc) != (y1 <= yc)
        if not cross.any():
            continue
        xa, ya, xb, yb = x0[cross], y0[cross], x1[cross], y1[cross]
        xs = np.sort(xa + (yc - ya) * (xb - xa) / (yb - ya))
        out[y] = np.searchsorted(xs, xc, side="right") % 2 == 1
    return out


def polygons_to_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] -> uint8 (H, W) binary mask (their union).

    COCO coordinates are continuous, pixel (x, y) covering [x, x+1) x [y, y+1); a pixel is inside when
    its centre is (pycocotools upsamples instead, so single pixels along edges can differ).
    """
    m = np.zeros((h, w), bool)
    for poly in polygons:
        if len(poly) >= 6:  # fewer than 3 points: degenerate
            m |= _polygon_inside(poly[: len(poly) // 2 * 2], h, w)
    return m.astype(np.uint8)


def annotation_mask(ann: dict, h: int, w: int) -> np.ndarray:
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return polygons_to_mask(seg, h, w)
    if isinstance(seg, dict) and "counts" in seg:
        size = seg.get("size", [h, w])
        if list(size) != [h, w]:
            raise DataError(f"annotation {ann.get('id')}: RLE size {size} differs from image size {[h, w]}")
        return rle_decode(seg["counts"], h, w)
    raise DataError(f"annotation {ann.get('id')}: unsupported segmentation {type(seg).__name__}")


# ------------------------------------------------------------------------------------ semantic
def category_map(categories: list[dict]) -> tuple[dict[int, int], list[str]]:
    """{COCO category id: class id 1..N in sorted id order}, and the class names (background first)."""
    cats = sorted(categories, key=lambda c: c["id"])
    return {int(c["id"]): i + 1 for i, c in enumerate(cats)}, ["background"] + [str(c["name"]) for c in cats]


def semantic_mask(anns: list[dict], h: int, w: int, cat_map: dict[int, int]) -> np.ndarray:
    """The rules in the module docstring: largest instance first, smaller on top; crowd -> 255."""
    out = np.zeros((h, w), np.uint8)
    claimed = np.zeros((h, w), bool)
    things = [a for a in anns if not a.get("iscrowd", 0)]
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    for a in sorted(things, key=lambda a: (-float(a.get("area", 0)), a.get("id", 0))):
        if a["category_id"] not in cat_map:
            raise DataError(f"annotation {a.get('id')}: category {a['category_id']} is not in the categories list")
        m = annotation_mask(a, h, w).astype(bool)
        out[m] = cat_map[a["category_id"]]
        claimed |= m
    for a in crowd:
        m = annotation_mask(a, h, w).astype(bool) & ~claimed
        out[m] = 255
    return out


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=0, sort_keys=True))
    os.replace(tmp, path)


def convert_coco(instances_json: str | Path, images_dir: str | Path | None, out_root: str | Path,
                 split: str = "train", *, link: str = "symlink", skip_empty: bool = True,
                 progress: bool = True) -> int:
    """Convert one COCO split into out_root (VOC layout). Returns the number of images listed.

    link: "symlink" (default) or "copy" the COCO JPEGs into JPEGImages/, or "none" (masks only).
    Several splits can be converted into the same out_root; labels.json and meta.json are merged.
    The split list is written last, so an interrupted conversion lists nothing half-done.
    """
    if link not in ("symlink", "copy", "none"):
        raise ValueError(f"link must be symlink, copy or none, got {link!r}")
    instances_json, out = Path(instances_json), Path(out_root)
    try:
        data = json.loads(instances_json.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read COCO instances file {instances_json}: {e}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"COCO instances file {instances_json} has no {key!r} list")
    cat_map, names = category_map(data["categories"])
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)

    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (out / d).mkdir(parents=True, exist_ok=True)
    labels_path = out / "labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    ids: list[str] = []
    images = sorted(data["images"], key=lambda im: im["id"])
    for im in tqdm(images, desc=f"coco {split}", unit="img", disable=not progress):
        iid = Path(im["file_name"]).stem
        validate_id(iid, str(instances_json))
        h, w = int(im["height"]), int(im["width"])
        mask = semantic_mask(by_image.get(im["id"], []), h, w, cat_map)
        tags = [int(c) for c in np.unique(mask) if c not in (0, 255)]
        if skip_empty and not tags:
            continue
        if link != "none":
            src = Path(images_dir) / im["file_name"] if images_dir is not None else None
            if src is None or not src.is_file():
                raise DataError(f"image {iid!r}: file not found: {src}")
            dst = out / "JPEGImages" / f"{iid}{src.suffix.lower()}"
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            if link == "symlink":
                dst.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dst)
        png = out / "SegmentationClassAug" / f"{iid}.png"
        tmp = png.with_name(f".{png.name}.tmp")
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, png)
        labels[iid] = tags
        ids.append(iid)

    _write_json_atomic(labels_path, labels)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({"generator": GENERATOR, "num_classes": len(names), "class_names": names,
                 "category_ids": sorted(cat_map)})
    meta.setdefault("splits", {})[split] = len(ids)
    _write_json_atomic(meta_path, meta)
    split_file = out / "ImageSets" / "Segmentation" / f"{split}.txt"
    tmp = split_file.with_name(f".{split_file.name}.tmp")
    tmp.write_text("".join(i + "\n" for i in ids))
    os.replace(tmp, split_file)
    return len(ids)


__all__ = ["convert_coco", "semantic_mask", "category_map", "rle_decode", "rle_encode",
           "rle_string_to_counts", "counts_to_rle_string", "polygons_to_mask", "annotation_mask", "NUM_CLASSES"]

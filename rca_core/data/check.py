"""`rca data check`: validate a VOC-layout tree and list EVERY problem with the image id."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .voc import (IMAGE_EXTS, MASK_DIRS, DataError, load_labels_file, lookup_tags, parse_split_line,
                  read_mask_file, validate_id)

KINDS = ("missing_root", "missing_split", "bad_id", "duplicate_id", "missing_image", "unreadable_image",
         "missing_mask", "unreadable_mask", "size_mismatch", "bad_label", "bad_labels_file", "missing_tags",
         "bad_tag", "tag_mismatch")


@dataclass(frozen=True)
class Problem:
    kind: str            # one of KINDS
    message: str
    split: str = ""
    image_id: str = ""
    path: str = ""

    def __str__(self) -> str:
        where = f"[{self.split}] " if self.split else ""
        who = f"{self.image_id!r}: " if self.image_id else ""
        at = f" ({self.path})" if self.path else ""
        return f"{where}{who}{self.kind}: {self.message}{at}"


def _num_classes_of(root: Path) -> int:
    try:
        n = json.loads((root / "meta.json").read_text()).get("num_classes")
        if isinstance(n, int) and n >= 2:
            return n
    except (OSError, ValueError):
        pass
    return 21


def check_dataset(root: str | Path, num_classes: int | None = None, splits: list[str] | None = None, *,
                  mask_dir: str = "auto", labels_file: str | Path | None = None, require_masks: bool = True,
                  progress: bool = True) -> list[Problem]:
    """Every problem of the tree (empty list = OK). Decodes every image and mask.

    num_classes defaults to meta.json's (demo/COCO trees) or 21; splits default to every
    ImageSets/Segmentation/*.txt; labels_file defaults to root/labels.json when present.
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem("missing_root", "data set root not found", path=str(root))]
    nc = num_classes or _num_classes_of(root)
    sdir = root / "ImageSets" / "Segmentation"
    if splits is None:
        splits = sorted(p.stem for p in sdir.glob("*.txt")) if sdir.is_dir() else []
        if not splits:
            return [Problem("missing_split", "no split files", path=str(sdir / "*.txt"))]
    mdirs = MASK_DIRS if mask_dir == "auto" else (mask_dir,)
    problems: list[Problem] = []

    labels = None
    if labels_file is None and (root / "labels.json").is_file():
        labels_file = root / "labels.json"
    if labels_file is not None:
        try:
            labels = load_labels_file(labels_file, nc)
        except DataError as e:
            problems.append(Problem("bad_labels_file", str(e), path=str(labels_file)))

    for split in splits:
        split_file = sdir / f"{split}.txt"
        if not split_file.is_file():
            problems.append(Problem("missing_split", f"split {split!r} has no list file", split, path=str(split_file)))
            continue
        seen: set[str] = set()
        lines = [parse_split_line(ln) for ln in split_file.read_text().splitlines() if ln.strip()]
        for iid in tqdm(lines, desc=f"check {split}", unit="img", disable=not progress):
            problems.extend(_check_one(root, split, iid, nc, mdirs, labels, labels_file, require_masks, seen))
    return problems


def _check_one(root, split, iid, nc, mdirs, labels, labels_file, require_masks, seen) -> list[Problem]:
    out: list[Problem] = []
    try:
        validate_id(iid)
    except DataError as e:
        return [Problem("bad_id", str(e), split, iid)]
    if iid in seen:
        out.append(Problem("duplicate_id", "listed more than once", split, iid))
    seen.add(iid)

    img_path = next((root / "JPEGImages" / f"{iid}{e}" for e in IMAGE_EXTS
                     if (root / "JPEGImages" / f"{iid}{e}").is_file()), None)
    hw = None
    if img_path is None:
        out.append(Problem("missing_image", "listed but has no image file", split, iid,
                           str(root / "JPEGImages" / f"{iid}.jpg")))
    else:
        try:
            with Image.open(img_path) as im:
                im.load()
                hw = (im.size[1], im.size[0])
        except Exception as e:  # noqa: BLE001
            out.append(Problem("unreadable_image", f"cannot decode: {e}", split, iid, str(img_path)))

    mask_path = next((root / d / f"{iid}.png" for d in mdirs if (root / d / f"{iid}.png").is_file()), None)
    mask = None
    if mask_path is None:
        if require_masks:
            out.append(Problem("missing_mask", "no mask file", split, iid, str(root / mdirs[0] / f"{iid}.png")))
    else:
        try:
            mask = read_mask_file(mask_path)
        except DataError as e:
            out.append(Problem("unreadable_mask", str(e), split, iid, str(mask_path)))
    if mask is not None:
        if hw is not None and mask.shape != hw:
            out.append(Problem("size_mismatch", f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {hw[0]}x{hw[1]}",
                               split, iid, str(mask_path)))
        bad = np.unique(mask[(mask >= nc) & (mask != 255)])
        if bad.size:
            out.append(Problem("bad_label", f"class values {[int(b) for b in bad]} outside 0..{nc - 1} (255 = ignore)",
                               split, iid, str(mask_path)))

    if labels is not None:
        tags = lookup_tags(labels, iid)
        if tags is None:
            out.append(Problem("missing_tags", "no entry in the labels file", split, iid, str(labels_file)))
        else:
            bad_t = [c for c in tags if not 1 <= c < nc]
            if bad_t:
                out.append(Problem("bad_tag", f"tags {bad_t} outside 1..{nc - 1}", split, iid, str(labels_file)))
            elif mask is not None:
                from_mask = sorted(int(c) for c in np.unique(mask) if c != 0 and c != 255 and c < nc)
                if sorted(tags) != from_mask:
                    out.append(Problem("tag_mismatch", f"labels file says {sorted(tags)}, mask has {from_mask}",
                                       split, iid, str(labels_file)))
    return out


def format_problems(problems: list[Problem], limit: int | None = None) -> str:
    """Human-readable listing: a count per kind, then one line per problem."""
    if not problems:
        return "no problems"
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    head = f"{len(problems)} problem(s): " + ", ".join(f"{k} {v}" for k, v in counts.items())
    shown = problems if limit is None else problems[:limit]
    lines = [head] + [f"  {p}" for p in shown]
    if limit is not None and len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


__all__ = ["Problem", "check_dataset", "format_problems", "KINDS"]

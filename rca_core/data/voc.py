"""Reader for data sets in PASCAL VOC layout (VOC 2012 + SBD train_aug, the demo tree, converted COCO).

    root/JPEGImages/{id}.jpg
    root/SegmentationClassAug/{id}.png     grey PNG, value = class id, 255 = ignore
    root/SegmentationClass/{id}.png        palette PNG, index = class id, 255 = ignore
    root/ImageSets/Segmentation/{split}.txt  one id per line
    root/labels.json (optional)            {id: [class ids]}; or a cls_labels.npy given as labels_file

The root may be a local path or a URL (s3://bucket/VOC2012, ...): every file is read through the
project's I/O layer (rca_core.storage), so a worker on a node that cannot see the driver's disk reads
the same tree. Each image folder is listed once (not one existence check per image).
Errors name the file, the image id and the offending value (DataError).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from rca_core import storage
from rca_core.object_io import StorageUnavailable
from rca_core.config.data import VOC_CLASSES

from .palette import PALETTE

MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A problem with a data set file or entry; the message names the file / image id."""


def validate_id(image_id: str, source: str = "") -> str:
    """An image id must be a plain file stem: no path separators, no '..', no NUL, not empty."""
    where = f" (in {source})" if source else ""
    if not image_id or image_id != image_id.strip():
        raise DataError(f"bad image id {image_id!r}{where}: empty or surrounded by whitespace")
    for bad in ("..", "/", "\\", "\x00"):
        if bad in image_id:
            raise DataError(f"bad image id {image_id!r}{where}: contains {bad!r}")
    return image_id


_LIST_LINE = re.compile(r"^/?JPEGImages/(?P<id>[^/\s]+)\.(jpg|jpeg|png)(\s+\S+)?$")


def parse_split_line(line: str) -> str:
    """'2007_000032' or the DeepLab list form '/JPEGImages/2007_000032.jpg /SegmentationClassAug/...'."""
    line = line.strip()
    m = _LIST_LINE.match(line)
    return m.group("id") if m else line


def _text(location: str, opts=None) -> str | None:
    """A text file's content through the I/O layer, None when it does not exist."""
    try:
        return storage.read_bytes(location, opts).decode()
    except FileNotFoundError:
        return None


def read_split(root: str | Path, split: str, storage_options=None) -> list[str]:
    """Ids of ImageSets/Segmentation/{split}.txt (raw, not validated)."""
    path = storage.join(str(root), "ImageSets", "Segmentation", f"{split}.txt")
    text = _text(path, storage_options)
    if text is None:
        raise DataError(f"split file not found: {path}")
    return [parse_split_line(ln) for ln in text.splitlines() if ln.strip()]


def default_class_names(root: str | Path, num_classes: int, storage_options=None) -> list[str]:
    """Names from root/meta.json when it has the right count, VOC names for 21 classes, else class{i}."""
    text = _text(storage.join(str(root), "meta.json"), storage_options)
    if text is not None:
        try:
            names = json.loads(text).get("class_names")
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
        except ValueError:
            pass
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]


def load_labels_file(path: str | Path, num_classes: int, storage_options=None) -> dict[str, list[int]]:
    """Image-level tags: a JSON {id: [class ids]} or IRN's cls_labels.npy {id: multi-hot over fg classes}.

    cls_labels.npy keys may be strings or IRN's integer form of the id (underscores removed); integer
    keys are stored as their decimal string and matched by `lookup_tags`. `path` may be a URL.
    """
    try:
        data = storage.read_bytes(path, storage_options)
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"labels file not found: {path}") from None
    suffix = Path(str(path)).suffix
    out: dict[str, list[int]] = {}
    if suffix == ".json":
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise DataError(f"labels file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise DataError(f"labels file {path}: expected an object {{id: [class ids]}}")
        for k, v in raw.items():
            if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in v):
                raise DataError(f"labels file {path}: entry {k!r} must be a list of integer class ids, got {v!r}")
            out[str(k)] = sorted(set(v))
    elif suffix == ".npy":
        try:
            raw = np.load(io.BytesIO(data), allow_pickle=True)  # IRN stores a pickled dict; only load files you trust
            raw = raw.item() if raw.dtype == object and raw.shape == () else raw
        except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
            raise DataError(f"cannot read labels file {path}: {e}") from None
        if not isinstance(raw, dict):
            raise DataError(f"labels file {path}: expected a dict {{id: multi-hot vector}} (IRN cls_labels.npy)")
        for k, v in raw.items():
            vec = np.asarray(v).reshape(-1)
            if vec.size != num_classes - 1:
                raise DataError(f"labels file {path}: entry {k!r} has {vec.size} values, expected {num_classes - 1} "
                                f"(one per foreground class)")
            out[str(k)] = [int(j) + 1 for j in np.nonzero(vec > 0.5)[0]]
    else:
        raise DataError(f"labels file {path}: unknown format (use .json or IRN's cls_labels.npy)")
    return out


def lookup_tags(labels: dict[str, list[int]], image_id: str) -> list[int] | None:
    if image_id in labels:
        return labels[image_id]
    key = image_id.replace("_", "")
    if key.isdigit():  # IRN's integer keys
        return labels.get(str(int(key)))
    return None


def read_mask_file(path, fileobj=None) -> np.ndarray:
    """A label PNG as uint8 (H, W): palette index ('P'), grey value ('L'), or VOC colour ('RGB').
    `fileobj`: an open file to read instead of `path` (which then only names it in errors)."""
    try:
        with Image.open(fileobj if fileobj is not None else path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            if mode == "RGB":
                rgb = np.asarray(im)
            else:
                raise DataError(f"mask {path}: unsupported PNG mode {mode} (expected P, L or RGB)")
    except (DataError, StorageUnavailable):
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read mask {path}: {e}") from None
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal = (PALETTE[:, 0].astype(np.int32) << 16) | (PALETTE[:, 1].astype(np.int32) << 8) | PALETTE[:, 2]
    lut = {int(c): i for i, c in reversed(list(enumerate(pal)))}
    uniq, inv = np.unique(code, return_inverse=True)
    idx = []
    for c in uniq:
        if int(c) not in lut:
            raise DataError(f"mask {path}: colour {((c >> 16) & 255, (c >> 8) & 255, c & 255)} is not a VOC palette colour")
        idx.append(lut[int(c)])
    return np.array(idx, np.uint8)[inv.reshape(code.shape)]


class VOCDataset:
    """One split of a VOC-layout tree (local path or URL). See docs/architecture.md (Data API)."""

    def __init__(self, root: str | Path, split: str = "train", num_classes: int = 21,
                 class_names: list[str] | None = None, mask_dir: str = "auto",
                 labels_file: str | Path | None = None, max_images: int | None = None,
                 check_files: bool = True, storage_options=None):
        self.location = str(root)
        self.is_remote = storage.is_url(self.location)
        self.root = self.location if self.is_remote else Path(storage.local_path(self.location))
        self.storage_options = storage_options
        self.fs, self._root = storage.filesystem(self.location, storage_options)
        self.split = split
        self.num_classes = int(num_classes)
        if mask_dir not in ("auto",) + MASK_DIRS:
            raise DataError(f"mask_dir must be auto, SegmentationClassAug or SegmentationClass, got {mask_dir!r}")
        self.mask_dir = mask_dir
        if not storage.is_dir(self.location, storage_options):
            raise DataError(f"data set root not found: {self.location} (from host {storage.host()})")
        self.class_names = (list(class_names) if class_names
                            else default_class_names(self.location, self.num_classes, storage_options))
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{len(self.class_names)} class names given for {self.num_classes} classes")
        split_file = self._uri("ImageSets", "Segmentation", f"{split}.txt")
        ids = read_split(self.location, split, storage_options)
        for i in ids:
            validate_id(i, split_file)
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        if dup:
            raise DataError(f"image id {dup[0]!r} is listed twice in {split_file}")
        if max_images is not None:
            ids = ids[:max_images]
        self.ids: list[str] = ids
        self._listings: dict[str, dict[str, str]] = {}
        self._prefetched: dict = {}
        self._sizes: dict[str, tuple[int, int]] = {}  # (H, W) of images read or measured so far
        if check_files:
            for i in ids:
                self.image_path(i)
        if labels_file is None and self.fs.exists(self._path("labels.json")):
            labels_file = self._uri("labels.json")
        self.labels_file = labels_file if labels_file is None or storage.is_url(str(labels_file)) else Path(labels_file)
        self._labels = (load_labels_file(self.labels_file, self.num_classes, storage_options)
                        if self.labels_file else None)
        self._tags: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCDataset({self.location!r}, split={self.split!r}, n={len(self.ids)}, num_classes={self.num_classes})"

    def __getstate__(self):  # picklable for DataLoader workers: the file system is rebuilt from the URL
        d = dict(self.__dict__)
        d.pop("fs", None)
        d["_prefetched"] = {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.fs, _ = storage.filesystem(self.location, self.storage_options)

    def _path(self, *parts: str) -> str:
        return storage.join(self._root, *parts)

    def _uri(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def _listing(self, folder: str) -> dict[str, str]:
        """{file name: path in fs} of one folder, listed once (one request on object storage)."""
        if folder not in self._listings:
            try:
                names = self.fs.ls(self._path(folder), detail=False)
            except (FileNotFoundError, NotADirectoryError):
                names = []
            self._listings[folder] = {str(n).rstrip("/").rsplit("/", 1)[-1]: str(n) for n in names}
        return self._listings[folder]

    def _display(self, fs_path: str) -> str:
        return fs_path if not self.is_remote else f"{self.location.split('://', 1)[0]}://{fs_path}"

    def _id(self, i) -> str:
        if isinstance(i, (int, np.integer)):
            return self.ids[int(i)]
        return validate_id(str(i))

    # --------------------------------------------------------------------------------- paths
    def image_path(self, i) -> Path | str:
        """The image file: a Path for a local tree, a URL for a remote one."""
        iid = self._id(i)
        listing = self._listing("JPEGImages")
        for ext in IMAGE_EXTS:
            p = listing.get(f"{iid}{ext}")
            if p is not None:
                return Path(p) if not self.is_remote else self._display(p)
        raise DataError(f"image {iid!r} listed in split {self.split!r} has no file: "
                        f"{self._uri('JPEGImages', iid + '.jpg')} not found")

    def mask_path(self, i) -> Path | str:
        iid = self._id(i)
        dirs = MASK_DIRS if self.mask_dir == "auto" else (self.mask_dir,)
        for d in dirs:
            p = self._listing(d).get(f"{iid}.png")
            if p is not None:
                return Path(p) if not self.is_remote else self._display(p)
        tried = ", ".join(self._uri(d, f"{iid}.png") for d in dirs)
        raise DataError(f"no mask for image {iid!r}: tried {tried}")

    def has_mask(self, i) -> bool:
        try:
            self.mask_path(i)
            return True
        except DataError:
            return False

    def _open(self, path):
        """A readable file: local files opened in place; a remote file fetched whole into memory with one GET
        (storage.fetch; fsspec's open asks for the object's size first: a HEAD, then the GET)."""
        if not self.is_remote:
            return open(path, "rb")
        return io.BytesIO(storage.fetch(self.fs, str(path).split("://", 1)[1], self.location, self.storage_options))

    # ---------------------------------------------------------------------------------- data
    def prefetch(self, kind: str, image_id: str, executor) -> None:
        """Start decoding an image ('image') or reading its mask ('mask') on `executor`; the next call of
        image()/mask() for that id returns the result (I/O and decoding overlap with compute)."""
        key = (kind, image_id)
        if key not in self._prefetched:
            fn = self._read_image if kind == "image" else self._read_mask
            self._prefetched[key] = executor.submit(fn, image_id)

    def drop_prefetched(self) -> None:
        for f in self._prefetched.values():
            f.cancel()
        self._prefetched = {}

    def image(self, i) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        fut = self._prefetched.pop(("image", self._id(i)), None) if self._prefetched else None
        if fut is not None:
            return fut.result()
        return self._read_image(i)

    def _read_image(self, i) -> np.ndarray:
        path = self.image_path(i)
        try:
            with self._open(path) as f, Image.open(f) as im:
                im.load()  # decode now: a truncated file fails here
                out = np.array(im.convert("RGB"), dtype=np.uint8)
        except StorageUnavailable:  # the store did not answer: not a bad image
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {self._id(i)!r} ({path}): {e}") from None
        self._sizes[self._id(i)] = out.shape[:2]
        return out

    def size(self, i) -> tuple[int, int]:
        """(H, W) from the image header, without decoding (remembered from a decoded image: the mask check of an
        image just read costs no second read)."""
        iid = self._id(i)
        if iid in self._sizes:
            return self._sizes[iid]
        path = self.image_path(i)
        try:
            with self._open(path) as f, Image.open(f) as im:
                w, h = im.size
        except StorageUnavailable:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {iid!r} ({path}): {e}") from None
        self._sizes[iid] = (h, w)
        return h, w

    def mask(self, i) -> np.ndarray:
        """(H, W) uint8 class ids, 255 = ignore. Checked against the image size and the class list."""
        iid = self._id(i)
        fut = self._prefetched.pop(("mask", iid), None) if self._prefetched else None
        m, path = fut.result() if fut is not None else self._read_mask(iid)
        # checked here, not on the prefetch thread: the image is usually decoded by now, so its size is known
        # without reading it again
        hw = self.size(iid)
        if m.shape != hw:
            raise DataError(f"mask of image {iid!r} ({path}) is {m.shape[0]}x{m.shape[1]} but the image is {hw[0]}x{hw[1]}")
        return m

    def _read_mask(self, i) -> tuple[np.ndarray, str | Path]:
        """(the mask, checked against the class list; its path)."""
        iid = self._id(i)
        path = self.mask_path(iid)
        try:
            f = self._open(path)
        except OSError as e:
            raise DataError(f"cannot read mask {path}: {e}") from None
        with f:
            m = read_mask_file(path, f)
        bad = np.unique(m[(m >= self.num_classes) & (m != 255)])
        if bad.size:
            raise DataError(f"mask of image {iid!r} ({path}) has class value {int(bad[0])} outside "
                            f"0..{self.num_classes - 1} (and not 255 = ignore)")
        return m, path

    def tags(self, i) -> list[int]:
        """Foreground class ids (1-based) present in the image: from the labels file, else the mask."""
        iid = self._id(i)
        if iid in self._tags:
            return list(self._tags[iid])
        if self._labels is not None:
            t = lookup_tags(self._labels, iid)
            if t is None:
                raise DataError(f"image {iid!r} has no entry in labels file {self.labels_file}")
            bad = [c for c in t if not 1 <= c < self.num_classes]
            if bad:
                raise DataError(f"labels file {self.labels_file}: image {iid!r} has tag {bad[0]} outside "
                                f"1..{self.num_classes - 1}")
        else:
            t = [int(c) for c in np.unique(self.mask(iid)) if c not in (0, 255)]
        self._tags[iid] = list(t)
        return list(t)

    def tag_vector(self, i) -> np.ndarray:
        """Multi-hot float32 over the C-1 foreground classes (logit j <-> class j+1)."""
        v = np.zeros(self.num_classes - 1, np.float32)
        for c in self.tags(i):
            v[c - 1] = 1.0
        return v


__all__ = ["VOCDataset", "DataError", "validate_id", "read_split", "load_labels_file", "read_mask_file",
           "default_class_names", "MASK_DIRS"]

"""Segmenter inference: load a checkpoint, predict label maps (multi-scale + flip), predict a folder.

- `load_segmenter(checkpoint, device)` -> (model in eval mode, meta). The checkpoint (seg_train's
  `segmenter.pt`, or its training `checkpoint.pt`) carries the metadata (arch, backbone, num_classes,
  class names, normalisation), so nothing else is needed. Loaded with torch.load(weights_only=True).
- `Predictor(model, meta, device, scales, flip)`: `.probs(batch)` -> class probabilities averaged over
  scales (and horizontal flips) at the input size; `.predict(batch)` -> uint8 label maps.
- `predict_folder(checkpoint, inputs, out_dir, batch_size, device)`: every readable image of a
  folder (or of a list of files) -> `out_dir/masks/{stem}.png` (VOC palette PNG) and
  `out_dir/overlays/{stem}.png` (colour overlay). Images are batched by size (same-size images share a
  batch, so a prediction does not depend on its batch mates), on the GPU when present. An unreadable,
  missing or corrupt image is reported by name in the returned error list; the others are still written.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rca_core.data.palette import overlay, save_palette_png
from rca_core.device import pick_device
from rca_core.models.deeplab import build_from_meta

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}


class CheckpointError(ValueError):
    """A segmenter checkpoint that is missing, unreadable, or lacks the metadata to rebuild the model."""


def _as_device(device: str | torch.device | None) -> torch.device:
    if device is None or (isinstance(device, str) and device in ("auto", "cpu", "cuda")):
        return pick_device(device or "auto")
    return torch.device(device)


def load_segmenter(checkpoint, device: str | torch.device | None = None):
    """(model in eval mode on `device`, meta dict) from a segmenter checkpoint: a local file, a URL or a
    store file (rca_core.storage.FileRef)."""
    from rca_core import storage
    from rca_core.train_utils import load_torch

    ref = checkpoint if isinstance(checkpoint, storage.FileRef) else storage.file_ref(checkpoint)
    path = ref.uri
    if not ref.exists():
        raise CheckpointError(f"segmenter checkpoint not found: {path}")
    try:
        obj = load_torch(ref)
    except Exception as e:
        raise CheckpointError(f"segmenter checkpoint {path} could not be read: {type(e).__name__}: {e}") from e
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if meta is None and isinstance(obj, dict):
        meta = (obj.get("extra") or {}).get("meta")
    if not isinstance(meta, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a segmenter checkpoint (no 'model' weights and 'meta' with the "
                              "architecture); use seg_train's segmenter.pt")
    model = build_from_meta(meta)
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit the {meta.get('arch')} model it describes: {e}") from e
    dev = _as_device(device)
    return model.to(dev).eval(), meta


class Predictor:
    """Batched inference with optional multi-scale + flip averaging of softmax probabilities."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device | str | None = None,
                 scales: Sequence[float] = (1.0,), flip: bool = False):
        self.device = _as_device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.num_classes = int(meta["num_classes"])
        self.scales = [float(s) for s in scales]
        self.flip = bool(flip)
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def _to_tensor(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = images if images.ndim == 4 else images[None]
            if not images.flags.writeable:
                images = images.copy()
            images = torch.from_numpy(images)
        x = images.to(self.device)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div_(255.0)   # (B, H, W, 3) uint8 -> (B, 3, H, W) float
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def probs(self, images) -> torch.Tensor:
        """(B, H, W, 3) uint8 (numpy or tensor) -> (B, C, H, W) float probabilities on self.device."""
        x = self._to_tensor(images)
        size = x.shape[-2:]
        total = torch.zeros((x.shape[0], self.num_classes) + tuple(size), device=self.device)
        n = 0
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                  recompute_scale_factor=False)
            views = [(xs, False)] + ([(xs.flip(-1), True)] if self.flip else [])
            for v, flipped in views:
                logits = self.model(v)
                if flipped:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != size:
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                total += logits.float().softmax(1)
                n += 1
        return total / n

    def predict(self, images) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H, W) uint8 label maps."""
        return self.probs(images).argmax(1).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- folders
def list_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Image files of a folder (by extension, sorted) or of a list of files and/or folders; plus an error
    for every path that does not exist. A folder given on its own must hold at least one image."""
    errors: list[str] = []
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        if p.is_dir():
            files = _folder_images(p)
            if not files:
                raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {p}")
            return files, errors
        inputs = [p]
    files = []
    for f in inputs:
        f = Path(f)
        if f.is_dir():
            found = _folder_images(f)
            files.extend(found)
            if not found:
                errors.append(f"{f}: folder holds no image files")
        elif f.is_file():
            files.append(f)
        else:
            errors.append(f"{f}: file not found")
    return files, errors


def _folder_images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; raises ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()  # decode fully: truncated files fail here, not later
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _output_names(files: list[Path]) -> dict[Path, str]:
    """Output stem per input; inputs sharing a stem (a.jpg, a.png) keep their extension in the name."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    return {f: (f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.')}") for f in files}


def predict_folder(checkpoint: str | os.PathLike, inputs, out_dir: str | os.PathLike, batch_size: int = 8,
                   device: str | torch.device | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                   overlays: bool = True, show_progress: bool = True) -> list[str]:
    """Predict every image of `inputs` (a folder or a list of files) into `out_dir`; returns the errors.

    Writes `out_dir/masks/{stem}.png` (palette PNG) and, with `overlays`, `out_dir/overlays/{stem}.png`.
    Each error names the file ("path: reason"); every other image is still processed.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files, errors = list_inputs(inputs)
    model, meta = load_segmenter(checkpoint, device)
    pred = Predictor(model, meta, device, scales, flip)
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    names = _output_names(files)
    buckets: "OrderedDict[tuple, list[tuple[Path, np.ndarray]]]" = OrderedDict()
    bar = tqdm(total=len(files), desc="predict", disable=not show_progress, leave=False)

    def run(items: list[tuple[Path, np.ndarray]]) -> None:
        labels = pred.predict(np.stack([img for _, img in items]))
        for (f, img), lab in zip(items, labels):
            try:
                save_palette_png(lab, out / "masks" / f"{names[f]}.png")
                if overlays:
                    Image.fromarray(overlay(img, lab)).save(out / "overlays" / f"{names[f]}.png")
            except OSError as e:
                errors.append(f"{f}: cannot write output ({type(e).__name__}: {e})")
        bar.update(len(items))

    pending = 0
    for f in files:
        try:
            img = read_image(f)
        except ValueError as e:
            errors.append(str(e))
            bar.update(1)
            continue
        key = img.shape
        buckets.setdefault(key, []).append((f, img))
        pending += 1
        if len(buckets[key]) == batch_size:
            pending -= len(buckets[key])
            run(buckets.pop(key))
        elif pending > 4 * batch_size:  # many different sizes: flush the fullest bucket to bound memory
            key = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[key])
            run(buckets.pop(key))
    for items in buckets.values():
        run(items)
    bar.close()
    return errors


__all__ = ["CheckpointError", "load_segmenter", "Predictor", "predict_folder", "list_inputs", "read_image",
           "IMAGE_EXTENSIONS"]

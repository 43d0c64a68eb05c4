"""Stage cam_import (cam.source: external): CAMs made by another method, imported once into the store.

Reads `<cam.external.dir>/<image_id>.npy` for every training image: a dict saved with np.save, as IRN's
make_cam.py writes it - "keys" (the CAM's classes as 0-based foreground indices, cam.external.keys_base) and
the (n_keys, H, W) image-resolution CAMs under cam.external.field ("high_res"; CLIP-ES: "attn_highres").
Each file is checked: present and readable, its classes equal the image's tags, its shape (n_tags, H, W) the
image's size, its values finite and in [0, 1]. A bad file is named with what is wrong, and every bad file of
the run is listed when the stage ends (it then fails); the good images are kept, so a re-run after the files
are mended imports only the rest. Output: the same `cam` field as cam_infer (max-normalised per class,
stored as cam_infer.dtype, attrs `classes`).

Files are read with np.load(allow_pickle=True) (IRN's dict format needs it): import only files you made.
"""
from __future__ import annotations

import io

import numpy as np

from rca_core import storage
from rca_core.cam_ops import encode_cam

TOLERANCE = 1e-3  # float16 CAMs (CLIP-ES) may round a little past 1


def check(obj, image_id: str, tags: list[int], size: tuple[int, int], field: str, keys_base: int) -> np.ndarray:
    """The (n_tags, H, W) float32 CAMs of a loaded file, in tag order, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict with 'keys' and {field!r} (IRN's make_cam.py layout), got "
                         f"{type(obj).__name__}")
    missing = [k for k in ("keys", field) if k not in obj]
    if missing:
        raise ValueError(f"no {' or '.join(repr(m) for m in missing)} entry (entries: {sorted(obj)}; "
                         f"cam.external.field names the CAM entry)")
    keys = [int(k) + (1 - keys_base) for k in np.asarray(obj["keys"]).reshape(-1)]
    if sorted(keys) != sorted(tags) or len(set(keys)) != len(keys):
        raise ValueError(f"its classes {keys} (keys {np.asarray(obj['keys']).tolist()}, cam.external.keys_base "
                         f"{keys_base}) are not the image's tags {sorted(tags)}")
    cam = np.asarray(obj[field])
    want = (len(keys), *size)
    if cam.shape != want:
        raise ValueError(f"{field!r} has shape {cam.shape}, expected (n_keys, H, W) = {want} (the image's size)")
    cam = cam.astype(np.float32)
    if not np.isfinite(cam).all():
        raise ValueError(f"{field!r} holds NaN or infinite values")
    if cam.size and (cam.min() < -TOLERANCE or cam.max() > 1 + TOLERANCE):
        raise ValueError(f"{field!r} values run from {cam.min():.4g} to {cam.max():.4g}; expected CAMs in [0, 1] "
                         f"(max-normalised per class, as IRN's make_cam.py writes them)")
    order = np.argsort(keys)
    return np.clip(cam[order], 0, 1)


class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.ext = cfg.cam.external
        self.problems: list[str] = []

    def path(self, image_id: str) -> str:
        return storage.join(self.ext.dir, f"{image_id}.npy")

    def process(self, image_id: str) -> dict:
        ds = self.ctx.dataset
        tags = sorted(set(int(t) for t in ds.tags(image_id)))
        path = self.path(image_id)
        try:
            try:
                data = storage.read_bytes(path, self.cfg.storage)
            except (FileNotFoundError, IsADirectoryError):
                raise ValueError("file not found") from None
            try:
                obj = np.load(io.BytesIO(data), allow_pickle=True)
                obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
            except Exception as e:  # noqa: BLE001 - any unreadable file: say so
                raise ValueError(f"not a readable .npy file ({type(e).__name__}: {e})") from None
            cam = check(obj, image_id, tags, tuple(ds.size(image_id)), self.ext.field, self.ext.keys_base)
        except ValueError as e:
            self.problems.append(f"{path}: {e}")
            return {"bad": 1}
        self.ctx.out.write(image_id, {"cam": encode_cam(cam, self.cfg.cam_infer.dtype)}, attrs={"classes": tags})
        return {"n_classes": len(tags)}

    def partial(self) -> list[str]:
        out, self.problems = self.problems, []
        return out


class ExternalCamError(ValueError):
    """Some of the external CAM files are missing or bad (every one is named)."""


def finalize(cfg, ctx, parts: list | None = None) -> dict:
    problems = [p for part in parts or [] for p in (part or [])]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ExternalCamError(f"cam_import: {len(problems)} of {len(ctx.ids)} CAM files in {cfg.cam.external.dir} "
                               f"are missing or bad (the other images are imported and kept):\n  {shown}")
    return {"source": cfg.cam.external.dir, "field": cfg.cam.external.field, "dtype": cfg.cam_infer.dtype}

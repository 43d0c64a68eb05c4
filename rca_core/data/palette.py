"""The PASCAL VOC colour palette: palette PNG export and colourised overlays of label maps."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 VOC colours: the bit-interleaving scheme of the VOC devkit (255 -> 224,224,192)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


PALETTE = voc_palette()


def _palette_image(mask: np.ndarray, what: str) -> Image.Image:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask for {what} must be 2-D, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask for {what} has values outside 0..255")
        mask = mask.astype(np.uint8)
    mask = np.ascontiguousarray(mask)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    im.putpalette(PALETTE.tobytes())
    return im


def palette_png_bytes(mask: np.ndarray) -> bytes:
    """A uint8 label map as the bytes of a palette ('P' mode) PNG with the VOC colours."""
    buf = io.BytesIO()
    _palette_image(mask, "a PNG").save(buf, format="PNG")
    return buf.getvalue()


def save_palette_png(mask: np.ndarray, path: str | Path, atomic: bool = False) -> None:
    """Write a uint8 label map as a palette ('P' mode) PNG with the VOC colours."""
    im = _palette_image(mask, str(path))
    path = Path(path)
    if atomic:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    else:
        im.save(path, format="PNG")


def colourise(mask: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 RGB in VOC colours."""
    return PALETTE[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over an RGB image (background 0 left untouched)."""
    col = colourise(mask).astype(np.float32)
    img = np.asarray(image, np.float32)
    a = np.where((np.asarray(mask) > 0)[..., None], alpha, 0.0)
    return np.clip(img * (1 - a) + col * a, 0, 255).astype(np.uint8)


__all__ = ["PALETTE", "voc_palette", "save_palette_png", "palette_png_bytes", "colourise", "overlay"]

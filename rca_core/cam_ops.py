"""CAM operations: image normalisation, multi-scale + flip CAM inference, CAM -> label map.

`multiscale_cam` follows IRN (docs/method.md, CAM inference and evaluation): for each scale the image (and its horizontal
flip) goes through the network, the ReLU CAMs of the image's ground-truth classes are upsampled
(bilinear) to the output size, the flipped one is flipped back, and everything is summed; each
class is then divided by its maximum (so values lie in [0, 1]), at image resolution (the random walk
downsamples it to its feature grid itself). `encode_cam`/`decode_cam`: the stored form (float16 or uint8).
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize_image(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W), ImageNet mean/std."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    return ((img.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy()


def tags_to_indices(tags: list[int], num_classes: int) -> list[int]:
    """1-based foreground class ids -> 0-based channel indices, checked."""
    for t in tags:
        if not 1 <= int(t) < num_classes:
            raise ValueError(f"tag {t} outside the foreground classes 1..{num_classes - 1}")
    return [int(t) - 1 for t in sorted(set(int(t) for t in tags))]


@torch.no_grad()
def multiscale_cam(model, img: np.ndarray, channels: list[int], scales: list[float], flip: bool = True,
                   device: torch.device | str = "cpu", cam_fn=None) -> np.ndarray:
    """CAMs of `channels` for one image -> (n, H, W) float32 in [0, 1], each class max-normalised.

    `cam_fn(batch) -> (B, n_fg, h, w)` ReLU CAMs; default `model.cam_maps`.
    """
    h, w = img.shape[:2]
    n = len(channels)
    cam_fn = cam_fn or model.cam_maps
    x = torch.from_numpy(normalize_image(img)).unsqueeze(0).to(device)
    acc = torch.zeros(n, h, w, device=device)
    if n == 0:
        return acc.cpu().numpy()
    idx = torch.tensor(channels, device=device)
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        cams = cam_fn(batch)[:, idx].float()
        if flip:
            cams = cams[:1] + cams[1:].flip(-1)
        acc += F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)[0]
    acc = acc / (acc.flatten(1).max(1).values.view(n, 1, 1) + 1e-5)
    return acc.cpu().numpy()


def encode_cam(cam: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """A [0, 1] CAM as stored: float16, or uint8 = round(255 * cam)."""
    if dtype == "uint8":  # = np.rint(np.clip(cam, 0, 1) * 255), in one float32 buffer (a quarter less time)
        t = np.multiply(cam, np.float32(255.0), dtype=np.float32)
        np.clip(t, 0.0, 255.0, out=t)
        np.rint(t, out=t)
        return t.astype(np.uint8)
    if dtype == "float16":
        return cam.astype(np.float16)
    raise ValueError(f"cam_infer.dtype must be float16 or uint8, got {dtype!r}")


_INV_255 = float(np.float32(1.0 / 255.0))


def decode_cam(stored: np.ndarray) -> np.ndarray:
    """A stored CAM (float16 or uint8) as float32 in [0, 1]."""
    if stored.dtype == np.uint8:  # float32(x) * float32(1/255) as numpy computes it, in one vectorised pass (torch)
        t = torch.from_numpy(np.ascontiguousarray(stored)) if stored.flags.writeable else torch.tensor(stored)
        return t.to(torch.float32).mul_(_INV_255).numpy()
    return stored.astype(np.float32)


"""Device choice (CUDA when present and asked for, else CPU) and the networks' fast paths on it (`FastPath`:
autocast precision, channels-last), one object the stages and the training loop ask."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FastPath:
    """How a stage runs its networks on `device`: `precision` "fp32" | "bf16" | "fp16" (torch.autocast around the
    forward passes; losses and every result leave it as float32) and `channels_last` (the model's memory format)."""
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    def autocast(self):
        """The networks' forward passes (and a training step's loss) run inside this."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this path's memory format (in place: parameters keep their identity)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def grad_scaler(self):
        """A GradScaler for fp16 training (bf16 and fp32 need none), else None."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None


def fast_path(compute, device: torch.device | str) -> FastPath:
    """The FastPath of a `compute` config section on `device`: precision auto = bf16 on a GPU that supports it,
    fp16 on an older one, fp32 on CPU; channels_last auto = on."""
    device = torch.device(device)
    precision = getattr(compute, "precision", "auto")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("compute.precision fp16 runs on GPUs only; on CPU use bf16 or fp32")
    return FastPath(device, precision, getattr(compute, "channels_last", "auto") != "off")

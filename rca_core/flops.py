"""FLOPs of a stage's model calls and the machine's matmul peak: what a stage's achieved GFLOP/s is measured against.

- `counting()`: a context that counts the FLOPs of the torch operations run inside it (torch.utils.flop_counter:
  convolutions, matmuls, their backward; elementwise and sparse work count zero), in the calling thread and in
  autograd's.
  Its overhead is per operation (Python dispatch), not per FLOP: ~3-5 % of a ResNet-50 forward at VOC size on
  one CPU thread, so the runner and the training loop count a sample (the first images, the first step).
- `matmul_peak_gflops(device)`: GFLOP/s of the fastest of repeated n x n float32 GEMMs on `device` with this
  process's torch threads, as `torch.mm` and as the same GEMM in a 1x1 channels-last convolution (on CPU oneDNN's
  convolution kernels can beat torch.mm's BLAS, and the networks run on them); measured once per (device, dtype,
  threads) and cached: the practical peak of this worker (the threads its stage runs on), not a data-sheet figure.
- `utilisation(...)`: the summary keys every stage reports (gflop, gflop_per_s, peak_gflop_per_s, flop_utilisation).
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

_PEAK: dict[tuple, float] = {}


class FlopCount:
    """What `counting()` yields: `.flops` once the block has ended."""
    flops: float = 0.0

    @property
    def gflop(self) -> float:
        return self.flops / 1e9


def _dense_counter():
    """torch's FlopCounterMode, leaving out operations on sparse tensors: its formulas count a sparse x dense
    product as dense (the random walk's sparse transition matrix read as N x N would count ~100x its work)."""
    from torch.utils.flop_counter import FlopCounterMode

    class DenseFlopCounter(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            if any(isinstance(a, torch.Tensor) and a.layout != torch.strided for a in args):
                return out
            return super()._count_flops(func_packet, out, args, kwargs)

    return DenseFlopCounter(display=False)


@contextlib.contextmanager
def counting():
    """Count the FLOPs of the dense torch operations run in the block (sparse ones count zero)."""
    res = FlopCount()
    mode = _dense_counter()
    with mode:
        yield res
    res.flops = float(mode.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                       n: int | None = None, seconds: float = 0.25) -> float:
    """GFLOP/s of the fastest n x n GEMM in `dtype` on `device` with this process's torch threads, as torch.mm or
    as a 1x1 convolution (cached per device, dtype, threads and n)."""
    device = torch.device(device or "cpu")
    key = (str(device), dtype, torch.get_num_threads(), n)
    if key in _PEAK:
        return _PEAK[key]
    n = n or (2048 if device.type == "cpu" else 8192)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = torch.mm(a, b)
    # the same GEMM as a 1x1 convolution (channels-last): on CPU oneDNN's convolution kernels can beat torch.mm's
    # BLAS, and the networks' convolutions run on them
    xa = a.t().reshape(1, n, n, 1).contiguous(memory_format=torch.channels_last)
    wb = b.t().reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    for fn in (lambda: torch.mm(a, b, out=c), lambda: F.conv2d(xa, wb)):
        fn()  # warm-up: kernels chosen, memory touched
        _sync(device)
        reps, t_end = 0, time.perf_counter() + seconds / 2
        while reps < 3 or time.perf_counter() < t_end:
            t = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
            reps += 1
    # the fastest call: other work on the machine only ever slows one down
    _PEAK[key] = 2.0 * n ** 3 / best / 1e9
    return _PEAK[key]


def utilisation(gflop: float, seconds: float, peak_gflops: float | None) -> dict:
    """Summary keys: total GFLOP, achieved GFLOP/s per worker over `seconds` of its compute, the worker's measured
    matmul peak and the ratio (None where nothing was counted)."""
    rate = gflop / seconds if seconds > 0 and gflop > 0 else None
    return {"gflop": round(gflop, 1), "gflop_per_s": None if rate is None else round(rate, 1),
            "peak_gflop_per_s": None if not peak_gflops else round(peak_gflops, 1),
            "flop_utilisation": None if rate is None or not peak_gflops else round(rate / peak_gflops, 3)}


__all__ = ["FlopCount", "counting", "matmul_peak_gflops", "utilisation"]

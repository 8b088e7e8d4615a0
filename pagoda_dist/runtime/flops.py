"""FLOP accounting: model FLOPs per image (counted, not estimated) and model FLOPs utilisation (MFU).

Counting uses torch's FlopCounterMode, which counts matmuls, convolutions and attention (2 FLOPs per multiply-add)
and ignores cheap elementwise work, the usual convention for MFU. A training step is forward plus backward with
respect to the parameters (roughly 3x the forward for convolutions and linear layers).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

ForwardFn = Callable[[nn.Module, Tensor], Tensor]
"""How to call the model on an input batch x, e.g. lambda net, x: net(x, c_noise, cond)."""


def _plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _counted_flops(model: nn.Module, input_shape: tuple[int, ...], forward_fn: ForwardFn | None, batch_size: int,
                   backward: bool) -> float:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ref = next(model.parameters(), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    x = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    if backward and not params:
        raise ValueError("training FLOPs need parameters with requires_grad=True; this model has none")
    forward_fn = forward_fn or _plain_forward
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = forward_fn(model, x)
            if backward:
                # autograd.grad leaves the parameters' .grad untouched (a caller's accumulated gradients survive)
                torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
    return counter.get_total_flops() / batch_size


def forward_flops_per_image(model: nn.Module, input_shape: tuple[int, ...], forward_fn: ForwardFn | None = None,
                            batch_size: int = 2) -> float:
    """FLOPs of one forward pass per image; `input_shape` excludes the batch dimension, e.g. (3, 64, 64)."""
    return _counted_flops(model, input_shape, forward_fn, batch_size, backward=False)


def training_flops_per_image(model: nn.Module, input_shape: tuple[int, ...], forward_fn: ForwardFn | None = None,
                             batch_size: int = 2) -> float:
    """FLOPs of forward + backward (gradients of all trainable parameters) per image."""
    return _counted_flops(model, input_shape, forward_fn, batch_size, backward=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        size: int | None = None, repeats: int = 8, trials: int = 3) -> float:
    """Measured dense-matmul FLOP/s of this device and dtype (best of `trials`): the denominator of MFU.

    A measured peak, not the datasheet's: MFU against it says how much of what this machine actually delivers a
    training step uses. Takes about a second.
    """
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device).manual_seed(0)  # its own generator: a run's RNG stream must not depend on this
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up: kernel selection, allocation, clocks
    _synchronize(device)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * repeats / best


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (per device: pass per-device throughput)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return flops_per_image * images_per_s / peak_flops

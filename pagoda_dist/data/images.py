"""One place that turns the image batches the metrics accept into float tensors in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ImageBatch = Tensor | np.ndarray
"""NCHW images: uint8 in [0, 255], or floating point in `value_range` (the project's [-1, 1] by default)."""


def to_unit_range(images: ImageBatch, value_range: tuple[float, float] = (-1.0, 1.0),
                  name: str = "images") -> Tensor:
    """NCHW uint8 or float images -> float32 tensor in [0, 1] (floats are clamped: generators overshoot)."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected NCHW images with 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected uint8 or floating point images, got {x.dtype}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"{name}: value_range must be (low, high) with high > low, got {value_range}")
    return ((x.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def to_rgb(x: Tensor) -> Tensor:
    """Replicates a grey channel to RGB (ImageNet/CLIP feature networks expect three channels)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

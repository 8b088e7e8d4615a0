"""Stored pixels -> model tensors, and THE downsampling used wherever a lower resolution is derived from data.

Teacher training, precompute (inverting a base-resolution copy of each image), growth losses and evaluation
("real images downsampled the same way") must all derive low-resolution images identically: use `downsample`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_tensor(pixels: list[np.ndarray] | np.ndarray, resolution: int | None = None) -> Tensor:
    """uint8 images (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] (0 -> -1, 255 -> 1), optionally downsampled.

    Equal (to float rounding) to `downsample(to_tensor(pixels), resolution)` for integer factors, but done in
    numpy on the channels-last array: single-threaded and predictable inside DataLoader workers. The result is
    a channels-last view (the memory format the networks use), not a copy.
    """
    arr = np.stack(pixels) if isinstance(pixels, list) else np.asarray(pixels)
    x = arr.astype(np.float32)
    size = x.shape[1]
    if resolution is not None and resolution != size and size % resolution == 0:
        f = size // resolution
        b, c = x.shape[0], x.shape[3]
        # Rows then columns: two reductions over one middle axis run ~3x faster than one over axes (2, 4).
        x = x.reshape(b, resolution, f, size * c).sum(axis=2)
        x = x.reshape(b, resolution, resolution, f, c).sum(axis=3)
        x *= np.float32(1 / (f * f))
    x *= np.float32(1 / 127.5)
    x -= np.float32(1.0)
    out = torch.from_numpy(x).permute(0, 3, 1, 2)
    if resolution is not None and out.shape[-1] != resolution:
        out = downsample(out, resolution)
    return out


def to_uint8(images: Tensor) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded (inverse of `to_tensor`)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def downsample(images: Tensor, resolution: int) -> Tensor:
    """Antialiased downsampling of (B, C, H, W) to `resolution`.

    Integer factors (the normal case: powers of two) use a box filter: each output pixel is the mean of its
    factor x factor block, which has no ringing and keeps the mean colour exactly. Other sizes use
    antialiased bilinear interpolation.
    """
    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"downsample expects square images, got {tuple(images.shape[-2:])}")
    if resolution == size:
        return images
    if resolution > size:
        raise ValueError(f"cannot downsample {size}px images to a larger {resolution}px")
    if size % resolution == 0:
        return F.avg_pool2d(images, size // resolution)
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False)

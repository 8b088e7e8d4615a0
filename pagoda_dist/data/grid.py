"""PNG sample grids (the one grid writer used by every stage)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from pagoda_dist.data.images import ImageBatch, to_unit_range


def grid_array(images: ImageBatch, nrow: int | None = None, padding: int = 1,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(H, W, C) uint8 mosaic of NCHW images, `nrow` images per row (default: a square-ish grid), black gaps."""
    x = to_unit_range(images, value_range, "grid images")
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("a sample grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    rows = math.ceil(n / nrow)
    tiles = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.zeros((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        canvas[top:top + h, left:left + w] = tile
    return canvas


def save_grid(images: ImageBatch, target: str | Path | BinaryIO | None = None, nrow: int | None = None,
              padding: int = 1, value_range: tuple[float, float] = (-1.0, 1.0)) -> bytes:
    """Encodes NCHW images (floats in `value_range`, [-1, 1] by default, or uint8) as a PNG grid.

    Writes it to `target` (a local path or a binary file object) when given, and returns the PNG bytes either way,
    so callers can put them in object storage themselves.
    """
    canvas = grid_array(images, nrow, padding, value_range)
    image = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if isinstance(target, (str, Path)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(data)
    elif target is not None:
        target.write(data)
    return data

"""Small sets of real images for the core tests, straight from the builtin sources (no shards, no S3)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pagoda_dist.data.builtin import build


def real_images(name: str, count: int, resolution: int, *, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], shape (N, 3, r, r); class labels or -1) of the builtin dataset `name`."""
    # Fashion-MNIST's official split, or photo tiles with 20% of every photo's tiles held out: held-out tiles are
    # never training tiles, and look like them.
    source = build(name, resolution=max(resolution, 32), val_fraction=0.2, seed=0,
                   limit=None if split == "val" or name == "photo-tiles" else 4 * count)
    items = [item for item in source.items if item.split == split][:count]
    if len(items) < count:
        raise ValueError(f"{name} has only {len(items)} '{split}' images at {resolution}px; {count} were asked for")
    pixels = np.stack([np.broadcast_to(i.pixels[..., None], (*i.pixels.shape, 3)) if i.pixels.ndim == 2
                       else i.pixels for i in items])
    x = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = F.interpolate(x, size=resolution, mode="bilinear", antialias=True, align_corners=False)
    labels = torch.tensor([-1 if i.cls is None else i.cls for i in items])
    return x.clamp(-1, 1), labels

"""The image-quality report every stage writes: SWD per pyramid level plus FID-EffNetLite0, in one dict."""

from __future__ import annotations

import torch

from ..models.efficientnet_lite0 import EfficientNetLite0
from .fid import EFFNET_METRIC, FeatureStats, fid_effnet_lite0
from .images import ImageBatch
from .swd import swd


def image_metrics(real: ImageBatch, fake: ImageBatch, seed: int = 0, effnet: EfficientNetLite0 | None = None,
                  real_stats: FeatureStats | None = None, batch_size: int = 64,
                  value_range: tuple[float, float] = (-1.0, 1.0),
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """{"swd/<res>": ..., "swd/avg": ..., "FID-EffNetLite0": ...} for equally sized real and generated sets.

    `real_stats` (EfficientNet features of `real`, computed once) saves the real set's feature pass when a run
    evaluates against the same real images repeatedly. Measure the floor the same way: image_metrics(real, real2).
    """
    out = swd(real, fake, seed=seed, value_range=value_range).to_dict()
    reference = real_stats if real_stats is not None else real
    out[EFFNET_METRIC] = fid_effnet_lite0(reference, fake, batch_size, effnet, value_range, device)
    return out

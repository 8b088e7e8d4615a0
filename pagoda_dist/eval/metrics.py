"""The image-quality report of an image set against a reference set: SWD per pyramid level, FID-EffNetLite0 and,
where configured, standard FID and CLIP score, in one dict.

The images of a set are first reduced to `SetFeatures` (per-image network features, SWD patches, CLIP cosines)
where they are, slice by slice if need be; `reference` and `compare` need only those, so no image has to travel
to where the metrics are computed. Slices of a set, concatenated in set order, give exactly the features of the
whole set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..models.efficientnet_lite0 import EfficientNetLite0, load_efficientnet_lite0
from .clip_score import Tokenizer, clip_cosines, mean_clip_score
from .fid import EFFNET_METRIC, INCEPTION_METRIC, FeatureStats, effnet_features, frechet_distance, inception_features
from .swd import PatchSampling, SWDResult, descriptors, level_distance, normalise, pyramid_heights
from pagoda_dist.data.images import ImageBatch, to_unit_range

CLIP_METRIC = "CLIP score"


@dataclass
class SetFeatures:
    """What the metrics need of an image set (or of a slice of one). Network features are kept as the float32 the
    networks output (lossless; statistics are taken in float64)."""

    heights: list[int]             # SWD pyramid levels, px, finest first
    effnet: np.ndarray             # (N, 1280) pooled EfficientNet-Lite0 features
    inception: np.ndarray | None   # (N, 2048) FID Inception pool features (None: no standard FID)
    swd: list[np.ndarray]          # per level, raw (M, 7, 7, C) patches of the images inside the SWD set
    clip: np.ndarray | None        # (N,) CLIP cosine of image i and caption i (None: no CLIP score)

    @staticmethod
    def cat(parts: Sequence[SetFeatures]) -> SetFeatures:
        """The features of consecutive slices of one set, as those of their union."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if arrays[0] is None else np.concatenate(arrays)

        return SetFeatures(first.heights, np.concatenate([p.effnet for p in parts]),
                           cat([p.inception for p in parts]),
                           [np.concatenate([p.swd[i] for p in parts]) for i in range(len(first.swd))],
                           cat([p.clip for p in parts]))

    def head(self, count: int, swd: list[np.ndarray]) -> SetFeatures:
        """The first `count` images' features, with other SWD patches (`swd`, e.g. drawn for a smaller set)."""
        return SetFeatures(self.heights, self.effnet[:count],
                           None if self.inception is None else self.inception[:count], swd,
                           None if self.clip is None else self.clip[:count])


class FeatureNets:
    """The networks that reduce images to `SetFeatures`, loaded once by the caller."""

    def __init__(self, effnet: EfficientNetLite0, inception: nn.Module | None = None,
                 clip: tuple[nn.Module, Tokenizer] | None = None, device: str | torch.device = "cpu") -> None:
        self.effnet, self.inception, self.clip, self.device = effnet, inception, clip, device

    @torch.no_grad()
    def features(self, images: ImageBatch, patches: PatchSampling, start: int = 0,
                 captions: Sequence[str] | None = None, inception: bool = True,
                 value_range: tuple[float, float] = (-1.0, 1.0)) -> SetFeatures:
        """Features of images `start`, `start + 1`, ... of a set whose SWD patches follow `patches`; Inception
        features unless `inception` is False, CLIP cosines when the nets include CLIP and `captions` are given."""
        heights = pyramid_heights(to_unit_range(images[:1], value_range, "images"))
        # The networks output float32; effnet_features / inception_features widen it to float64, losslessly.
        effnet = effnet_features(images, self.effnet, value_range=value_range, device=self.device)
        inc = None
        if inception and self.inception is not None:
            inc = inception_features(images, self.inception, value_range=value_range, device=self.device)
        clip = None
        if self.clip is not None and captions is not None:
            clip = clip_cosines(images, captions, *self.clip, value_range=value_range, device=self.device)
        return SetFeatures(heights, effnet.astype(np.float32), None if inc is None else inc.astype(np.float32),
                           descriptors(images, patches, start, value_range=value_range), clip)


@dataclass
class Reference:
    """The reference side of comparisons, computed once: feature statistics and normalised SWD patches."""

    heights: list[int]
    effnet: FeatureStats
    inception: FeatureStats | None
    swd: list[np.ndarray]


def reference(*parts: SetFeatures, inception: FeatureStats | None = None) -> Reference:
    """The reference made of a set's slices; `inception`: FID reference statistics (e.g. from a file) used instead
    of the set's own Inception features. (A function, not a classmethod, so that Ray can run it as a task.)"""
    s = SetFeatures.cat(parts)
    if inception is None and s.inception is not None:
        inception = FeatureStats.of(s.inception)
    return Reference(s.heights, FeatureStats.of(s.effnet), inception, [normalise(d) for d in s.swd])


def compare(reference: Reference, seed: int, *parts: SetFeatures) -> dict[str, float]:
    """{"swd/<res>": ..., "swd/avg": ..., "FID-EffNetLite0": ..., ["FID": ...,] ["CLIP score": ...]} of the set made
    of `parts` against `reference`. SWD needs sets of equal size (its bias depends on the number of patches)."""
    other = SetFeatures.cat(parts)
    if [len(d) for d in other.swd] != [len(d) for d in reference.swd] or other.heights != reference.heights:
        raise ValueError(f"SWD needs sets of equal size and shape: the reference has {len(reference.swd[0])} patches "
                         f"per level at {reference.heights} px, the other set {len(other.swd[0])} at {other.heights} "
                         "px; evaluate the same number of each (eval.num_images)")
    levels = {height: level_distance(reference.swd[i], normalise(other.swd[i]), seed, i)
              for i, height in enumerate(reference.heights)}
    out = SWDResult(levels=levels, average=float(np.mean(list(levels.values())))).to_dict()
    out[EFFNET_METRIC] = frechet_distance(reference.effnet, FeatureStats.of(other.effnet))
    if reference.inception is not None and other.inception is not None:
        out[INCEPTION_METRIC] = frechet_distance(reference.inception, FeatureStats.of(other.inception))
    if other.clip is not None:
        out[CLIP_METRIC] = mean_clip_score(other.clip)
    return out


def image_metrics(real: ImageBatch, fake: ImageBatch, seed: int = 0, effnet: EfficientNetLite0 | None = None,
                  value_range: tuple[float, float] = (-1.0, 1.0),
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """SWD per level and FID-EffNetLite0 of two equally sized image sets held in memory. Measure the floor the same
    way: image_metrics(real, real2)."""
    nets = FeatureNets(effnet or load_efficientnet_lite0(), device=device)
    ref = reference(nets.features(real, PatchSampling(seed, 0, len(real)), value_range=value_range))
    return compare(ref, seed, nets.features(fake, PatchSampling(seed, 1, len(fake)), value_range=value_range))

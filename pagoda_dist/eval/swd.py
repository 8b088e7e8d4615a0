"""Sliced Wasserstein distance between two image sets on Laplacian-pyramid patches (Karras et al. 2018).

Each pyramid level compares the distributions of 7x7 neighbourhoods at one scale, so the metric says *which* scale
is wrong: blur shows at the fine levels only, wrong colours and layout at the coarse one. That is the signal
progressive growing needs. Implemented from the description in docs/EVALUATION.md:

- Laplacian pyramid with the 5x5 binomial filter, from the full resolution down to 16x16 (the last level is the
  low-pass image itself);
- 128 random 7x7 neighbourhoods per image per level; each descriptor set is normalised per channel by its own mean
  and standard deviation;
- 4 repeats x 128 random unit directions: project both sets, sort, mean absolute difference; averaged, x 1e3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pagoda_dist.data.images import ImageBatch, to_unit_range

BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
SCALE = 1e3  # reporting convention of the original metric


@dataclass(frozen=True)
class SWDResult:
    """SWD x 1e3 per pyramid level (keyed by the level's height in pixels, finest first) and their average."""

    levels: dict[int, float]
    average: float

    def to_dict(self, prefix: str = "swd") -> dict[str, float]:
        out = {f"{prefix}/{res}": value for res, value in self.levels.items()}
        out[f"{prefix}/avg"] = self.average
        return out


def _blur(x: Tensor) -> Tensor:
    """Depthwise 5x5 binomial filter with mirror padding (no edge darkening)."""
    k = torch.outer(BINOMIAL_5, BINOMIAL_5).to(x)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def _downsample(x: Tensor) -> Tensor:
    return _blur(x)[..., ::2, ::2]


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero insertion then the binomial filter x 4 (each output pixel saw a quarter of the taps)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = 4.0 * x
    return _blur(up)[..., : size[0], : size[1]]


def laplacian_pyramid(x: Tensor, min_resolution: int = 16) -> list[Tensor]:
    """Band-pass levels from the full resolution down to `min_resolution`; the last level is the low-pass image."""
    levels = []
    while min(x.shape[-2:]) > min_resolution:
        down = _downsample(x)
        levels.append(x - _upsample(down, x.shape[-2:]))
        x = down
    levels.append(x)
    return levels


def normalise(desc: np.ndarray) -> np.ndarray:
    """(M, k, k, C) descriptors -> (M, k*k*C), each channel standardised over the whole set."""
    desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
    desc /= desc.std(axis=(0, 1, 2), keepdims=True) + 1e-8  # flat images would otherwise divide by zero
    return desc.reshape(desc.shape[0], -1)


@dataclass(frozen=True)
class PatchSampling:
    """Where the patches of one image set lie: drawn for the whole set of `size` images at once from stream
    `stream` of `seed`, so the patches of image i are the same however the set is cut into slices."""

    seed: int
    stream: int  # 0: the reference (real) set of a comparison, 1: the set compared with it
    size: int


def pyramid_heights(images: Tensor, min_resolution: int = 16) -> list[int]:
    """Heights of the Laplacian levels of a float NCHW batch's images, finest first."""
    return [band.shape[-2] for band in laplacian_pyramid(images[:1], min_resolution)]


def descriptors(images: ImageBatch, sampling: PatchSampling, start: int = 0, levels: list[int] | None = None,
                value_range: tuple[float, float] = (-1.0, 1.0), min_resolution: int = 16, per_image: int = 128,
                size: int = 7, chunk: int = 256) -> list[np.ndarray]:
    """Raw (M, size, size, C) neighbourhoods per pyramid level (`levels`, default all) of a slice of a set: images
    are the set's images `start`, `start + 1`, ...; those at or beyond `sampling.size` are not part of it.

    Concatenated in set order, the slices' descriptors are those of the whole set; `normalise` them then. One chunk
    of images at a time keeps the pyramid's memory small at any image size.
    """
    x = torch.as_tensor(images)
    if min_resolution < size or min(x.shape[-2:]) < size:
        raise ValueError(f"SWD: images ({tuple(x.shape[-2:])}) and min_resolution ({min_resolution}) must be at "
                         f"least the patch size {size}")
    count = max(0, min(len(x), sampling.size - start))
    channels = x.shape[1]
    if levels is None:
        levels = list(range(len(pyramid_heights(to_unit_range(x[:1], value_range), min_resolution))))
    parts: dict[int, list[np.ndarray]] = {i: [] for i in levels}
    corners: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    offsets = np.arange(size)
    for first in range(0, count, chunk):
        bands = laplacian_pyramid(to_unit_range(x[first:min(first + chunk, count)], value_range), min_resolution)
        for i in levels:
            arr = bands[i].permute(0, 2, 3, 1).numpy()  # NHWC, so one fancy index yields (n, per_image, k, k, C)
            if i not in corners:  # drawn for the whole set: the result depends on neither slices nor chunks
                h, w = arr.shape[1:3]
                rng = np.random.default_rng([sampling.seed, sampling.stream, i])
                ys = rng.integers(0, h - size + 1, (sampling.size, per_image))
                xs = rng.integers(0, w - size + 1, (sampling.size, per_image))
                corners[i] = (ys[start:start + count], xs[start:start + count])
            ys, xs = (c[first:first + len(arr)] for c in corners[i])
            idx_n = np.arange(arr.shape[0])[:, None, None, None]
            patches = arr[idx_n, ys[..., None, None] + offsets[:, None], xs[..., None, None] + offsets[None, :]]
            parts[i].append(patches.reshape(-1, size, size, channels))
    empty = np.empty((0, size, size, channels), dtype=np.float32)
    return [np.concatenate(parts[i]) if parts[i] else empty for i in levels]


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, repeats: int = 4,
                       directions: int = 128) -> float:
    """Mean over `repeats` of the mean |sorted projection difference| over `directions` random unit directions."""
    results = []
    for _ in range(repeats):
        dirs = rng.standard_normal((a.shape[1], directions)).astype(np.float32)
        dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
        # Sort along the last axis of a (directions, M) array: contiguous rows, numpy's fastest case.
        proj_a = np.sort(np.ascontiguousarray((a @ dirs).T), axis=1)
        proj_b = np.sort(np.ascontiguousarray((b @ dirs).T), axis=1)
        results.append(float(np.abs(proj_a - proj_b).mean()))
    return float(np.mean(results))


def swd(real: ImageBatch, fake: ImageBatch, seed: int = 0, value_range: tuple[float, float] = (-1.0, 1.0),
        min_resolution: int = 16, patches_per_image: int = 128, patch_size: int = 7, repeats: int = 4,
        directions: int = 128, chunk_size: int = 256) -> SWDResult:
    """SWD x 1e3 between two equally sized NCHW image sets (uint8, or floats in `value_range`).

    Deterministic given `seed`. Both sets must have the same number of images and the same shape: the metric's
    bias depends on the number of descriptors, so unequal sets would not compare with anything.
    """
    x, y = torch.as_tensor(real), torch.as_tensor(fake)
    if len(x) == 0:
        raise ValueError("SWD of an empty image set is undefined")
    first = to_unit_range(x[:1], value_range, "real")
    to_unit_range(y[:1], value_range, "fake")  # validates dtype and layout before any work
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"SWD needs sets of equal size: real has {x.shape[0]} images, fake has {y.shape[0]}; "
                         "evaluate the same number of each (eval.num_images)")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"SWD needs images of one shape: real {tuple(x.shape[1:])}, fake {tuple(y.shape[1:])}; "
                         "resize the real set to the generator's resolution first")
    heights = pyramid_heights(first, min_resolution)
    levels = {}
    for i, height in enumerate(heights):  # one level at a time keeps memory to two descriptor sets
        with torch.no_grad():
            desc_x, desc_y = (normalise(descriptors(z, PatchSampling(seed, stream, len(z)), levels=[i],
                                                    value_range=value_range, min_resolution=min_resolution,
                                                    per_image=patches_per_image, size=patch_size,
                                                    chunk=chunk_size)[0])
                              for stream, z in ((0, x), (1, y)))
        levels[height] = level_distance(desc_x, desc_y, seed, i, repeats, directions)
    return SWDResult(levels=levels, average=float(np.mean(list(levels.values()))))


def level_distance(a: np.ndarray, b: np.ndarray, seed: int, level: int, repeats: int = 4,
                   directions: int = 128) -> float:
    """SWD x 1e3 of pyramid level `level` between two normalised descriptor sets (directions from stream 2)."""
    return SCALE * sliced_wasserstein(a, b, np.random.default_rng([seed, 2, level]), repeats, directions)

"""Frechet distances between Gaussian fits of image features: FID-EffNetLite0 (CPU-friendly) and standard FID.

FID-EffNetLite0 uses the 1280-d pooled features of the ImageNet-trained EfficientNet-Lite0 at 224 x 224. It is *not*
FID: always report it under its own name (`EFFNET_METRIC`), and compare figures only at equal image counts (the
estimate is biased upward, more so for small sets). Standard FID uses Inception-v3 weights from a local file
(see `inception.py`) and should use 50k generated images; say which reference statistics a figure used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.efficientnet_lite0 import EfficientNetLite0, load_efficientnet_lite0
from pagoda_dist.data.images import ImageBatch, to_rgb, to_unit_range

EFFNET_METRIC = "FID-EffNetLite0"
INCEPTION_METRIC = "FID"
EFFNET_RESOLUTION = 224  # the resolution EfficientNet-Lite0 was trained at


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (float64), and how many samples they came from."""

    mu: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"feature statistics need a (N >= 2, D) array, got shape {f.shape}")
        return cls(mu=f.mean(axis=0), cov=np.cov(f, rowvar=False), count=f.shape[0])

    @cached_property
    def root(self) -> np.ndarray:
        """The covariance's symmetric square root, computed once per object: a reference set's serves every set
        compared with it (an eigendecomposition of a 2048 x 2048 matrix is seconds on a CPU)."""
        return _sqrt_psd(self.cov)

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, cov=self.cov, count=self.count)

    @classmethod
    def load(cls, path: str | Path | BinaryIO, name: str | None = None) -> FeatureStats:
        """Statistics written by `save`, or a reference batch in guided-diffusion's evaluator format (`mu` and
        `sigma` of Inception pool3 features). `path` may be a seekable file object (e.g. an object in S3, `name`
        its URL for messages): only the two arrays are read, never the batch's images (`arr_0`, gigabytes at 512
        px). count 0: not recorded."""
        name = name or str(path)
        if isinstance(path, (str, Path)) and not Path(path).is_file():
            raise FileNotFoundError(f"feature statistics file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{name}: not a .npz file of feature statistics ({err})") from None
        with data:
            cov_key = "cov" if "cov" in data.files else "sigma"
            if "mu" not in data.files or cov_key not in data.files:
                raise ValueError(f"{name} holds {sorted(data.files)}; feature statistics need 'mu' and 'sigma' "
                                 "(guided-diffusion's reference batches) or 'mu' and 'cov'")
            mu, cov = np.asarray(data["mu"], np.float64), np.asarray(data[cov_key], np.float64)
            count = int(data["count"]) if "count" in data.files else 0
        if mu.ndim != 1 or cov.shape != (len(mu), len(mu)):
            raise ValueError(f"{name}: 'mu' {mu.shape} and '{cov_key}' {cov.shape} are not a (D,) mean and its "
                             "(D, D) covariance")
        return cls(mu=mu, cov=cov, count=count)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues from rounding -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    tr((C_a C_b)^(1/2)) = sum of sqrt(eigenvalues of C_a^(1/2) C_b C_a^(1/2)), a symmetric PSD matrix: this stays
    real and stable when the covariances are singular (fewer samples than feature dimensions), where a general
    matrix square root returns complex noise.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    root_a = a.root
    inner = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    trace_sqrt = np.sqrt(np.clip(inner, 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)


def _batches(images: ImageBatch, batch_size: int, value_range: tuple[float, float], name: str) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield to_rgb(to_unit_range(images[start:start + batch_size], value_range, name))


@torch.no_grad()
def effnet_features(images: ImageBatch, net: EfficientNetLite0 | None = None, batch_size: int = 64,
                    value_range: tuple[float, float] = (-1.0, 1.0),
                    device: str | torch.device = "cpu") -> np.ndarray:
    """(N, 1280) pooled EfficientNet-Lite0 features of NCHW images resized (bilinear, antialiased) to 224."""
    net = (net or load_efficientnet_lite0()).to(device)
    out = []
    for x in _batches(images, batch_size, value_range, "images"):
        x = F.interpolate(x.to(device), size=(EFFNET_RESOLUTION, EFFNET_RESOLUTION), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(net.pooled((x - 0.5) / 0.5).double().cpu().numpy())
    return np.concatenate(out)


def _stats(x: ImageBatch | FeatureStats, features: Callable[[ImageBatch], np.ndarray]) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.of(features(x))


def fid_effnet_lite0(real: ImageBatch | FeatureStats, fake: ImageBatch | FeatureStats, batch_size: int = 64,
                     net: EfficientNetLite0 | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
                     device: str | torch.device = "cpu") -> float:
    """FID-EffNetLite0 between two image sets (or precomputed `FeatureStats`, e.g. of the real set, reused across
    evaluations). Report it as `EFFNET_METRIC`, never as FID."""
    def features(images: ImageBatch) -> np.ndarray:
        nonlocal net
        net = net or load_efficientnet_lite0()  # loaded only if some set still needs its features
        return effnet_features(images, net, batch_size, value_range, device)

    return frechet_distance(_stats(real, features), _stats(fake, features))


@torch.no_grad()
def inception_features(images: ImageBatch, net: torch.nn.Module, batch_size: int = 64,
                       value_range: tuple[float, float] = (-1.0, 1.0),
                       device: str | torch.device = "cpu") -> np.ndarray:
    """(N, 2048) pool features of the FID Inception-v3 (`inception.load_fid_inception`), computed from
    uint8-quantised images as the reference implementation does."""
    net = net.to(device)
    out = []
    for x in _batches(images, batch_size, value_range, "images"):
        x8 = (x * 255.0).round().to(torch.uint8)
        out.append(net(x8.to(device))[0].double().cpu().numpy())
    return np.concatenate(out)


def fid_inception(real: ImageBatch | FeatureStats, fake: ImageBatch | FeatureStats, weights_path: str | Path,
                  batch_size: int = 64, value_range: tuple[float, float] = (-1.0, 1.0),
                  device: str | torch.device = "cpu", check_hash: bool = True) -> float:
    """Standard FID with Inception-v3 `pt_inception-2015-12-05` read from a local file (never downloaded).

    Pass the reference set as `FeatureStats` of the dataset's real images and say which ones; FID is comparable
    to published figures only at 50k generated samples.
    """
    from .inception import load_fid_inception  # torch-fidelity is optional: imported only when FID is asked for

    net = load_fid_inception(weights_path, check_hash=check_hash)

    def features(images: ImageBatch) -> np.ndarray:
        return inception_features(images, net, batch_size, value_range, device)

    return frechet_distance(_stats(real, features), _stats(fake, features))

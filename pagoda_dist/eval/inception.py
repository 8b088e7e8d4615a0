"""The standard FID Inception-v3, from a local weights file only (never downloaded).

The network is torch-fidelity's `FeatureExtractorInceptionV3` (a maintained port of the TensorFlow FID graph,
including its TF1-style bilinear resize to 299): it takes a local weights path, so nothing is fetched. The weights are
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release; torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` is the same file): the 8 hex digits are the start of its SHA-256,
checked here before loading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

SHA256_PREFIX = "6726825d"  # published with the file name of the FID Inception weights
FEATURE = "2048"  # the pool3 features FID is defined on


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_inception(weights_path: str | Path, check_hash: bool = True) -> nn.Module:
    """The frozen FID Inception-v3; calling it on uint8 NCHW images returns a 1-tuple of (N, 2048) features.

    `check_hash=False` skips the SHA-256 check (for a re-saved copy of the same weights, or plumbing tests).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights {path} do not exist: standard FID never downloads them; place "
            "pt_inception-2015-12-05-6726825d.pth there (eval.inception_weights) or use FID-EffNetLite0")
    if check_hash and not sha256_of(path).startswith(SHA256_PREFIX):
        raise ValueError(f"{path}: SHA-256 does not start with {SHA256_PREFIX}, so it is not "
                         "pt_inception-2015-12-05-6726825d.pth; FID with other weights is not FID")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError("standard FID needs torch-fidelity (pure Python, no downloads with a local weights "
                          "file): pip install torch-fidelity==0.4.0") from None
    # torch-fidelity reads the file with full unpickling; reading it first with weights_only=True refuses anything
    # but plain tensors, so that second read cannot run code.
    torch.load(path, map_location="cpu", weights_only=True)
    return FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE], feature_extractor_weights_path=str(path))

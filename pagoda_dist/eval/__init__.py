"""Evaluation: SWD on Laplacian-pyramid patches, FID-EffNetLite0, standard FID from local Inception weights, CLIP
score, FLOP accounting / MFU and PNG sample grids. Pure torch/numpy; see docs/EVALUATION.md for the protocol."""

from .fid import EFFNET_METRIC, INCEPTION_METRIC, FeatureStats, effnet_features, fid_effnet_lite0, fid_inception
from .fid import frechet_distance
from .flops import estimate_peak_flops, forward_flops_per_image, mfu, training_flops_per_image
from .grid import save_grid
from .images import to_unit_range
from .metrics import image_metrics
from .swd import SWDResult, laplacian_pyramid, swd

__all__ = [
    "EFFNET_METRIC",
    "INCEPTION_METRIC",
    "FeatureStats",
    "SWDResult",
    "effnet_features",
    "estimate_peak_flops",
    "fid_effnet_lite0",
    "fid_inception",
    "forward_flops_per_image",
    "frechet_distance",
    "image_metrics",
    "laplacian_pyramid",
    "mfu",
    "save_grid",
    "swd",
    "to_unit_range",
    "training_flops_per_image",
]

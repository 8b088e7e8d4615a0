"""Evaluation: SWD on Laplacian-pyramid patches, FID-EffNetLite0, standard FID (Inception weights never downloaded
from the internet) and CLIP score; see docs/EVALUATION.md for the protocol. The metrics themselves are pure
torch/numpy; `evaluate` scores a run in slices, here or on a Ray actor pool (`distributed`). (FLOP accounting lives in
`runtime.flops`, PNG grids in `data.grid`: the runtime uses both, and it sits below evaluation.)"""

from .fid import EFFNET_METRIC, INCEPTION_METRIC, FeatureStats, effnet_features, fid_effnet_lite0, fid_inception
from .fid import frechet_distance
from .metrics import image_metrics
from .swd import SWDResult, laplacian_pyramid, swd

__all__ = [
    "EFFNET_METRIC",
    "INCEPTION_METRIC",
    "FeatureStats",
    "SWDResult",
    "effnet_features",
    "fid_effnet_lite0",
    "fid_inception",
    "frechet_distance",
    "image_metrics",
    "laplacian_pyramid",
    "swd",
]

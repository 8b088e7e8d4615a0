"""What the stages share beyond the `Stage` protocol (see `pagoda_dist.interfaces`)."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pagoda_dist.config import Config
from pagoda_dist.interfaces import Batch, Condition


def grid_inputs(cfg: Config, n: int, seed: int, first_batch: Callable[[int], Batch]) -> tuple[Tensor, Condition]:
    """`Stage.grid_inputs` of every PaGoDA stage: unit noise at the base resolution (every stage starts from it),
    and class labels in order, the first captions' embeddings of the data, or no condition."""
    m = cfg.model
    noise = torch.randn((n, m.in_channels, m.resolution, m.resolution), generator=torch.Generator().manual_seed(seed))
    if m.num_classes:
        return noise, Condition(class_labels=torch.arange(n) % m.num_classes)
    if m.text_dim:
        return noise, first_batch(n).condition
    return noise, Condition()


def export_metadata(cfg: Config) -> dict[str, Any]:
    """`Stage.export_metadata` of every PaGoDA stage: what a loader needs, beyond the architecture record, to sample
    the exported network as the run does (`pagoda_dist.api`): the EDM noise levels, the teacher's PF-ODE sampler
    (a generator's default guidance scale is its `guidance`), the condition kind and, for text, the CLIP text tower
    the captions were embedded with (`precompute.clip_*`: a local weights path, or a seeded random tower)."""
    d, s, m, pre = cfg.diffusion, cfg.teacher.sampler, cfg.model, cfg.precompute
    text = None
    if m.text_dim:
        weights = None if pre.clip_weights is None else os.path.abspath(os.path.expanduser(pre.clip_weights))
        text = {"arch": pre.clip_model, "weights": weights, "random_init": weights is None}
    return {"diffusion": {"sigma_data": d.sigma_data, "sigma_min": d.sigma_min, "sigma_max": d.sigma_max, "rho": d.rho},
            "sampler": {"solver": s.solver, "steps": s.steps, "guidance": s.guidance, "clamp": s.clamp},
            "condition": "class" if m.num_classes else "text" if m.text_dim else "none",
            "num_classes": m.num_classes, "text_encoder": text}

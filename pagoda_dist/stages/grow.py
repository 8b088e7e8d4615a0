"""Stage 3, growth: the generator of the stage below (its EMA), grown by one octave (2x), most of the base frozen.

Each octave adds upsampling blocks and a zero-initialised head whose residual is added to the bicubic x2 of the
image below, so a grown generator starts exactly at the bicubic baseline; it then learns, like distillation, to
reconstruct the real full-resolution image from the base latent, plus the GAN term (`stages.adversarial`).
"""
from __future__ import annotations

from typing import Any

from pagoda_dist.chain import StageSpec
from pagoda_dist.config import Config
from pagoda_dist.models.checkpoint_safety import network_from_export
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.stages.adversarial import AdversarialStage


def build_grow(cfg: Config, spec: StageSpec, previous_export: dict[str, Any]) -> AdversarialStage:
    """Growth stage `spec` (a `chain` entry of kind grow) from the export of the stage it starts from."""
    previous = network_from_export(previous_export, source="previous stage export")
    if not isinstance(previous, OneStepGenerator):
        raise ValueError("growing needs a one-step generator export (distill or grow-*), got a teacher export")
    if 2 * previous.resolution != spec.resolution:
        raise ValueError(f"cannot grow the {previous.resolution}px generator to {spec.resolution}px: growth doubles it")
    generator = previous.grow(cfg.grow.trainable_decoder_blocks, detail_only=spec.resolution in cfg.grow.detail_only,
                              freeze_below=spec.resolution in cfg.grow.freeze_below)
    return AdversarialStage(cfg, spec.name, generator, spec.adversarial(cfg), cfg.grow.train.optimizer)

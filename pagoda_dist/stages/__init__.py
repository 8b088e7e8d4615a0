"""The three PaGoDA stages, each built from the config and, after the teacher, from the previous stage's export.

An export is the dict a committed checkpoint stores as `export.pt`: {"architecture", "ema", "net", ...}. Stages
start from the EMA weights of the stage before, as the paper does.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from pagoda_dist.config import Config
from pagoda_dist.models.checkpoint_safety import check_architecture, load_checked, model_from_architecture
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet
from pagoda_dist.stages.adversarial import AdversarialStage
from pagoda_dist.stages.base import Batch, Stage, StageInputs, StepDriver
from pagoda_dist.stages.teacher import TeacherStage

__all__ = ["AdversarialStage", "Batch", "Stage", "StageInputs", "StepDriver", "TeacherStage", "build_distill",
           "build_grow", "build_teacher", "grow_stage_name", "network_from_export"]


def grow_stage_name(resolution: int) -> str:
    return f"grow-{resolution}"


def network_from_export(export: dict[str, Any], *, source: str = "export") -> UNet | OneStepGenerator:
    """The EMA network an export describes, its architecture checked against the weights."""
    net = model_from_architecture(export["architecture"])
    load_checked(net, {"architecture": export["architecture"], "state_dict": export["ema"]}, source=source)
    return net


def build_teacher(cfg: Config) -> TeacherStage:
    return TeacherStage(cfg)


def build_distill(cfg: Config, teacher_export: dict[str, Any]) -> AdversarialStage:
    """The base-resolution one-step generator, initialised as a copy of the teacher's EMA network (guidance-aware
    when `distill.adversarial.guidance_range` is set)."""
    check_architecture(UNet(cfg.model).architecture(), teacher_export["architecture"], source="teacher export")
    teacher = network_from_export(teacher_export, source="teacher export")
    d = cfg.diffusion
    adv = cfg.distill.adversarial
    generator = OneStepGenerator.from_teacher(teacher, sigma_max=d.sigma_max, sigma_data=d.sigma_data,
                                              trainable_decoder_blocks=cfg.grow.trainable_decoder_blocks,
                                              guidance_input=bool(adv.guidance_range))
    teacher_sample = None
    if adv.distill_loss_weight > 0:
        teacher_stage = TeacherStage(cfg, teacher.requires_grad_(False).eval())

        def teacher_sample(noise: Tensor, cond: Condition) -> Tensor:
            """The teacher's sample from `noise`, guided at `cond.guidance` per sample (else teacher.sampler's)."""
            net = teacher_stage.net.to(noise.device)  # the runtime moves trainable networks only; a no-op after once
            return teacher_stage.sample(net, noise, cond, guidance=cond.guidance)

    return AdversarialStage(cfg, "distill", generator, adv, cfg.distill.train.optimizer, teacher_sample)


def build_grow(cfg: Config, previous_export: dict[str, Any], resolution: int) -> AdversarialStage:
    """The generator of the stage below (its EMA), grown by one octave to `resolution`, freeze policy applied."""
    previous = network_from_export(previous_export, source="previous stage export")
    if not isinstance(previous, OneStepGenerator):
        raise ValueError("growing needs a one-step generator export (distill or grow-*), got a teacher export")
    if 2 * previous.resolution != resolution:
        raise ValueError(f"cannot grow the {previous.resolution}px generator to {resolution}px: growth doubles it")
    generator = previous.grow(cfg.grow.trainable_decoder_blocks)
    return AdversarialStage(cfg, grow_stage_name(resolution), generator, cfg.grow.adversarial,
                            cfg.grow.train.optimizer)

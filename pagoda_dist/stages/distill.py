"""Stage 2, distillation: the one-step generator at the base resolution, initialised as a copy of the teacher.

It learns to map each real image's DDIM-inversion latent back to the image (reconstruction), plus a GAN term on
fresh noise; see `stages.adversarial` for the step. Stages start from the EMA weights of the stage before, as the
paper does.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from pagoda_dist.config import Config
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.checkpoint_safety import check_architecture, network_from_export
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet
from pagoda_dist.stages.adversarial import AdversarialStage
from pagoda_dist.stages.teacher import TeacherStage


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
            """The teacher's PF-ODE sample from `noise` (never churned: the target is a function of its noise),
            guided at `cond.guidance` per sample (else teacher.sampler's)."""
            net = teacher_stage.net.to(noise.device)  # the runtime moves trainable networks only; a no-op after once
            return teacher_stage.sample(net, noise, cond, guidance=cond.guidance, deterministic=True)

    return AdversarialStage(cfg, "distill", generator, adv, cfg.distill.train.optimizer, teacher_sample)

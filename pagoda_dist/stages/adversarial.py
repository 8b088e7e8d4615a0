"""Stages 2 and 3: train the one-step generator by reconstruction of real images from their inversion latents,
plus a GAN term on samples from fresh noise. Distillation (base resolution) and each growth step (2x) differ only
in the generator they start from, the resolution of the real target and the loss weights, so both are this class.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagoda_dist.config import AdversarialConfig, Config, OptimizerConfig
from pagoda_dist.losses import (d_hinge_loss, diff_augment, distillation_loss, g_hinge_loss, generator_objective,
                                reconstruction_distance)
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.models.discriminator import Discriminator
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.stages.base import Batch, StageInputs, StepDriver

TeacherSampler = Callable[[Tensor, Condition], Tensor]
"""teacher_sample(unit_noise, cond) -> base-resolution teacher sample (for the optional distillation loss)."""


class AdversarialStage:
    """G(z_inv(x)) ~ x by reconstruction; G(sigma_max eps) ~ data by a hinge GAN with an adaptive weight."""

    def __init__(self, cfg: Config, name: str, generator: OneStepGenerator, adv: AdversarialConfig,
                 optimizer: OptimizerConfig, teacher_sample: TeacherSampler | None = None) -> None:
        if adv.distill_loss_weight > 0 and teacher_sample is None:
            raise ValueError(f"{name}: adversarial.distill_loss_weight > 0 needs the teacher's sampler")
        self.cfg, self.name, self.adv = cfg, name, adv
        self.generator = generator
        m = cfg.model
        self.discriminator = Discriminator(adv.discriminator, generator.resolution, in_channels=m.in_channels,
                                           num_classes=m.num_classes, text_dim=m.text_dim)
        backbone = self.discriminator.backbone
        # The feature distance reuses the discriminator's frozen backbone: one copy of its weights, not two.
        self.rec_distance = reconstruction_distance(
            adv.rec_loss, None if backbone is None else backbone.forward_features,
            None if backbone is None else self.discriminator.backbone_input_size)
        # Only these are unfrozen again after the generator step (a projected D's backbone stays frozen).
        self._d_trainable = [p for p in self.discriminator.parameters() if p.requires_grad]
        self.teacher_sample = teacher_sample
        self.optimizer = optimizer
        self.inputs = StageInputs(resolution=generator.resolution, needs_latents=True)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, OptimizerConfig]:
        return {"generator": self.optimizer, "discriminator": self.adv.discriminator.optimizer}

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        if batch.latent is None:
            raise ValueError(f"{self.name}: batches need inversion latents (stream the latent-pair shards)")
        G, D = driver.module("generator"), driver.module("discriminator")
        cond, real = batch.condition, batch.image
        n = len(batch)
        noise = torch.randn_like(batch.latent)
        gan_on = self.adv.gan_weight > 0 and nimg >= self.adv.gan_start_kimg * 1000
        metrics: dict[str, float] = {}

        if gan_on:  # discriminator step on real images vs. one-step samples from fresh noise
            with torch.no_grad():
                fake = G(noise * self.generator.sigma_max, cond)
            real_aug, fake_aug = diff_augment(real, fake.to(real.dtype), policy=self.adv.diffaug)
            d_loss = d_hinge_loss(D(real_aug, cond), D(fake_aug, cond))
            driver.backward("discriminator", d_loss)
            driver.step("discriminator")
            metrics["d_loss"] = d_loss.item()

        # Generator step. Reconstruction on the latents, GAN on fresh noise: one forward over both halves. The
        # discriminator is frozen meanwhile (two ZeRO engines must not both see gradients for its parameters).
        use_noise = gan_on or self.teacher_sample is not None
        z = torch.cat([batch.latent, noise]) if use_noise else batch.latent
        z_cond = Condition.cat([cond, cond]) if use_noise and not cond.is_empty else cond
        target_sample = self.teacher_sample(noise, cond) if self.teacher_sample is not None else None

        def rec_fn(out: Tensor) -> Tensor:
            loss = self.rec_distance(out[:n], real)
            if target_sample is not None:
                loss = loss + self.adv.distill_loss_weight * distillation_loss(out[n:], target_sample)
            return loss

        def gan_fn(out: Tensor) -> Tensor:
            (fake_aug,) = diff_augment(out[n:], policy=self.adv.diffaug)
            return g_hinge_loss(D(fake_aug, cond))

        self._set_d_trainable(False)
        try:
            out = G(z, z_cond)
            objective = generator_objective(out, rec_fn, gan_fn if gan_on else None,
                                            factor=self.adv.gan_weight, clip=self.adv.adaptive_clip)
            driver.backward("generator", objective.loss)
            driver.step("generator")
        finally:
            self._set_d_trainable(True)
        metrics.update(loss=objective.loss.item(), rec=objective.rec.item(), gan=objective.gan.item(),
                       gan_weight=float(objective.weight))
        return metrics

    def _set_d_trainable(self, flag: bool) -> None:
        for p in self._d_trainable:
            p.requires_grad_(flag)

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        """One network evaluation: G(sigma_max * eps, cond)."""
        return net(noise * self.generator.sigma_max, condition).clamp(-1, 1)

    def architecture(self) -> dict:
        return self.generator.architecture()

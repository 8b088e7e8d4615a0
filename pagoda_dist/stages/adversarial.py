"""Stages 2 and 3: train the one-step generator by reconstruction of real images from their inversion latents,
plus a GAN term on samples from fresh noise. Distillation (base resolution) and each growth step (2x) differ only
in the generator they start from, the resolution of the real target and the loss weights, so both are this class.

Text-to-image additions (PaGoDA's paper), both on the fresh-noise half of the batch:
- guidance-aware generator (`guidance_range`): each noise sample gets its own guidance scale w ~ U[low, high] as a
  generator input, and the distillation target is the teacher's classifier-free-guided sample at that w from that
  noise. The reconstruction half stays at w = 1: its latents come from the teacher's unguided PF-ODE inversion.
- CLIP regulariser (`clip_loss_weight`): 1 - cos(CLIP image embedding of G(noise), the caption's CLIP embedding),
  with a frozen image tower of the CLIP model that embedded the captions.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagoda_dist.config import AdversarialConfig, Config, OptimizerConfig
from pagoda_dist.losses import (clip_loss, d_hinge_loss, diff_augment, distillation_loss, g_hinge_loss,
                                generator_objective, reconstruction_distance)
from pagoda_dist.models.clip_image import ClipImageEncoder
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.models.discriminator import Discriminator
from pagoda_dist.models.generator import OneStepGenerator, with_sampling_guidance
from pagoda_dist.stages.base import Batch, StageInputs, StepDriver

TeacherSampler = Callable[[Tensor, Condition], Tensor]
"""teacher_sample(unit_noise, cond) -> base-resolution teacher sample (for the optional distillation loss), guided
at `cond.guidance` per sample when the condition carries it."""


class AdversarialStage:
    """G(z_inv(x)) ~ x by reconstruction; G(sigma_max eps) ~ data by a hinge GAN with an adaptive weight."""

    def __init__(self, cfg: Config, name: str, generator: OneStepGenerator, adv: AdversarialConfig,
                 optimizer: OptimizerConfig, teacher_sample: TeacherSampler | None = None) -> None:
        if adv.distill_loss_weight > 0 and teacher_sample is None:
            raise ValueError(f"{name}: adversarial.distill_loss_weight > 0 needs the teacher's sampler")
        if adv.guidance_range and not generator.guidance_input:
            raise ValueError(f"{name}: adversarial.guidance_range needs a guidance-aware generator "
                             "(OneStepGenerator(..., guidance_input=True))")
        self.cfg, self.name, self.adv = cfg, name, adv
        self.generator = generator
        m = cfg.model
        # Reconstruction alone (gan_weight 0) has no discriminator: no engine, optimizer state or checkpoint shard.
        self.discriminator = Discriminator(adv.discriminator, generator.resolution, in_channels=m.in_channels,
                                           num_classes=m.num_classes, text_dim=m.text_dim) \
            if adv.builds_discriminator else None
        backbone = None if self.discriminator is None else self.discriminator.backbone
        # The feature distance reuses the discriminator's frozen backbone: one copy of its weights, not two.
        self.rec_distance = reconstruction_distance(
            adv.rec_loss, None if backbone is None else backbone.forward_features,
            None if backbone is None else self.discriminator.backbone_input_size)
        # Only these are unfrozen again after the generator step (a projected D's backbone stays frozen).
        self._d_trainable = [] if self.discriminator is None else \
            [p for p in self.discriminator.parameters() if p.requires_grad]
        self.teacher_sample = teacher_sample
        self.clip_image = self._clip_image_tower(cfg, name, adv)
        self.optimizer = optimizer
        self.inputs = StageInputs(resolution=generator.resolution, needs_latents=True)

    @staticmethod
    def _clip_image_tower(cfg: Config, name: str, adv: AdversarialConfig) -> ClipImageEncoder | None:
        """The frozen CLIP image tower of the CLIP regulariser: the image half of the open_clip model whose text
        half embedded the captions (precompute.clip_*). Deliberately not in `trainable()`: no optimizer, no EMA,
        no checkpoint; `train_step` moves it to the batch's device."""
        if adv.clip_loss_weight <= 0:
            return None
        pre = cfg.precompute
        tower = ClipImageEncoder(pre.clip_model, pre.clip_weights, pre.clip_random_init)
        if tower.dim != cfg.model.text_dim:
            raise ValueError(f"{name}: adversarial.clip_loss_weight: the image tower of {pre.clip_model} embeds into "
                             f"{tower.dim} dimensions, the captions' embeddings (model.text_dim) have "
                             f"{cfg.model.text_dim}: both must come from the same CLIP model")
        return tower

    def trainable(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"generator": self.generator}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    def optimizers(self) -> dict[str, OptimizerConfig]:
        configs = {"generator": self.optimizer, "discriminator": self.adv.discriminator.optimizer}
        return {name: configs[name] for name in self.trainable()}

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        if batch.latent is None:
            raise ValueError(f"{self.name}: batches need inversion latents (stream the latent-pair shards)")
        G = driver.module("generator")
        D = driver.module("discriminator") if self.discriminator is not None else None
        cond, real = batch.condition, batch.image
        n = len(batch)
        noise = torch.randn_like(batch.latent)
        gan_on = self.adv.uses_gan and nimg >= self.adv.gan_start_kimg * 1000
        metrics: dict[str, float] = {}
        # The generator's condition per half. The latents are inversions of the unguided PF-ODE, so reconstruction
        # teaches w = 1; fresh noise gets w ~ U[low, high] per sample (the teacher's guided sample is its target).
        rec_cond = noise_cond = cond
        if self.adv.guidance_range:
            low, high = self.adv.guidance_range
            rec_cond = cond.with_guidance(torch.ones(n, device=noise.device), n)
            noise_cond = cond.with_guidance(low + (high - low) * torch.rand(n, device=noise.device), n)

        if gan_on:  # discriminator step on real images vs. one-step samples from fresh noise
            with torch.no_grad():
                fake = G(noise * self.generator.sigma_max, noise_cond)
            real_aug, fake_aug = diff_augment(real, fake.to(real.dtype), policy=self.adv.diffaug)
            d_loss = d_hinge_loss(D(real_aug, cond), D(fake_aug, cond))
            driver.backward("discriminator", d_loss)
            driver.step("discriminator")
            metrics["d_loss"] = d_loss.item()

        # Generator step. Reconstruction on the latents, GAN (and distillation, CLIP) on fresh noise: one forward over
        # both halves. The discriminator is frozen meanwhile (two ZeRO engines must not both see gradients for its
        # parameters).
        use_noise = gan_on or self.teacher_sample is not None or self.clip_image is not None
        z = torch.cat([batch.latent, noise]) if use_noise else batch.latent
        z_cond = Condition.cat([rec_cond, noise_cond]) if use_noise else rec_cond
        target_sample = self.teacher_sample(noise, noise_cond) if self.teacher_sample is not None else None

        def rec_fn(out: Tensor) -> Tensor:
            loss = self.rec_distance(out[:n], real)
            if target_sample is not None:
                loss = loss + self.adv.distill_loss_weight * distillation_loss(out[n:], target_sample)
            return loss

        def gan_fn(out: Tensor) -> Tensor:
            (fake_aug,) = diff_augment(out[n:], policy=self.adv.diffaug)
            return g_hinge_loss(D(fake_aug, cond))

        clip_fn = None
        if self.clip_image is not None:
            text = cond.text_pooled
            if text is None:
                raise ValueError(f"{self.name}: adversarial.clip_loss_weight needs the captions' text embeddings in "
                                 "the batches (Condition.text_pooled)")
            tower = self.clip_image.to(noise.device)  # a no-op after the first step
            captioned = None if cond.text_mask is None else cond.text_mask.any(dim=1)  # dropped captions: all False

            def clip_fn(out: Tensor) -> Tensor:
                return self.adv.clip_loss_weight * clip_loss(out[n:], text, tower, captioned)

        self._set_d_trainable(False)
        try:
            out = G(z, z_cond)
            objective = generator_objective(out, rec_fn, gan_fn if gan_on else None,
                                            factor=self.adv.gan_weight, clip=self.adv.adaptive_clip, reg_fn=clip_fn)
            driver.backward("generator", objective.loss)
            driver.step("generator")
        finally:
            self._set_d_trainable(True)
        metrics.update(loss=objective.loss.item(), rec=objective.rec.item(), gan=objective.gan.item(),
                       gan_weight=float(objective.weight))
        if clip_fn is not None:  # unweighted: 1 - clip is the mean cosine, the CLIP score / 100 (before its clamp at 0)
            metrics["clip"] = objective.reg.item() / self.adv.clip_loss_weight
        return metrics

    def _set_d_trainable(self, flag: bool) -> None:
        for p in self._d_trainable:
            p.requires_grad_(flag)

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        """One network evaluation: G(sigma_max * eps, cond); a guidance-aware generator at teacher.sampler.guidance
        unless `condition` carries its own scales."""
        condition = with_sampling_guidance(self.generator, condition, self.cfg.teacher.sampler.guidance)
        return net(noise * self.generator.sigma_max, condition).clamp(-1, 1)

    def architecture(self) -> dict:
        return self.generator.architecture()

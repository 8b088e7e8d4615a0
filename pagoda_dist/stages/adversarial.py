"""Stages 2 and 3: train the one-step generator by reconstruction of real images from their inversion latents,
plus a GAN term on samples from fresh noise. Distillation (base resolution) and each growth step (2x) differ only
in the generator they start from, the resolution of the real target and the loss weights, so both are this class.

Text-to-image additions (PaGoDA's paper), both on the fresh-noise half of the batch:
- guidance-aware generator (`guidance_range`): each noise sample gets its own guidance scale w ~ U[low, high] as a
  generator input, and the distillation target is the teacher's classifier-free-guided sample at that w from that
  noise. The reconstruction half stays at w = 1: its latents come from the teacher's unguided PF-ODE inversion.
- CLIP regulariser (`clip_loss_weight`): 1 - cos(CLIP image embedding of G(noise), the caption's CLIP embedding),
  with a frozen image tower of the CLIP model that embedded the captions.

Growth details of the reference at high resolution (sony/pagoda `res64to256.sh`, `res64to512.sh`):
- split steps (`grow.split_steps`, its `separate_update`): two generator updates per batch, first the reconstruction
  loss, then the GAN loss on fresh noise at the fixed weight `gan_weight` (no adaptive weight: the reference's
  `decoder_adaptive_weight` is off there), instead of one update of rec + adaptive weight x GAN.
- reconstruction discriminator (`grow.recon_discriminator`): a second discriminator, trained on real images vs.
  their reconstructions G(z_inv(x)), the reconstruction update's own forward (detached, as the reference reuses
  it), before that update (the reference steps it after); the reconstruction update adds its generator hinge term
  at `recon_discriminator_weight` x the adaptive weight.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagoda_dist.config import AdversarialConfig, Config, OptimizerConfig
from pagoda_dist.losses import (clip_loss, d_hinge_loss, diff_augment, distillation_loss, g_hinge_loss,
                                generator_objective, reconstruction_distance)
from pagoda_dist.interfaces import Batch, Condition, StageInputs, StepDriver
from pagoda_dist.models.clip_image import ClipImageEncoder
from pagoda_dist.models.generator import OneStepGenerator, with_sampling_guidance
from pagoda_dist.stages.base import export_metadata, grid_inputs
from pagoda_dist.stages.networks import discriminator, recon_discriminator

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
        # Reconstruction alone (gan_weight 0) has no discriminator: no engine, optimizer state or checkpoint shard.
        self.discriminator = discriminator(cfg, adv, generator.resolution)
        backbone = None if self.discriminator is None else self.discriminator.backbone
        # The feature distance reuses the discriminator's frozen backbone: one copy of its weights, not two.
        self.rec_distance = reconstruction_distance(
            adv.rec_loss, None if backbone is None else backbone.forward_features,
            None if backbone is None else self.discriminator.backbone_input_size)
        # Growth resolutions only (validated), so the base-resolution distillation never splits its step.
        self.split_steps = generator.resolution in cfg.grow.split_steps
        self.recon_discriminator = recon_discriminator(cfg, adv, generator.resolution)
        # Only these are unfrozen again after the generator step (a projected D's backbone stays frozen).
        self._d_trainable = [p for d in (self.discriminator, self.recon_discriminator) if d is not None
                             for p in d.parameters() if p.requires_grad]
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
        if self.recon_discriminator is not None:
            nets["recon_discriminator"] = self.recon_discriminator
        return nets

    def optimizers(self) -> dict[str, OptimizerConfig]:
        d_opt = self.adv.discriminator.optimizer  # the reconstruction discriminator's too, as in the reference
        configs = {"generator": self.optimizer, "discriminator": d_opt, "recon_discriminator": d_opt}
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

        # A split step's reconstructions: the forward of its first update, which the reconstruction discriminator
        # also judges (detached: no second generator pass). That discriminator steps before the generator's update
        # uses it, as the main one does: ZeRO fails when the first backward through an engine is the generator's
        # (with the engine's parameters frozen) instead of its own.
        reconstruction = G(batch.latent, rec_cond) if self.split_steps else None
        if self.recon_discriminator is not None and gan_on:  # real images vs. their reconstructions
            R = driver.module("recon_discriminator")
            real_aug, rec_aug = diff_augment(real, reconstruction.detach().to(real.dtype), policy=self.adv.diffaug)
            r_loss = d_hinge_loss(R(real_aug, cond), R(rec_aug, cond))
            driver.backward("recon_discriminator", r_loss)
            driver.step("recon_discriminator")
            metrics["recon_d_loss"] = r_loss.item()

        clip_term = self._clip_term(cond, noise.device)
        # The generator's update(s). The discriminators are frozen meanwhile (two ZeRO engines must not both see
        # gradients for their parameters).
        self._set_d_trainable(False)
        try:
            if reconstruction is not None:
                self._split_updates(driver, batch, reconstruction, noise, noise_cond, gan_on, clip_term, metrics)
            else:
                self._joint_update(driver, batch, rec_cond, noise, noise_cond, gan_on, clip_term, metrics)
        finally:
            self._set_d_trainable(True)
        return metrics

    def _g_loss(self, D: nn.Module, fake: Tensor, cond: Condition) -> Tensor:
        """The generator's hinge term against discriminator D on augmented `fake`."""
        (fake_aug,) = diff_augment(fake, policy=self.adv.diffaug)
        return g_hinge_loss(D(fake_aug, cond))

    def _clip_term(self, cond: Condition, device: torch.device) -> Callable[[Tensor], Tensor] | None:
        """fake -> the weighted CLIP regulariser against the batch's captions; None when it is off."""
        if self.clip_image is None:
            return None
        text = cond.text_pooled
        if text is None:
            raise ValueError(f"{self.name}: adversarial.clip_loss_weight needs the captions' text embeddings in "
                             "the batches (Condition.text_pooled)")
        tower = self.clip_image.to(device)  # a no-op after the first step
        captioned = None if cond.text_mask is None else cond.text_mask.any(dim=1)  # dropped captions: all False
        return lambda fake: self.adv.clip_loss_weight * clip_loss(fake, text, tower, captioned)

    def _joint_update(self, driver: StepDriver, batch: Batch, rec_cond: Condition, noise: Tensor,
                      noise_cond: Condition, gan_on: bool, clip_term: Callable[[Tensor], Tensor] | None,
                      metrics: dict[str, float]) -> None:
        """One generator update: reconstruction on the latents, GAN (and distillation, CLIP) on fresh noise, one
        forward over both halves, the GAN term at the adaptive weight."""
        G, n, cond = driver.module("generator"), len(batch), batch.condition
        use_noise = gan_on or self.teacher_sample is not None or clip_term is not None
        z = torch.cat([batch.latent, noise]) if use_noise else batch.latent
        z_cond = Condition.cat([rec_cond, noise_cond]) if use_noise else rec_cond
        target_sample = self.teacher_sample(noise, noise_cond) if self.teacher_sample is not None else None

        def rec_fn(out: Tensor) -> Tensor:
            loss = self.rec_distance(out[:n], batch.image)
            if target_sample is not None:
                loss = loss + self.adv.distill_loss_weight * distillation_loss(out[n:], target_sample)
            return loss

        D = driver.module("discriminator") if gan_on else None
        out = G(z, z_cond)
        objective = generator_objective(out, rec_fn, (lambda o: self._g_loss(D, o[n:], cond)) if gan_on else None,
                                        factor=self.adv.gan_weight, clip=self.adv.adaptive_clip,
                                        reg_fn=None if clip_term is None else lambda o: clip_term(o[n:]))
        driver.backward("generator", objective.loss)
        driver.step("generator")
        metrics.update(loss=objective.loss.item(), rec=objective.rec.item(), gan=objective.gan.item(),
                       gan_weight=float(objective.weight))
        if clip_term is not None:  # unweighted: 1 - clip is the mean cosine, the CLIP score / 100 (before its clamp)
            metrics["clip"] = objective.reg.item() / self.adv.clip_loss_weight

    def _split_updates(self, driver: StepDriver, batch: Batch, reconstruction: Tensor, noise: Tensor,
                       noise_cond: Condition, gan_on: bool, clip_term: Callable[[Tensor], Tensor] | None,
                       metrics: dict[str, float]) -> None:
        """Two generator updates (grow.split_steps): the reconstruction loss of `reconstruction` = G(latents) (plus
        the reconstruction discriminator's term at its adaptive weight), then the GAN loss on fresh noise at the
        fixed weight gan_weight (plus the CLIP term)."""
        G, cond = driver.module("generator"), batch.condition
        R = driver.module("recon_discriminator") if self.recon_discriminator is not None and gan_on else None
        rec = generator_objective(reconstruction, lambda o: self.rec_distance(o, batch.image),
                                  None if R is None else lambda o: self._g_loss(R, o, cond),
                                  factor=self.cfg.grow.recon_discriminator_weight, clip=self.adv.adaptive_clip)
        driver.backward("generator", rec.loss)
        driver.step("generator")
        total = rec.loss.item()
        metrics.update(rec=rec.rec.item(), gan=0.0, gan_weight=0.0)
        if R is not None:
            metrics.update(recon_gan=rec.gan.item(), recon_weight=float(rec.weight))
        if gan_on or clip_term is not None:
            fake = G(noise * self.generator.sigma_max, noise_cond)  # as the discriminator step and sampling do
            loss = fake.new_zeros((), dtype=torch.float32)
            if gan_on:
                gan = self._g_loss(driver.module("discriminator"), fake, cond)
                loss = loss + self.adv.gan_weight * gan
                metrics.update(gan=gan.item(), gan_weight=self.adv.gan_weight)
            if clip_term is not None:
                reg = clip_term(fake)
                loss = loss + reg
                metrics["clip"] = reg.item() / self.adv.clip_loss_weight
            driver.backward("generator", loss)
            driver.step("generator")
            total += loss.item()
        metrics["loss"] = total

    def _set_d_trainable(self, flag: bool) -> None:
        for p in self._d_trainable:
            p.requires_grad_(flag)

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        """One network evaluation: G(sigma_max * eps, cond); a guidance-aware generator at teacher.sampler.guidance
        unless `condition` carries its own scales."""
        condition = with_sampling_guidance(self.generator, condition, self.cfg.teacher.sampler.guidance)
        return net(noise * self.generator.sigma_max, condition).clamp(-1, 1)

    def grid_inputs(self, n: int, seed: int, first_batch: Callable[[int], Batch]) -> tuple[Tensor, Condition]:
        return grid_inputs(self.cfg, n, seed, first_batch)

    def architecture(self) -> dict:
        return self.generator.architecture()

    def export_metadata(self) -> dict:
        return export_metadata(self.cfg)

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

Reference options (sony/pagoda): `adaptive_weight_at: last_layer` takes the adaptive weight's gradient norms at the
weight of the generator's last layer instead of at its output image (both are logged either way);
`independent_noise` gives the generator's fresh-noise half its own draw instead of the discriminator step's;
`separate_real_stream` gives the discriminator step the reals of a second data stream (`Batch.gan_real`), its fakes
their condition, as the reference's discriminator steps read its GAN data loader;
`cutout_ratio` sets DiffAugment's cutout size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pagoda_dist.config import AdversarialConfig, Config, OptimizerConfig
from pagoda_dist.losses import (GeneratorObjective, clip_loss, conv_weight_grad, d_hinge_loss, diff_augment,
                                distillation_loss, g_hinge_loss, generator_objective, reconstruction_distance)
from pagoda_dist.interfaces import Batch, Condition, StageInputs, StepDriver
from pagoda_dist.models.clip_image import ClipImageEncoder
from pagoda_dist.models.generator import OneStepGenerator, with_sampling_guidance
from pagoda_dist.stages.base import export_metadata, grid_inputs
from pagoda_dist.stages.networks import discriminator, recon_discriminator

TeacherSampler = Callable[[Tensor, Condition], Tensor]
"""teacher_sample(unit_noise, cond) -> base-resolution teacher sample (for the optional distillation loss), guided
at `cond.guidance` per sample when the condition carries it."""
LastLayerGrad = Callable[[Tensor], Tensor]
"""A gradient at the generator's output -> the gradient at its last layer's weight (see `AdversarialStage._forward`)."""


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
            None if backbone is None else self.discriminator.backbone_input_size, adv.rec_multiscale_weight,
            adv.feature_resize)
        # Growth resolutions only (validated), so the base-resolution distillation never splits its step.
        self.split_steps = generator.resolution in cfg.grow.split_steps
        self.recon_discriminator = recon_discriminator(cfg, adv, generator.resolution)
        # Only these are unfrozen again after the generator step (a projected D's backbone stays frozen).
        self._d_trainable = [p for d in (self.discriminator, self.recon_discriminator) if d is not None
                             for p in d.parameters() if p.requires_grad]
        self.teacher_sample = teacher_sample
        # The reference's adaptive weight (at the last layer's weight) is logged beside ours, or used with
        # adaptive_weight_at: last_layer. Not under ZeRO-3, whose partitioned weights the head's re-run cannot read.
        self.last_layer = generator.last_layer if cfg.runtime.zero_stage < 3 else None
        if adv.adaptive_weight_at == "last_layer" and self.last_layer is None:
            raise ValueError(f"{name}: adversarial.adaptive_weight_at 'last_layer' needs runtime.zero_stage <= 2 and "
                             "a generator whose last block ends in its residual block (no attention at the output "
                             "resolution); use 'output'")
        self.clip_image = self._clip_image_tower(cfg, name, adv)
        self.optimizer = optimizer
        self.inputs = StageInputs(resolution=generator.resolution, needs_latents=True,
                                  gan_reals=adv.separate_real_stream)

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
        gan_on = self.adv.uses_gan and nimg >= self.adv.gan_start_kimg * 1000
        metrics: dict[str, float] = {}
        # The latents are inversions of the unguided PF-ODE, so reconstruction teaches w = 1 (a guidance-aware
        # generator's fresh noise gets its own w, see `_fresh`).
        rec_cond = cond.with_guidance(torch.ones(n, device=real.device), n) if self.adv.guidance_range else cond
        # The discriminator's reals: the batch's own, or a second stream's (whose condition its fakes then get).
        reals = self._gan_reals(batch) if gan_on else batch
        noise, noise_cond = self._fresh(batch.latent, reals.condition)

        if gan_on:  # discriminator step on real images vs. one-step samples from fresh noise
            with torch.no_grad():
                fake = G(noise * self.generator.sigma_max, noise_cond)
            real_aug, fake_aug = self._augment(reals.image, fake.to(reals.image.dtype))
            d_loss = d_hinge_loss(D(real_aug, reals.condition), D(fake_aug, reals.condition))
            driver.backward("discriminator", d_loss)
            driver.step("discriminator")
            metrics["d_loss"] = d_loss.item()
            if self.adv.independent_noise:  # the generator's step gets a draw of its own, as in the reference
                noise, noise_cond = self._fresh(batch.latent, cond)

        # A split step's reconstructions: the forward of its first update, which the reconstruction discriminator
        # also judges (detached: no second generator pass). That discriminator steps before the generator's update
        # uses it, as the main one does: ZeRO fails when the first backward through an engine is the generator's
        # (with the engine's parameters frozen) instead of its own.
        reconstruction, last_layer = self._forward(G, batch.latent, rec_cond) if self.split_steps else (None, None)
        if self.recon_discriminator is not None and gan_on:  # real images vs. their reconstructions
            R = driver.module("recon_discriminator")
            real_aug, rec_aug = self._augment(real, reconstruction.detach().to(real.dtype))
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
                self._split_updates(driver, batch, (reconstruction, last_layer), noise, noise_cond, gan_on, clip_term,
                                    metrics)
            else:
                self._joint_update(driver, batch, rec_cond, noise, noise_cond, gan_on, clip_term, metrics)
        finally:
            self._set_d_trainable(True)
        return metrics

    def _gan_reals(self, batch: Batch) -> Batch:
        """The discriminator's real batch: `batch` itself, or its `gan_real` under separate_real_stream."""
        if not self.adv.separate_real_stream:
            return batch
        if batch.gan_real is None or len(batch.gan_real) != len(batch):
            raise ValueError(f"{self.name}: adversarial.separate_real_stream needs batches that carry a second "
                             "stream's reals of the same size (Batch.gan_real; the data source reads them when "
                             "StageInputs.gan_reals is set)")
        return batch.gan_real

    def _fresh(self, latent: Tensor, cond: Condition) -> tuple[Tensor, Condition]:
        """Unit noise like the latents, and its condition: `cond`, with w ~ U[low, high] per sample for a
        guidance-aware generator (the teacher's guided sample at w is its target)."""
        noise, n = torch.randn_like(latent), latent.shape[0]
        if not self.adv.guidance_range:
            return noise, cond
        low, high = self.adv.guidance_range
        return noise, cond.with_guidance(low + (high - low) * torch.rand(n, device=noise.device), n)

    def _augment(self, *images: Tensor) -> tuple[Tensor, ...]:
        return diff_augment(*images, policy=self.adv.diffaug, cutout_ratio=self.adv.cutout_ratio)

    def _forward(self, G: Callable[..., Tensor], z: Tensor, cond: Condition) -> tuple[Tensor, LastLayerGrad | None]:
        """G(z, cond), and the map from a gradient at that output to the gradient at the weight of the generator's
        last layer (`OneStepGenerator.last_layer`) in this very forward; None where it is not computed (see
        `__init__`). The map runs the output head again on a detached copy of its input with detached weights, and
        differentiates that alone: autograd never enters the engine's graph, whose backward DeepSpeed hooks (even
        towards an activation); the weight's gradient then follows from the layer's input (`conv_weight_grad`)."""
        if self.last_layer is None:
            return G(z, cond), None
        conv, head = self.last_layer
        with _recording(conv) as conv_calls, _recording(head) as head_calls:
            out = G(z, cond)
        weight_grad = conv_weight_grad(conv, conv_calls[-1][0])
        head_in = head_calls[-1][0].detach()
        weights = {name: p.detach() for name, p in head.named_parameters()}

        def last_layer_grad(g_out: Tensor) -> Tensor:
            # A non-leaf input: module hooks that watch this call's gradients (the FLOP counter of a run's first
            # step) cannot take a leaf during autograd.grad.
            x = head_in.detach().requires_grad_().clone()
            with torch.enable_grad():
                y = torch.func.functional_call(head, weights, (x,))
            (g_conv,) = torch.autograd.grad(y, x, g_out.to(y.dtype))
            return weight_grad(g_conv)
        return out, last_layer_grad

    def _g_loss(self, D: nn.Module, fake: Tensor, cond: Condition) -> Tensor:
        """The generator's hinge term against discriminator D on augmented `fake`."""
        (fake_aug,) = self._augment(fake)
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
        # The fresh half at sigma_max, as the discriminator step and sampling feed it (the latents already are).
        z = torch.cat([batch.latent, noise * self.generator.sigma_max]) if use_noise else batch.latent
        z_cond = Condition.cat([rec_cond, noise_cond]) if use_noise else rec_cond
        target_sample = self.teacher_sample(noise, noise_cond) if self.teacher_sample is not None else None

        def rec_fn(out: Tensor) -> Tensor:
            loss = self.rec_distance(out[:n], batch.image)
            if target_sample is not None:
                loss = loss + self.adv.distill_loss_weight * distillation_loss(out[n:], target_sample)
            return loss

        D = driver.module("discriminator") if gan_on else None
        out, last_layer = self._forward(G, z, z_cond)
        objective = generator_objective(out, rec_fn, (lambda o: self._g_loss(D, o[n:], cond)) if gan_on else None,
                                        factor=self.adv.gan_weight, clip=self.adv.adaptive_clip,
                                        reg_fn=None if clip_term is None else lambda o: clip_term(o[n:]),
                                        last_layer_grad=last_layer, weight_at=self.adv.adaptive_weight_at)
        driver.backward("generator", objective.loss)
        driver.step("generator")
        metrics.update(loss=objective.loss.item(), rec=objective.rec.item(), gan=objective.gan.item(),
                       gan_weight=float(objective.weight), **_both_weights("gan_weight", objective))
        if clip_term is not None:  # unweighted: 1 - clip is the mean cosine, the CLIP score / 100 (before its clamp)
            metrics["clip"] = objective.reg.item() / self.adv.clip_loss_weight

    def _split_updates(self, driver: StepDriver, batch: Batch, forward: tuple[Tensor, LastLayerGrad | None],
                       noise: Tensor, noise_cond: Condition, gan_on: bool,
                       clip_term: Callable[[Tensor], Tensor] | None, metrics: dict[str, float]) -> None:
        """Two generator updates (grow.split_steps): the reconstruction loss of `forward` = (G(latents), its last
        layer's gradient map) (plus the reconstruction discriminator's term at its adaptive weight), then the GAN
        loss on fresh noise at the fixed weight gan_weight (plus the CLIP term)."""
        G, cond = driver.module("generator"), batch.condition
        reconstruction, last_layer = forward
        R = driver.module("recon_discriminator") if self.recon_discriminator is not None and gan_on else None
        rec = generator_objective(reconstruction, lambda o: self.rec_distance(o, batch.image),
                                  None if R is None else lambda o: self._g_loss(R, o, cond),
                                  factor=self.cfg.grow.recon_discriminator_weight, clip=self.adv.adaptive_clip,
                                  last_layer_grad=last_layer, weight_at=self.adv.adaptive_weight_at)
        driver.backward("generator", rec.loss)
        driver.step("generator")
        total = rec.loss.item()
        metrics.update(rec=rec.rec.item(), gan=0.0, gan_weight=0.0)
        if R is not None:
            metrics.update(recon_gan=rec.gan.item(), recon_weight=float(rec.weight),
                           **_both_weights("recon_weight", rec))
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


@contextmanager
def _recording(module: nn.Module) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """(first input, output) of each call of `module` while the context is open."""
    calls: list[tuple[Tensor, Tensor]] = []
    handle = module.register_forward_hook(lambda _module, args, out: calls.append((args[0], out)))
    try:
        yield calls
    finally:
        handle.remove()


def _both_weights(name: str, objective: GeneratorObjective) -> dict[str, float]:
    """The adaptive weight by each formula (`name`_output, `name`_last_layer), where the step computed it."""
    weights = {"output": objective.weight_output, "last_layer": objective.weight_last_layer}
    return {f"{name}_{at}": float(w) for at, w in weights.items() if w is not None}

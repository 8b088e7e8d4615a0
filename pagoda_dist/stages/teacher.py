"""Stage 1: the low-resolution EDM diffusion teacher."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagoda_dist.config import Config, DiffusionConfig, OptimizerConfig, SamplerConfig
from pagoda_dist.diffusion import EDMPrecond, edm_loss, sample
from pagoda_dist.interfaces import Batch, Condition, StageInputs, StepDriver
from pagoda_dist.models.unet import UNet
from pagoda_dist.stages.base import export_metadata, grid_inputs


def drop_for_guidance(condition: Condition, prob: float, batch: int, device: torch.device) -> Condition:
    """Drops each sample's condition with probability `prob`, so one network also learns the unconditional model."""
    if prob <= 0 or condition.is_empty:
        return condition
    return condition.drop(torch.rand(batch, device=device) < prob)


@torch.no_grad()
def sample_teacher(net: nn.Module, noise: Tensor, condition: Condition, diffusion: DiffusionConfig,
                   sampler: SamplerConfig, guidance: float | Tensor | None = None) -> Tensor:
    """Images in [-1, 1] from the teacher `net` and unit `noise` with the PF-ODE `sampler` (classifier-free guided).

    guidance: the scale, one for the batch or a (B,) tensor with one per sample; None: sampler.guidance.
    An empty condition samples unguided.
    """
    if condition.is_empty:
        guidance = 1.0
    elif guidance is None:
        guidance = sampler.guidance
    d, s = diffusion, sampler
    result = sample(EDMPrecond(net, d.sigma_data), noise, condition, solver=s.solver, steps=s.steps,
                    sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho, guidance=guidance,
                    null_cond=Condition.null, clamp=s.clamp)
    return result.x.clamp(-1, 1)


class TeacherStage:
    """EDM denoiser D(x; sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) on base-resolution images."""

    name = "teacher"

    def __init__(self, cfg: Config, net: UNet | None = None) -> None:
        self.cfg = cfg
        self.net = net if net is not None else UNet(cfg.model)
        self.inputs = StageInputs(resolution=cfg.model.resolution, needs_latents=False)

    def trainable(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, OptimizerConfig]:
        return {"net": self.cfg.teacher.train.optimizer}

    def denoiser(self, net: nn.Module) -> EDMPrecond:
        return EDMPrecond(net, self.cfg.diffusion.sigma_data)

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        d = self.cfg.diffusion
        cond = drop_for_guidance(batch.condition, self.cfg.model.cond_drop_prob, len(batch), batch.image.device)
        loss = edm_loss(self.denoiser(driver.module("net")), batch.image, cond, p_mean=d.p_mean, p_std=d.p_std).mean()
        driver.backward("net", loss)
        driver.step("net")
        return {"loss": loss.item()}

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition,
               guidance: float | Tensor | None = None) -> Tensor:
        """The teacher's PF-ODE sampler with the teacher.sampler settings (see `sample_teacher`)."""
        return sample_teacher(net, noise, condition, self.cfg.diffusion, self.cfg.teacher.sampler, guidance)

    def grid_inputs(self, n: int, seed: int, first_batch: Callable[[int], Batch]) -> tuple[Tensor, Condition]:
        return grid_inputs(self.cfg, n, seed, first_batch)

    def architecture(self) -> dict:
        return self.net.architecture()

    def export_metadata(self) -> dict:
        return export_metadata(self.cfg)


def build_teacher(cfg: Config) -> TeacherStage:
    """Stage 1 from the config alone: a freshly initialised UNet (the chain's first stage starts from nothing)."""
    return TeacherStage(cfg)

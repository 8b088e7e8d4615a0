"""Stage 1: the low-resolution EDM diffusion teacher."""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagoda_dist.config import Config, DiffusionConfig, OptimizerConfig, SamplerConfig
from pagoda_dist.diffusion import Churn, EDMPrecond, edm_loss, per_sample_normal, sample
from pagoda_dist.interfaces import Batch, Condition, StageInputs, StepDriver
from pagoda_dist.models.unet import UNet
from pagoda_dist.stages.base import export_metadata, grid_inputs


def drop_for_guidance(condition: Condition, prob: float, batch: int, device: torch.device) -> Condition:
    """Drops each sample's condition with probability `prob`, so one network also learns the unconditional model."""
    if prob <= 0 or condition.is_empty:
        return condition
    return condition.drop(torch.rand(batch, device=device) < prob)


def noise_seeds(noise: Tensor) -> list[int]:
    """One seed per sample, a hash of that sample's noise alone: its stochastic sampler's fresh noise then depends on
    nothing else (not its batch, its slice of an evaluation, or a global generator)."""
    rows = noise.detach().float().flatten(1).cpu().numpy()
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") >> 1 for row in rows]


@torch.no_grad()
def sample_teacher(net: nn.Module, noise: Tensor, condition: Condition, diffusion: DiffusionConfig,
                   sampler: SamplerConfig, guidance: float | Tensor | None = None,
                   deterministic: bool = False) -> Tensor:
    """Images in [-1, 1] from the teacher `net` and unit `noise` with the PF-ODE `sampler` (classifier-free guided).

    guidance: the scale, one for the batch or a (B,) tensor with one per sample; None: sampler.guidance.
    An empty condition samples unguided. sampler.churn > 0 samples stochastically (EDM), with fresh noise that is a
    function of each sample's `noise`; `deterministic` ignores it (a distillation target is the PF-ODE's sample).
    """
    if condition.is_empty:
        guidance = 1.0
    elif guidance is None:
        guidance = sampler.guidance
    d, s = diffusion, sampler
    churn = None
    if s.churn > 0 and not deterministic:
        churn = Churn(s.churn, s.churn_min, float("inf") if s.churn_max is None else s.churn_max, s.churn_noise,
                      per_sample_normal(noise_seeds(noise)))
    result = sample(EDMPrecond(net, d.sigma_data), noise, condition, solver=s.solver, steps=s.steps,
                    sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho, guidance=guidance,
                    null_cond=Condition.null, clamp=s.clamp, churn=churn)
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
               guidance: float | Tensor | None = None, deterministic: bool = False) -> Tensor:
        """The teacher's sampler with the teacher.sampler settings (see `sample_teacher`)."""
        return sample_teacher(net, noise, condition, self.cfg.diffusion, self.cfg.teacher.sampler, guidance,
                              deterministic)

    def grid_inputs(self, n: int, seed: int, first_batch: Callable[[int], Batch]) -> tuple[Tensor, Condition]:
        return grid_inputs(self.cfg, n, seed, first_batch)

    def architecture(self) -> dict:
        return self.net.architecture()

    def export_metadata(self) -> dict:
        return export_metadata(self.cfg)


def build_teacher(cfg: Config) -> TeacherStage:
    """Stage 1 from the config alone: a freshly initialised UNet (the chain's first stage starts from nothing)."""
    return TeacherStage(cfg)

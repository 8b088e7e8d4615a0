"""Probability-flow ODE dx/dsigma = (x - D(x; sigma, cond)) / sigma: sampling (down to 0) and inversion (up).

Small pure functions over a denoiser D(x, sigma[B], cond). Everything is batched and deterministic; the only loop is
over noise levels. Gradients are not disabled here: wrap calls in `torch.no_grad()` / `torch.inference_mode()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .edm import Denoiser, karras_sigmas
from .guidance import ClassifierFreeGuidance

DenoiseFn = Callable[[Tensor, float], Tensor]  # x, sigma -> D(x; sigma) with cond, clamp and NFE count bound in


def euler_step(denoise: DenoiseFn, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """First order: the derivative at the start of the step (also the step's direction when inverting)."""
    d = (x - denoise(x, sigma)) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(denoise: DenoiseFn, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """EDM's second-order step: average the derivatives at both ends. A step to sigma = 0 stays Euler, because the
    derivative (x - D)/sigma is undefined there."""
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (d + d_next)


def ddim_step(denoise: DenoiseFn, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Deterministic DDIM (eta = 0) in its own variables: predict x0 and eps, re-noise x0 to sigma_next.

    With eps = (x - x0)/sigma this is x0 + sigma_next eps = x + (sigma_next - sigma)(x - x0)/sigma: exactly the Euler
    step in EDM variables (the VP scaling x / sqrt(1 + sigma^2) cancels out of DDIM's update).
    """
    x0 = denoise(x, sigma)
    eps = (x - x0) / sigma
    return x0 + sigma_next * eps


SOLVERS: dict[str, Callable[[DenoiseFn, Tensor, float, float], Tensor]] = {
    "euler": euler_step,
    "heun": heun_step,
    "ddim": ddim_step,
}


@dataclass(frozen=True)
class ODEResult:
    """End point of an integration and its cost.

    nfe: denoiser evaluations per image (Heun on n Karras points: 2n - 1 sampling to 0, 2(n - 1) inverting).
    network_evals: network forward passes per image (= 2 nfe under classifier-free guidance with w not in {0, 1}).
    """

    x: Tensor
    nfe: int
    network_evals: int


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): before each step from sigma with
    churn_min <= sigma <= churn_max, raise the noise level to sigma_hat = (1 + gamma) sigma, gamma =
    min(amount / steps, sqrt(2) - 1), by adding fresh noise of std sqrt(sigma_hat^2 - sigma^2) x noise_scale.

    normal(x) draws the fresh noise like x (torch.randn_like; `per_sample_normal` makes it a function of per-sample
    seeds, so a sample does not depend on its batch).
    """

    amount: float
    churn_min: float = 0.0
    churn_max: float = float("inf")
    noise_scale: float = 1.0
    normal: Callable[[Tensor], Tensor] = torch.randn_like

    def __call__(self, x: Tensor, sigma: float, steps: int) -> tuple[Tensor, float]:
        if not self.churn_min <= sigma <= self.churn_max:
            return x, sigma
        sigma_hat = sigma * (1 + min(self.amount / steps, math.sqrt(2) - 1))
        return x + math.sqrt(sigma_hat**2 - sigma**2) * self.noise_scale * self.normal(x), sigma_hat


def per_sample_normal(seeds: list[int]) -> Callable[[Tensor], Tensor]:
    """x -> standard normal noise like x whose row i comes from a generator seeded with seeds[i] (each call draws
    the next values of every row's own stream), as EDM's StackedRandomGenerator."""
    generators: dict[torch.device, list[torch.Generator]] = {}

    def normal(x: Tensor) -> Tensor:
        if x.shape[0] != len(seeds):
            raise ValueError(f"per_sample_normal: {len(seeds)} seeds for a batch of {x.shape[0]}")
        if x.device not in generators:
            generators[x.device] = [torch.Generator(x.device).manual_seed(s) for s in seeds]
        gens = generators[x.device]
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens])
    return normal


def _grid(sigmas: Tensor) -> list[float]:
    """Validate a noise-level schedule: strictly monotone, positive except a final 0 of a descending grid."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of >= 2 noise levels, got shape {tuple(sigmas.shape)}")
    grid = sigmas.tolist()
    steps = [b - a for a, b in zip(grid[:-1], grid[1:])]
    if not (all(s < 0 for s in steps) or all(s > 0 for s in steps)):
        raise ValueError(f"sigmas must be strictly decreasing (sampling) or increasing (inversion), got {grid}")
    if min(grid[:-1]) <= 0 or grid[-1] < 0:
        raise ValueError(f"sigmas must be > 0 except a final 0 of a descending grid, got {grid}")
    return grid


def integrate(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Any = None,
    *,
    solver: str = "heun",
    clamp: bool = False,
    churn: Churn | None = None,
) -> ODEResult:
    """Integrate the PF-ODE from x at sigmas[0] through each of `sigmas` in turn (either direction).

    clamp: clip the denoiser output to [-1, 1] (images in [-1, 1]; the reference inverts with this on).
    churn: EDM's stochastic sampler (descending grids, Euler or Heun); None or amount 0: deterministic.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    step, grid = SOLVERS[solver], _grid(sigmas)
    churning = churn is not None and churn.amount > 0
    if churning and (solver == "ddim" or grid[-1] > grid[0]):
        raise ValueError("churn (EDM's stochastic sampler) needs a descending grid and the euler or heun solver")
    sigma_dtype = torch.promote_types(x.dtype, torch.float32)
    nfe = 0

    def denoise(x_t: Tensor, sigma: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        sigma_b = torch.full((x_t.shape[0],), sigma, dtype=sigma_dtype, device=x_t.device)
        d = denoiser(x_t, sigma_b, cond).to(x_t.dtype)
        return d.clamp(-1, 1) if clamp else d

    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        if churning:
            x, sigma = churn(x, sigma, len(grid) - 1)
        x = step(denoise, x, sigma, sigma_next)
    return ODEResult(x=x, nfe=nfe, network_evals=nfe * getattr(denoiser, "passes_per_call", 1))


def _guided(denoiser: Denoiser, guidance: float | Tensor, null_cond: Callable[[Any], Any] | None) -> Denoiser:
    """The denoiser under classifier-free guidance: one scale, or a (B,) tensor of per-sample scales."""
    if not isinstance(guidance, Tensor) and guidance == 1.0:
        return denoiser
    return ClassifierFreeGuidance(denoiser, guidance, null_cond)


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any = None,
    *,
    solver: str = "heun",
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float | Tensor = 1.0,
    null_cond: Callable[[Any], Any] | None = None,
    clamp: bool = False,
    churn: Churn | None = None,
) -> ODEResult:
    """Generate from unit Gaussian `noise`: start at sigma_max * noise, integrate down the `steps`-point Karras grid
    and a final step to 0 (EDM's num_steps; Heun costs 2 steps - 1 evaluations). `guidance` is the classifier-free
    guidance scale, one for the batch or a (B,) tensor with one per sample. `churn`: EDM's stochastic sampler."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, append_zero=True)
    guided = _guided(denoiser, guidance, null_cond)
    return integrate(guided, noise * sigma_max, sigmas, cond, solver=solver, clamp=clamp, churn=churn)


def invert(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any = None,
    *,
    solver: str = "heun",
    steps: int = 40,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float | Tensor = 1.0,
    null_cond: Callable[[Any], Any] | None = None,
    clamp: bool = False,
) -> ODEResult:
    """Map clean images to their PF-ODE latents at sigma_max ("DDIM inversion"): start at x0 itself, taken as the
    state at sigma_min (no noise added), and integrate up the ascending `steps`-point Karras grid.
    Heun costs 2 (steps - 1) evaluations (the reference: 40 points, 78)."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0)
    guided = _guided(denoiser, guidance, null_cond)
    return integrate(guided, x0, sigmas, cond, solver=solver, clamp=clamp)


__all__ = ["Churn", "ODEResult", "SOLVERS", "ddim_step", "euler_step", "heun_step", "integrate", "invert",
           "per_sample_normal", "sample"]

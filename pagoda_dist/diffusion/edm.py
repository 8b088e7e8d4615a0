"""EDM preconditioning, training noise levels and loss (Karras et al. 2022), and PaGoDA's one-step generator G.

The denoiser is D(x; sigma, cond) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond), where F
is a raw network. The scalings give F unit-variance inputs and a unit-variance training target at every sigma
when the data has standard deviation sigma_data.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

RawNet = Callable[[Tensor, Tensor, Any], Tensor]
"""A raw network F(x_in, c_noise, cond): x_in [B, ...], c_noise [B] (log(sigma)/4, may be negative), opaque cond."""

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
"""A denoiser D(x, sigma, cond) -> estimate of the clean x; sigma is a [B] tensor of per-sample noise levels."""

SIGMA_DATA = 0.5  # standard deviation of images scaled to [-1, 1] (EDM's choice; PaGoDA keeps it)
P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal training noise distribution: ln(sigma) ~ N(P_MEAN, P_STD^2)


class Preconditioning(NamedTuple):
    """EDM's four scalings at a noise level (each broadcastable against x, except c_noise which is the net's input)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_preconditioning(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """Karras et al. 2022, Table 1. c_noise = log(sigma)/4 is negative below sigma = 1: the net must accept that."""
    var = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 / var,
        c_out=sigma * sigma_data * var.rsqrt(),
        c_in=var.rsqrt(),
        c_noise=sigma.log() / 4,
    )


def per_sample_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or [B] noise level to shape [B, 1, ..., 1] matching x.

    The dtype is at least float32 so that low-precision images do not round the noise level (sigma = 80 and
    0.002 are far apart; bfloat16 keeps only ~3 significant digits).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(x.shape[0])
    elif sigma.numel() != x.shape[0]:
        raise ValueError(
            f"sigma has {sigma.numel()} values but x has batch size {x.shape[0]}: pass one sigma or one per sample"
        )
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class EDMPrecond(nn.Module):
    """Wraps a raw network F(x_in, c_noise, cond) into the EDM denoiser D(x, sigma, cond).

    `cond` is passed through untouched. D is returned in float32 (or float64 if x is float64).
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        sigma = per_sample_sigma(sigma, x)
        c = edm_preconditioning(sigma, self.sigma_data)
        f = self.net(c.c_in * x, c.c_noise.flatten(), cond)
        return c.c_skip * x + c.c_out * f.to(c.c_out.dtype)


def generator_output(
    net: RawNet, z: Tensor, cond: Any, sigma_max: float = 80.0, *, sigma_data: float = SIGMA_DATA
) -> Tensor:
    """PaGoDA's one-step generator G(z, cond) = F(c_in(sigma_max) z, c_noise(sigma_max), cond).

    `z` lives at noise level sigma_max (sigma_max * eps, or a latent from `invert`), not unit noise. This is the raw
    network output with no skip mixing. It is not the teacher's denoiser at sigma_max: there c_skip ~ 4e-5 and
    c_out ~ sigma_data = 0.5, so D ~ 0.5 F: a student initialised from the teacher's `net` starts at about twice the
    teacher's posterior mean E[x0 | z] (F's training target there is (x0 - c_skip z) / c_out ~ 2 x0), not at D.
    """
    c = edm_preconditioning(per_sample_sigma(sigma_max, z), sigma_data)
    return net(c.c_in * z, c.c_noise.flatten(), cond)


def sample_training_sigmas(
    n: int,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """n noise levels with ln(sigma) ~ N(p_mean, p_std^2): EDM's training distribution."""
    if not p_std > 0:
        raise ValueError(f"p_std must be > 0, got {p_std}")
    return (torch.randn(n, generator=generator, device=device, dtype=dtype) * p_std + p_mean).exp()


def edm_loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2: equalises the loss over sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any = None,
    generator: torch.Generator | None = None,
    *,
    sigma: Tensor | None = None,
    sigma_data: float | None = None,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> Tensor:
    """Per-sample EDM loss lambda(sigma) * mean_pixels (D(x0 + sigma n; sigma, cond) - x0)^2, shape [B].

    The mean over pixels (EDM sums) keeps the loss ~1 at initialisation at any resolution. `sigma` ([B]) overrides
    the log-normal draw; `sigma_data` defaults to the denoiser's own (an `EDMPrecond`) so the two cannot disagree.
    """
    if sigma_data is None:
        sigma_data = getattr(denoiser, "sigma_data", None)
        if sigma_data is None:
            raise ValueError("edm_loss: pass sigma_data=..., the denoiser has no .sigma_data attribute")
    b = x0.shape[0]
    if sigma is None:
        sigma = sample_training_sigmas(
            b, p_mean=p_mean, p_std=p_std, generator=generator, device=x0.device, dtype=torch.float32
        )
    sigma_b = per_sample_sigma(sigma, x0)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    denoised = denoiser(x0 + sigma_b * noise, sigma_b.flatten(), cond)
    err = (denoised - x0).square().reshape(b, -1).mean(dim=1)
    return edm_loss_weight(sigma_b.flatten(), sigma_data) * err


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    append_zero: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """n descending noise levels sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Endpoints are exactly sigma_max and sigma_min. `append_zero` adds a final 0 (the sampling target). Built in
    float64 then cast, as EDM does, so the grid is the same on every device.
    """
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 noise levels, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    # Pin the endpoints: the power round trip can be off by an ulp.
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


__all__ = [
    "Denoiser",
    "EDMPrecond",
    "P_MEAN",
    "P_STD",
    "Preconditioning",
    "RawNet",
    "SIGMA_DATA",
    "edm_loss",
    "edm_loss_weight",
    "edm_preconditioning",
    "generator_output",
    "karras_sigmas",
    "per_sample_sigma",
    "sample_training_sigmas",
]

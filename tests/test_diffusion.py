"""Diffusion core: EDM preconditioning/loss and PF-ODE solvers, checked against answers known in closed form.

For Gaussian data N(mu, s^2 I) the ideal denoiser is D(x; sigma) = mu + s^2/(s^2 + sigma^2) (x - mu) and the PF-ODE
solution is x(sigma) = mu + sqrt(s^2 + sigma^2)/sqrt(s^2 + sigma_0^2) (x(sigma_0) - mu).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from pagoda_dist.diffusion import (
    Churn,
    ClassifierFreeGuidance,
    EDMPrecond,
    concat_conditions,
    ddim_step,
    edm_loss,
    edm_loss_weight,
    edm_preconditioning,
    euler_step,
    generator_output,
    integrate,
    invert,
    karras_sigmas,
    per_sample_normal,
    sample,
    sample_training_sigmas,
)

MU, S = 0.1, 0.5  # Gaussian data mean and std
SD = 0.5  # sigma_data
SMIN, SMAX = 0.002, 80.0


def _col(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def gaussian_denoiser(x: Tensor, sigma: Tensor, cond: object = None, mu: float | Tensor = MU) -> Tensor:
    return mu + S**2 / (S**2 + _col(sigma, x) ** 2) * (x - mu)


def gaussian_flow(x: Tensor, sigma0: float, sigma1: float) -> Tensor:
    return MU + math.sqrt(S**2 + sigma1**2) / math.sqrt(S**2 + sigma0**2) * (x - MU)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def psnr(a: Tensor, b: Tensor) -> float:
    """For images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / (a - b).square().mean().item())


class TinyNet(nn.Module):
    """A small nonlinear raw network F(x_in, c_noise, cond) for wiring and determinism checks."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(1, channels)

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: object) -> Tensor:
        return torch.tanh(self.conv(x_in) + self.emb(c_noise[:, None].to(x_in.dtype))[:, :, None, None])


# ---------------------------------------------------------------------------------------------- EDM pieces


def test_karras_grid_endpoints_and_monotone() -> None:
    sig = karras_sigmas(18)
    assert sig.shape == (18,) and sig.dtype == torch.float64
    assert sig[0].item() == SMAX and sig[-1].item() == SMIN
    assert bool((sig[1:] < sig[:-1]).all())
    with_zero = karras_sigmas(18, append_zero=True)
    assert with_zero.shape == (19,) and with_zero[-1].item() == 0.0 and torch.equal(with_zero[:-1], sig)
    # rho = 1 is a linear ramp; larger rho puts more levels at low noise.
    assert torch.allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    assert karras_sigmas(18, rho=7)[9] < karras_sigmas(18, rho=3)[9]
    with pytest.raises(ValueError, match="n >= 2"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(5, 2.0, 1.0)


def test_preconditioning_identities() -> None:
    sigma = torch.logspace(math.log10(SMIN), math.log10(SMAX), 50, dtype=torch.float64)
    c = edm_preconditioning(sigma, SD)
    one = torch.ones_like(sigma)
    # Unit-variance network input: Var(c_in (y + n)) = c_in^2 (sd^2 + sigma^2) = 1.
    assert torch.allclose(c.c_in**2 * (SD**2 + sigma**2), one)
    # Unit-variance training target (y - c_skip (y + n)) / c_out: ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) = c_out^2.
    assert torch.allclose((1 - c.c_skip) ** 2 * SD**2 + c.c_skip**2 * sigma**2, c.c_out**2)
    # The loss weight undoes c_out^2, so the effective loss on F is an unweighted unit-scale MSE.
    assert torch.allclose(edm_loss_weight(sigma, SD) * c.c_out**2, one)
    assert torch.allclose(c.c_noise, sigma.log() / 4)
    assert c.c_noise[0] < 0 < c.c_noise[-1]  # the net must take negative c_noise
    # sigma = 0 is the clean image: no skip attenuation, no network contribution.
    c0 = edm_preconditioning(torch.zeros(1, dtype=torch.float64), SD)
    assert c0.c_skip.item() == 1.0 and c0.c_out.item() == 0.0


@pytest.mark.parametrize("sigma", [0.01, 0.5, 5.0, 80.0])
def test_training_target_has_unit_variance(sigma: float) -> None:
    y, n = SD * randn(200_000, seed=1), sigma * randn(200_000, seed=2)
    c = edm_preconditioning(torch.tensor(sigma, dtype=torch.float64), SD)
    target = (y - c.c_skip * (y + n)) / c.c_out
    assert abs(target.var().item() - 1) < 0.02
    assert abs((c.c_in * (y + n)).var().item() - 1) < 0.02


def test_denoiser_is_identity_at_sigma_zero_for_bounded_net() -> None:
    x = randn(4, 3, 8, 8, dtype=torch.float32)
    d = EDMPrecond(TinyNet())(x, 0.0)
    assert torch.equal(d, x)


def test_edm_precond_wiring() -> None:
    seen: dict[str, object] = {}

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x_in: Tensor, c_noise: Tensor, cond: object) -> Tensor:
            seen.update(x_in=x_in, c_noise=c_noise, cond=cond)
            return self.scale * torch.sin(x_in) + c_noise[:, None, None, None]

    sd = 0.7
    net = Recorder()
    pre = EDMPrecond(net, sigma_data=sd)
    x = randn(3, 2, 4, 4, dtype=torch.float32)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    cond = object()
    d = pre(x, sigma, cond)
    col = sigma[:, None, None, None]
    x_in = x / (col**2 + sd**2).sqrt()
    f = 2.0 * torch.sin(x_in) + col.log() / 4
    expected = sd**2 / (col**2 + sd**2) * x + col * sd / (col**2 + sd**2).sqrt() * f
    assert seen["cond"] is cond
    assert torch.allclose(seen["x_in"], x_in)
    assert seen["c_noise"].shape == (3,) and torch.allclose(seen["c_noise"], sigma.log() / 4)
    assert torch.allclose(d, expected, atol=1e-6)
    # A scalar sigma broadcasts to the batch; gradients reach the wrapped net.
    assert torch.allclose(pre(x, 1.0, cond)[1], d[1])
    pre(x, sigma, cond).sum().backward()
    assert net.scale.grad is not None and net.scale.grad.abs() > 0
    with pytest.raises(ValueError, match="batch size"):
        pre(x, torch.ones(2), cond)


def analytic_raw_net(x_in: Tensor, c_noise: Tensor, cond: object) -> Tensor:
    """The raw F whose EDM-preconditioned denoiser is exactly the Gaussian ideal denoiser."""
    sigma = _col((4 * c_noise).exp(), x_in)
    c = edm_preconditioning(sigma, SD)
    x = x_in / c.c_in
    return (gaussian_denoiser(x, sigma) - c.c_skip * x) / c.c_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precond_analytic_denoiser_finite_at_extremes(dtype: torch.dtype) -> None:
    pre = EDMPrecond(analytic_raw_net, sigma_data=SD)
    for sigma in (SMIN, SMAX):
        x = MU + math.sqrt(S**2 + sigma**2) * randn(8, 3, 4, 4, dtype=dtype)
        d = pre(x, sigma)
        assert torch.isfinite(d).all()
        assert torch.allclose(d, gaussian_denoiser(x, torch.tensor(sigma)), rtol=1e-3, atol=1e-4)
    for solver in ("euler", "heun", "ddim"):
        out = sample(pre, randn(8, 3, 4, 4, dtype=dtype), solver=solver, steps=18)
        assert torch.isfinite(out.x).all()
        lat = invert(pre, out.x, solver=solver, steps=18)
        assert torch.isfinite(lat.x).all()


def test_lognormal_training_sigmas() -> None:
    sig = sample_training_sigmas(200_000, generator=torch.Generator().manual_seed(0))
    assert (sig > 0).all()
    assert abs(sig.log().mean().item() + 1.2) < 0.01 and abs(sig.log().std().item() - 1.2) < 0.01
    again = sample_training_sigmas(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sig, again)


def test_edm_loss_matches_definition() -> None:
    pre = EDMPrecond(TinyNet(), sigma_data=SD)
    x0 = SD * randn(6, 3, 8, 8, dtype=torch.float32)
    loss = edm_loss(pre, x0, None, torch.Generator().manual_seed(3))
    assert loss.shape == (6,)
    g = torch.Generator().manual_seed(3)  # same draws, same order: sigmas, then noise
    sigma = (torch.randn(6, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x0.shape, generator=g)
    d = pre(x0 + sigma[:, None, None, None] * noise, sigma)
    manual = edm_loss_weight(sigma, SD) * (d - x0).square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss, manual)
    with pytest.raises(ValueError, match="sigma_data"):
        edm_loss(gaussian_denoiser, x0)


def test_edm_loss_is_one_for_zero_net_at_every_sigma() -> None:
    """With F = 0 and data of std sigma_data, lambda(sigma) E|c_skip (y + n) - y|^2 = 1: the weighting equalises."""
    zero = EDMPrecond(lambda x_in, c_noise, cond: torch.zeros_like(x_in), sigma_data=SD)
    x0 = SD * randn(7, 4096)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)
    loss = edm_loss(zero, x0, sigma=sigma, generator=torch.Generator().manual_seed(1))  # noise independent of x0
    assert torch.allclose(loss, torch.ones_like(loss), atol=0.08)


def test_generator_output_is_raw_net_at_sigma_max() -> None:
    net = TinyNet()
    z = SMAX * randn(2, 3, 8, 8, dtype=torch.float32)
    g = generator_output(net, z, None, SMAX, sigma_data=SD)
    c = edm_preconditioning(torch.tensor(SMAX), SD)
    assert torch.allclose(g, net(c.c_in * z, torch.full((2,), math.log(SMAX) / 4), None))
    # The teacher's denoiser at sigma_max is the same F with (tiny) skip mixing.
    assert torch.allclose(EDMPrecond(net, SD)(z, SMAX), c.c_skip * z + c.c_out * g, atol=1e-6)


# ---------------------------------------------------------------------------------------------- PF-ODE


def _solve_error(solver: str, intervals: int, inverse: bool) -> float:
    """Max error of integrating the Gaussian PF-ODE between sigma_max and sigma_min (relative to the end scale)."""
    sig = karras_sigmas(intervals + 1)
    if inverse:
        x = MU + S * randn(16, 3, 4, 4, seed=1)
        out = integrate(gaussian_denoiser, x, sig.flip(0), solver=solver).x
        return ((out - gaussian_flow(x, SMIN, SMAX)) / SMAX).abs().max().item()
    x = SMAX * randn(16, 3, 4, 4, seed=2)
    out = integrate(gaussian_denoiser, x, sig, solver=solver).x
    return (out - gaussian_flow(x, SMAX, SMIN)).abs().max().item()


@pytest.mark.parametrize("inverse", [False, True], ids=["sample", "invert"])
@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("ddim", 1), ("heun", 2)])
def test_convergence_order(solver: str, order: int, inverse: bool) -> None:
    errs = [_solve_error(solver, m, inverse) for m in (32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
    assert errs[0] > errs[1] > errs[2]
    assert all(abs(r - order) < 0.2 for r in rates), (errs, rates)


@pytest.mark.parametrize("inverse", [False, True], ids=["sample", "invert"])
@pytest.mark.parametrize("intervals", [8, 17, 39])
def test_heun_beats_euler_at_equal_steps(intervals: int, inverse: bool) -> None:
    assert _solve_error("heun", intervals, inverse) < _solve_error("euler", intervals, inverse)


def test_sample_and_invert_closed_form_and_nfe() -> None:
    eps = randn(16, 3, 4, 4, seed=3)
    out = sample(gaussian_denoiser, eps, solver="heun", steps=64)
    assert out.nfe == out.network_evals == 2 * 64 - 1  # last step to 0 is Euler
    assert torch.allclose(out.x, gaussian_flow(SMAX * eps, SMAX, 0.0), atol=1e-2)
    x0 = MU + S * randn(16, 3, 4, 4, seed=4)
    lat = invert(gaussian_denoiser, x0, solver="heun", steps=40)
    assert lat.nfe == 78  # the reference's 40-point Heun inversion
    assert torch.allclose(lat.x, gaussian_flow(x0, SMIN, SMAX), rtol=0.02, atol=0.0)  # ~1% with 39 Heun steps
    assert sample(gaussian_denoiser, eps, solver="euler", steps=18).nfe == 18
    assert invert(gaussian_denoiser, x0, solver="euler", steps=18).nfe == 17


def test_ddim_equals_euler_in_edm_variables() -> None:
    pre = EDMPrecond(TinyNet().double(), sigma_data=SD)
    x = SMAX * randn(4, 3, 8, 8, seed=5)
    denoise = lambda x_t, s: pre(x_t, s)  # noqa: E731
    assert torch.allclose(ddim_step(denoise, x, 80.0, 30.0), euler_step(denoise, x, 80.0, 30.0), rtol=1e-12)
    sig = karras_sigmas(12, append_zero=True)
    a, b = integrate(pre, x, sig, solver="ddim"), integrate(pre, x, sig, solver="euler")
    assert a.nfe == b.nfe and torch.allclose(a.x, b.x, rtol=1e-10, atol=1e-12)
    y = 0.5 * randn(4, 3, 8, 8, seed=6)
    a, b = integrate(pre, y, sig[:-1].flip(0), solver="ddim"), integrate(pre, y, sig[:-1].flip(0), solver="euler")
    assert torch.allclose(a.x, b.x, rtol=1e-10, atol=1e-10)


class GaussianMixture:
    """Ideal denoiser of an equal-weight mixture of isotropic Gaussians: nonlinear, still exact."""

    def __init__(self, k: int = 4, dim: int = 3 * 8 * 8, s: float = 0.2) -> None:
        self.means = (0.5 * randn(k, dim, seed=7)).clamp(-0.9, 0.9)
        self.s = s

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        xf, var = x.reshape(x.shape[0], 1, -1), sigma.reshape(-1, 1).to(x.dtype) ** 2 + self.s**2
        resp = (-(xf - self.means).square().sum(-1) / (2 * var)).softmax(-1)
        post = self.means + (self.s**2 / var)[..., None] * (xf - self.means)
        return (resp[..., None] * post).sum(1).reshape(x.shape)

    def data(self, n: int) -> Tensor:
        k = torch.randint(0, len(self.means), (n,), generator=torch.Generator().manual_seed(8))
        return (self.means[k] + self.s * randn(n, self.means.shape[1], seed=9)).reshape(n, 3, 8, 8)


def test_invert_then_sample_recovers_the_image() -> None:
    mix = GaussianMixture()
    x0 = mix.data(32)

    def round_trip(solver: str, steps: int) -> float:
        lat = invert(mix, x0, solver=solver, steps=steps)
        return psnr(sample(mix, lat.x / SMAX, solver=solver, steps=steps).x, x0)

    heun = [round_trip("heun", n) for n in (6, 18, 40)]
    assert heun[0] < heun[1] < heun[2] and heun[2] > 60, heun
    assert round_trip("euler", 18) < heun[1]
    # Latents of real data look like sigma_max * unit noise.
    lat = invert(mix, x0, steps=40).x / SMAX
    assert abs(lat.std().item() - 1) < 0.1


def test_clamp_flag_limits_denoiser_output() -> None:
    wild = lambda x, sigma, cond: 5 * x  # noqa: E731  (outputs far outside [-1, 1])
    eps = randn(4, 3, 4, 4, seed=10)
    clamped = sample(wild, eps, solver="heun", steps=6, clamp=True).x
    assert clamped.abs().max() <= 1 + 1e-9  # the last (Euler) step to 0 lands on D itself
    assert sample(wild, eps, solver="heun", steps=6).x.abs().max() > 1
    # On a denoiser already inside [-1, 1] the flag changes nothing.
    tame = lambda x, sigma, cond: torch.tanh(x)  # noqa: E731
    assert torch.equal(sample(tame, eps, steps=6, clamp=True).x, sample(tame, eps, steps=6).x)


# ---------------------------------------------------------------------------------------------- guidance


@dataclasses.dataclass
class Cond:
    mean: Tensor
    caption: list[str]
    extra: Tensor | None = None


def null_cond(c: Cond) -> Cond:
    return Cond(mean=torch.zeros_like(c.mean), caption=[""] * len(c.caption), extra=None)


class CountingMeanDenoiser:
    """Gaussian denoiser whose mean comes from the condition; records batch sizes of each call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        self.batches.append(x.shape[0])
        assert len(cond.caption) == x.shape[0] == sigma.shape[0]
        return gaussian_denoiser(x, sigma, mu=_col(cond.mean, x))


def _cond(b: int) -> Cond:
    return Cond(mean=torch.linspace(-0.5, 0.5, b, dtype=torch.float64), caption=[f"c{i}" for i in range(b)])


def test_cfg_weight_one_is_the_conditional_model() -> None:
    eps, cond = randn(5, 3, 4, 4, seed=11), _cond(5)
    plain, guided = CountingMeanDenoiser(), CountingMeanDenoiser()
    ref = sample(plain, eps, cond, steps=10)

    def must_not_be_called(c: Cond) -> Cond:
        raise AssertionError("null_cond called at guidance 1")

    out = sample(guided, eps, cond, steps=10, guidance=1.0, null_cond=must_not_be_called)
    assert torch.equal(out.x, ref.x) and out.network_evals == out.nfe == 19
    assert guided.batches == [5] * 19
    x, sigma = randn(5, 3, 4, 4), torch.full((5,), 2.0, dtype=torch.float64)
    assert torch.equal(ClassifierFreeGuidance(plain, 1.0, None)(x, sigma, cond), plain(x, sigma, cond))


def test_cfg_is_one_batched_call_with_the_guidance_formula() -> None:
    den, cond, w = CountingMeanDenoiser(), _cond(5), 3.0
    x, sigma = randn(5, 3, 4, 4, seed=12), torch.full((5,), 1.5, dtype=torch.float64)
    cfg = ClassifierFreeGuidance(den, w, null_cond)
    got = cfg(x, sigma, cond)
    assert den.batches == [10] and cfg.passes_per_call == 2
    d_c, d_u = den(x, sigma, cond), den(x, sigma, null_cond(cond))
    assert torch.allclose(got, d_u + w * (d_c - d_u), rtol=1e-12)
    out = sample(den, randn(5, 3, 4, 4), cond, steps=6, guidance=w, null_cond=null_cond)
    assert out.nfe == 11 and out.network_evals == 22
    with pytest.raises(ValueError, match="null_cond"):
        sample(den, randn(5, 3, 4, 4), cond, guidance=2.0)


def test_concat_conditions_structure() -> None:
    a = Cond(mean=torch.zeros(2), caption=["a", "b"], extra=torch.ones(2, 3))
    b = Cond(mean=torch.ones(2), caption=["", ""], extra=torch.zeros(2, 3))
    c = concat_conditions(a, b)
    assert isinstance(c, Cond) and c.caption == ["a", "b", "", ""] and c.extra.shape == (4, 3)
    assert torch.equal(c.mean, torch.tensor([0.0, 0, 1, 1]))
    d = concat_conditions({"y": torch.zeros(2), "w": torch.tensor(2.0)}, {"y": torch.ones(2), "w": torch.tensor(2.0)})
    assert d["y"].shape == (4,) and d["w"].item() == 2.0
    with pytest.raises(TypeError, match="None"):
        concat_conditions(a, null_cond(a))


# ---------------------------------------------------------------------------------------------- robustness


def test_solvers_are_deterministic() -> None:
    pre = EDMPrecond(TinyNet())
    eps = randn(4, 3, 8, 8, seed=13, dtype=torch.float32)
    for solver in ("euler", "heun", "ddim"):
        a, b = sample(pre, eps, solver=solver, steps=8), sample(pre, eps, solver=solver, steps=8)
        assert torch.equal(a.x, b.x)
        ia, ib = invert(pre, a.x, solver=solver, steps=8), invert(pre, a.x, solver=solver, steps=8)
        assert torch.equal(ia.x, ib.x)


def test_bad_inputs_raise_clear_errors() -> None:
    x = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(gaussian_denoiser, x, solver="rk4")
    with pytest.raises(ValueError, match="strictly"):
        integrate(gaussian_denoiser, x, torch.tensor([1.0, 2.0, 1.5]))
    with pytest.raises(ValueError, match="final 0"):
        integrate(gaussian_denoiser, x, torch.tensor([2.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="1-D"):
        integrate(gaussian_denoiser, x, torch.tensor([1.0]))


# ------------------------------------------------------------------------------------ stochastic sampler (EDM)
def test_churn_zero_is_the_deterministic_sampler_and_churn_samples_the_data() -> None:
    """EDM's S_churn: amount 0 is the PF-ODE sampler exactly; with churn the sample differs from the PF-ODE's but
    still has the data's distribution (exact denoiser of Gaussian data: mean MU, std S; on a fine grid, as churn
    adds discretisation error: the std is 6% high at 32 points, 1% at 128)."""
    noise = randn(1024, 32, seed=3)
    plain = sample(gaussian_denoiser, noise, steps=128, sigma_min=SMIN, sigma_max=SMAX)
    zero = sample(gaussian_denoiser, noise, steps=128, sigma_min=SMIN, sigma_max=SMAX, churn=Churn(0.0))
    assert torch.equal(plain.x, zero.x)
    churned = sample(gaussian_denoiser, noise, steps=128, sigma_min=SMIN, sigma_max=SMAX,
                     churn=Churn(40.0, 0.05, 50.0, 1.0, per_sample_normal(list(range(1024)))))
    assert churned.nfe == plain.nfe
    assert (churned.x - plain.x).abs().mean() > 0.05
    assert churned.x.mean().item() == pytest.approx(MU, abs=0.01)
    assert churned.x.std().item() == pytest.approx(S, rel=0.02)


def test_churn_noise_of_a_sample_depends_on_its_seed_alone() -> None:
    """per_sample_normal: a sample's stochastic path is the same in any batch (EDM's StackedRandomGenerator)."""
    noise = randn(3, 2, 4, 4, seed=4)
    kwargs = {"steps": 8, "sigma_min": SMIN, "sigma_max": SMAX}
    both = sample(gaussian_denoiser, noise, churn=Churn(10.0, normal=per_sample_normal([7, 8, 9])), **kwargs).x
    alone = sample(gaussian_denoiser, noise[1:2], churn=Churn(10.0, normal=per_sample_normal([8])), **kwargs).x
    torch.testing.assert_close(both[1:2], alone)
    other = sample(gaussian_denoiser, noise[1:2], churn=Churn(10.0, normal=per_sample_normal([5])), **kwargs).x
    assert not torch.allclose(other, alone)
    with pytest.raises(ValueError, match="descending grid"):
        integrate(gaussian_denoiser, noise, karras_sigmas(4).flip(0), churn=Churn(1.0))
    with pytest.raises(ValueError, match="euler or heun"):
        sample(gaussian_denoiser, noise, solver="ddim", churn=Churn(1.0), **kwargs)

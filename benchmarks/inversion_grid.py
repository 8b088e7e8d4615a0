"""How many Karras points the inversion needs: latent scale and round trip against the grid, with an exact denoiser.

    python benchmarks/inversion_grid.py [--points 8 12 18 24 40 80] [--images 64] [--resolution 64]

Data: x0 ~ N(0, sigma_data^2 I) images (3 x resolution^2). Its denoiser is known in closed form,
D(x; sigma) = x sigma_data^2 / (sigma_data^2 + sigma^2), and so is its PF-ODE flow: x(sigma) = x0 sqrt((sigma_data^2 +
sigma^2) / (sigma_data^2 + sigma_min^2)), so the exact latent has std sqrt(sigma_data^2 + sigma_max^2) ~ sigma_max (1
+ 2e-5). What a sampler meets at sigma_max is sigma_max * eps: a latent with std / sigma_max below 1 is an input the
one-step generator never sees on its GAN half. Per grid (Heun, `invert` as precompute runs it, clamp off: Gaussian data
exceed [-1, 1]), prints:
  - latent std / sigma_max (1 is right),
  - the latent's relative RMS error against the exact flow,
  - round-trip PSNR of sample(invert(x)) vs x on the same grid (what precompute reports), and the denoiser
    evaluations per image of both directions.
The round trip can be near perfect while the latent is off: the sampler's discretisation error on the way down
mostly undoes the inversion's on the way up.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pagoda_dist.diffusion import invert, sample  # noqa: E402

SIGMA_DATA, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
    """The exact denoiser of N(0, SIGMA_DATA^2 I) data."""
    s2 = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) ** 2
    return x * SIGMA_DATA**2 / (SIGMA_DATA**2 + s2)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB for a peak-to-peak range of 2 (images in [-1, 1])."""
    mse = (x - y).square().flatten(1).mean(1).clamp_min(1e-20)
    return float((10 * torch.log10(4.0 / mse)).mean())


def measure(points: int, x0: torch.Tensor) -> dict[str, float]:
    inv = invert(gaussian_denoiser, x0, steps=points, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    exact = x0 * math.sqrt((SIGMA_DATA**2 + SIGMA_MAX**2) / (SIGMA_DATA**2 + SIGMA_MIN**2))
    back = sample(gaussian_denoiser, inv.x / SIGMA_MAX, steps=points, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    return {"std_ratio": float(inv.x.std() / SIGMA_MAX),
            "latent_err": float((inv.x - exact).square().mean().sqrt() / exact.square().mean().sqrt()),
            "psnr": psnr(back.x, x0), "nfe": inv.nfe + back.nfe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[8, 12, 18, 24, 40, 80])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x0 = SIGMA_DATA * torch.randn(args.images, 3, args.resolution, args.resolution, generator=g, dtype=torch.float64)
    print(f"Gaussian data, std {SIGMA_DATA}, {args.images} images 3x{args.resolution}^2, exact denoiser, Heun, "
          f"sigma {SIGMA_MIN}..{SIGMA_MAX}, float64")
    print(f"{'points':>6} {'std/sigma_max':>13} {'latent rel. err':>15} {'round-trip PSNR':>15} {'NFE inv+sample':>14}")
    for n in args.points:
        m = measure(n, x0)
        print(f"{n:>6} {m['std_ratio']:>13.4f} {m['latent_err']:>15.4f} {m['psnr']:>12.1f} dB {m['nfe']:>14}")


if __name__ == "__main__":
    main()

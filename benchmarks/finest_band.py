"""What the first growth octave starts from: bicubic x2 of each base-resolution image set, seen by the finest SWD level.

A grown stage is scored against bicubic x2 of the stage below. This benchmark asks how much of that baseline's
score is the base images' own doing: it upsamples, by bicubic x2, the held-out real images (box-downsampled to the
base resolution), the teacher's samples and the one-step student's samples (the same noise for both), and scores
each against the held-out real images at twice the base resolution. Beside each it prints the kurtosis of the
finest Laplacian band (the band the finest SWD level compares) and the spread of that band's energy across images
(coefficient of variation of the per-image RMS): photographs have sparse detail, flat in some tiles and sharp edges
in others, and a distribution that lacks it shows at the finest level whatever the octave above adds.

    python benchmarks/finest_band.py configs/tiles.yaml run.name=tiles-v6 --seeds 5
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
from benchmarks.common import config_parser  # noqa: E402
from pagoda_dist.config import load_config  # noqa: E402
from pagoda_dist.data.tensors import downsample  # noqa: E402
from pagoda_dist.eval.evaluate import Scorer, bicubic, generate, held_out  # noqa: E402
from pagoda_dist.eval.inputs import load_network  # noqa: E402
from pagoda_dist.eval.swd import laplacian_pyramid  # noqa: E402
from pagoda_dist.pipeline import local_storage  # noqa: E402


def band_statistics(images: Tensor) -> tuple[float, float]:
    """(kurtosis, per-image RMS coefficient of variation) of the finest Laplacian band of `images`."""
    band = laplacian_pyramid(images.float())[0]
    flat = band.flatten()
    kurtosis = ((flat - flat.mean()) / flat.std()).pow(4).mean().item()
    rms = band.square().mean(dim=(1, 2, 3)).sqrt()
    return kurtosis, (rms.std() / rms.mean()).item()


def main() -> None:
    parser = config_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="noise draws of the generated sets")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    base, n = cfg.model.resolution, cfg.eval.num_images
    with local_storage(cfg):
        data = held_out(cfg, n)
        score = Scorer(cfg)
        real = downsample(data.real, 2 * base)
        nets = {stage: load_network(cfg, stage) for stage in ("teacher", "distill")}
        sets: dict[str, list[Tensor]] = {"real (held-out, next 128)": [downsample(data.real_floor, base)]}
        for seed in range(1, args.seeds + 1):
            g = torch.Generator().manual_seed(cfg.run.seed + seed)
            noise = torch.randn(n, cfg.model.in_channels, base, base, generator=g)
            for stage, net in nets.items():
                sets.setdefault(f"{stage} samples", []).append(generate(cfg, net, noise, data.condition))
        finest = f"swd/{2 * base}"
        print(f"bicubic x2 of {base} px sets vs {n} held-out real images at {2 * base} px "
              f"(generated: mean over {args.seeds} draws)")
        print(f"{'set':28s} {finest:>9s} {'swd/' + str(base):>9s} {'FID-EffNetLite0':>16s} {'kurtosis':>9s} "
              f"{'rms cv':>7s}")
        for name, images in sets.items():
            upsampled = [bicubic(x, 2 * base) for x in images]
            rows = [score(real, x) for x in upsampled]
            stats = [band_statistics(x) for x in upsampled]
            mean = {k: statistics.mean(r[k] for r in rows) for k in (finest, f"swd/{base}", "FID-EffNetLite0")}
            print(f"{name:28s} {mean[finest]:9.1f} {mean[f'swd/{base}']:9.1f} {mean['FID-EffNetLite0']:16.1f} "
                  f"{statistics.mean(s[0] for s in stats):9.1f} {statistics.mean(s[1] for s in stats):7.2f}")
        kurt, cv = band_statistics(real)
        print(f"{'real at ' + str(2 * base) + ' px itself':28s} {'':9s} {'':9s} {'':16s} {kurt:9.1f} {cv:7.2f}")


if __name__ == "__main__":
    main()

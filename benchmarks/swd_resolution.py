"""How finely the base resolution's SWD tells the one-step student from its teacher, and either from real data.

The quality benchmark scores eval.num_images generated images against as many held-out ones; on the photo tiles that
is 128 of the 312 held-out tiles, and a difference of a few percent between two stages may be the draw's. This
benchmark takes its real sets from the training split, which holds thousands: the first N training images
(evaluation order) are the reference, and in each draw the next N not yet used are scored as if a generator had
drawn them (a generator of the data distribution itself: where any generator's score lands, and how far one draw
moves it), beside the final teacher and the final student on the same noise. Per draw it prints SWD at the base
resolution, FID-EffNetLite0 and the RMS of the finest Laplacian band (the image minus its binomial blur: how much
pixel-scale grain a set has); then each set's mean (sd) of those and of its contrast (the RMS about each image's own
channel means), and the student's and teacher's paired change against the real set and the student's against the
teacher, with the mean change's 95% t-interval. An interval across zero means this N and this many draws cannot
tell the two apart, whichever way the mean points.

--inverted adds a fourth set: the student handed the inversion latents of the draw's own real tiles instead of fresh
noise, and prints how those latents differ from N(0, I). Near the real set, it says the student has learnt the
latent -> image map and what it lacks on fresh noise is the teacher's: real images invert to latents that unit noise
does not look like (the teacher's distribution is not the data's), and only the GAN half, which sees fresh noise,
can close that gap. A fifth set, the student on the same noise coloured to the latents' second-order statistics
(per spatial frequency, the channel covariance of all the latents read), says whether those statistics are the
difference: near the student on latents, they are; near or beyond the student on fresh noise, the difference lies in
what a Gaussian cannot carry.

--live adds the student's live weights (the ones the optimiser stepped, from the same checkpoint) beside its EMA
network, on the same noise: what the weight average does to the images, e.g. to their contrast. --student-kimg K
scores the student's first committed checkpoint at or after K thousand images instead of its latest (keep them with
logging.keep_checkpoints), to follow the student's metrics over training against the same teacher and real sets.

    python benchmarks/swd_resolution.py configs/tiles.yaml run.name=tiles-v9 --images 128 --draws 10
    python benchmarks/swd_resolution.py configs/tiles.yaml run.name=tiles-v9 --images 512 --draws 7
    python benchmarks/swd_resolution.py configs/tiles.yaml run.name=tiles-v9 --images 128 --draws 10 --inverted
    python benchmarks/swd_resolution.py configs/tiles.yaml run.name=tiles-v9 --images 128 --draws 10 --live
    python benchmarks/swd_resolution.py configs/tiles.yaml run.name=tiles-v9 --images 128 --draws 10 --student-kimg 10
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
from benchmarks.common import config_parser  # noqa: E402
from pagoda_dist.config import load_config  # noqa: E402
from pagoda_dist.data.tensors import downsample  # noqa: E402
from pagoda_dist.eval.evaluate import Scorer, generate  # noqa: E402
from pagoda_dist.eval.fid import EFFNET_METRIC  # noqa: E402
from pagoda_dist.eval.inputs import HeldOutSlice, load_export_network, load_network, read_held_out  # noqa: E402
from pagoda_dist.eval.swd import laplacian_pyramid  # noqa: E402
from pagoda_dist.pipeline import local_storage  # noqa: E402
from pagoda_dist.runtime.checkpoint import CheckpointStore, NoExport  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_vs_time import mean_interval  # noqa: E402

SETS = ("real", "teacher", "student")
PAIRS = (("teacher", "real"), ("student", "real"), ("student", "teacher"))
INVERTED = "student on latents"
COLOURED = "student on coloured noise"
INVERTED_PAIRS = ((INVERTED, "real"), ("student", INVERTED), (COLOURED, "student"))
LIVE = "student live weights"
LIVE_PAIRS = ((LIVE, "teacher"), (LIVE, "student"))
BAND = "finest band RMS"
CONTRAST = "contrast"


def finest_band_rms(images: torch.Tensor) -> float:
    """RMS of the finest Laplacian band of images in [-1, 1]: the pixel-scale grain a set has."""
    return float(laplacian_pyramid(images.float(), images.shape[-1] // 2)[0].square().mean().sqrt())


def contrast(images: torch.Tensor) -> float:
    """RMS of images in [-1, 1] about each image's own channel means: how much their pixels vary within an image
    (SWD standardises a whole set's channels, so a set flatter within its images than between them shows there)."""
    x = images.float()
    return float((x - x.mean(dim=(2, 3), keepdim=True)).square().mean().sqrt())


def consecutive_sets(tiles: HeldOutSlice, n: int) -> list[HeldOutSlice]:
    """One read of the training split cut into sets of n: the reference, then each draw's real set (one reader,
    not one per set)."""
    def part(i: int) -> HeldOutSlice:
        at = slice(n * i, n * (i + 1))
        return HeldOutSlice(tiles.images[at], tiles.condition[at],  # an empty condition slices to itself
                            tiles.captions[at] if tiles.captions else None,
                            None if tiles.latent is None else tiles.latent[at])
    return [part(i) for i in range(len(tiles.images) // n)]


def latent_stats(z: torch.Tensor) -> dict[str, float]:
    """How a batch of base-resolution latents departs from i.i.d. unit noise: its std (per sigma_max when the
    latents are at that scale), and, after each is scaled to unit std, the correlation of horizontal neighbours and
    the spread of the per-image channel means (1 / resolution for white noise)."""
    unit = z / z.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return {"std": float(z.std()), "neighbour correlation": float((unit[..., 1:] * unit[..., :-1]).mean()),
            "channel-mean sd": float(unit.mean(dim=(2, 3)).std())}


def spectrum_root(latents: torch.Tensor) -> torch.Tensor:
    """(H, W, C, C) square roots of the latents' channel covariance at each spatial frequency of their 2-D Fourier
    transform: what turns unit noise into the stationary Gaussian with the latents' spectrum and colour
    correlations (`coloured`). A real image's transform at -f is the conjugate of that at f, so the estimate and
    its root are too, and the coloured noise comes back real."""
    coeffs = torch.fft.fft2(latents.double()).permute(2, 3, 1, 0)  # (H, W, C, N)
    cov = coeffs @ coeffs.conj().transpose(-1, -2) / (latents.shape[0] * latents.shape[-2] * latents.shape[-1])
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag_embed(values.clamp_min(0).sqrt().to(vectors.dtype)) @ vectors.conj().transpose(-1, -2)


def coloured(noise: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Unit noise (N, C, H, W) given the second-order statistics `root` was taken from, frequency by frequency."""
    coeffs = torch.fft.fft2(noise.double()).permute(2, 3, 1, 0)
    return torch.fft.ifft2((root @ coeffs).permute(3, 2, 0, 1)).real.to(noise.dtype)


def summary(rows: list[dict[str, dict[str, float]]], key: str, sets: tuple[str, ...] = SETS,
            pairs: tuple[tuple[str, str], ...] = PAIRS) -> list[str]:
    """Mean (sd) of each set over the draws, then each pair's change per draw with its mean and 95% interval."""
    spread = (lambda v: f" ({statistics.stdev(v):.1f})") if len(rows) > 1 else (lambda v: "")
    out = [f"  {key}: " + ", ".join(f"{name} {statistics.mean(v):.1f}{spread(v)}"
                                    for name in sets for v in [[r[name][key] for r in rows]])]
    for ours, ref in pairs:
        change = [r[ours][key] / r[ref][key] - 1 for r in rows]
        out.append(f"    {ours} vs {ref}: {' '.join(f'{c:+.1%}' for c in change)}, lower in "
                   f"{sum(c < 0 for c in change)}/{len(change)}{mean_interval(change)}")
    return out


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--images", type=int, default=128, help="images in every set (reference, real, generated)")
    parser.add_argument("--draws", type=int, default=5, help="noise draws, each with its own real set")
    parser.add_argument("--inverted", action="store_true",
                        help="also score the student on the inversion latents of each draw's real tiles, and on "
                             "the draw's noise coloured to the latents' spectrum")
    parser.add_argument("--live", action="store_true",
                        help="also score the student's live (not EMA) weights of the same checkpoint")
    parser.add_argument("--student-kimg", type=float, default=None,
                        help="score the student's first committed checkpoint at or after this many thousand images "
                             "(default: its latest), to follow a metric over training")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    n, res = args.images, cfg.model.resolution
    key = f"swd/{res}"
    sets, pairs = SETS, PAIRS
    if args.inverted:
        sets, pairs = sets + (INVERTED, COLOURED), pairs + INVERTED_PAIRS
    if args.live:
        sets, pairs = sets + (LIVE,), pairs + LIVE_PAIRS
    torch.manual_seed(cfg.run.seed)
    rows, latent_rows = [], []
    with local_storage(cfg):
        try:
            tiles = read_held_out(cfg, 0, n * (args.draws + 1), split="train", latents=args.inverted)
        except ValueError as err:
            raise SystemExit(f"swd_resolution: {err}; lower --images or --draws") from None
        reference, *real_sets = consecutive_sets(tiles, n)
        real = downsample(reference.images, res)
        if args.inverted:  # one estimate from every latent read: 128 per frequency would leave it noisy
            root = spectrum_root(tiles.latent / cfg.diffusion.sigma_max)
        score = Scorer(cfg)
        store = CheckpointStore(cfg.run_url, "distill")
        try:
            student, seen = (store.latest_export() if args.student_kimg is None
                             else store.export_from(round(args.student_kimg * 1000)))
        except NoExport as err:
            raise SystemExit(f"swd_resolution: {err}") from None
        print(f"[swd_resolution] student: the checkpoint at {seen} images", flush=True)
        nets = {"teacher": load_network(cfg, "teacher"), "student": load_export_network(student)}
        if args.live:
            nets[LIVE] = load_export_network(student, weights="net")
        for d, drawn in enumerate(real_sets, start=1):
            g = torch.Generator().manual_seed(cfg.run.seed + d)  # draw 1 is the quality benchmark's curve noise
            noise = torch.randn(n, cfg.model.in_channels, res, res, generator=g)
            images = {"real": downsample(drawn.images, res),
                      **{name: generate(cfg, net, noise, drawn.condition) for name, net in nets.items()}}
            if args.inverted:
                unit_latents = drawn.latent / cfg.diffusion.sigma_max
                # guidance 1: the latents invert the unguided PF-ODE, the input reconstruction trains the student on
                images[INVERTED] = generate(cfg, nets["student"], unit_latents, drawn.condition, guidance=1.0)
                tinted = coloured(noise, root)
                images[COLOURED] = generate(cfg, nets["student"], tinted, drawn.condition, guidance=1.0)
                latent_rows.append({"latents": latent_stats(unit_latents), "coloured": latent_stats(tinted),
                                    "noise": latent_stats(noise)})
            rows.append({name: {**score(real, images[name], drawn.captions), BAND: 1e3 * finest_band_rms(images[name]),
                                CONTRAST: 1e3 * contrast(images[name])} for name in sets})
            print(f"[swd_resolution] draw {d}: " + "; ".join(
                f"{name} {rows[-1][name][key]:.1f} / {rows[-1][name][EFFNET_METRIC]:.1f} / {rows[-1][name][BAND]:.1f}"
                for name in sets), flush=True)
    print(f"\n{args.images} images per set against {args.images} training images, {args.draws} draws "
          f"({key} / {EFFNET_METRIC} / {BAND} x 1e3; then the {CONTRAST} x 1e3)")
    print("\n".join(line for metric in (key, EFFNET_METRIC, BAND, CONTRAST)
                     for line in summary(rows, metric, sets, pairs)))
    if latent_rows:  # the inversion latents per sigma_max against the unit noise the other sets are drawn from
        mean = {kind: {stat: statistics.mean(r[kind][stat] for r in latent_rows) for stat in latent_rows[0][kind]}
                for kind in latent_rows[0]}
        print("  latents vs coloured noise vs unit noise: " + ", ".join(
            f"{stat} {mean['latents'][stat]:.3f} / {mean['coloured'][stat]:.3f} / {mean['noise'][stat]:.3f}"
            for stat in mean["noise"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

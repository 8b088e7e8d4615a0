"""How well a discriminator can tell real base-resolution images from the teacher's and the one-step student's.

The GAN half of distillation can only pull the student toward what its discriminator tells apart. This benchmark
trains fresh discriminators offline, each on `--train` real training images (box-downsampled to the base
resolution) against as many generated ones (the teacher's and the student's samples, the same noise), for `--steps`
steps of the distillation batch with the config's discriminator optimizer and the hinge loss, and prints each one's
accuracy on `--held-out` further images of each side (0.5: chance). Four discriminators per generated set: the
config's own (distill.adversarial.discriminator) with and without its DiffAugment policy (applied, as in training,
to both sides alike), the plain conv one on the pixels (backbone none, the same channels, two scales, mean head),
and that one ended as StyleGAN's is (conv_head dense, minibatch_std 4), unaugmented.

    python benchmarks/discriminator_probe.py configs/tiles.yaml run.name=tiles-h1 --train 3000 --held-out 1000
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
from benchmarks.common import config_parser  # noqa: E402
from pagoda_dist.config import Config, OptimizerConfig, load_config  # noqa: E402
from pagoda_dist.data.tensors import downsample  # noqa: E402
from pagoda_dist.eval.evaluate import generate  # noqa: E402
from pagoda_dist.eval.inputs import load_network, read_held_out  # noqa: E402
from pagoda_dist.interfaces import Condition  # noqa: E402
from pagoda_dist.losses import d_hinge_loss, diff_augment  # noqa: E402
from pagoda_dist.models.discriminator import Discriminator  # noqa: E402
from pagoda_dist.pipeline import local_storage  # noqa: E402
from pagoda_dist.runtime.drivers import build_optimizer  # noqa: E402

Augment = Callable[[Tensor, Tensor], tuple[Tensor, ...]]


def held_out_accuracy(net: nn.Module, real: Tensor, fake: Tensor) -> float:
    """Mean of the share of real images scored above 0 and of fake ones below (the hinge loss's boundary), the
    logits of every scale averaged."""
    with torch.no_grad():
        r, f = (torch.stack(net(x)).mean(0) for x in (real, fake))
    return float(((r > 0).float().mean() + (f < 0).float().mean()) / 2)


def probe(net: nn.Module, real: Tensor, fake: Tensor, *, train: int, steps: int, batch: int,
          optimizer: OptimizerConfig, augment: Augment | None = None, seed: int = 0) -> float:
    """Trains `net` on the first `train` of each set (hinge loss, `augment` on each real/fake batch pair) and
    returns its accuracy on the rest."""
    opt = build_optimizer(net, optimizer)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i, j = torch.randint(0, train, (batch,), generator=g), torch.randint(0, train, (batch,), generator=g)
        r, f = augment(real[i], fake[j]) if augment else (real[i], fake[j])
        loss = d_hinge_loss(net(r), net(f))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return held_out_accuracy(net, real[train:], fake[train:])


def discriminators(cfg: Config) -> dict[str, tuple[Callable[[], nn.Module], Augment | None]]:
    """The probed discriminators by name: a builder for fresh weights and the augmentation they train under."""
    adv, res = cfg.distill.adversarial, cfg.model.resolution
    own, pixels = adv.discriminator, dataclasses.replace(adv.discriminator, backbone="none", num_scales=2,
                                                         pixel_scales=0, conv_head="mean", minibatch_std=0)
    augment = (lambda r, f: diff_augment(r, f, policy=adv.diffaug, cutout_ratio=adv.cutout_ratio)) \
        if adv.diffaug else None
    out = {f"config's, DiffAugment {adv.diffaug or 'off'}": (lambda: Discriminator(own, res), augment)}
    if augment:
        out["config's, no augmentation"] = (lambda: Discriminator(own, res), None)
    out["pixels (backbone none, 2 scales)"] = (lambda: Discriminator(pixels, res), None)
    # StyleGAN's ending: features of the last map by position, and a group's spread beside them.
    styled = dataclasses.replace(pixels, conv_head="dense", minibatch_std=4)
    out["pixels, dense head, minibatch std 4"] = (lambda: Discriminator(styled, res), None)
    return out


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--train", type=int, default=3000, help="training images of each side")
    parser.add_argument("--held-out", type=int, default=1000, help="held-back images of each side scored")
    parser.add_argument("--steps", type=int, default=1500, help="discriminator steps of distill.train.batch_size")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.model.num_classes or cfg.model.text_dim:
        raise SystemExit(f"discriminator_probe: {args.config} is conditional; the probe judges unconditional "
                         "samples only (model.num_classes: 0, no text)")
    n, res = args.train + args.held_out, cfg.model.resolution
    torch.manual_seed(cfg.run.seed)
    with local_storage(cfg):
        try:
            real = downsample(read_held_out(cfg, 0, n, split="train").images, res)
        except ValueError as err:
            raise SystemExit(f"discriminator_probe: {err}; lower --train or --held-out") from None
        noise = torch.randn(n, cfg.model.in_channels, res, res, generator=torch.Generator().manual_seed(cfg.run.seed))
        nets = {"teacher": load_network(cfg, "teacher"), "student": load_network(cfg, "distill")}
        generated = {stage: generate(cfg, net, noise, Condition()) for stage, net in nets.items()}
    print(f"[discriminator_probe] {args.train} vs {args.train} images, {args.steps} steps of "
          f"{cfg.distill.train.batch_size}; accuracy on {args.held_out} vs {args.held_out} held back (0.5: chance)")
    for stage, fake in generated.items():
        for name, (build, augment) in discriminators(cfg).items():
            torch.manual_seed(cfg.run.seed)  # the same initial weights for either generated set
            start = time.perf_counter()
            acc = probe(build(), real, fake, train=args.train, steps=args.steps, batch=cfg.distill.train.batch_size,
                        optimizer=cfg.distill.adversarial.discriminator.optimizer, augment=augment, seed=cfg.run.seed)
            print(f"  real vs {stage}: {name}: {acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

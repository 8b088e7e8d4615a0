"""Where the adaptive GAN weight's gradient norms are taken changes its value: the three formulas side by side.

    python benchmarks/adaptive_weight.py [--seeds 4]

For small random generators (a 16 px base UNet, and the same grown to 32 px, weights ~ N(0, 0.05) so that no
zero-initialised head blocks a gradient) with a random discriminator, the joint update's reconstruction loss
(multiscale L1 + L2 on random targets) and hinge GAN loss give ||d rec|| / ||d gan|| at
  - output: the generator's output image (adversarial.adaptive_weight_at: output, this project's default),
  - ref layer: the weight of the second conv of the last decoder residual block before the head (the layer the
    reference's get_last_layer names, output_blocks[-1][0].out_layers[3]; adaptive_weight_at: last_layer),
  - head conv: the weight of the output head's conv (VQGAN's conv_out, for comparison).
Prints each ratio and the ratios between them: the same gan_weight factor means a different GAN strength under
each formula. Plain autograd on CPU (no DeepSpeed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pagoda_dist.config import load_config  # noqa: E402
from pagoda_dist.interfaces import Condition  # noqa: E402
from pagoda_dist.losses import g_hinge_loss, multiscale_l1_l2  # noqa: E402
from pagoda_dist.models.generator import OneStepGenerator  # noqa: E402
from pagoda_dist.stages.networks import discriminator  # noqa: E402

SMALL = ["model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_classes=10",
         "distill.adversarial.discriminator.channels=16", "grow.adversarial.discriminator.channels=16",
         "grow.resolutions=[32]", "data.resolution=32"]


def ratios(seed: int, grown: bool) -> dict[str, float]:
    cfg = load_config(None, SMALL)
    torch.manual_seed(seed)
    G = OneStepGenerator(cfg.model, growth_resolutions=[32] if grown else [])
    for p in G.parameters():
        p.data.normal_(0, 0.05)
    adv = cfg.grow.adversarial if grown else cfg.distill.adversarial
    D = discriminator(cfg, adv, G.resolution)
    n, res = 4, G.resolution
    z, cond = torch.randn(2 * n, 3, 16, 16) * 80, Condition(class_labels=torch.randint(0, 10, (2 * n,)))
    target = torch.rand(n, 3, res, res) * 2 - 1
    out = G(z, cond)
    rec, gan = multiscale_l1_l2(out[:n], target), g_hinge_loss(D(out[n:], cond[n:]))
    head = G.growth_heads[-1] if grown else G.net.out
    places = {"output": out, "head conv": head.conv.weight, "ref layer": G.last_layer[0].weight}
    result = {}
    for name, wrt in places.items():
        g_rec, g_gan = (torch.autograd.grad(loss, wrt, retain_graph=True)[0] for loss in (rec, gan))
        result[name] = float(g_rec.norm() / g_gan.norm())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    print(f"{'generator':>10} {'seed':>4} {'output':>8} {'head conv':>9} {'ref layer':>9} "
          f"{'output/ref':>10} {'head/ref':>8}")
    for grown in (False, True):
        for seed in range(args.seeds):
            r = ratios(seed, grown)
            print(f"{'grow-32' if grown else 'distill':>10} {seed:>4} {r['output']:>8.3f} {r['head conv']:>9.3f} "
                  f"{r['ref layer']:>9.3f} {r['output'] / r['ref layer']:>10.2f} "
                  f"{r['head conv'] / r['ref layer']:>8.2f}")


if __name__ == "__main__":
    main()

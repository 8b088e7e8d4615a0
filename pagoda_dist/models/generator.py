"""PaGoDA's growable one-step generator G(z, cond), initialised from the teacher UNet.

At the base resolution G(z) = F(c_in(sigma_max) z, c_noise(sigma_max), cond): the teacher's raw network at
sigma_max, no skip mixing (PaGoDA). Each growth step (`grow`) doubles the output resolution by inserting, between
the last base-resolution decoder features and the output head, one upsampling residual block and two residual
blocks at the new resolution. All growth blocks keep the base level's width, so the head is reused: with the new
blocks' zero-initialised residual branches, a freshly grown generator applies the head to exactly the nearest-
upsampled features of the previous stage: roughly its output upsampled, and training adds detail from there.

Names: `net.*` is the teacher's UNet (same names as the teacher under the `net.` prefix), `growth.{k}.{j}` is
block j of growth step k (0: upsampling). `net.out` is the head.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from pagoda_dist.config import ModelConfig
from pagoda_dist.diffusion.edm import SIGMA_DATA, edm_preconditioning, per_sample_sigma
from pagoda_dist.models.blocks import UNetBlock
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.models.unet import UNet

GROWTH_BLOCKS = 3  # per octave: one upsampling block, then two blocks at the new resolution


def copy_matching_weights(dst: nn.Module, src: nn.Module | dict[str, Tensor]) -> list[str]:
    """Copies every parameter/buffer of `src` whose name and shape match one in `dst`; returns the copied names."""
    src_state = src.state_dict() if isinstance(src, nn.Module) else src
    dst_state = dst.state_dict()
    copied = []
    with torch.no_grad():
        for name, value in src_state.items():
            target = dst_state.get(name)
            if target is not None and target.shape == value.shape:
                target.copy_(value)
                copied.append(name)
    return copied


class OneStepGenerator(nn.Module):
    """G(z, cond) -> image at `resolution`; z is noise at level sigma_max (sigma_max * eps or an inversion latent)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        growth_resolutions: list[int] | tuple[int, ...] = (),
        trainable_decoder_blocks: int = 3,
        sigma_max: float = 80.0,
        sigma_data: float = SIGMA_DATA,
    ) -> None:
        super().__init__()
        expected = [cfg.resolution * 2 ** (k + 1) for k in range(len(growth_resolutions))]
        if list(growth_resolutions) != expected:
            raise ValueError(f"growth_resolutions {list(growth_resolutions)} must double from model.resolution "
                             f"{cfg.resolution} each step: expected {expected}")
        if trainable_decoder_blocks < 0:
            raise ValueError(f"trainable_decoder_blocks must be >= 0, got {trainable_decoder_blocks}")
        self.cfg = cfg
        self.growth_resolutions = list(growth_resolutions)
        self.trainable_decoder_blocks = trainable_decoder_blocks
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.net = UNet(cfg)
        width, emb = self.net.out_channels, self.net.emb_dim
        self.growth = nn.ModuleList([
            nn.ModuleList([UNetBlock(width, width, emb, dropout=cfg.dropout, resample="up" if j == 0 else "none")
                           for j in range(GROWTH_BLOCKS)])
            for _ in self.growth_resolutions
        ])
        if cfg.channels_last:
            self.growth.to(memory_format=torch.channels_last)
        self.apply_freeze_policy()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_teacher(cls, teacher: UNet, *, sigma_max: float = 80.0, sigma_data: float = SIGMA_DATA,
                     trainable_decoder_blocks: int = 3) -> OneStepGenerator:
        """A base-resolution generator whose network is an exact copy of the teacher's."""
        gen = cls(teacher.cfg, sigma_max=sigma_max, sigma_data=sigma_data,
                  trainable_decoder_blocks=trainable_decoder_blocks)
        gen.net.load_state_dict(teacher.state_dict())
        return gen.to(next(teacher.parameters()).device)

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> OneStepGenerator:
        """Rebuilds the generator an `architecture()` dict describes (weights not included)."""
        return cls(ModelConfig(**arch["model"]), growth_resolutions=arch["growth_resolutions"],
                   trainable_decoder_blocks=arch["trainable_decoder_blocks"],
                   sigma_max=arch["sigma_max"], sigma_data=arch["sigma_data"])

    def grow(self, trainable_decoder_blocks: int | None = None) -> OneStepGenerator:
        """A new generator at twice the resolution: this one's weights copied by name and shape, freeze applied.

        `self` is left untouched (build new optimizers and EMA for the returned module).
        """
        k = self.trainable_decoder_blocks if trainable_decoder_blocks is None else trainable_decoder_blocks
        grown = OneStepGenerator(self.cfg, growth_resolutions=[*self.growth_resolutions, 2 * self.resolution],
                                 trainable_decoder_blocks=k, sigma_max=self.sigma_max, sigma_data=self.sigma_data)
        copy_matching_weights(grown, self)
        return grown.to(next(self.parameters()).device)

    def apply_freeze_policy(self) -> None:
        """Base stage: everything trains. Grown: only the last decoder blocks, the growth blocks and the head train.

        Frozen: embeddings, encoder, middle and all but the last `trainable_decoder_blocks` decoder entries.
        """
        grown = bool(self.growth_resolutions)
        n_dec = len(self.net.dec)
        first_trainable = max(0, n_dec - self.trainable_decoder_blocks)
        for p in self.parameters():
            p.requires_grad_(not grown)
        if grown:
            for i in range(first_trainable, n_dec):
                self.net.dec[i].requires_grad_(True)
            self.growth.requires_grad_(True)
            self.net.out.requires_grad_(True)

    # --------------------------------------------------------------------------------------------- forward
    @property
    def resolution(self) -> int:
        return self.growth_resolutions[-1] if self.growth_resolutions else self.cfg.resolution

    @property
    def stage(self) -> str:
        return f"grow-{self.resolution}" if self.growth_resolutions else "distill"

    def features(self, x_in: Tensor, c_noise: Tensor, cond: Condition | None = None) -> Tensor:
        """Features at `resolution` that feed the head: the UNet's final decoder features, then the growth blocks."""
        h, emb = self.net.features(x_in, c_noise, cond)
        for blocks in self.growth:
            for block in blocks:
                h = block(h, emb)
        return h

    def raw(self, x_in: Tensor, c_noise: Tensor, cond: Condition | None = None) -> Tensor:
        """The network F with the growth blocks: base-resolution input, output at `resolution`."""
        return self.net.out(self.features(x_in, c_noise, cond)).contiguous()

    def forward(self, z: Tensor, cond: Condition | None = None) -> Tensor:
        c = edm_preconditioning(per_sample_sigma(self.sigma_max, z), self.sigma_data)
        return self.raw((c.c_in * z).to(z.dtype), c.c_noise.flatten(), cond)

    def architecture(self) -> dict[str, Any]:
        """Plain-data description stored in checkpoints (see `checkpoint_safety`)."""
        return {"kind": "one_step_generator", "stage": self.stage, "resolution": self.resolution,
                "model": dataclasses.asdict(self.cfg), "growth_resolutions": list(self.growth_resolutions),
                "trainable_decoder_blocks": self.trainable_decoder_blocks,
                "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}

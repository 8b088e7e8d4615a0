"""PaGoDA's growable one-step generator G(z, cond), initialised from the teacher UNet.

At the base resolution G(z) = F(c_in(sigma_max) z, c_noise(sigma_max), cond): the teacher's raw network at
sigma_max, no skip mixing (PaGoDA). Each growth step (`grow`) doubles the output resolution: one upsampling
residual block and two residual blocks at the new resolution continue from the previous octave's features, and a
new output head turns them into a residual image added to the bicubic upsampling of the previous octave's image:

    out_0 = head(h_0),   h_k = growth_k(h_(k-1)),   out_k = bicubic_x2(out_(k-1)) + head_k(h_k)

Every new head starts at zero, so a freshly grown generator outputs exactly the bicubic upsampling of the stage
below (the baseline growth must beat) and training adds the detail. (Applying the base head to upsampled features
instead leaves its zero padding one feature row off what the base network learned to compensate: a bright frame
along every border.)

A detail-only octave (`detail_resolutions`) removes each 2x2 block's mean from its head's residual: its image then
has exactly the 2x2 means of bicubic x2 of the image below, so it adds detail and cannot redraw the colour and
layout the stage below drew (a reconstruction distance otherwise also pulls that content towards its conditional
mean, which blurs it).

A guidance-aware generator (text-to-image PaGoDA) also takes the classifier-free guidance scale w it should
imitate, per sample, as `Condition.guidance` (missing: w = 1, unguided). Its embedding is added to the UNet's
noise-and-condition embedding and starts at exactly zero, so the teacher copy is unchanged until training moves it.

Names: `net.*` is the teacher's UNet (same names as the teacher under the `net.` prefix), `growth.{k}.{j}` is
block j of growth step k (0: upsampling), `growth_heads.{k}` its output head, `guidance_emb.*` the guidance
embedding of a guidance-aware generator. `net.out` is the base head.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda_dist.config import ModelConfig
from pagoda_dist.diffusion.edm import SIGMA_DATA, edm_preconditioning, per_sample_sigma
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.blocks import FourierEmbedding, OutputHead, UNetBlock, zero_
from pagoda_dist.models.unet import UNet, model_record

GROWTH_BLOCKS = 3  # per octave: one upsampling block, then two blocks at the new resolution
GROWTH_OUTPUT = "bicubic+residual"  # each octave: bicubic x2 of the image below plus its own head's residual


def without_block_means(residual: Tensor) -> Tensor:
    """`residual` minus the mean of each 2x2 block (nearest-upsampled back): every 2x2 block then sums to exactly 0."""
    return residual - F.interpolate(F.avg_pool2d(residual, 2), scale_factor=2, mode="nearest")


class GuidanceEmbedding(nn.Module):
    """w (B,) -> (B, 4*channels) added to the UNet's embedding: Fourier features of (w - 1) / 4, then a Linear.

    (w - 1) / 4 puts w = 1 at 0 and a guidance range up to ~8 inside the span FourierEmbedding resolves (it was sized
    for c_noise in about [-1.6, 1.1]). The Linear is zero-initialised: a new embedding adds exactly 0 for every w.
    """

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.fourier = FourierEmbedding(channels)
        self.proj = zero_(nn.Linear(channels, emb_dim))

    def forward(self, w: Tensor) -> Tensor:
        return self.proj(self.fourier((w.float() - 1) / 4).to(self.proj.weight.dtype))


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
        guidance_input: bool = False,
        detail_resolutions: list[int] | tuple[int, ...] = (),
        freeze_below: bool = False,
    ) -> None:
        super().__init__()
        expected = [cfg.resolution * 2 ** (k + 1) for k in range(len(growth_resolutions))]
        if list(growth_resolutions) != expected:
            raise ValueError(f"growth_resolutions {list(growth_resolutions)} must double from model.resolution "
                             f"{cfg.resolution} each step: expected {expected}")
        if not set(detail_resolutions) <= set(growth_resolutions):
            raise ValueError(f"detail_resolutions {list(detail_resolutions)} must be growth resolutions "
                             f"{list(growth_resolutions)}")
        if trainable_decoder_blocks < 0:
            raise ValueError(f"trainable_decoder_blocks must be >= 0, got {trainable_decoder_blocks}")
        self.cfg = cfg
        self.growth_resolutions = list(growth_resolutions)
        self.trainable_decoder_blocks = trainable_decoder_blocks
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.guidance_input = bool(guidance_input)
        self.detail_resolutions = sorted(detail_resolutions)
        self.freeze_below = bool(freeze_below)
        if self.guidance_input and not (cfg.num_classes or cfg.text_dim):
            raise ValueError("a guidance-aware generator needs a conditional model (model.num_classes or "
                             "model.text_dim): classifier-free guidance steers towards a condition")
        self.net = UNet(cfg)
        width, emb = self.net.out_channels, self.net.emb_dim
        self.guidance_emb = GuidanceEmbedding(cfg.channels, emb) if self.guidance_input else None
        self.growth = nn.ModuleList([
            nn.ModuleList([UNetBlock(width, width, emb, dropout=cfg.dropout, resample="up" if j == 0 else "none")
                           for j in range(GROWTH_BLOCKS)])
            for _ in self.growth_resolutions
        ])
        self.growth_heads = nn.ModuleList([OutputHead(width, cfg.in_channels) for _ in self.growth_resolutions])
        if cfg.uses_channels_last:
            self.growth.to(memory_format=torch.channels_last)
            self.growth_heads.to(memory_format=torch.channels_last)
        self.apply_freeze_policy()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_teacher(cls, teacher: UNet, *, sigma_max: float = 80.0, sigma_data: float = SIGMA_DATA,
                     trainable_decoder_blocks: int = 3, guidance_input: bool = False) -> OneStepGenerator:
        """A base-resolution generator whose network is an exact copy of the teacher's (and whose guidance
        embedding, if any, adds zero: it equals the teacher's raw network at sigma_max for every w)."""
        gen = cls(teacher.cfg, sigma_max=sigma_max, sigma_data=sigma_data,
                  trainable_decoder_blocks=trainable_decoder_blocks, guidance_input=guidance_input)
        gen.net.load_state_dict(teacher.state_dict())
        return gen.to(next(teacher.parameters()).device)

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> OneStepGenerator:
        """Rebuilds the generator an `architecture()` dict describes (weights not included). Records written before
        guidance-aware generators existed have no `guidance_input`: they are not guidance-aware."""
        return cls(ModelConfig(**arch["model"]), growth_resolutions=arch["growth_resolutions"],
                   trainable_decoder_blocks=arch["trainable_decoder_blocks"],
                   sigma_max=arch["sigma_max"], sigma_data=arch["sigma_data"],
                   guidance_input=arch.get("guidance_input", False),
                   detail_resolutions=arch.get("detail_resolutions", []),
                   freeze_below=arch.get("freeze_below", False))

    def grow(self, trainable_decoder_blocks: int | None = None, *, detail_only: bool = False,
             freeze_below: bool | None = None) -> OneStepGenerator:
        """A new generator at twice the resolution: this one's weights copied by name and shape, freeze applied;
        `detail_only` makes the new octave a detail-only one (see the module doc), `freeze_below` (None: as this
        one) sets the freeze policy of `apply_freeze_policy`.

        `self` is left untouched (build new optimizers and EMA for the returned module). A guidance-aware generator
        grows into one: its guidance embedding is copied and, like every embedding, frozen.
        """
        k = self.trainable_decoder_blocks if trainable_decoder_blocks is None else trainable_decoder_blocks
        new = 2 * self.resolution
        grown = OneStepGenerator(self.cfg, growth_resolutions=[*self.growth_resolutions, new],
                                 trainable_decoder_blocks=k, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                                 guidance_input=self.guidance_input,
                                 detail_resolutions=[*self.detail_resolutions, *([new] if detail_only else [])],
                                 freeze_below=self.freeze_below if freeze_below is None else freeze_below)
        copy_matching_weights(grown, self)
        return grown.to(next(self.parameters()).device)

    def apply_freeze_policy(self) -> None:
        """Base stage: everything trains. Grown: the last `trainable_decoder_blocks` decoder entries, the growth octaves
        and the output heads train; with `freeze_below` only the newest octave and its head (and those decoder
        entries), so with no decoder entry trainable the image of the stage below stays exactly what it was.

        Frozen: embeddings (the guidance embedding too), encoder, middle and all but the last
        `trainable_decoder_blocks` decoder entries.
        """
        grown = bool(self.growth_resolutions)
        n_dec = len(self.net.dec)
        first_trainable = max(0, n_dec - self.trainable_decoder_blocks)
        for p in self.parameters():
            p.requires_grad_(not grown)
        if grown:
            for i in range(first_trainable, n_dec):
                self.net.dec[i].requires_grad_(True)
            below = not self.freeze_below
            for octave, head in zip(self.growth[:-1], self.growth_heads[:-1]):
                octave.requires_grad_(below)
                head.requires_grad_(below)
            self.growth[-1].requires_grad_(True)
            self.growth_heads[-1].requires_grad_(True)
            self.net.out.requires_grad_(below)

    # --------------------------------------------------------------------------------------------- forward
    @property
    def resolution(self) -> int:
        return self.growth_resolutions[-1] if self.growth_resolutions else self.cfg.resolution

    @property
    def last_layer(self) -> tuple[nn.Conv2d, nn.Module] | None:
        """(conv, head): the layer the reference's adaptive GAN weight differentiates at (sony/pagoda's get_last_layer:
        the second conv of the last decoder block's residual block, `output_blocks[-1][0].out_layers[3]`), here of
        the newest growth block or, at the base resolution, of the last decoder block; and the output head that block
        feeds. The conv's output adds to the block's skip path, and the head's output enters the image as it is, so
        a gradient at the image maps to one at the conv's output through the head alone. None when the last block
        ends in attention instead (attention at the output resolution)."""
        block = self.growth[-1][-1] if self.growth_resolutions else self.net.dec[-1]
        if block.attn is not None or block.xattn is not None:
            return None
        return block.res.conv2, (self.growth_heads[-1] if self.growth_resolutions else self.net.out)

    @property
    def stage(self) -> str:
        return f"grow-{self.resolution}" if self.growth_resolutions else "distill"

    def guidance_embedding(self, cond: Condition | None, batch: int) -> Tensor | None:
        """The guidance embedding of `cond.guidance` (w = 1 where absent); None for a generator without one."""
        if self.guidance_emb is None:
            return None
        device = self.guidance_emb.proj.weight.device
        w = cond.guidance if cond is not None and cond.guidance is not None else torch.ones(batch, device=device)
        if w.shape != (batch,):
            raise ValueError(f"Condition.guidance must hold one scale per sample, shape ({batch},), got "
                             f"{tuple(w.shape)}")
        return self.guidance_emb(w.to(device))

    def raw(self, x_in: Tensor, c_noise: Tensor, cond: Condition | None = None) -> Tensor:
        """The network F with the growth octaves: base-resolution input, output at `resolution` (see the module doc).

        A guidance-aware generator adds its guidance embedding to the UNet's; others ignore `cond.guidance`.
        """
        h, emb = self.net.features(x_in, c_noise, cond, self.guidance_embedding(cond, x_in.shape[0]))
        out = self.net.out(h)
        for resolution, blocks, head in zip(self.growth_resolutions, self.growth, self.growth_heads):
            for block in blocks:
                h = block(h, emb)
            residual = head(h)
            if resolution in self.detail_resolutions:
                residual = without_block_means(residual)
            out = F.interpolate(out, scale_factor=2, mode="bicubic", align_corners=False) + residual
        return out.contiguous()

    def forward(self, z: Tensor, cond: Condition | None = None) -> Tensor:
        c = edm_preconditioning(per_sample_sigma(self.sigma_max, z), self.sigma_data)
        return self.raw((c.c_in * z).to(z.dtype), c.c_noise.flatten(), cond)

    def architecture(self) -> dict[str, Any]:
        """Plain-data description stored in checkpoints (see `checkpoint_safety`).

        `guidance_input` and `freeze_below` (of a grown generator) appear only when True and `detail_resolutions`
        only when not empty, so the records of every other generator stay what they were before the fields existed
        (resuming compares records for equality). Grown generators record their output layout (`growth_output`): one
        grown before the residual heads existed then fails to load with that field named, instead of a list of
        missing weights; distilled generators are unaffected and grow as they are.
        """
        arch = {"kind": "one_step_generator", "stage": self.stage, "resolution": self.resolution,
                "model": model_record(self.cfg), "growth_resolutions": list(self.growth_resolutions),
                "trainable_decoder_blocks": self.trainable_decoder_blocks,
                "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}
        if self.guidance_input:
            arch["guidance_input"] = True
        if self.detail_resolutions:
            arch["detail_resolutions"] = list(self.detail_resolutions)
        if self.freeze_below and self.growth_resolutions:
            arch["freeze_below"] = True
        if self.growth_resolutions:
            arch["growth_output"] = GROWTH_OUTPUT
        return arch


def with_sampling_guidance(net: nn.Module, cond: Condition, guidance: float) -> Condition:
    """`cond` for sampling `net`: a guidance-aware generator gets scale `guidance` for every sample (unless `cond`
    carries its own scales); any other network gets `cond` unchanged."""
    if not getattr(net, "guidance_input", False) or cond.guidance is not None or cond.is_empty:
        return cond
    return cond.with_guidance(guidance)

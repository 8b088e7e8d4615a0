"""Small test-only stages and an in-memory data stream for the runtime tests (no PaGoDA math).

- `ToyDenoiser`: one network ("net") learns to remove noise from a fixed family of low-rank images.
- `ToyGan`: two networks ("gen", "disc"): a reconstruction + non-saturating GAN step with the discriminator
  frozen during the generator step, the pattern the real distil/grow stages follow.
Both draw noise from torch's global RNG (so resume must restore RNG state) and are big enough for ZeRO-3 to
partition their weights. `Fault` makes one rank die or receive SIGTERM once, at a given image count.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda_dist.config import Config, OptimizerConfig
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.runtime.source import DataRequest
from pagoda_dist.stages.base import Batch, StageInputs, StepDriver

HIDDEN = 640  # 640 x 192 weights > DeepSpeed's 1e5 persistence threshold: ZeRO-3 really partitions them


@dataclass(frozen=True)
class Fault:
    """On `rank`, once `nimg` images were seen: "kill" the process or send it "sigterm"; `marker` makes it once."""

    kind: str
    nimg: int
    rank: int
    marker: str

    def maybe_fire(self, nimg: int) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != self.rank or nimg < self.nimg or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"{self.kind} at {nimg} on pid {os.getpid()}\n")
        if self.kind == "kill":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGTERM)


def _mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, dim))


class ToyDenoiser:
    name = "toy"

    def __init__(self, cfg: Config, fault: Fault | None = None) -> None:
        self.res, self.channels = cfg.model.resolution, cfg.model.in_channels
        self.inputs = StageInputs(resolution=self.res, needs_latents=False)
        self.dim = self.channels * self.res * self.res
        self.net = _mlp(self.dim)
        self.optimizer = cfg.teacher.train.optimizer
        self.fault = fault

    def trainable(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, OptimizerConfig]:
        return {"net": self.optimizer}

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        if self.fault is not None:
            self.fault.maybe_fire(nimg)
        x = batch.image.flatten(1)
        noisy = x + 0.5 * torch.randn_like(x)
        loss = F.mse_loss(driver.module("net")(noisy), x)
        driver.backward("net", loss)
        driver.step("net")
        return {"loss": loss.item()}

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        return net(noise.flatten(1)).view_as(noise).clamp(-1, 1)

    def architecture(self) -> dict[str, Any]:
        return {"kind": "toy-denoiser", "dim": self.dim, "hidden": HIDDEN}


class ToyGan:
    name = "toy-gan"

    def __init__(self, cfg: Config, fault: Fault | None = None) -> None:
        self.res, self.channels = cfg.model.resolution, cfg.model.in_channels
        self.inputs = StageInputs(resolution=self.res, needs_latents=False)
        self.dim = self.channels * self.res * self.res
        self.gen, self.disc = _mlp(self.dim), nn.Sequential(_mlp(self.dim), nn.Linear(self.dim, 1))
        self.opts = {"gen": cfg.distill.train.optimizer, "disc": cfg.distill.adversarial.discriminator.optimizer}
        self.fault = fault

    def trainable(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "disc": self.disc}

    def optimizers(self) -> dict[str, OptimizerConfig]:
        return dict(self.opts)

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        if self.fault is not None:
            self.fault.maybe_fire(nimg)
        gen, disc = driver.module("gen"), driver.module("disc")
        x = batch.image.flatten(1)
        z = x + torch.randn_like(x)
        # Generator step with the discriminator frozen (ZeRO-2 asserts on gradients reduced twice otherwise).
        disc.requires_grad_(False)
        fake = gen(z)
        g_loss = F.mse_loss(fake, x) + 0.1 * F.softplus(-disc(fake)).mean()
        driver.backward("gen", g_loss)
        driver.step("gen")
        disc.requires_grad_(True)
        d_loss = F.softplus(disc(fake.detach())).mean() + F.softplus(-disc(x)).mean()
        driver.backward("disc", d_loss)
        driver.step("disc")
        return {"g_loss": g_loss.item(), "d_loss": d_loss.item()}

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        return net(noise.flatten(1)).view_as(noise).clamp(-1, 1)

    def architecture(self) -> dict[str, Any]:
        return {"kind": "toy-gan", "dim": self.dim, "hidden": HIDDEN}


def make_denoiser(cfg: Config, fault: Fault | None = None) -> ToyDenoiser:
    return ToyDenoiser(cfg, fault)


def make_gan(cfg: Config, fault: Fault | None = None) -> ToyGan:
    return ToyGan(cfg, fault)


class ToySource:
    """Endless deterministic images: sample i is a fixed random mix of 4 patterns, rank r reads i = r, r+W, ..."""

    def __init__(self, cfg: Config, request: DataRequest) -> None:
        self.request = request
        self.shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        g = torch.Generator().manual_seed(request.seed)
        self.basis = torch.randn(4, *self.shape, generator=g)
        self.next_index = int((request.state or {}).get("next_index", request.rank))

    def _sample(self, index: int) -> Tensor:
        g = torch.Generator().manual_seed(self.request.seed * 1_000_003 + index)
        mix = torch.randn(4, generator=g)
        return torch.tanh((mix[:, None, None, None] * self.basis).sum(0))

    def __iter__(self) -> Iterator[Batch]:
        step = self.request.world_size
        while True:
            indices = [self.next_index + k * step for k in range(self.request.batch_size)]
            self.next_index += step * self.request.batch_size
            yield Batch(torch.stack([self._sample(i) for i in indices]))

    def state(self) -> dict[str, Any]:
        return {"next_index": self.next_index}


def toy_data(cfg: Config, request: DataRequest) -> ToySource:
    return ToySource(cfg, request)

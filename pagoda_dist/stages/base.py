"""What a training stage is, seen from whoever drives it (a 30-line loop or the distributed runtime).

A stage owns its networks and its math; a driver owns optimisation (plain optimizers or DeepSpeed engines),
data, checkpoints and logging. The two meet in `Stage.train_step(batch, driver)`: the stage computes losses and
asks the driver to run backward and to step each named network, so the same step runs single-process on the CPU
and under DeepSpeed ZeRO on many GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from pagoda_dist.config import OptimizerConfig
from pagoda_dist.models.conditioning import Condition


@dataclass
class Batch:
    """One (per-rank) batch: images in [-1, 1] at the stage's resolution, their condition, maybe latents."""

    image: Tensor  # (B, C, H, W), H = W = StageInputs.resolution
    condition: Condition = field(default_factory=Condition)
    latent: Tensor | None = None  # (B, C, r, r) DDIM-inversion latent at the base resolution r

    def to(self, device: torch.device | str) -> Batch:
        latent = None if self.latent is None else self.latent.to(device)
        return Batch(self.image.to(device), self.condition.to(device), latent)

    def __len__(self) -> int:
        return self.image.shape[0]


@dataclass(frozen=True)
class StageInputs:
    """What a stage consumes: images at `resolution`, from image shards or from latent-pair shards."""

    resolution: int
    needs_latents: bool


class StepDriver(Protocol):
    """The optimisation side of a step, for networks named as in `Stage.trainable()`."""

    def module(self, name: str) -> nn.Module:
        """The network to call in the forward pass (a plain module or its DeepSpeed engine)."""

    def backward(self, name: str, loss: Tensor) -> None:
        """Backpropagates `loss` into network `name` (loss already scaled for accumulation by the driver)."""

    def step(self, name: str) -> None:
        """Clips, steps and zeroes the gradients of network `name` (at accumulation boundaries)."""


class Stage(Protocol):
    """A PaGoDA stage: teacher, distil or one growth step."""

    name: str
    inputs: StageInputs

    def trainable(self) -> dict[str, nn.Module]:
        """Networks with an optimizer, by name; the first one is the network whose EMA is kept and sampled."""

    def optimizers(self) -> dict[str, OptimizerConfig]:
        """The optimizer settings of each trainable network, by the same names."""

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        """One optimisation step on `batch` after `nimg` images were seen; returns scalar losses and metrics."""

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: Tensor, condition: Condition) -> Tensor:
        """Images in [-1, 1] from `net` (the EMA copy of the first trainable network) and base-resolution noise."""

    def architecture(self) -> dict:
        """Plain-data description of the networks (stored in checkpoints; a mismatched load names the difference)."""

"""What the data layer, the runtime and the stages share: a `Batch` and its `Condition`, `StageInputs` (what a
stage asks of the data), and the `Stage` / `StepDriver` protocols (what the runtime trains, and how a stage asks it
to optimise).

A neutral module: it imports torch only, so data/, runtime/, models/ and stages/ can all share these types
without importing each other. A stage is a plain object with `train_step(batch, driver, nimg)`: the stage computes
losses and asks the driver to run backward and to step each named network, so the same step runs single-process on
the CPU and under DeepSpeed ZeRO on many GPUs. `Condition` is the one container that the UNet, the discriminator, the solvers
(classifier-free guidance) and the data loader use for "the condition" and "no condition": a class label, a CLIP
text embedding, or nothing; plus, for a guidance-aware one-step generator, the guidance scale it should imitate.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pagoda_dist.config import OptimizerConfig

NO_CLASS = -1  # class label meaning "unconditional" (dropped for guidance, or an unconditional model)


@dataclass
class Condition:
    """Per-sample conditioning for a batch; every tensor has the batch as its first dimension.

    class_labels: (B,) int64, NO_CLASS where the label is dropped.
    text_pooled:  (B, D) pooled CLIP text embedding.
    text_tokens:  (B, T, D) per-token CLIP text embedding (cross-attention keys and values).
    text_mask:    (B, T) bool, True for real tokens; all False where the text is dropped.
    guidance:     (B,) float32 classifier-free guidance scale w for a guidance-aware one-step generator (None: w = 1).
                  Not a condition: dropping the condition keeps it, `is_empty` ignores it, and every network but
                  such a generator ignores it (the teacher is guided by its sampler, never by this field).
    """

    class_labels: Tensor | None = None
    text_pooled: Tensor | None = None
    text_tokens: Tensor | None = None
    text_mask: Tensor | None = None
    # Exempt from a low-precision engine's input cast (runtime.drivers): a guidance scale rounded to bf16 (7.77 ->
    # 7.78125) would no longer be the scale the teacher's target was sampled at.
    guidance: Tensor | None = field(default=None, metadata={"keep_dtype": True})

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def is_empty(self) -> bool:
        """True when there is no class or text condition (a guidance scale alone conditions nothing)."""
        return not any(name != "guidance" for name in self._tensors())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        """Moves every tensor; a float dtype applies to the embeddings only (labels, masks and guidance keep theirs:
        a guidance scale rounded to bf16 would no longer match the scale the teacher's target was sampled at)."""
        moved = {}
        for name, t in self._tensors().items():
            cast = dtype is not None and t.is_floating_point() and name != "guidance"
            moved[name] = t.to(device, dtype) if cast else t.to(device)
        return replace(self, **moved)

    def with_guidance(self, scale: float | Tensor, batch: int | None = None) -> Condition:
        """The same condition with guidance scale `scale`: one value for the batch, or a (B,) tensor per sample.

        The batch size comes from the other tensors, or from `batch` when there are none.
        """
        tensors = list(self._tensors().values())
        b = (tensors[0].shape[0] if tensors else None) if batch is None else batch
        if b is None:
            raise ValueError("Condition.with_guidance: pass `batch` for a condition without tensors")
        w = torch.as_tensor(scale, dtype=torch.float32, device=tensors[0].device if tensors else None)
        if w.dim() == 0:
            w = w.expand(b).clone()
        if w.shape != (b,):
            raise ValueError(f"Condition.with_guidance: need one scale or {b} (one per sample), got {tuple(w.shape)}")
        return replace(self, guidance=w)

    def null(self) -> Condition:
        """The same batch with every condition dropped (the unconditional input of guidance)."""
        return self.drop(None)

    def drop(self, mask: Tensor | None) -> Condition:
        """Drops the condition where `mask` (B,) is True; `None` drops it everywhere. The guidance scale stays."""
        out = {}
        for name, t in self._tensors().items():
            if name == "guidance":
                continue
            m = torch.ones(t.shape[0], dtype=torch.bool, device=t.device) if mask is None else mask.to(t.device)
            m = m.view(-1, *([1] * (t.dim() - 1)))
            if name == "class_labels":
                out[name] = torch.where(m, torch.full_like(t, NO_CLASS), t)
            elif name == "text_mask":
                out[name] = t & ~m
            else:
                out[name] = torch.where(m, torch.zeros_like(t), t)
        return replace(self, **out)

    def __getitem__(self, index: slice | Tensor) -> Condition:
        return replace(self, **{name: t[index] for name, t in self._tensors().items()})

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """Concatenates batches along the first dimension (all must carry the same fields)."""
        first = conditions[0]._tensors()
        for c in conditions[1:]:
            if c._tensors().keys() != first.keys():
                raise ValueError(f"Condition.cat: conditions carry different fields, {sorted(first)} vs "
                                 f"{sorted(c._tensors())}; give every part the same (e.g. a guidance scale)")
        return replace(conditions[0], **{name: torch.cat([c._tensors()[name] for c in conditions]) for name in first})

    def repeat(self, times: int) -> Condition:
        """Repeats the whole batch `times` times along the first dimension."""
        return Condition.cat([self] * times)


@dataclass
class Batch:
    """One (per-rank) batch: images in [-1, 1] at the stage's resolution, their condition, maybe latents."""

    image: Tensor  # (B, C, H, W), H = W = StageInputs.resolution
    condition: Condition = field(default_factory=Condition)
    latent: Tensor | None = None  # (B, C, r, r) DDIM-inversion latent at the base resolution r
    # Real images (and their condition) of a second stream for the discriminator (StageInputs.gan_reals).
    gan_real: Batch | None = None

    def to(self, device: torch.device | str) -> Batch:
        latent = None if self.latent is None else self.latent.to(device)
        gan_real = None if self.gan_real is None else self.gan_real.to(device)
        return Batch(self.image.to(device), self.condition.to(device), latent, gan_real)

    def __len__(self) -> int:
        return self.image.shape[0]


@dataclass(frozen=True)
class StageInputs:
    """What a stage consumes: images at `resolution`, from image shards or from latent-pair shards."""

    resolution: int
    needs_latents: bool
    # Also a second, independently ordered stream of the same shards' real images, for the discriminator
    # (Batch.gan_real; adversarial.separate_real_stream).
    gan_reals: bool = False


class StepDriver(Protocol):
    """The optimisation side of a step, for networks named as in `Stage.trainable()`."""

    def module(self, name: str) -> nn.Module:
        """The network to call in the forward pass (a plain module or its DeepSpeed engine)."""

    def backward(self, name: str, loss: Tensor) -> None:
        """Backpropagates `loss` into network `name` (loss already scaled for accumulation by the driver)."""

    def step(self, name: str) -> None:
        """Clips, steps and zeroes the gradients of network `name` (at accumulation boundaries)."""


class Stage(Protocol):
    """What the runtime trains: a PaGoDA stage (teacher, distil or one growth step), or any other.

    Optional: `export_metadata() -> dict`, JSON-able facts that a loader of the exported network needs beyond its
    architecture (how to sample it, what it is conditioned on); the runtime stores them in each export.
    """

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

    def grid_inputs(self, n: int, seed: int, first_batch: Callable[[int], Batch]) -> tuple[Tensor, Condition]:
        """Fixed noise (drawn from `seed`) and conditions for sample grids of `n` images, as `sample` takes them;
        `first_batch(n)` reads the first n samples of the stage's data, for conditions that only the data has."""

    def architecture(self) -> dict:
        """Plain-data description of the networks (stored in checkpoints; a mismatched load names the difference)."""

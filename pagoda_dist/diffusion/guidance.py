"""Classifier-free guidance over an opaque condition, in one batched network call."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from .edm import Denoiser, per_sample_sigma


def concat_conditions(a: Any, b: Any) -> Any:
    """Concatenate two condition batches along the batch axis, whatever their structure.

    Tensors with a batch axis are concatenated; 0-d tensors and other leaves (e.g. a guidance scale, a flag) must be
    equal in both and are kept once; None stays None; dataclasses, dicts, lists and tuples recurse. Lists are taken
    as per-sample (captions) and joined.
    """
    if a is None or b is None:
        if a is not b:
            raise TypeError("concat_conditions: one condition is None and the other is not; keep null_cond's structure")
        return None
    if isinstance(a, Tensor):
        if a.ndim == 0:
            if not torch.equal(a, b):
                raise ValueError(f"concat_conditions: 0-d tensors differ ({a.item()} vs {b.item()}); cannot batch them")
            return a
        return torch.cat([a, b])
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        fields = [f.name for f in dataclasses.fields(a) if f.init]
        return dataclasses.replace(a, **{k: concat_conditions(getattr(a, k), getattr(b, k)) for k in fields})
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"concat_conditions: dict keys differ: {sorted(a)} vs {sorted(b)}")
        return {k: concat_conditions(a[k], b[k]) for k in a}
    if isinstance(a, list):
        return a + b
    if isinstance(a, tuple):
        items = [concat_conditions(x, y) for x, y in zip(a, b, strict=True)]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    if a != b:
        raise TypeError(f"concat_conditions: cannot batch {type(a).__name__} leaves that differ ({a!r} vs {b!r})")
    return a


class ClassifierFreeGuidance:
    """D_cfg(x, s, c) = D(x, s, null) + w (D(x, s, c) - D(x, s, null)).

    Both terms come from one network call on a doubled batch [x; x] with conditions [c; null_cond(c)].
    w is one scale for the batch, or a (B,) tensor of per-sample scales (e.g. the targets of a guidance-aware
    generator, each at its own w). A single w = 1 is the conditional denoiser itself and w = 0 the unconditional
    one: each costs a single pass; per-sample scales always cost two.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        guidance: float | Tensor,
        null_cond: Callable[[Any], Any] | None,
        cat_cond: Callable[[Any, Any], Any] = concat_conditions,
    ) -> None:
        per_sample = isinstance(guidance, Tensor) and guidance.ndim > 0
        if per_sample and guidance.ndim != 1:
            raise ValueError(f"per-sample guidance must be a (B,) tensor, got shape {tuple(guidance.shape)}")
        if (per_sample or float(guidance) != 1.0) and null_cond is None:
            raise ValueError(f"guidance={guidance} needs null_cond (a callable cond -> unconditional cond)")
        self.denoiser = denoiser
        self.guidance: float | Tensor = guidance.detach() if per_sample else float(guidance)
        self.null_cond = null_cond
        self.cat_cond = cat_cond

    @property
    def passes_per_call(self) -> int:
        """Network forward passes per image per call (what a fair NFE-per-image figure counts)."""
        return 1 if not isinstance(self.guidance, Tensor) and self.guidance in (0.0, 1.0) else 2

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        w = self.guidance
        if isinstance(w, Tensor):
            if w.numel() != x.shape[0]:
                raise ValueError(f"per-sample guidance has {w.numel()} scales for a batch of {x.shape[0]}")
        elif w == 1.0:
            return self.denoiser(x, sigma, cond)
        null = self.null_cond(cond)
        if not isinstance(w, Tensor) and w == 0.0:
            return self.denoiser(x, sigma, null)
        sigma = per_sample_sigma(sigma, x).flatten()
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self.cat_cond(cond, null))
        d_cond, d_null = both.chunk(2)
        if isinstance(w, Tensor):
            w = w.to(d_cond.device, d_cond.dtype).view(-1, *([1] * (d_cond.ndim - 1)))
        return d_null + w * (d_cond - d_null)


__all__ = ["ClassifierFreeGuidance", "concat_conditions"]

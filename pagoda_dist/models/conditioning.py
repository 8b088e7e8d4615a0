"""The condition a network sees: a class label, a CLIP text embedding, or nothing.

One small container so that the UNet, the discriminator, the solvers (classifier-free guidance) and the data
loader agree on what "the condition" and "no condition" mean.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

NO_CLASS = -1  # class label meaning "unconditional" (dropped for guidance, or an unconditional model)


@dataclass
class Condition:
    """Per-sample conditioning for a batch; every tensor has the batch as its first dimension.

    class_labels: (B,) int64, NO_CLASS where the label is dropped.
    text_pooled:  (B, D) pooled CLIP text embedding.
    text_tokens:  (B, T, D) per-token CLIP text embedding (cross-attention keys and values).
    text_mask:    (B, T) bool, True for real tokens; all False where the text is dropped.
    """

    class_labels: Tensor | None = None
    text_pooled: Tensor | None = None
    text_tokens: Tensor | None = None
    text_mask: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def is_empty(self) -> bool:
        return not self._tensors()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        """Moves every tensor; a float dtype applies to the embeddings only (labels and masks keep theirs)."""
        moved = {}
        for name, t in self._tensors().items():
            moved[name] = t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return replace(self, **moved)

    def null(self) -> Condition:
        """The same batch with every condition dropped (the unconditional input of guidance)."""
        return self.drop(None)

    def drop(self, mask: Tensor | None) -> Condition:
        """Drops the condition where `mask` (B,) is True; `None` drops it everywhere."""
        out = {}
        for name, t in self._tensors().items():
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
        return replace(conditions[0], **{name: torch.cat([c._tensors()[name] for c in conditions]) for name in first})

    def repeat(self, times: int) -> Condition:
        """Repeats the whole batch `times` times along the first dimension."""
        return Condition.cat([self] * times)

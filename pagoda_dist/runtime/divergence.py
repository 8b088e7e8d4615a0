"""The divergence guard: an optimizer update with a non-finite loss or gradient is skipped on every rank together.

A driver hands the guard each loss it backpropagates (`note_loss`) and each torch optimizer it builds (`watch`).
Right before a watched optimizer updates (inside DeepSpeed's ZeRO wrapper too: the torch optimizer we build is the
one that steps there), the guard checks this rank's losses since the last update and the gradients the optimizer
is about to apply (its own partition under ZeRO), and the ranks vote. If any rank saw a non-finite value, every
rank drops the gradients, so the optimizer leaves those parameters and their state untouched: the update is
skipped, as DeepSpeed's fp16 loss scaler and torch's GradScaler skip one on overflow. DeepSpeed itself also skips
ZeRO updates whose global gradient norm is not finite; `after_update` counts those skips too.

The worker reads `step_skipped()` after each training step, counts the skipped steps in a row and stops the stage
after `runtime.max_nonfinite_steps` of them, with no checkpoint written since the streak began. With only finite
values nothing is changed: the check reads the gradients and adds one small vote per update.
"""
from __future__ import annotations

import torch

from .comm import Comm, SoloComm


class NonFiniteGuard:
    """Skips, on every rank together, the optimizer updates that would apply a non-finite loss or gradient."""

    def __init__(self, comm: Comm | SoloComm) -> None:
        self.comm = comm
        self.in_a_row = 0        # training steps skipped in a row (0 after a step with every update applied)
        self.total = 0           # training steps skipped since the stage (re)started
        self._bad_loss: torch.Tensor | None = None  # since the last update; a tensor, so no device sync per loss
        self._skip_update = False
        self._skipped_step = False

    def note_loss(self, loss: torch.Tensor) -> None:
        """Records whether a loss about to be backpropagated is finite."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Checks every update of `optimizer` first (torch's step pre-hook)."""
        optimizer.register_step_pre_hook(self._before_update)

    def _before_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = torch.zeros((), dtype=torch.bool)
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            local = ~torch.isfinite(norm).cpu()
        if self._bad_loss is not None:
            local = local | self._bad_loss.cpu()
        # ZeRO-3 may call the optimizer once per parameter sub-group: once skipped, the whole update stays skipped.
        self._skip_update = self.comm.any(bool(local)) or self._skip_update
        if self._skip_update:
            for p in params:
                p.grad = None  # torch's optimizers leave a parameter without a gradient (and its state) as it is

    def after_update(self, applied: bool = True) -> None:
        """Called after each optimizer update; `applied` is False when DeepSpeed skipped it by itself."""
        self._skipped_step = self._skipped_step or self._skip_update or not applied
        self._skip_update = False
        self._bad_loss = None

    def step_skipped(self) -> bool:
        """Whether any update of the training step just finished was skipped (the same answer on every rank);
        counts it and starts the next step."""
        skipped, self._skipped_step = self._skipped_step, False
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        return skipped

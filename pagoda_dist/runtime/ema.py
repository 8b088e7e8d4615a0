"""Exponential moving average of a network, kept in fp32 on one rank and correct under ZeRO-3.

The average is a full copy of the network made before any engine partitions it. Under ZeRO-3 every rank holds
only a slice of each live parameter, so each update gathers the full parameters on all ranks (a collective that
every rank joins) and the keeper rank folds them into its copy; the other ranks hold no copy at all.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# A context manager that makes the given parameters whole for its duration (ZeRO-3 gather), or does nothing.
Gather = Callable[[list[nn.Parameter]], AbstractContextManager]


@dataclass
class _Pairs:
    """A live network's tensors in the order of the average's (empty lists on ranks that keep no average)."""

    live: nn.Module
    gathered: list[nn.Parameter]  # every live parameter: what a ZeRO-3 gather must make whole
    live_params: list[nn.Parameter] = field(default_factory=list)
    ema_params: list[Tensor] = field(default_factory=list)
    live_buffers: list[Tensor] = field(default_factory=list)
    ema_buffers: list[Tensor] = field(default_factory=list)


class Ema:
    """fp32 EMA of `net`; `keep=False` on ranks that only take part in the gathers."""

    def __init__(self, net: nn.Module, *, keep: bool) -> None:
        self.net: nn.Module | None = None
        if keep:
            self.net = copy.deepcopy(net).float().eval().requires_grad_(False)
        self._pairs: _Pairs | None = None

    def _pairs_for(self, live: nn.Module) -> _Pairs:
        """The live tensors matched to the average's, found once: walking the module tree by name every step costs
        more than the update itself on a small network. The engines keep their parameter objects for the whole run
        (ZeRO-3 partitions them in place), so the match stays valid."""
        if self._pairs is None or self._pairs.live is not live:
            params = dict(live.named_parameters())
            pairs = _Pairs(live, list(params.values()))
            if self.net is not None:
                buffers = dict(live.named_buffers())
                for name, p in self.net.named_parameters():
                    pairs.ema_params.append(p)
                    pairs.live_params.append(params[name])
                for name, b in self.net.named_buffers():
                    pairs.ema_buffers.append(b)
                    pairs.live_buffers.append(buffers[name])
            self._pairs = pairs
        return self._pairs

    @torch.no_grad()
    def update(self, live: nn.Module, beta: float, gather: Gather) -> None:
        """ema = beta * ema + (1 - beta) * live, for parameters; buffers are copied (collective under ZeRO-3)."""
        pairs = self._pairs_for(live)
        with gather(pairs.gathered):
            if self.net is None:
                return
            # One multi-tensor kernel instead of a Python loop over ~100s of tensors: the keeper rank does this
            # alone while its peers wait at the next step's collective.
            torch._foreach_lerp_(pairs.ema_params, [p.detach().float() for p in pairs.live_params], 1.0 - beta)
            for ema_buffer, live_buffer in zip(pairs.ema_buffers, pairs.live_buffers):
                ema_buffer.copy_(live_buffer)

    def state_dict(self) -> dict[str, Tensor]:
        if self.net is None:
            raise RuntimeError("this rank keeps no EMA copy (only the keeper rank does)")
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.net is not None:
            self.net.load_state_dict(state)


@torch.no_grad()
def full_state_dict(net: nn.Module, gather: Gather, *, keep: bool) -> dict[str, Tensor] | None:
    """The whole `net` as an fp32 state dict on ranks with `keep` (collective under ZeRO-3), else None."""
    with gather(list(net.parameters())):
        if not keep:
            return None
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
                for k, v in net.state_dict().items()}

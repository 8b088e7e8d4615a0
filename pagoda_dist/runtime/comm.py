"""The few collective operations the runtime needs, for one process or a torch.distributed group.

Everything here is collective: every rank calls the same functions in the same order.
"""
from __future__ import annotations

from typing import Any

import torch


class Vote:
    """An `any` whose collective was started earlier and may still be in flight; `result()` waits for it."""

    def __init__(self, flag: torch.Tensor, work: Any = None) -> None:
        self._flag, self._work = flag, work

    def result(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return bool(self._flag.item() > 0)


class Comm:
    """Collectives over the default torch.distributed group (CPU tensors: gloo; GPU: nccl)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        self._dist = dist
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        return self.start_any(flag).result()

    def start_any(self, flag: bool) -> Vote:
        """`any` without waiting: the vote travels while the caller works, and `result()` reads it later. A
        collective the caller would otherwise wait on is a point where every rank waits for the slowest one."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return Vote(t, self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, async_op=True))

    def all(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on all of them."""
        return not self.any(not flag)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (plain picklable data)."""
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (plain picklable data)."""
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key mean over ranks; every rank must pass the same keys."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}


class SoloComm:
    """The same interface for a single process (no torch.distributed)."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass

    def any(self, flag: bool) -> bool:
        return flag

    def start_any(self, flag: bool) -> Vote:
        return Vote(torch.tensor([1.0 if flag else 0.0]))

    def all(self, flag: bool) -> bool:
        return flag

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

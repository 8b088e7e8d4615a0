"""Ray Train's torch backend, plus the SIGTERM handler of `preemption` installed on every worker's main thread,
and the relay that carries a SIGTERM received by the driver to every worker."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from .preemption import install_sigterm_handler


class _PreemptibleBackend(Backend):
    """Delegates to Ray's torch backend (process group set-up) and then installs the SIGTERM handler."""

    @staticmethod
    def _torch() -> Backend:
        return TorchConfig.backend_cls.fget(TorchConfig())()

    def on_start(self, worker_group: Any, backend_config: PreemptibleTorchConfig) -> None:
        self._torch().on_start(worker_group, backend_config)
        # worker_group.execute runs on each worker actor's main thread, where signal handlers may be set.
        worker_group.execute(install_sigterm_handler, backend_config.sigterm_grace_s)

    def on_training_start(self, worker_group: Any, backend_config: PreemptibleTorchConfig) -> None:
        self._torch().on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group: Any, backend_config: PreemptibleTorchConfig) -> None:
        self._torch().on_shutdown(worker_group, backend_config)


@dataclass
class PreemptibleTorchConfig(TorchConfig):
    """`TorchConfig` whose workers save and stop on SIGTERM within `sigterm_grace_s` seconds."""

    sigterm_grace_s: float = 60.0

    @property
    def backend_cls(self) -> type[Backend]:
        return _PreemptibleBackend


class StopRelay:
    """Carries the driver's stop request to the workers. An asyncio actor: each worker's `wait` call simply stays
    pending until `request` (no polling, and one idle connection per worker)."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()

    async def request(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()


def start_stop_relay() -> Any:
    """A fresh `StopRelay` actor on the driver's own node (no CPU: it must start while the workers hold every CPU
    of the cluster). Pinned there because a relay on a worker node would die with that node and leave the
    restarted group deaf to the driver's SIGTERM; the driver's node lives exactly as long as the driver."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(StopRelay).options(scheduling_strategy=here).remote()

"""The runtime's view of a data stream: a factory called once per rank, and a position it can checkpoint.

The runtime never opens shards itself. `train_stage` is handed a `DataFactory`; each rank calls it with a
`DataRequest` (who it is, how many samples per micro-batch, and where the stream stopped last time) and iterates
the returned `BatchSource` forever. At a checkpoint the runtime stores `source.state()` per rank and hands it
back on resume, so the stream continues where it stopped. A run resumed on another number of ranks hands each
rank the state of the saved rank of the same number (rank 0's to a rank new to the run) and the same global batch:
the source continues the same sequence of global batches, shared out among the new ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pagoda_dist.config import Config
from pagoda_dist.interfaces import Batch, StageInputs


@dataclass(frozen=True)
class DataRequest:
    """What one rank asks of the data layer."""

    rank: int                     # data-parallel rank of the caller
    world_size: int               # number of data-parallel ranks (each reads a disjoint part of the stream)
    batch_size: int               # samples per yielded Batch (the per-rank micro-batch)
    seed: int                     # run seed: the order of the stream is a function of it
    inputs: StageInputs           # resolution and whether latents are needed
    state: dict[str, Any] | None  # `BatchSource.state()` saved by this rank at the checkpoint; None: start
    global_batch: int | None = None  # samples per optimizer step, all ranks (None: batch_size x world_size)


class BatchSource(Protocol):
    """An endless stream of per-rank batches with a resumable position."""

    def __iter__(self) -> Iterator[Batch]:
        """Yields batches of exactly `DataRequest.batch_size` samples, forever (epochs roll over inside)."""

    def state(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings, lists, dicts) locating the next batch not yet yielded."""

    def corrupt_count(self) -> int:
        """Samples this rank found corrupt and skipped so far (logged as the metric `corrupt_samples`)."""


DataFactory = Callable[[Config, DataRequest], BatchSource]

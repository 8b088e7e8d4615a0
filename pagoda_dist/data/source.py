"""The streaming reader as the runtime consumes it: one rank's endless batches with a resumable position.

Image shards carry captions, not their embeddings: a text-conditioned teacher gets an `embed` function (built
above the data layer, from the text tower precompute uses) that turns each batch's captions into its condition.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from pagoda_dist.config import Config
from pagoda_dist.data.reader import LoaderBatch, reader_for
from pagoda_dist.interfaces import Condition, StageInputs

CaptionEmbedder = Callable[[list[str]], Condition]


class ReaderSource:
    """A `runtime.source.BatchSource` over `reader_for`: image shards, or latent pairs when the stage needs them."""

    def __init__(self, cfg: Config, inputs: StageInputs, *, batch_size: int, rank: int, world_size: int,
                 state: dict[str, Any] | None, embed: CaptionEmbedder | None = None) -> None:
        self.reader = reader_for(cfg, inputs, batch_size=batch_size, rank=rank, world_size=world_size)
        if state is not None:
            self.reader.load_state_dict(state)
        self.embed = embed

    def __iter__(self) -> Iterator[LoaderBatch]:
        for batch in self.reader:
            if self.embed is not None:
                if not batch.captions:
                    raise ValueError(f"model.text_dim > 0 needs captions, but {self.reader.url} has none")
                with torch.no_grad():
                    batch.condition = self.embed(batch.captions)
            yield batch

    def state(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def corrupt_count(self) -> int:
        return self.reader.corrupt_count

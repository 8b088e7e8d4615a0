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


GAN_REALS = "gan_reals"  # the second stream's state, inside the main stream's


class ReaderSource:
    """A `runtime.source.BatchSource` over `reader_for`: image shards, or latent pairs when the stage needs them;
    with `inputs.gan_reals`, each batch also carries the same-sized batch of a second stream (`Batch.gan_real`).

    The second stream's position travels in the state beside the first's; each reader resumes its own (on another
    world size too: both keep the layout and global batch they started with)."""

    def __init__(self, cfg: Config, inputs: StageInputs, *, batch_size: int, rank: int, world_size: int,
                 state: dict[str, Any] | None, embed: CaptionEmbedder | None = None,
                 global_batch: int | None = None) -> None:
        self.reader = reader_for(cfg, inputs, batch_size=batch_size, rank=rank, world_size=world_size,
                                 global_batch=global_batch)
        self.reals = reader_for(cfg, inputs, batch_size=batch_size, rank=rank, world_size=world_size,
                                global_batch=global_batch, gan_reals=True) if inputs.gan_reals else None
        if state is not None:
            if (GAN_REALS in state) != (self.reals is not None):
                raise ValueError("the saved data position was written with adversarial.separate_real_stream "
                                 f"{'on' if GAN_REALS in state else 'off'}; resume with the same setting")
            self.reader.load_state_dict(state)
            if self.reals is not None:
                self.reals.load_state_dict(state[GAN_REALS])
        self.embed = embed

    def __iter__(self) -> Iterator[LoaderBatch]:
        reals = None if self.reals is None else iter(self.reals)
        try:
            for batch in self.reader:
                self._embed(batch)
                if reals is not None:
                    batch.gan_real = self._embed(next(reals))
                yield batch
        finally:
            if reals is not None:
                reals.close()  # stops its DataLoader workers now, not at garbage collection

    def _embed(self, batch: LoaderBatch) -> LoaderBatch:
        if self.embed is not None:
            if not batch.captions:
                raise ValueError(f"model.text_dim > 0 needs captions, but {self.reader.url} has none")
            with torch.no_grad():
                batch.condition = self.embed(batch.captions)
        return batch

    def state(self) -> dict[str, Any]:
        state = self.reader.state_dict()
        if self.reals is not None:
            state[GAN_REALS] = self.reals.state_dict()
        return state

    def corrupt_count(self) -> int:
        return self.reader.corrupt_count + (0 if self.reals is None else self.reals.corrupt_count)

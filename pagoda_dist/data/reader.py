"""Streaming reader: committed shards (local or s3://) -> endless, deterministic, resumable `Batch`es per rank.

    reader = StreamingReader(cfg.shards_url, batch_size=64, resolution=16, rank=r, world_size=n,
                             num_workers=2, seed=cfg.run.seed)
    reader.load_state_dict(checkpoint["data"])        # optional: exact resume
    for batch in reader:                              # endless; batch.image in [-1, 1], (64, C, 16, 16)
        ...
        checkpoint["data"] = reader.state_dict()      # tiny dict: the rank's position in its stream

Order: `order.SampleOrder` maps stream positions to samples as a pure function of (dataset, seed, epoch, rank,
world size); every rank gets the same number of samples per epoch, whatever the shard sizes, so a distributed job
never waits on a rank that ran dry. Batch k of a rank is positions [start + k*B, start + (k+1)*B) and is built
by DataLoader worker k mod num_workers; the DataLoader hands batches back in k order, so the stream does not depend
on the number of workers, and neither do the caller's random numbers (see `StreamingReader.loader_seed`). The
state is the position after the last batch *yielded to the caller* (batches the DataLoader prefetched but the
caller never saw are read again after a resume, never skipped). A stream resumed on another world size keeps the
layout it started with (`order.Layout`): its positions then index the rank's share of the same global batches.

I/O: samples are fetched a chunk (<= chunk_size consecutive samples of one shard) at a time with one range read
through `storage.read_bytes` (which retries transient S3 failures), using the per-shard byte index written with
the shards; a few threads fetch the chunks of the next batches while the current one decodes. Each DataLoader
worker fetches the chunks its own batches need, so a chunk may be fetched once per worker (the price of an order
that does not depend on the worker count); chunks are therefore large (shuffle_window // 4 samples by default)
so that per-request costs stay small next to decoding.

Corrupt samples (a bad tar header, an image that does not decode, a missing label or latent) are replaced by the
next valid sample of the rank's epoch order (a deterministic choice, so resume stays exact), and counted:
`batch.corrupt` per batch, `reader.corrupt_count` in all, `reader.corrupt_keys` for the last few.
"""
from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pagoda_dist import storage
from pagoda_dist.config import Config, LoaderPriority, ModelConfig
from pagoda_dist.data.imaging import UnreadableImage, decode_image
from pagoda_dist.data.manifest import Manifest, read_manifest
from pagoda_dist.data.order import Layout, SampleOrder, hash64
from pagoda_dist.data.samples import CorruptSample, Sample
from pagoda_dist.data.shards import Decoder, ShardIndex, read_index
from pagoda_dist.data.tensors import to_tensor
from pagoda_dist.data.wds_source import sample_decoder, tar_root
from pagoda_dist.interfaces import Batch, Condition, StageInputs

ConditionMode = Literal["auto", "class", "text", "none"]
MAX_REPLACEMENTS = 256  # consecutive corrupt samples tolerated before the data is declared broken
RECENT_CORRUPT = 100
GAN_REALS_SALT = 0x6A5  # salts the second stream's seed (`gan_reals_seed`)


@dataclass
class LoaderBatch(Batch):
    """A `Batch` plus what the loop may want to log or use: captions, keys, corrupt samples replaced."""

    captions: list[str] | None = None            # per-sample captions, when the dataset has them
    keys: list[str] = field(default_factory=list)  # "shard/key" of each sample
    corrupt: int = 0                             # corrupt samples replaced in this batch
    corrupt_keys: list[str] = field(default_factory=list)
    position: int = 0                            # the rank's stream position after this batch

    def to(self, device: torch.device | str) -> LoaderBatch:
        moved = Batch.to(self, device)
        return replace(self, image=moved.image, condition=moved.condition, latent=moved.latent,
                       gan_real=moved.gan_real)

    def pin_memory(self) -> LoaderBatch:
        """Page-locked copies (DataLoader(pin_memory=True) calls this) for fast, asynchronous GPU copies."""
        cond = Condition(**{f.name: None if getattr(self.condition, f.name) is None
                            else getattr(self.condition, f.name).pin_memory() for f in fields(Condition)})
        latent = None if self.latent is None else self.latent.pin_memory()
        return replace(self, image=self.image.pin_memory(), condition=cond, latent=latent)


@dataclass(frozen=True)
class StreamSpec:
    """Everything a DataLoader worker needs to rebuild the stream (plain data, picklable)."""

    url: str                   # the committed folder: manifest and per-shard indexes
    tar_url: str               # the folder of the shard tars: `url`, or indexed WebDataset shards' own (wds_source)
    decode: Decoder            # one sample's bytes -> Sample, in the tars' layout (ours or img2dataset's)
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    channels: int
    stored_resolution: int
    resolution: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    chunk_size: int
    shuffle_window: int
    layout: Layout             # the world size the stream was laid out for, and the global batch (order.Layout)
    start: int                 # stream position of the first batch
    classes: bool              # produce class labels (and treat a missing one as corrupt)
    text: bool                 # produce text embeddings from emb/tok/mask arrays when present
    latents: bool              # produce latents (and treat a missing one as corrupt)
    hflip: bool
    prefetch_batches: int
    io_threads: int

    def order(self) -> SampleOrder:
        """The order of the layout's rank streams (this rank reads positions of them through `locate`)."""
        return SampleOrder(self.counts, self.seed, 0, self.layout.world_size, self.chunk_size, self.shuffle_window)

    def locate(self, order: SampleOrder, k: int) -> np.ndarray:
        """(batch_size, 4) rows (layout rank, position in its stream, shard, index in shard) of batch k after start."""
        consumed = self.start + k * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        ranks, positions = self.layout.positions(self.rank, self.world_size, consumed)
        return np.concatenate([np.stack([ranks, positions], axis=1), order.locate_ranks(ranks, positions)], axis=1)


@dataclass
class _Decoded:
    """One sample ready to batch."""

    ref: str                   # "shard/key", for reports
    uid: int                   # the sample's index in the split (shard offset + index in shard)
    pixels: np.ndarray
    cls: int | None
    caption: str | None
    arrays: dict[str, np.ndarray]


class _ChunkFetcher:
    """Fetches chunks (one range read each) in background threads and keeps those still needed."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.pool = ThreadPoolExecutor(max_workers=spec.io_threads, thread_name_prefix="pagoda-data")
        self.indexes: dict[int, Future[ShardIndex]] = {}
        self.chunks: dict[tuple[int, int], Future[tuple[memoryview, int, ShardIndex]]] = {}

    def _shard_url(self, shard: int) -> str:
        return storage.join(self.spec.tar_url, self.spec.shards[shard])

    def _read(self, shard: int, start: int, length: int) -> tuple[memoryview, int, ShardIndex]:
        index = self.indexes[shard].result()  # submitted before this chunk, so never stuck behind it
        if len(index) != self.spec.counts[shard]:
            raise ValueError(f"{self._shard_url(shard)}: index lists {len(index)} samples, the manifest "
                             f"{self.spec.counts[shard]}; re-run the job that wrote this dataset")
        lo, hi = int(index.offsets[start]), int(index.offsets[start + length])
        return memoryview(storage.read_bytes(self._shard_url(shard), lo, hi)), lo, index

    def request(self, chunk: tuple[int, int, int]) -> None:
        shard, start, length = chunk
        if (shard, start) not in self.chunks:
            if shard not in self.indexes:  # queued before the chunk: a chunk's thread never waits on a queued index
                self.indexes[shard] = self.pool.submit(read_index, storage.join(self.spec.url, self.spec.shards[shard]))
            self.chunks[(shard, start)] = self.pool.submit(self._read, shard, start, length)

    def sample(self, chunk: tuple[int, int, int], index_in_shard: int) -> Sample | CorruptSample:
        self.request(chunk)
        blob, base, index = self.chunks[chunk[:2]].result()
        lo, hi = int(index.offsets[index_in_shard]) - base, int(index.offsets[index_in_shard + 1]) - base
        return self.spec.decode(blob[lo:hi], index.key(index_in_shard))

    def keep_only(self, needed: set[tuple[int, int]]) -> None:
        for key in [k for k in self.chunks if k not in needed]:
            del self.chunks[key]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def lower_to_idle_priority(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: this worker (and the fetch threads it starts) runs only on otherwise idle cores.

    A worker at normal priority that wakes to decode takes a core from a training rank, and with synchronous data
    parallelism every other rank then waits for that one at the next collective: a few percent of decoding costs
    a few percent of *every* rank. In the idle class the decoding fills the moments the ranks wait anyway; if the
    ranks never wait, the prefetched batches run out, a rank blocks on the loader, and the loader gets the core.
    Off Linux (no SCHED_IDLE), or where a sandbox refuses the call, the lowest priority, nice 19, is the nearest
    thing; where that is refused too, the worker runs as it is (slower to share, never wrong)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))


class RankStream(IterableDataset):
    """The batches of one rank from `spec.start` on (an endless IterableDataset; one per DataLoader)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        self.first_index = np.concatenate([[0], np.cumsum(spec.counts)[:-1]]).astype(np.int64).tolist()

    def __iter__(self) -> Iterator[LoaderBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        spec, order = self.spec, self.spec.order()
        fetcher = _ChunkFetcher(spec)
        planned: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        k = worker
        try:
            while True:
                while len(planned) < 1 + spec.prefetch_batches:  # plan ahead: its chunks download meanwhile
                    rows = spec.locate(order, k)
                    for shard, idx in rows[:, 2:].tolist():
                        fetcher.request(order.chunk_of(shard, idx))
                    planned.append((k, rows))
                    k += workers
                batch_k, rows = planned.popleft()
                yield self._build(batch_k, rows, order, fetcher)
                fetcher.keep_only({order.chunk_of(s, i)[:2] for _, loc in planned for s, i in loc[:, 2:].tolist()})
        finally:
            fetcher.close()

    def _build(self, k: int, rows: np.ndarray, order: SampleOrder, fetcher: _ChunkFetcher) -> LoaderBatch:
        """Batch k from its `RankStream.locate` rows (layout rank, position in its stream, shard, index)."""
        spec = self.spec
        first = spec.start + k * spec.batch_size
        decoded, corrupt_keys = [], []
        for rank, position, shard, idx in rows.tolist():
            item = self._decode(fetcher, order, shard, idx)
            if isinstance(item, CorruptSample):
                corrupt_keys.append(str(item))
                item = self._replacement(fetcher, order, rank, position)
            decoded.append(item)
        epochs = rows[:, 1] // order.samples_per_epoch
        flips = self._flips(decoded, epochs) if spec.hflip else [False] * len(decoded)
        image = to_tensor([d.pixels[:, ::-1] if f else d.pixels for d, f in zip(decoded, flips)], spec.resolution)
        latent = None
        if spec.latents:
            latent = torch.from_numpy(np.stack([d.arrays["latent_flip" if f else "latent"]
                                                for d, f in zip(decoded, flips)]).astype(np.float32))
        return LoaderBatch(
            image=image, condition=self._condition(decoded), latent=latent,
            captions=[d.caption or "" for d in decoded] if any(d.caption is not None for d in decoded) else None,
            keys=[d.ref for d in decoded], corrupt=len(corrupt_keys), corrupt_keys=corrupt_keys,
            position=first + len(decoded))

    def _decode(self, fetcher: _ChunkFetcher, order: SampleOrder, shard: int, idx: int) -> _Decoded | CorruptSample:
        spec = self.spec
        ref = f"{spec.shards[shard]}/{idx}"
        sample = fetcher.sample(order.chunk_of(shard, idx), idx)
        if isinstance(sample, CorruptSample):
            return CorruptSample(f"{spec.shards[shard]}: {sample}")
        ref = f"{spec.shards[shard]}/{sample.key}"
        try:
            pixels = decode_image(sample.image, spec.channels, spec.stored_resolution)
        except UnreadableImage as err:
            return CorruptSample(f"{ref}: {err}")
        if spec.classes and sample.cls is None:
            return CorruptSample(f"{ref}: no class label (.cls) in a class-labelled dataset")
        if spec.latents and "latent" not in sample.arrays:
            return CorruptSample(f"{ref}: no latent.npy in a latent-pair dataset")
        if spec.latents and spec.hflip and "latent_flip" not in sample.arrays:
            raise ValueError(f"{ref}: hflip with latent pairs needs latent_flip.npy beside latent.npy "
                             "(precompute with precompute.flip=true), or turn hflip off")
        uid = self.first_index[shard] + idx
        return _Decoded(ref, uid, pixels, sample.cls, sample.caption, sample.arrays)

    def _replacement(self, fetcher: _ChunkFetcher, order: SampleOrder, rank: int, position: int) -> _Decoded:
        """The next valid sample after `position` in layout rank `rank`'s order, wrapping within the epoch."""
        m = order.samples_per_epoch
        epoch_start = position - position % m
        for step in range(1, min(MAX_REPLACEMENTS, m) + 1):
            candidate = epoch_start + (position - epoch_start + step) % m
            (shard, idx), = order.locate_ranks(np.array([rank]), np.array([candidate])).tolist()
            item = self._decode(fetcher, order, shard, idx)
            if not isinstance(item, CorruptSample):
                return item
        raise RuntimeError(f"{self.spec.url}: {min(MAX_REPLACEMENTS, m) + 1} consecutive samples are corrupt near "
                           f"stream position {position}; the shards are damaged: re-run `pagoda prepare`")

    def _flips(self, decoded: list[_Decoded], epochs: np.ndarray) -> list[bool]:
        # A coin per (sample, epoch), not per position: deterministic and independent of world size.
        return [bool(hash64((self.spec.seed, int(e), 3), np.array([d.uid]))[0] & 1) for d, e in zip(decoded, epochs)]

    def _condition(self, decoded: list[_Decoded]) -> Condition:
        spec = self.spec
        cond = Condition()
        if spec.classes:
            cond.class_labels = torch.tensor([d.cls for d in decoded], dtype=torch.int64)
        if spec.text and all("emb" in d.arrays for d in decoded):
            cond.text_pooled = torch.from_numpy(np.stack([d.arrays["emb"] for d in decoded]).astype(np.float32))
            if all("tok" in d.arrays for d in decoded):
                cond.text_tokens = torch.from_numpy(np.stack([d.arrays["tok"] for d in decoded]).astype(np.float32))
                masks = [d.arrays.get("mask", np.ones(d.arrays["tok"].shape[0], dtype=bool)) for d in decoded]
                cond.text_mask = torch.from_numpy(np.stack(masks).astype(bool))
        return cond


class StreamingReader:
    """An endless iterable of `LoaderBatch`es for one rank, with a checkpointable position (module docstring)."""

    def __init__(self, url: str, *, batch_size: int, split: str = "train", resolution: int | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_window: int = 1024, chunk_size: int | None = None, condition: ConditionMode = "auto",
                 needs_latents: bool = False, hflip: bool = False, prefetch_batches: int = 2,
                 io_threads: int = 4, pin_memory: bool = False, loader_priority: LoaderPriority = "normal",
                 manifest: Manifest | None = None, draw_loader_seed: bool = False,
                 global_batch: int | None = None) -> None:
        """url: committed shard folder; resolution: output side (None: as stored; lower: box-downsampled);
        rank / world_size: this rank's share; num_workers: DataLoader processes (0: in this process);
        shuffle_window: samples permuted together (data.shuffle_buffer); chunk_size: samples per range read
        (default shuffle_window // 4); condition: which labels to produce ("auto": whatever the data has);
        needs_latents: read latent-pair shards; hflip: random horizontal flips (with latent_flip for pairs);
        loader_priority: "idle" lowers the DataLoader workers to the idle scheduling class (data.loader_priority);
        draw_loader_seed: draw the loader's seed from torch's global RNG even without worker processes (a training
        stream: see `loader_seed`); global_batch: samples per optimizer step over all ranks (default batch_size x
        world_size): a stream resumed on another world size continues with the same global batches (order.Layout).
        """
        self.url = url.rstrip("/")
        self.manifest = manifest if manifest is not None else read_manifest(self.url)
        shards = self.manifest.shards(split)
        stored = self.manifest.resolution
        resolution = stored if resolution is None else resolution
        if resolution > stored:
            raise ValueError(f"{url} stores {stored}px images; {resolution}px needs data prepared at >= {resolution}")
        if batch_size < 1 or num_workers < 0 or prefetch_batches < 0 or io_threads < 1:
            raise ValueError("batch_size and io_threads must be >= 1, num_workers and prefetch_batches >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        global_batch = batch_size * world_size if global_batch is None else global_batch
        if global_batch % (batch_size * world_size):
            raise ValueError(f"a global batch of {global_batch} is not a whole number of {world_size} ranks x "
                             f"batches of {batch_size}")
        if needs_latents and self.manifest.kind != "latent-pairs":
            raise ValueError(f"{url} holds {self.manifest.kind} shards; latents need the latent-pair shards "
                             "written by `pagoda precompute`")
        if condition == "class" and not self.manifest.class_names:
            raise ValueError(f"{url} has no class labels; prepare a class-labelled dataset or use condition='none'")
        if chunk_size is None:  # a window then mixes >= 4 chunks from all over the dataset
            chunk_size = max(1, shuffle_window // 4)
        self.split, self.batch_size, self.num_workers, self.pin_memory = split, batch_size, num_workers, pin_memory
        self.loader_priority = loader_priority
        # The DataLoader's own seed (its workers' base seed). torch's DataLoader draws it from the global RNG each
        # time it starts, so a training step's noise depended on the worker count (0 workers: no draw) and on
        # whether the stream had been restarted by a resume. It is drawn here instead, exactly as torch did (so
        # runs with loader workers keep their numbers), once per stream, and travels in the state: a resumed
        # stream does not draw again. `draw_loader_seed` draws it without workers too.
        self.loader_seed: int | None = None
        self.draw_loader_seed = draw_loader_seed
        self.position = 0
        self.corrupt_count = 0
        self.corrupt_keys: collections.deque[str] = collections.deque(maxlen=RECENT_CORRUPT)
        self._spec = StreamSpec(
            url=self.url, tar_url=tar_root(self.manifest, self.url), decode=sample_decoder(self.manifest),
            shards=tuple(s.name for s in shards), counts=tuple(s.count for s in shards),
            channels=self.manifest.channels, stored_resolution=stored, resolution=resolution,
            batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, chunk_size=chunk_size,
            shuffle_window=shuffle_window, layout=Layout(world_size, global_batch), start=0,
            classes=condition in ("auto", "class") and bool(self.manifest.class_names),
            text=condition in ("auto", "text"), latents=needs_latents, hflip=hflip,
            prefetch_batches=prefetch_batches, io_threads=io_threads)
        self.order = self._spec.order()  # validates the world size against the sample count

    # ------------------------------------------------------------------------------------------ properties
    @property
    def samples_per_epoch(self) -> int:
        """Samples each rank sees per epoch (the same on every rank; after a resume on another world size, the
        layout's epochs are shared out anew, rounded down)."""
        return self.order.samples_per_epoch * self._spec.layout.world_size // self._spec.world_size

    @property
    def batches_per_epoch(self) -> float:
        return self.samples_per_epoch / self.batch_size

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    # -------------------------------------------------------------------------------------------- iterate
    def stream(self) -> RankStream:
        """The IterableDataset from the current position (for callers that build their own DataLoader)."""
        return RankStream(replace(self._spec, start=self.position))

    def __iter__(self) -> Iterator[LoaderBatch]:
        dataset = self.stream()
        if self.num_workers == 0:
            if self.draw_loader_seed:
                self._draw_loader_seed()
            source: Any = iter(dataset)
        else:
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                                persistent_workers=False, pin_memory=self.pin_memory,
                                generator=torch.Generator().manual_seed(self._draw_loader_seed()),
                                worker_init_fn=lower_to_idle_priority if self.loader_priority == "idle" else None)
            source = iter(loader)
        try:
            for batch in source:
                if self.pin_memory and self.num_workers == 0:
                    batch = batch.pin_memory()  # the DataLoader does this itself when it has workers
                if batch.position != self.position + len(batch):
                    raise RuntimeError(f"data stream out of order: got the batch ending at {batch.position}, "
                                       f"expected {self.position + len(batch)}")
                self.position = batch.position
                self.corrupt_count += batch.corrupt
                self.corrupt_keys.extend(batch.corrupt_keys)
                yield batch
        finally:
            del source  # stops the DataLoader workers now, not at garbage collection

    def _draw_loader_seed(self) -> int:
        """The stream's loader seed, drawn from torch's global RNG the first time (one int64, as DataLoader does)."""
        if self.loader_seed is None:
            self.loader_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        return self.loader_seed

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The rank's position and what it is relative to; equal on every rank, so rank 0's copy serves all."""
        s = self._spec
        return {"position": self.position, "samples_per_epoch": self.samples_per_epoch,
                "world_size": s.world_size, "layout_world_size": s.layout.world_size,
                "global_batch": s.layout.global_batch, "seed": s.seed, "split": self.split,
                "dataset": self.manifest.fingerprint, "shuffle_window": s.shuffle_window,
                "chunk_size": s.chunk_size, "corrupt_count": self.corrupt_count, "loader_seed": self.loader_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved position; refuses state it cannot honour exactly (and says why)."""
        s = self._spec
        mine = {"dataset": self.manifest.fingerprint, "seed": s.seed, "split": self.split,
                "shuffle_window": s.shuffle_window, "chunk_size": s.chunk_size}
        changed = [f"{k}: {state.get(k)!r} -> {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ValueError("the saved data position belongs to a different data stream (" + ", ".join(changed)
                             + "); resume with the same dataset and data settings, or start the data stream anew")
        position, saved_world = int(state["position"]), int(state["world_size"])
        layout = Layout(int(state.get("layout_world_size", saved_world)), s.layout.global_batch)
        self.corrupt_count = int(state.get("corrupt_count", 0))
        if layout.world_size != s.world_size or saved_world != s.world_size:
            # The stream's global batches carry over to another world size only at a step boundary and only if
            # they stay the same size (the saved state says how large they were).
            saved_batch = state.get("global_batch")
            if saved_batch is None:
                raise ValueError(f"the data position was saved with world size {saved_world} without its global "
                                 "batch (an older checkpoint); resume with that world size")
            if saved_batch != layout.global_batch:
                raise ValueError(f"the data stream was laid out for a global batch of {saved_batch} samples, this run "
                                 f"has {layout.global_batch}; resume with that batch size")
            share = layout.global_batch // saved_world
            if position % share:
                raise ValueError(f"the data position {position} was saved with world size {saved_world} in the middle "
                                 f"of a step ({share} samples per rank); resume with that world size")
            position = position // share * (layout.global_batch // s.world_size)
            if s.rank >= saved_world:
                self.corrupt_count = 0  # a rank new to the run (the counts of the saved ranks stay with them)
        self._spec = replace(s, layout=layout)
        self.order = self._spec.order()
        self.position = position
        # A state saved before loader seeds were kept comes from a stream that drew one when it started.
        self.loader_seed = state.get("loader_seed", s.seed)


def condition_mode(model: ModelConfig) -> ConditionMode:
    """The labels a model is built for: class labels, caption embeddings, or none."""
    return "class" if model.num_classes else "text" if model.text_dim else "none"


def reader_for(cfg: Config, inputs: StageInputs, *, batch_size: int, rank: int = 0, world_size: int = 1,
               split: str = "train", global_batch: int | None = None, gan_reals: bool = False) -> StreamingReader:
    """The reader a training stage needs, from the run config: image shards, or latent pairs when the stage
    `needs_latents`; the condition the model is built for; the stage's resolution; data.* loader settings; a loader
    seed drawn from torch's RNG whatever data.loader_workers is, so a stage's random numbers do not depend on it.
    Training splits are mirrored as data.hflip says: latent pairs under pairs and all, image shards under all.

    gan_reals: the stage's second stream (StageInputs.gan_reals): the same shards and flips without latents, in an
    order of its own (a seed derived from the run's), so the discriminator's reals are not the reconstruction's."""
    flips = cfg.data.hflip == "all" or (cfg.data.hflip == "pairs" and inputs.needs_latents)
    seed = gan_reals_seed(cfg.run.seed) if gan_reals else cfg.run.seed
    return StreamingReader(
        cfg.pairs_url if inputs.needs_latents else cfg.shards_url, batch_size=batch_size, split=split,
        resolution=inputs.resolution, rank=rank, world_size=world_size, num_workers=cfg.data.loader_workers,
        seed=seed, shuffle_window=cfg.data.shuffle_buffer, condition=condition_mode(cfg.model),
        needs_latents=inputs.needs_latents and not gan_reals, hflip=flips and split == "train",
        loader_priority=cfg.data.loader_priority, draw_loader_seed=True, global_batch=global_batch)


def gan_reals_seed(seed: int) -> int:
    """The order seed of a stage's second (discriminator) stream: a hash of the run seed, never the seed itself."""
    return int(hash64((seed, GAN_REALS_SALT), np.zeros(1, dtype=np.uint64))[0] >> 1)


def load_images(url: str, *, count: int, split: str = "val", resolution: int | None = None, seed: int = 0,
                num_workers: int = 0) -> torch.Tensor:
    """`count` distinct images of `split` in [-1, 1] (e.g. the real set of an evaluation), in a seeded order."""
    reader = StreamingReader(url, batch_size=min(count, 256), split=split, resolution=resolution, seed=seed,
                             num_workers=num_workers, condition="none")
    if count > reader.samples_per_epoch:
        raise ValueError(f"{url} has {reader.samples_per_epoch} '{split}' images; {count} were asked for")
    out, have = [], 0
    for batch in reader:
        out.append(batch.image[: count - have])
        have += len(out[-1])
        if have >= count:
            break
    return torch.cat(out)

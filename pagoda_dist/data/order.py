"""The order in which a rank sees samples: a pure function of (manifest counts, seed, epoch, rank, world size).

Training counts images, so a rank's data is one endless stream; its *position* is how many samples it has
consumed. Everything below turns a position into a (shard, index-in-shard) pair without reading any data, which
makes exact resume trivial: a resumed reader starts at the saved position and skips nothing by reading.

Per epoch e:
1. Every shard is cut into chunks of `chunk_size` consecutive samples (the unit of one range read).
2. The chunks are permuted by hash(seed, e) and laid end to end: one sequence of all N samples.
3. Rank r owns the slice [r*M, (r+1)*M) of that sequence, M = N // world_size, so every rank gets exactly M
   samples per epoch (the N mod world_size left over change every epoch); uneven shards cannot starve a rank.
4. Within the rank's slice, consecutive windows of `shuffle_window` samples are permuted by
   hash(seed, e, r, window): samples of ~window/chunk_size chunks mix, yet a reader fetches each chunk once.

DataLoader workers do not change the order: the reader hands batch k of a rank to worker k mod num_workers.

The world size the order is built for is the one a run started with (its *layout*). `Layout` says which of those
rank streams' positions a rank reads when a run resumes on another number of ranks with the same global batch:
step s of the run is, as before, the next B/W0 positions of each of the W0 rank streams laid end to end; the new
ranks split that same global batch among them, so no sample is repeated or skipped by the change.
Shuffling uses a splitmix64 hash rather than numpy's Generator so the order never changes with numpy's version.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EPOCH_CACHE = 2  # chunk permutations kept (a batch can straddle two epochs)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic is intended)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash64(words: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """A uint64 hash of each entry of `values` salted with `words` (seed, epoch, ...): deterministic everywhere."""
    h = np.zeros(1, dtype=np.uint64)
    for w in words:
        h = _mix(h ^ (np.array([w & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN))
    return _mix(np.asarray(values, dtype=np.uint64) ^ h)


def permutation(words: tuple[int, ...], n: int) -> np.ndarray:
    """A permutation of range(n) determined by `words`."""
    return np.argsort(hash64(words, np.arange(n, dtype=np.uint64)), kind="stable")


@dataclass
class SampleOrder:
    """Maps a rank's stream positions to (shard, index) pairs; see the module docstring for the construction."""

    counts: tuple[int, ...]     # samples per shard, manifest order
    seed: int
    rank: int
    world_size: int
    chunk_size: int = 64        # samples per range read
    shuffle_window: int = 256   # samples permuted together inside a rank's slice
    _chunks: np.ndarray = field(init=False, repr=False)
    _epochs: dict[int, tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.chunk_size < 1 or self.shuffle_window < 1:
            raise ValueError("chunk_size and shuffle_window must be >= 1")
        total = sum(self.counts)
        if total < self.world_size:
            raise ValueError(f"{total} samples cannot be split across {self.world_size} ranks")
        rows = [(s, start, min(self.chunk_size, n - start))
                for s, n in enumerate(self.counts) for start in range(0, n, self.chunk_size)]
        self._chunks = np.array(rows, dtype=np.int64).reshape(-1, 3)  # (shard, first index, length)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def samples_per_epoch(self) -> int:
        """M: samples this rank (every rank) sees per epoch."""
        return self.total // self.world_size

    def chunk_of(self, shard: int, index: int) -> tuple[int, int, int]:
        """(shard, first index, length) of the chunk holding sample `index` of `shard`."""
        start = index - index % self.chunk_size
        return shard, start, min(self.chunk_size, self.counts[shard] - start)

    def locate(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), 2) int64 array of (shard, index-in-shard) for this rank's stream positions."""
        positions = np.asarray(positions, dtype=np.int64)
        return self.locate_ranks(np.full_like(positions, self.rank), positions)

    def locate_ranks(self, ranks: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`locate` for positions of several ranks of this world size: position i is one of rank ranks[i]."""
        ranks, positions = np.asarray(ranks, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        if len(ranks) and not 0 <= ranks.min() <= ranks.max() < self.world_size:
            raise ValueError(f"ranks {sorted(set(ranks.tolist()))} are outside world size {self.world_size}")
        m, s = self.samples_per_epoch, self.shuffle_window
        epoch, offset = np.divmod(positions, m)
        window = offset // s
        local = np.empty_like(positions)
        for r, e, w in sorted(set(zip(ranks.tolist(), epoch.tolist(), window.tolist()))):
            sel = (ranks == r) & (epoch == e) & (window == w)
            start = w * s
            perm = permutation((self.seed, e, r, w, 1), min(s, m - start))
            local[sel] = start + perm[offset[sel] - start]
        sequence = ranks * m + local  # index into the epoch's chunk-ordered sequence of all samples
        out = np.empty((len(positions), 2), dtype=np.int64)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            order, ends = self._epoch(e)
            k = np.searchsorted(ends, sequence[sel], side="right")
            chunk = self._chunks[order[k]]
            out[sel, 0] = chunk[:, 0]
            out[sel, 1] = chunk[:, 1] + sequence[sel] - (ends[k] - chunk[:, 2])
        return out

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's chunk order and the cumulative sample count at the end of each chunk in that order."""
        if epoch not in self._epochs:
            if len(self._epochs) >= _EPOCH_CACHE:
                self._epochs.pop(min(self._epochs))
            order = permutation((self.seed, epoch, 0), len(self._chunks))
            self._epochs[epoch] = (order, np.cumsum(self._chunks[order, 2]))
        return self._epochs[epoch]


@dataclass(frozen=True)
class Layout:
    """Which samples a rank reads when the run's stream was laid out for `world_size` ranks.

    Step s of the run reads positions [s*P, (s+1)*P) of every layout rank's stream, P = global_batch / world_size,
    laid end to end in layout-rank order: the step's global batch. A rank of `ranks` ranks reads its consecutive
    1/ranks share of it, step after step (its micro-batches cut that share in order); with ranks == world_size that
    is exactly the rank's own stream, so a run that keeps its world size reads what it always read.
    """

    world_size: int     # W0: ranks the run's stream was laid out for
    global_batch: int   # B: samples per optimizer step over all ranks

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.global_batch < 1 or self.global_batch % self.world_size:
            raise ValueError(f"a global batch of {self.global_batch} cannot be split over {self.world_size} ranks")

    def positions(self, rank: int, ranks: int, consumed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(layout ranks, positions in their streams) of samples `consumed` (0, 1, ...) of `rank` of `ranks`."""
        if self.global_batch % ranks:
            raise ValueError(f"a global batch of {self.global_batch} cannot be split over {ranks} ranks; choose a "
                             "batch size divisible by the number of workers")
        share, per_rank = self.global_batch // ranks, self.global_batch // self.world_size
        step, within = np.divmod(np.asarray(consumed, dtype=np.int64), share)
        j = rank * share + within  # index in the step's global batch
        return j // per_rank, step * per_rank + j % per_rank

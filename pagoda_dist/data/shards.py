"""Writing and reading shard files: WebDataset tars plus a byte-range index per shard.

`ShardWriter` writes one shard and its index (`train-000007.tar` + `train-000007.idx.json`); `SplitWriter`
rolls a split over shards of `shard_size` samples. The index lists each sample's key and byte offsets, so a
reader fetches any run of consecutive samples with one range request (`read_samples`) instead of streaming the
whole tar; `iter_shard` streams a whole shard in order (what precompute does with its input).
"""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from pagoda_dist import storage
from pagoda_dist.data.samples import CorruptSample, Sample, sample_from_members, sample_to_members

INDEX_SUFFIX = ".idx.json"
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def shard_name(split: str, number: int) -> str:
    """`train-000007.tar`."""
    return f"{split}-{number:06d}.tar"


def index_name(shard: str) -> str:
    """`train-000007.idx.json` for `train-000007.tar`."""
    return shard[: -len(".tar")] + INDEX_SUFFIX


@dataclass(frozen=True)
class ShardInfo:
    """A written shard as the manifest lists it."""

    name: str    # file name within the dataset folder
    count: int   # samples
    bytes: int   # size of the tar

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> ShardInfo:
        return ShardInfo(name=str(data["name"]), count=int(data["count"]), bytes=int(data["bytes"]))


@dataclass(frozen=True)
class ShardIndex:
    """Keys and byte ranges of a shard's samples: sample i spans [offsets[i], offsets[i + 1])."""

    keys: np.ndarray     # bytes ("S") array: compact when a reader holds the indexes of thousands of shards
    offsets: np.ndarray  # int64, len(keys) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode()


class ShardWriter:
    """Writes one shard and its index to `folder_url/name`, visible only once `close()` has uploaded both.

    Samples go to a local temporary file first (beside the target for local folders, so closing is a rename),
    which keeps memory flat whatever the shard size and makes an S3 upload one retried PUT or multipart upload.
    """

    def __init__(self, folder_url: str, name: str) -> None:
        if not name.endswith(".tar") or "/" in name:
            raise ValueError(f"shard name {name!r} must be a plain file name ending in .tar")
        self.folder_url, self.name = folder_url, name
        self._remote = storage.is_remote(folder_url)
        tmp_dir = None
        if not self._remote:
            tmp_dir = storage.filesystem(folder_url)[1]
            os.makedirs(tmp_dir, exist_ok=True)
        fd, self._tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_dir)
        self._file = os.fdopen(fd, "w+b")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._offsets: list[int] = [0]
        self._closed = False

    def __len__(self) -> int:
        return len(self._keys)

    def write(self, sample: Sample) -> None:
        """Appends one sample (its members contiguous, in the canonical order)."""
        if sample.key in self._seen:  # readers group members by key: a repeated key would merge two samples
            raise ValueError(f"{self.name}: sample key {sample.key} is already in this shard")
        self._seen.add(sample.key)
        for member, data in sample_to_members(sample):
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical bytes on re-runs
            self._tar.addfile(info, _BytesReader(data))
        self._keys.append(sample.key)
        self._offsets.append(self._tar.offset)

    def close(self) -> ShardInfo:
        """Finishes the tar, stores it and its index; returns what the manifest records."""
        if self._closed:
            raise ValueError(f"{self.name} is already closed")
        self._closed = True
        self._tar.close()
        self._file.close()
        target = storage.join(self.folder_url, self.name)
        try:
            size = os.path.getsize(self._tmp_path)
            if self._remote:
                storage.copy_file(self._tmp_path, target)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a dataset is meant to be shared
                os.replace(self._tmp_path, storage.filesystem(target)[1])
        finally:
            if os.path.exists(self._tmp_path):
                os.unlink(self._tmp_path)
        index = {"shard": self.name, "keys": self._keys, "offsets": self._offsets}
        storage.write_bytes(storage.join(self.folder_url, index_name(self.name)), json.dumps(index).encode())
        return ShardInfo(self.name, len(self._keys), size)

    def abort(self) -> None:
        """Drops the shard without storing anything."""
        if not self._closed:
            self._closed = True
            self._file.close()
            if os.path.exists(self._tmp_path):
                os.unlink(self._tmp_path)


class SplitWriter:
    """Writes a split as `{split}-000000.tar`, `{split}-000001.tar`, ... of `shard_size` samples each."""

    def __init__(self, folder_url: str, split: str, shard_size: int) -> None:
        self.folder_url, self.split, self.shard_size = folder_url, split, shard_size
        self.shards: list[ShardInfo] = []
        self._current: ShardWriter | None = None
        self.count = 0

    def write(self, sample: Sample) -> None:
        if self._current is None:
            self._current = ShardWriter(self.folder_url, shard_name(self.split, len(self.shards)))
        self._current.write(sample)
        self.count += 1
        if len(self._current) >= self.shard_size:
            self.shards.append(self._current.close())
            self._current = None

    def close(self) -> list[ShardInfo]:
        if self._current is not None and len(self._current):
            self.shards.append(self._current.close())
        self._current = None
        return self.shards

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


class _BytesReader:
    """The minimal file object tarfile.addfile needs, without copying `data` into a BytesIO."""

    def __init__(self, data: bytes) -> None:
        self._view, self._pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        chunk = self._view[self._pos:end].tobytes()
        self._pos = end
        return chunk


# ------------------------------------------------------------------------------------------------- reading
def read_index(shard_url: str) -> ShardIndex:
    """The index beside `shard_url`; a StorageError when it is missing, ValueError when it is malformed."""
    url = shard_url[: -len(".tar")] + INDEX_SUFFIX
    try:
        data = json.loads(storage.read_bytes(url))
        keys = np.array([str(k).encode() for k in data["keys"]], dtype="S")
        offsets = np.asarray(data["offsets"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{url}: not a shard index ({err}); re-run `pagoda prepare` for this dataset") from None
    if len(offsets) != len(keys) + 1 or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"{url}: offsets do not match its {len(keys)} keys; re-run `pagoda prepare`")
    return ShardIndex(keys, offsets)


def parse_members(buf: bytes | memoryview) -> list[tuple[str, bytes]]:
    """The regular-file members (name, data) of a ustar byte run; raises CorruptSample on a bad header or size.

    A small parser of our own rather than tarfile: it works on an arbitrary run of whole members cut out of a
    shard by a range read (no end-of-archive blocks), and checks every header's checksum.
    """
    view = memoryview(buf)
    pos, out = 0, []
    while pos + _BLOCK <= len(view):
        header = bytes(view[pos:pos + _BLOCK])
        if header == _ZERO_BLOCK:
            break
        name, size, regular = parse_header(header, pos)
        pos += _BLOCK
        if pos + size > len(view):
            raise CorruptSample(f"member {name!r} is truncated ({size} bytes announced, {len(view) - pos} left)")
        if regular:
            out.append((name, view[pos:pos + size].tobytes()))
        pos += padded(size)
    return out


def parse_header(header: bytes, pos: int) -> tuple[str, int, bool]:
    """(name, data size, is a regular file) of one 512-byte tar header at byte `pos`; CorruptSample when damaged."""
    try:  # checksum first: a damaged header then reads as damaged, whatever field the damage hit
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        stored = -1
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise CorruptSample(f"tar header checksum mismatch at byte {pos}")
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptSample(f"unreadable tar header at byte {pos} ({err})") from None
    return (f"{prefix}/{name}" if prefix else name), size, header[156:157] in (b"0", b"\0")


def padded(size: int) -> int:
    """Bytes a member's data takes in a tar: whole 512-byte blocks."""
    return -(-size // _BLOCK) * _BLOCK


Decoder = Callable[[bytes | memoryview, str], Sample | CorruptSample]  # one sample's bytes, its key -> sample


def read_samples(shard_url: str, index: ShardIndex, start: int, stop: int,
                 decode: Decoder | None = None) -> list[Sample | CorruptSample]:
    """Samples [start, stop) of a shard with ONE range read; a corrupt sample comes back as its CorruptSample.
    `decode` reads another tar layout (default: `decode_members`, ours)."""
    decode = decode or decode_members
    base = int(index.offsets[start])
    blob = memoryview(storage.read_bytes(shard_url, base, int(index.offsets[stop])))
    out: list[Sample | CorruptSample] = []
    for i in range(start, stop):
        lo, hi = int(index.offsets[i]) - base, int(index.offsets[i + 1]) - base
        out.append(decode(blob[lo:hi], index.key(i)))
    return out


def decode_members(blob: bytes | memoryview, key: str) -> Sample | CorruptSample:
    """One sample's byte run -> Sample, or the CorruptSample saying why not (never raises for bad data)."""
    try:
        sample = sample_from_members(parse_members(blob))
    except CorruptSample as err:
        return CorruptSample(f"sample {key}: {err}")
    if sample.key != key:
        return CorruptSample(f"sample {key}: found key {sample.key!r} where the index says {key!r}")
    return sample


def iter_shard(shard_url: str, on_corrupt: Callable[[str, str], None] | None = None, *, tar_url: str | None = None,
               decode: Decoder | None = None) -> Iterator[Sample]:
    """Every sample of a shard in order (one read of the whole tar, split by its index).

    Corrupt samples are passed to `on_corrupt(key, reason)` and left out; without a callback they raise. The
    index lies beside `shard_url`; `tar_url` and `decode`: a tar kept elsewhere, in another layout (indexed
    WebDataset shards, see `wds_source`).
    """
    index = read_index(shard_url)
    for i, item in enumerate(read_samples(tar_url or shard_url, index, 0, len(index), decode)):
        key = index.key(i)
        if isinstance(item, CorruptSample):
            if on_corrupt is None:
                raise item
            on_corrupt(key, str(item))
            continue
        yield item

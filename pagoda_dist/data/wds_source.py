"""Existing WebDataset shards (img2dataset's layout) as training data, read in place: indexed once, never re-sharded.

img2dataset writes `00000.tar`, `00001.tar`, ... (often on S3), each sample a run of members `KEY.jpg`, `KEY.txt`
(the caption) and `KEY.json` (its metadata). `index_webdataset(src, out)` reads every tar once, front to back,
and writes at OUT what `pagoda prepare` writes for its own shards except the shards themselves:

    OUT/00000.idx.json     keys and byte offsets of the tar's samples (the `shards.read_index` format)
    OUT/manifest.json      kind "images"; extra["webdataset"]["root"] is the folder the tars live in
    OUT/COMMIT             written last; readers refuse OUT without it

OUT is the run's data.shards folder, not the tars' own folder, which may belong to someone else or be read-only.
The streaming reader then fetches runs of samples from the tars with one range request each, in the same
deterministic order and with the same exact-resume state as prepared shards; precompute and evaluation read them
through the same index.

Splits: the last round(val_fraction * shards) tars (at least one, when there are two or more) are held out as
'val'; img2dataset's shards are in input order, so any of them is as good a sample as another. Before the scan,
`listed_val_count` tells its size from img2dataset's NNNNN_stats.json files (the run's held-out preflight).

Problems: the scan reads tar headers only (plus each image's own header for its size), and never drops a sample:
a damaged tar header (the scan resynchronises at the next valid header), a sample without an image, an image
whose header does not parse or whose size differs from the dataset's (the most common square size; img2dataset's
`--resize_mode center_crop` or `border` makes them all one size) stay in the index, are listed in the manifest's
`skipped`, and are replaced by the next valid sample and counted (`corrupt_samples`) whenever the reader meets
them, like a corrupt sample of a prepared shard. Keeping them keeps every sample's byte range contiguous.
"""
from __future__ import annotations

import bisect
import collections
import io
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from pagoda_dist import storage
from pagoda_dist.data.manifest import MANIFEST_NAME, Manifest, ManifestError, fingerprint, read_manifest
from pagoda_dist.data.samples import CorruptSample, Sample
from pagoda_dist.data.shards import ShardInfo, decode_members, index_name, padded, parse_header, parse_members
from pagoda_dist.data.sources import Skipped, SourceError, open_source

log = logging.getLogger(__name__)
EXTRA_KEY = "webdataset"
FORMAT = "pagoda-webdataset-index/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SCAN_THREADS = 8      # tars scanned at once: a scan waits on the network, not the CPU
READ_SIZE = 1 << 22   # bytes per sequential read while scanning a tar
STATS_SUFFIX = "_stats.json"  # img2dataset's record of each shard, beside it: NNNNN.tar -> NNNNN_stats.json
_BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = path up to the basename's 1st dot


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name the way webdataset groups members; None for a name without a dot."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


# ------------------------------------------------------------------------------------------------ reading
def tar_root(manifest: Manifest, url: str) -> str:
    """The folder holding the tars a manifest lists: beside it (prepared shards), or the indexed tars' folder."""
    return str(manifest.extra.get(EXTRA_KEY, {}).get("root", url))


def sample_decoder(manifest: Manifest) -> Callable[[bytes | memoryview, str], Sample | CorruptSample]:
    """How one sample's byte run becomes a Sample: prepared shards' strict layout, or img2dataset's."""
    return decode_webdataset if EXTRA_KEY in manifest.extra else decode_members


def decode_webdataset(blob: bytes | memoryview, key: str) -> Sample | CorruptSample:
    """An img2dataset sample's members -> Sample (image: .jpg/.jpeg/.png/.webp; caption: .txt, else the json's
    "caption"; class: .cls when present), or the CorruptSample saying why not (never raises for bad data)."""
    try:
        members = parse_members(blob)
    except CorruptSample as err:
        return CorruptSample(f"sample {key}: {err}")
    sample = Sample(key=key, image=b"", image_ext="")
    for name, data in members:
        parts = split_name(name)
        if parts is None or parts[0] != key:
            return CorruptSample(f"sample {key}: member {name!r} belongs to another sample")
        ext = parts[1]
        try:
            if ext in IMAGE_EXTS and not sample.image:
                sample.image, sample.image_ext = data, "jpg" if ext == "jpeg" else ext
            elif ext == "txt":
                sample.caption = data.decode("utf-8").strip()
            elif ext == "json":
                sample.meta = json.loads(data)
            elif ext == "cls":
                sample.cls = int(data.decode("ascii"))
        except (ValueError, UnicodeDecodeError) as err:
            return CorruptSample(f"sample {key}: member {name!r} is unreadable ({err})")
    if not sample.image:
        return CorruptSample(f"sample {key}: no image member ({', '.join('.' + e for e in IMAGE_EXTS)})")
    if sample.caption is None and isinstance(sample.meta.get("caption"), str):
        sample.caption = sample.meta["caption"].strip()
    return sample


# ------------------------------------------------------------------------------------------------ the scan
@dataclass
class ShardScan:
    """One tar as the scan found it: its samples' keys and byte ranges, image sizes and problems."""

    name: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)          # sample i spans [offsets[i], offsets[i + 1])
    image_sizes: list[tuple[int, int] | None] = field(default_factory=list)  # None: no image, or no readable size
    problems: dict[int, str] = field(default_factory=dict)    # sample number -> what is wrong with it
    trailing: list[str] = field(default_factory=list)         # damage after the last sample (read by no one)
    formats: collections.Counter[str] = field(default_factory=collections.Counter)  # "jpeg" / "png" / "webp"
    captions: int = 0
    bytes: int = 0


class _RangeStream:
    """Sequential reads of an object through retried range reads of READ_SIZE (bounded memory, any size)."""

    def __init__(self, url: str) -> None:
        self.url, self.size, self.pos = url, storage.size(url), 0
        self._buf, self._buf_start = b"", 0

    def read(self, n: int) -> bytes:
        out = []
        while n > 0 and self.pos < self.size:
            offset = self.pos - self._buf_start
            if offset >= len(self._buf):
                self._buf_start, offset = self.pos, 0
                self._buf = storage.read_bytes(self.url, self.pos, min(self.size, self.pos + READ_SIZE))
            piece = self._buf[offset:offset + n]
            out.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return b"".join(out)


def scan_shard(url: str, name: str) -> ShardScan:
    """Reads the tar at `url` once and finds its samples (consecutive members sharing a key, webdataset's rule).

    A sample's range starts at its first header (or the pax/long-name header before it) and ends where the next
    sample starts, so anything between samples, a damaged region included, is read as part of the one before."""
    scan = ShardScan(name)
    stream = _RangeStream(url)
    start_of_next: int | None = None  # where the headers leading to the next file member began
    damage: list[tuple[int, str]] = []
    damaged = False                   # inside a damaged region: looking for the next valid header
    end = 0
    while True:
        at = stream.pos
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            if header:
                damage.append((at, "the tar ends inside a header"))
            break
        if header == bytes(_BLOCK) and not damaged:
            break  # the end-of-archive marker
        try:
            member, size, regular = parse_header(header, at)
        except CorruptSample as err:
            if not damaged:
                damage.append((at, f"damaged tar header ({err})"))
                if start_of_next is None and not scan.keys:
                    start_of_next = at  # leading damage belongs to the first sample
            damaged = True
            continue  # resynchronise: try the next block as a header
        damaged = False
        data = stream.read(size) if regular else b""
        rest = padded(size) - len(data)
        while rest > 0:  # padding, or the data of a non-file member (pax header, folder)
            got = len(stream.read(min(rest, READ_SIZE)))
            if not got:
                break
            rest -= got
        if (regular and len(data) < size) or rest > 0:
            damage.append((at, f"member {member!r} is cut short: the tar ends inside it"))
            end = stream.pos
            break
        if not regular:
            start_of_next = at if start_of_next is None else start_of_next
            continue
        parts = split_name(member)
        if parts is not None:
            key, ext = parts
            if not scan.keys or key != scan.keys[-1]:
                scan.keys.append(key)
                scan.offsets.append(at if start_of_next is None else start_of_next)
                scan.image_sizes.append(None)
            _member(scan, ext, data)
        start_of_next = None
        end = stream.pos
    scan.bytes = stream.size
    scan.offsets.append(end)
    for at, reason in damage:  # to the sample whose byte range holds it
        owner = bisect.bisect_right(scan.offsets, at) - 1
        if 0 <= owner < len(scan.keys):
            scan.problems.setdefault(owner, reason)
        else:
            scan.trailing.append(reason)
    for i, size in enumerate(scan.image_sizes):
        if size is None:
            scan.problems.setdefault(i, "no readable image member")
    return scan


def _member(scan: ShardScan, ext: str, data: bytes) -> None:
    i = len(scan.keys) - 1
    if ext == "txt":
        scan.captions += 1
    elif ext in IMAGE_EXTS and scan.image_sizes[i] is None:
        try:
            with Image.open(io.BytesIO(data)) as img:  # parses the header only: cheap
                scan.image_sizes[i] = img.size
                scan.formats["jpeg" if ext in ("jpg", "jpeg") else ext] += 1
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            scan.problems.setdefault(i, f"image does not open ({type(err).__name__})")


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class IndexReport:
    """What `index_webdataset` did (or found already done)."""

    url: str
    reused: bool
    shards: int
    samples: int
    resolution: int
    problems: int
    seconds: float = 0.0

    def summary(self) -> str:
        state = "already indexed" if self.reused else f"indexed in {self.seconds:.1f} s"
        return (f"{self.url}: {self.shards} WebDataset shards, {self.samples} samples at {self.resolution}px, "
                f"{state}; {self.problems} problem samples (replaced and counted when read)")


def index_webdataset(src: str, out: str, *, channels: int = 3, val_fraction: float = 0.05,
                     min_resolution: int = 8, progress: bool = True) -> IndexReport:
    """Indexes the WebDataset shards SRC (folder/prefix or brace pattern, local or s3://) into OUT (see the module
    docstring). Re-running with the same shards (names and sizes) and settings does nothing; after they change, the
    index is rebuilt. OUT holding shards made by `pagoda prepare` is refused."""
    started = time.monotonic()
    source = open_source(src, "webdataset")
    names = [item.name for item in source.items]
    held_out = held_out_shards(len(names), val_fraction)
    settings = {"format": FORMAT, "source": src, "digest": source.digest, "channels": channels, "val_shards": held_out}
    try:
        existing = read_manifest(out)
    except (ManifestError, storage.StorageError):
        existing = None
    if existing is not None and EXTRA_KEY not in existing.extra:
        raise SourceError(f"{out} holds shards made by `pagoda prepare`; index {src} into another folder "
                          "(data.shards)")
    if existing is not None and existing.settings == settings:
        return IndexReport(out, True, len(names), sum(existing.count(s) for s in existing.splits),
                           existing.resolution, existing.skipped_count)
    storage.remove(storage.join(out, storage.COMMIT_MARKER), recursive=False)  # a stale index is no index
    urls = [str(item.path) for item in source.items]
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scans = list(tqdm(pool.map(scan_shard, urls, names), total=len(urls), disable=not progress,
                          desc="index webdataset", unit="shard"))
    empty = [url for url, scan in zip(urls, scans) if not scan.keys]
    if empty:
        raise SourceError(f"{empty[0]} holds no samples (an empty or unreadable tar); remove it from SRC")
    resolution = _resolution(scans, src, min_resolution)
    problems: list[Skipped] = []
    for scan in scans:
        for i, size in enumerate(scan.image_sizes):
            if size is not None and size != (resolution, resolution):
                scan.problems.setdefault(i, f"image is {size[0]}x{size[1]}, the dataset's are {resolution}px square")
        problems += [Skipped(f"{scan.name}/{scan.keys[i]}", reason) for i, reason in sorted(scan.problems.items())]
        problems += [Skipped(f"{scan.name} (after its last sample)", reason) for reason in scan.trailing]
        body = {"shard": scan.name, "keys": scan.keys, "offsets": scan.offsets}
        storage.write_bytes(storage.join(out, index_name(scan.name)), json.dumps(body).encode())
    infos = [ShardInfo(scan.name, len(scan.keys), scan.bytes) for scan in scans]
    splits = {"train": infos[: len(infos) - held_out]}
    if held_out:
        splits["val"] = infos[len(infos) - held_out:]
    root = urls[0][: -len(names[0])].rstrip("/")
    formats = collections.Counter(f for scan in scans for f in scan.formats.elements())
    note = f"WebDataset shards indexed in place at {root}; problem samples stay in the index, replaced when read"
    manifest = Manifest(
        kind="images", resolution=resolution, channels=channels, splits=splits,
        image_format=max(formats, key=lambda f: formats[f]),
        has_captions=any(scan.captions for scan in scans), settings=settings, inputs=sum(len(s.keys) for s in scans),
        skipped=problems, skipped_count=len(problems), extra={EXTRA_KEY: {"root": root}},
        notes=[note])
    storage.write_bytes(storage.join(out, MANIFEST_NAME), manifest.to_json())
    expected = {index_name(info.name): -1 for info in infos} | {MANIFEST_NAME: -1}
    storage.commit_existing(out, meta={"kind": manifest.kind, "fingerprint": fingerprint(settings)},
                            expected=expected)
    report = IndexReport(out, False, len(infos), manifest.inputs, resolution, len(problems),
                         time.monotonic() - started)
    log.info(report.summary())
    return report


def held_out_shards(n: int, val_fraction: float) -> int:
    """How many of n tars (the last ones) the index holds out: round(val_fraction * n), at least one when there are
    two or more, never all."""
    return 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))


def listed_val_count(src: str, val_fraction: float) -> int | None:
    """The size of the 'val' split `index_webdataset(src)` will make, read before the scan from img2dataset's
    NNNNN_stats.json beside each held-out tar ("successes": the samples written into it); None when one of those
    files is missing or unreadable, since then only the scan can count the samples."""
    items = open_source(src, "webdataset").items
    total = 0
    for item in items[len(items) - held_out_shards(len(items), val_fraction):]:
        url = str(item.path).removesuffix(".tar") + STATS_SUFFIX
        try:
            total += int(json.loads(storage.read_bytes(url))["successes"])
        except (storage.StorageError, OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _resolution(scans: list[ShardScan], src: str, min_resolution: int) -> int:
    """The most common square image size (ties: the larger)."""
    sides = collections.Counter(size[0] for scan in scans for size in scan.image_sizes
                                if size is not None and size[0] == size[1])
    if not sides:
        raise SourceError(f"SRC {src}: no square images; make the shards with img2dataset --resize_mode "
                          "center_crop (or border) so that every image has one size")
    side = max(sides, key=lambda s: (sides[s], s))
    if side < min_resolution:
        raise SourceError(f"SRC {src}: its images are {side}px, data.resolution needs >= {min_resolution}px")
    return side

"""`pagoda prepare SRC OUT`: images (folders, class folders, captions, builtins; local or on S3) -> committed
WebDataset shards.

Steps: enumerate SRC (nothing is written if it is missing or empty) -> shuffle the inputs by seed, so shards
mix classes and photos -> split train/val (by source group: a photo's tiles, an image listed with several
captions) -> cut each split into shards of `shard_size` consecutive inputs (`plan_shards`) -> build each shard:
decode, square-crop, resize and encode its inputs (corrupt, truncated and non-image inputs are counted, reported
and skipped) and write `train-NNNNNN.tar` / `val-NNNNNN.tar` with its index, then the shard's completion record
`.prepare/train-NNNNNN.json` (its skipped inputs, and the settings it was made with) -> `manifest.json` ->
COMMIT marker, last. A stop request (`stop()` returning True, e.g. on SIGTERM) starts no further shard: the shards
under way are finished with their records, and `PrepareStopped` says how many are left for the same call to build.

An input's shard and key follow from its position in its split alone (key = that position), so the bytes never
depend on who builds the shards, how many at once, or in which order; a skipped input leaves its key unused and
its shard one sample shorter. Who builds them is a `ShardRunner`: `local_shards` (the default) in this process
with `workers` local processes decoding, or `pagoda_dist.prepare_ray` with one Ray task per shard across a
cluster.

Re-running with the same settings on a committed OUT does nothing. With different settings it refuses (another
run may be reading those shards) unless `overwrite=True`, which deletes and rebuilds. A prepare that stopped
before committing resumes: shards whose completion record carries the same settings, and whose files are whole,
are kept; its other leftovers are deleted and rebuilt. A committed OUT with the same settings that lost a shard
is repaired the same way (the rebuilt shard is byte-identical to the lost one).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from pagoda_dist import storage
from pagoda_dist.data import builtin
from pagoda_dist.data.imaging import UnreadableImage, encode_image, fit_square, load_image, to_channels
from pagoda_dist.data.manifest import (MANIFEST_NAME, Manifest, ManifestError, commit_manifest, fingerprint,
                                       read_manifest)
from pagoda_dist.data.order import hash64, permutation
from pagoda_dist.data.samples import Sample, make_key
from pagoda_dist.data.shards import INDEX_SUFFIX, ShardInfo, ShardWriter, index_name, shard_name
from pagoda_dist.data.sources import Skipped, Source, SourceError, SourceItem, open_source

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "val")
RECORDS = ".prepare"                     # folder of the shards' completion records, inside OUT
RECORD_FORMAT = "pagoda-prepare-shard/1"
FETCH_AHEAD = 16                         # object-store reads in flight per shard builder: a GET waits on latency
# Files a (possibly half-finished) prepare leaves in OUT; anything else there means OUT is someone else's folder.
_OWN_FILE = re.compile(rf"^((train|val)-\d{{6}}(\.tar|{re.escape(INDEX_SUFFIX)})|{MANIFEST_NAME}|COMMIT|\..*\.tmp"
                       rf"|{re.escape(RECORDS)}/(train|val)-\d{{6}}\.json)$")

Encoded = tuple[bytes, str]              # stored image bytes and their extension ("png" / "jpg")
Fetched = bytes | Skipped | None         # an input's bytes read from an object store (None: read where decoded)
Progress = Callable[[int, int], None]    # (inputs done, of which skipped), as increments


class PrepareError(ValueError):
    """Prepare cannot run or finish: bad settings, an OUT folder it must not touch, or no usable input."""


class PrepareStopped(RuntimeError):
    """A stop request ended the prepare with shards left; those built are kept and the same call builds the rest."""


@dataclass
class PrepareReport:
    """What `prepare` did (or found already done)."""

    url: str
    reused: bool                              # True: OUT was already committed with these settings
    counts: dict[str, int]                    # samples per split
    shards: dict[str, list[str]]              # shard names per split
    class_names: list[str] | None
    resolution: int
    channels: int
    inputs: int
    skipped_count: int
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    built: list[str] = field(default_factory=list)  # shards built by this call (the rest were kept or reused)

    def summary(self, max_skipped: int = 20) -> str:
        """Human-readable report: counts, shards, and the skipped inputs with reasons."""
        total = sum(len(v) for v in self.shards.values())
        kept = "" if self.reused or len(self.built) >= total else \
            f" ({len(self.built)} shards built, the others kept from an earlier attempt)"
        verb = "already prepared (same settings, nothing to do)" if self.reused else \
            f"prepared in {self.elapsed_s:.1f}s{kept}"
        splits = ", ".join(f"{k}: {n} samples in {len(self.shards.get(k, []))} shards" for k, n in self.counts.items())
        lines = [f"{self.url}: {verb}", f"  {self.resolution}px x {self.channels} channel(s); {splits}"]
        if self.class_names:
            lines.append(f"  {len(self.class_names)} classes: {', '.join(self.class_names[:10])}"
                         + (" ..." if len(self.class_names) > 10 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  skipped {self.skipped_count} of {self.inputs} inputs" + (":" if self.skipped_count else ""))
        lines += [f"    {s.source}: {s.reason}" for s in self.skipped[:max_skipped]]
        if self.skipped_count > min(max_skipped, len(self.skipped)):
            lines.append(f"    ... and {self.skipped_count - min(max_skipped, len(self.skipped))} more "
                         f"(all listed in {MANIFEST_NAME})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ shards as work
@dataclass(frozen=True)
class ShardWork:
    """What every shard builder shares: where shards go, how an input becomes stored bytes, and the fingerprint
    of the settings (a completion record counts only for the settings it was made with)."""

    out: str
    resolution: int
    channels: int
    image_format: str
    jpeg_quality: int
    fingerprint: str


@dataclass(frozen=True)
class ShardJob:
    """One shard to build: consecutive inputs of a split, each keyed by its position in the split."""

    split: str
    number: int
    first: int                        # position in the split of items[0], i.e. the key of its sample
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)

    @property
    def record(self) -> str:
        """The completion record's path within OUT."""
        return f"{RECORDS}/{self.name[: -len('.tar')]}.json"


@dataclass
class ShardRecord:
    """A built shard as its completion record keeps it."""

    name: str
    shard: ShardInfo | None           # None when every input of the shard was skipped (no file is written)
    skipped: list[Skipped]

    def to_json(self, fingerprint: str) -> bytes:
        return json.dumps({"format": RECORD_FORMAT, "fingerprint": fingerprint, "name": self.name,
                           "shard": self.shard.to_dict() if self.shard else None,
                           "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped]}).encode()

    @staticmethod
    def from_json(raw: bytes) -> tuple[str, ShardRecord]:
        """(fingerprint, record); ValueError/KeyError/TypeError when `raw` is not a record."""
        body = json.loads(raw)
        if body.get("format") != RECORD_FORMAT:
            raise ValueError(f"format is {body.get('format')!r}, expected {RECORD_FORMAT!r}")
        shard = ShardInfo.from_dict(body["shard"]) if body["shard"] is not None else None
        skipped = [Skipped(str(s["source"]), str(s["reason"])) for s in body["skipped"]]
        return str(body["fingerprint"]), ShardRecord(str(body["name"]), shard, skipped)


class ShardRunner(Protocol):
    """Builds `jobs` (each with `build_shard`, or `write_shard` over its encoded inputs) and yields their records
    as they complete, in any order; calls `progress` as inputs are done. `workers`: how many at once. Once `stop()`
    returns True it starts no further shard, finishes those under way and returns."""

    def __call__(self, jobs: list[ShardJob], work: ShardWork, workers: int, progress: Progress,
                 stop: Callable[[], bool]) -> Iterator[ShardRecord]: ...


def plan_shards(items: list[SourceItem], shard_size: int) -> list[ShardJob]:
    """Each split's inputs, in order, cut into shards of `shard_size`: train shards first, then val."""
    jobs = []
    for split in SPLITS:
        part = [i for i in items if (i.split or "train") == split]
        jobs += [ShardJob(split, n, start, tuple(part[start:start + shard_size]))
                 for n, start in enumerate(range(0, len(part), shard_size))]
    return jobs


# ------------------------------------------------------------------------------------------------- prepare
def prepare(src: str, out: str, *, kind: str = "auto", resolution: int = 32, channels: int = 3,
            image_format: str = "png", jpeg_quality: int = 95, shard_size: int = 1000,
            val_fraction: float = 0.05, workers: int = 2, seed: int = 0, limit: int | None = None,
            overwrite: bool = False, progress: bool = True, runner: ShardRunner | None = None,
            stop: Callable[[], bool] | None = None) -> PrepareReport:
    """Turns SRC into committed shards at OUT (local path, file:// or s3://); see the module docstring.

    src: image folder, class-per-subfolder tree, captioned folder, .jsonl manifest (each local or s3://), or
    builtin:NAME.
    limit: use at most this many inputs (deterministic subset; for tests and quick demos).
    workers: shards built at once by `runner`; the default runner's local decoding processes.
    stop: polled between shards; once it returns True no further shard starts and PrepareStopped is raised.
    """
    started = time.monotonic()
    _check_settings(resolution, channels, image_format, jpeg_quality, shard_size, val_fraction, workers, limit)
    source = _open(src, kind, resolution, val_fraction, seed, limit)
    items = _order_and_split(source, val_fraction, seed, limit)
    if not items:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in source.skipped[:3])
        raise SourceError(f"SRC {src}: no usable inputs ({len(source.skipped)} skipped: {reasons})")
    settings = {
        "source": src if src.startswith(BUILTIN_PREFIX) else str(storage.filesystem(src)[1]),
        "source_kind": source.kind, "source_digest": source.digest, "resolution": resolution,
        "channels": channels, "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None, "shard_size": shard_size,
        "val_fraction": val_fraction, "seed": seed, "limit": limit,
    }
    reused = _existing(out, settings, overwrite)
    if reused is not None:
        report = _report(out, reused, True, time.monotonic() - started)
        if progress:
            print(report.summary(), file=sys.stderr)
        return report

    work = ShardWork(out, resolution, channels, image_format, jpeg_quality, fingerprint(settings))
    jobs = plan_shards(items, shard_size)
    records = _resume(out, work.fingerprint, jobs)
    todo = [job for job in jobs if job.name not in records]
    skipped_so_far = len(source.skipped) + sum(len(r.skipped) for r in records.values())
    bar = tqdm(total=len(items), initial=len(items) - sum(len(job.items) for job in todo), unit="img",
               desc=f"prepare {out}", disable=not progress, smoothing=0.1)

    def advance(done: int, skipped: int) -> None:
        nonlocal skipped_so_far
        bar.update(done)
        if skipped:
            skipped_so_far += skipped
            bar.set_postfix(skipped=skipped_so_far, refresh=False)

    # A failure leaves the finished shards and their records in place: the same call again builds only the rest.
    with bar:
        for record in (runner or local_shards)(todo, work, workers, advance, stop or _never):
            records[record.name] = record
    left = sum(job.name not in records for job in jobs)
    if left:
        raise PrepareStopped(f"prepare of {out} stopped on request with {left} of {len(jobs)} shards left; the "
                             "finished ones are kept, and the same command builds the rest")
    done = [records[job.name] for job in jobs]
    shards = {split: [r.shard for job, r in zip(jobs, done) if job.split == split and r.shard] for split in SPLITS}
    skipped = list(source.skipped) + [s for r in done for s in r.skipped]
    if not shards["train"]:
        _clear(out)
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:3])
        raise PrepareError(f"SRC {src}: none of the {len(items)} inputs became a training sample "
                           f"({len(skipped)} skipped, e.g. {reasons}); nothing was written to {out}")
    manifest = Manifest(
        kind="images", resolution=resolution, channels=channels, image_format=image_format,
        splits={split: s for split, s in shards.items() if s}, class_names=source.class_names,
        has_captions=any(i.caption is not None for i in items), settings=settings,
        inputs=len(items) + len(source.skipped), skipped=skipped, skipped_count=len(skipped),
        notes=source.notes)
    commit_manifest(out, manifest)
    report = _report(out, manifest, False, time.monotonic() - started)
    report.built = [job.name for job in todo if records[job.name].shard is not None]
    if progress:
        print(report.summary(), file=sys.stderr)
    return report


def _check_settings(resolution: int, channels: int, image_format: str, jpeg_quality: int, shard_size: int,
                    val_fraction: float, workers: int, limit: int | None) -> None:
    problems = []
    if resolution < 8 or resolution & (resolution - 1):
        problems.append(f"resolution must be a power of two >= 8, got {resolution}")
    if channels not in (1, 3):
        problems.append(f"channels must be 1 or 3, got {channels}")
    if image_format not in ("png", "jpeg"):
        problems.append(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        problems.append(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if shard_size < 1:
        problems.append(f"shard_size must be >= 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        problems.append(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 1:
        problems.append(f"limit must be >= 1 or None, got {limit}")
    if problems:
        raise PrepareError("prepare: " + "; ".join(problems))


def _open(src: str, kind: str, resolution: int, val_fraction: float, seed: int, limit: int | None) -> Source:
    if src.startswith(BUILTIN_PREFIX):
        if kind != "auto":
            raise SourceError(f"SRC {src} is a builtin dataset; leave the source kind at 'auto', not {kind!r}")
        return builtin.build(src[len(BUILTIN_PREFIX):], resolution=resolution, val_fraction=val_fraction,
                             seed=seed, limit=limit)
    return open_source(src, kind)


def _order_and_split(source: Source, val_fraction: float, seed: int, limit: int | None) -> list[SourceItem]:
    """Shuffles by seed (shards then mix classes/photos), applies `limit`, and assigns splits by group."""
    items = [source.items[i] for i in permutation((seed, 5), len(source.items))]
    if limit is not None and not source.kind.startswith(BUILTIN_PREFIX):
        items = items[:limit]  # builtins apply their own limit (they keep their split proportions)
    undecided = [i for i in items if i.split is None]
    if undecided:
        groups = sorted({i.group for i in undecided})
        codes = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                          for g in groups], dtype=np.uint64)
        u = hash64((seed, 9), codes).astype(np.float64) / 2.0 ** 64
        val = {g for g, x in zip(groups, u) if x < val_fraction}
        for item in undecided:
            item.split = "val" if item.group in val else "train"
    return items


def _existing(out: str, settings: dict, overwrite: bool) -> Manifest | None:
    """The committed manifest to reuse, or None when OUT is to be built (or finished, or repaired) here."""
    if not storage.is_committed(out):
        return None
    try:
        manifest = read_manifest(out)
    except ManifestError as err:
        if not overwrite and _manifest_settings(out) == settings:
            # Committed with these settings but a file was lost: rebuild only what is missing (identical bytes).
            log.warning("%s; rebuilding the missing shards", err)
            storage.remove(storage.join(out, storage.COMMIT_MARKER), recursive=False)
            return None
        if not overwrite:
            raise PrepareError(f"{err}; pass overwrite=True (`--overwrite`) to delete and rebuild it") from None
        manifest = None
    if manifest is not None and manifest.settings == settings:
        return manifest
    if manifest is not None and not overwrite:
        diff = ", ".join(f"{k}: {manifest.settings.get(k)!r} -> {v!r}" for k, v in sorted(settings.items())
                         if manifest.settings.get(k) != v)
        raise PrepareError(f"{out} already holds shards prepared with other settings ({diff}); choose another "
                           "OUT, or pass overwrite=True (`--overwrite`) to delete and rebuild them")
    _clear(out)
    return None


def _manifest_settings(out: str) -> dict | None:
    """The settings in OUT's manifest.json, read without checking the folder; None when it cannot be read."""
    where = storage.join(out, MANIFEST_NAME)
    try:
        return Manifest.from_json(storage.read_bytes(where), where).settings
    except (ManifestError, storage.ObjectNotFound):
        return None


def _own_files(out: str) -> dict[str, int]:
    """What a prepare wrote in OUT ({relative path: size}); refuses a folder that holds anything else."""
    present = storage.list_files(out)
    foreign = sorted(rel for rel in present if not _OWN_FILE.match(rel))
    if foreign:
        raise PrepareError(f"{out} is not empty and is not a shard folder (it holds {', '.join(foreign[:3])}"
                           f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new OUT")
    return present


def _clear(out: str) -> None:
    """Deletes what a prepare writes in OUT (commit marker first); refuses a folder holding anything else."""
    present = _own_files(out)
    if storage.COMMIT_MARKER in present:
        storage.remove(storage.join(out, storage.COMMIT_MARKER), recursive=False)
    for rel in sorted(present):
        if rel != storage.COMMIT_MARKER:
            storage.remove(storage.join(out, rel), recursive=False)
    storage.remove(storage.join(out, RECORDS))  # the (now empty) local folder; nothing on an object store


def _resume(out: str, fingerprint: str, jobs: list[ShardJob]) -> dict[str, ShardRecord]:
    """Records of the shards an earlier attempt with the same settings finished (record present, files whole);
    every other file it left in OUT is deleted."""
    present = _own_files(out)
    candidates = [job for job in jobs if job.record in present]
    with ThreadPoolExecutor(16) as pool:  # one small GET per record
        raws = list(pool.map(lambda job: storage.read_bytes(storage.join(out, job.record)), candidates))
    done: dict[str, ShardRecord] = {}
    for job, raw in zip(candidates, raws):
        try:
            made_with, record = ShardRecord.from_json(raw)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable completion record (%s); rebuilding that shard", job.record, err)
            continue
        shard = record.shard
        whole = shard is None or (present.get(shard.name) == shard.bytes and index_name(shard.name) in present)
        if made_with == fingerprint and record.name == job.name and whole:
            done[job.name] = record
    keep = {rel for job in jobs if job.name in done for rel in (job.record, job.name, index_name(job.name))}
    for rel in sorted(set(present) - keep):
        storage.remove(storage.join(out, rel), recursive=False)
    return done


def _report(out: str, manifest: Manifest, reused: bool, elapsed: float) -> PrepareReport:
    return PrepareReport(
        url=out, reused=reused, counts={k: manifest.count(k) for k in manifest.splits},
        shards={k: [s.name for s in v] for k, v in manifest.splits.items()}, class_names=manifest.class_names,
        resolution=manifest.resolution, channels=manifest.channels, inputs=manifest.inputs,
        skipped_count=manifest.skipped_count, skipped=manifest.skipped, notes=manifest.notes, elapsed_s=elapsed)


# ----------------------------------------------------------------------------------------- building shards
def _never() -> bool:
    return False


def local_shards(jobs: list[ShardJob], work: ShardWork, workers: int, progress: Progress,
                 stop: Callable[[], bool] = _never) -> Iterator[ShardRecord]:
    """The default runner: builds the shards in order in this process, decoding in `workers` local processes (in
    this process alone when workers == 1 or there are few inputs); returns early once `stop()` is True."""
    if workers == 1 or sum(len(job.items) for job in jobs) < 64:
        for job in jobs:
            if stop():
                return
            yield build_shard(job, work, progress)
        return
    tasks = ((item, work) for job in jobs for item in job.items)
    # spawn, not fork: the parent may hold S3 client threads and locks that a forked child would inherit.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_process,
                                                   initargs=(storage.env_for_workers(),)) as pool:
        results = pool.imap(_encode_task, tasks, chunksize=16)
        for job in jobs:
            if stop():  # leaving the pool's block ends its processes, whatever they had decoded ahead
                return
            yield write_shard(job, work, itertools.islice(results, len(job.items)), progress)


def build_shard(job: ShardJob, work: ShardWork, progress: Progress | None = None) -> ShardRecord:
    """Builds one shard in this process (what a Ray task runs); object-store reads run ahead in threads."""
    return write_shard(job, work, (_encode(item, data, work) for item, data in _fetched(job.items)), progress)


def write_shard(job: ShardJob, work: ShardWork, results: Iterable[Encoded | Skipped],
                progress: Progress | None = None) -> ShardRecord:
    """Writes shard `job.name` from `results` (one per input of `job`, in order), then its completion record."""
    writer: ShardWriter | None = None
    skipped: list[Skipped] = []
    try:
        for position, (item, result) in enumerate(zip(job.items, results, strict=True), start=job.first):
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                writer = writer or ShardWriter(work.out, job.name)
                data, ext = result
                writer.write(Sample(key=make_key(position), image=data, image_ext=ext, cls=item.cls,
                                    caption=item.caption, meta={"source": item.name}))
            if progress is not None:
                progress(1, int(isinstance(result, Skipped)))
        record = ShardRecord(job.name, writer.close() if writer is not None else None, skipped)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    storage.write_bytes(storage.join(work.out, job.record), record.to_json(work.fingerprint))
    return record


def _init_process(env: dict[str, str]) -> None:
    """A decoding process reads inputs from the same object store as its parent."""
    os.environ.update(env)
    storage.configure()


def _encode_task(task: tuple[SourceItem, ShardWork]) -> Encoded | Skipped:
    item, work = task
    return _encode(item, _fetch(item), work)


def _fetch(item: SourceItem) -> Fetched:
    """An object-store input's bytes (a vanished object is skipped); None for local files and ready pixels.
    Other storage failures (access denied, an outage outlasting the retries) raise: they are not the input's."""
    if item.path is None or not storage.is_remote(item.path):
        return None
    try:
        return storage.read_bytes(item.path)
    except storage.ObjectNotFound:
        return Skipped(item.name, "the object is gone (deleted after SRC was listed)")


def _fetched(items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Fetched]]:
    """`(item, _fetch(item))` in order, with up to FETCH_AHEAD reads in flight."""
    if not any(item.path is not None and storage.is_remote(item.path) for item in items):
        yield from ((item, None) for item in items)
        return
    with ThreadPoolExecutor(FETCH_AHEAD) as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append((item, pool.submit(_fetch, item)))
            if len(ahead) >= FETCH_AHEAD:
                first, future = ahead.popleft()
                yield first, future.result()
        for item, future in ahead:
            yield item, future.result()


def _encode(item: SourceItem, data: Fetched, work: ShardWork) -> Encoded | Skipped:
    if isinstance(data, Skipped):
        return data
    try:
        return encode_item(item, work.resolution, work.channels, work.image_format, work.jpeg_quality, data)
    except UnreadableImage as err:
        return Skipped(item.name, str(err))
    except (OSError, ValueError) as err:  # e.g. an image mode PIL cannot convert
        return Skipped(item.name, f"cannot convert the image ({err})")


def stored_image(item: SourceItem, resolution: int, channels: int, data: bytes | None = None) -> Image.Image:
    """The image as prepare stores it (before encoding): decode, channels, centre square, resize. `data`: the
    input's bytes when already read (else they are read from `item.path`)."""
    if item.pixels is not None:
        img = Image.fromarray(item.pixels)
    elif data is not None or (item.path is not None and storage.is_remote(item.path)):
        img = load_image(io.BytesIO(data if data is not None else storage.read_bytes(str(item.path))))
    else:
        img = load_image(str(item.path))
    return fit_square(to_channels(img, channels), resolution)


def encode_item(item: SourceItem, resolution: int, channels: int, image_format: str, jpeg_quality: int,
                data: bytes | None = None) -> Encoded:
    """Stored bytes and extension of one input; raises UnreadableImage for corrupt or non-image inputs."""
    return encode_image(stored_image(item, resolution, channels, data), image_format, jpeg_quality)

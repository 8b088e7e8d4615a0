"""`pagoda prepare SRC OUT`: images (folders, class folders, captions, builtins) -> committed WebDataset shards.

Steps: enumerate SRC (nothing is written if it is missing or empty) -> shuffle the inputs by seed, so shards
mix classes and photos -> split train/val (by source group: a photo's tiles, an image listed with several
captions) -> decode, square-crop, resize and encode in `workers` processes (corrupt, truncated and non-image
inputs are counted, reported and skipped) -> write `train-NNNNNN.tar` / `val-NNNNNN.tar` with indexes ->
`manifest.json` -> COMMIT marker. The shard bytes depend only on the inputs and settings, never on `workers`.

Re-running with the same settings on a committed OUT does nothing. With different settings it refuses (another
run may be reading those shards) unless `overwrite=True`, which deletes and rebuilds. Leftovers of a prepare
that died before committing are deleted and rebuilt.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from pagoda_dist import storage
from pagoda_dist.data import builtin
from pagoda_dist.data.imaging import UnreadableImage, encode_image, fit_square, load_image, to_channels
from pagoda_dist.data.manifest import MANIFEST_NAME, Manifest, ManifestError, commit_manifest, read_manifest
from pagoda_dist.data.order import hash64, permutation
from pagoda_dist.data.samples import Sample, make_key
from pagoda_dist.data.shards import INDEX_SUFFIX, SplitWriter
from pagoda_dist.data.sources import Skipped, Source, SourceError, SourceItem, open_source

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "val")
# Files a (possibly half-finished) prepare leaves in OUT; anything else there means OUT is someone else's folder.
_OWN_FILE = re.compile(rf"^((train|val)-\d{{6}}(\.tar|{re.escape(INDEX_SUFFIX)})|{MANIFEST_NAME}|COMMIT|\..*\.tmp)$")


class PrepareError(ValueError):
    """Prepare cannot run or finish: bad settings, an OUT folder it must not touch, or no usable input."""


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

    def summary(self, max_skipped: int = 20) -> str:
        """Human-readable report: counts, shards, and the skipped inputs with reasons."""
        verb = "already prepared (same settings, nothing to do)" if self.reused else \
            f"prepared in {self.elapsed_s:.1f}s"
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


@dataclass(frozen=True)
class _Encoding:
    """What every worker needs to turn an input into stored bytes."""

    resolution: int
    channels: int
    image_format: str
    jpeg_quality: int


def prepare(src: str, out: str, *, kind: str = "auto", resolution: int = 32, channels: int = 3,
            image_format: str = "png", jpeg_quality: int = 95, shard_size: int = 1000,
            val_fraction: float = 0.05, workers: int = 2, seed: int = 0, limit: int | None = None,
            overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Turns SRC into committed shards at OUT (local path, file:// or s3://); see the module docstring.

    src: image folder, class-per-subfolder tree, captioned folder, .jsonl manifest, or builtin:NAME.
    limit: use at most this many inputs (deterministic subset; for tests and quick demos).
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

    encoding = _Encoding(resolution, channels, image_format, jpeg_quality)
    writers = {split: SplitWriter(out, split, shard_size) for split in SPLITS}
    skipped = list(source.skipped)
    try:
        bar = tqdm(total=len(items), unit="img", desc=f"prepare {out}", disable=not progress, smoothing=0.1)
        with bar:
            for item, result in zip(items, _encoded(items, encoding, workers)):
                bar.update(1)
                if isinstance(result, Skipped):
                    skipped.append(result)
                    bar.set_postfix(skipped=len(skipped), refresh=False)
                    continue
                data, ext = result
                writer = writers[item.split or "train"]
                writer.write(Sample(key=make_key(writer.count), image=data, image_ext=ext, cls=item.cls,
                                    caption=item.caption, meta={"source": item.name}))
        shards = {split: w.close() for split, w in writers.items()}
        if not shards["train"]:
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
    except BaseException:
        for w in writers.values():
            w.abort()
        try:
            _clear(out)  # an uncommitted folder is worthless; leave nothing that looks like a dataset
        except Exception as err:  # noqa: BLE001 - the original failure is the one to report
            log.warning("could not remove the partial output in %s: %s", out, err)
        raise
    report = _report(out, manifest, False, time.monotonic() - started)
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
    """The committed manifest to reuse, or None after making OUT ready for a fresh write."""
    if storage.is_committed(out):
        try:
            manifest = read_manifest(out)
        except ManifestError as err:
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


def _clear(out: str) -> None:
    """Deletes what a prepare writes in OUT (commit marker first); refuses a folder holding anything else."""
    present = storage.list_files(out)
    foreign = sorted(rel for rel in present if not _OWN_FILE.match(rel))
    if foreign:
        raise PrepareError(f"{out} is not empty and is not a shard folder (it holds {', '.join(foreign[:3])}"
                           f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new OUT")
    if "COMMIT" in present:
        storage.remove(storage.join(out, "COMMIT"), recursive=False)
    for rel in sorted(present):
        if rel != "COMMIT":
            storage.remove(storage.join(out, rel), recursive=False)


def _report(out: str, manifest: Manifest, reused: bool, elapsed: float) -> PrepareReport:
    return PrepareReport(
        url=out, reused=reused, counts={k: manifest.count(k) for k in manifest.splits},
        shards={k: [s.name for s in v] for k, v in manifest.splits.items()}, class_names=manifest.class_names,
        resolution=manifest.resolution, channels=manifest.channels, inputs=manifest.inputs,
        skipped_count=manifest.skipped_count, skipped=manifest.skipped, notes=manifest.notes, elapsed_s=elapsed)


# --------------------------------------------------------------------------------------------- the workers
def _encoded(items: list[SourceItem], encoding: _Encoding, workers: int) -> Iterator[tuple[bytes, str] | Skipped]:
    """encode_item over `items`, in order, in `workers` processes (in this process when workers == 1)."""
    tasks = ((item, encoding) for item in items)
    if workers == 1 or len(items) < 64:
        yield from (_encode_task(t) for t in tasks)
        return
    # spawn, not fork: the parent may hold S3 client threads and locks that a forked child would inherit.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode_task, tasks, chunksize=16)


def _encode_task(task: tuple[SourceItem, _Encoding]) -> tuple[bytes, str] | Skipped:
    item, enc = task
    try:
        return encode_item(item, enc.resolution, enc.channels, enc.image_format, enc.jpeg_quality)
    except UnreadableImage as err:
        return Skipped(item.name, str(err))
    except (OSError, ValueError) as err:  # e.g. an image mode PIL cannot convert
        return Skipped(item.name, f"cannot convert the image ({err})")


def stored_image(item: SourceItem, resolution: int, channels: int) -> Image.Image:
    """The image as prepare stores it (before encoding): decode, channels, centre square, resize."""
    img = load_image(item.path) if item.pixels is None else Image.fromarray(item.pixels)
    return fit_square(to_channels(img, channels), resolution)


def encode_item(item: SourceItem, resolution: int, channels: int, image_format: str,
                jpeg_quality: int) -> tuple[bytes, str]:
    """Stored bytes and extension of one input; raises UnreadableImage for corrupt or non-image inputs."""
    return encode_image(stored_image(item, resolution, channels), image_format, jpeg_quality)

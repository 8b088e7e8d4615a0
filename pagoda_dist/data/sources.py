"""Inputs of `pagoda prepare`: turn SRC into a list of items (a file to load, or ready pixels) with labels.

Layouts (`kind`, or detected by `auto`):
- folder:   images anywhere below SRC, unlabelled.
- classes:  one subfolder per class (ImageNet layout); class ids follow the sorted folder names.
- captions: images with a same-stem `.txt` caption beside them, or a JSONL manifest of
            {"image": path relative to the JSONL file, "caption": text} (SRC is the .jsonl file).
- builtin:NAME: a dataset built from installed packages (see `builtin.py`).

Enumeration only lists and stats files; decoding happens later in the prepare workers, where corrupt or
non-image files are caught, counted and reported. Problems visible here (a missing caption, a bad JSONL line)
are reported the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Files that describe a dataset rather than being part of it: never treated as (non-)image inputs.
SIDECAR_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md"}
KINDS = ("auto", "folder", "classes", "captions")


class SourceError(ValueError):
    """SRC cannot be used: missing, empty, or not the layout asked for."""


@dataclass
class Skipped:
    """An input left out of the shards, and why."""

    source: str
    reason: str


@dataclass
class SourceItem:
    """One future sample: where its pixels come from and what it is labelled with."""

    name: str                          # shown in reports, stored as the sample's json "source"
    path: str | None = None            # an image file to decode ...
    pixels: np.ndarray | None = None   # ... or ready uint8 pixels (H, W) / (H, W, C) from a builtin builder
    cls: int | None = None
    caption: str | None = None
    group: str = ""                    # items of a group land in the same split (e.g. tiles of one photo)
    split: str | None = None           # "train" / "val" fixed by the source, else decided by prepare


@dataclass
class Source:
    """An enumerated input: items plus what describes the dataset as a whole."""

    kind: str
    items: list[SourceItem]
    class_names: list[str] | None = None
    skipped: list[Skipped] = field(default_factory=list)
    digest: str = ""                   # changes when the inputs change (names and sizes): part of the settings
    notes: list[str] = field(default_factory=list)


def open_source(src: str, kind: str = "auto") -> Source:
    """Enumerates a local SRC (plain path or file:// URL) of the given layout; raises SourceError when unusable."""
    if kind not in KINDS:
        raise SourceError(f"source kind {kind!r} is not one of {KINDS}")
    if "://" in src and not src.startswith("file://"):
        raise SourceError(f"SRC {src!r}: prepare reads a local folder or JSONL file; copy remote data locally first")
    root = Path(src[len("file://"):] if src.startswith("file://") else src).expanduser()
    if not root.exists():
        raise SourceError(f"SRC {root} does not exist; pass an image folder, a class-per-subfolder tree, "
                          "a captioned folder, a .jsonl manifest, or builtin:photo-tiles / builtin:fashion-mnist")
    if root.is_file():
        if root.suffix.lower() != ".jsonl":
            raise SourceError(f"SRC {root} is a file; only a .jsonl caption manifest can be given as a file")
        if kind not in ("auto", "captions"):
            raise SourceError(f"SRC {root} is a JSONL manifest, which is a captions source, not {kind!r}")
        return _jsonl(root)
    files = _walk(root)
    if not files:
        raise SourceError(f"SRC {root} holds no files (hidden files and .txt/.json/.csv/.md sidecars aside)")
    if kind == "auto":
        kind = _detect(root, files)
    if kind == "captions":
        return _captions(root, files)
    if kind == "classes":
        return _classes(root, files)
    return _folder(root, files)


def _walk(root: Path) -> list[Path]:
    """Candidate input files below root, sorted; hidden entries and sidecars are left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() not in SIDECAR_SUFFIXES and path.is_file():
                out.append(path)
    return sorted(out)


def _detect(root: Path, files: list[Path]) -> str:
    if any(f.with_suffix(".txt").is_file() for f in files):
        return "captions"
    top_level = [f for f in files if f.parent == root]
    return "classes" if not top_level and any(p.is_dir() for p in root.iterdir()) else "folder"


def _item(root: Path, path: Path, **labels: object) -> SourceItem:
    rel = path.relative_to(root).as_posix()
    return SourceItem(name=rel, path=str(path), group=rel, **labels)  # type: ignore[arg-type]


def digest_of(entries: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for name, size in entries:
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _stat_digest(root: Path, paths: list[Path]) -> str:
    return digest_of([(p.relative_to(root).as_posix(), p.stat().st_size) for p in paths])


def _folder(root: Path, files: list[Path]) -> Source:
    return Source("folder", [_item(root, f) for f in files], digest=_stat_digest(root, files))


def _classes(root: Path, files: list[Path]) -> Source:
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SourceError(f"SRC {root}: a class layout needs one subfolder per class; found none")
    index = {name: i for i, name in enumerate(class_dirs)}
    items, skipped = [], []
    for f in files:
        parts = f.relative_to(root).parts
        if len(parts) < 2:
            skipped.append(Skipped(parts[0], "file at the top level of a class layout (belongs to no class)"))
            continue
        items.append(_item(root, f, cls=index[parts[0]]))
    if not items:
        raise SourceError(f"SRC {root}: the class subfolders {class_dirs[:5]} hold no files")
    empty = sorted(set(class_dirs) - {Path(i.name).parts[0] for i in items})
    notes = [f"class folders without files: {', '.join(empty)}"] if empty else []
    return Source("classes", items, class_names=class_dirs, skipped=skipped,
                  digest=_stat_digest(root, files), notes=notes)


def _captions(root: Path, files: list[Path]) -> Source:
    items, skipped = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        caption_file = f.with_suffix(".txt")
        if not caption_file.is_file():
            skipped.append(Skipped(rel, f"no caption file {caption_file.name} beside it"))
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            skipped.append(Skipped(rel, f"caption file {caption_file.name} is empty"))
            continue
        items.append(_item(root, f, caption=caption))
    captions = [f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()]
    return Source("captions", items, skipped=skipped, digest=_stat_digest(root, files + captions))


def _jsonl(manifest: Path) -> Source:
    base = manifest.parent
    items, skipped, entries = [], [], []
    text = manifest.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{lineno}"
        try:
            record = json.loads(line)
            image, caption = record["image"], record["caption"]
            if not isinstance(image, str) or not isinstance(caption, str):
                raise TypeError("'image' and 'caption' must be strings")
        except (ValueError, KeyError, TypeError) as err:
            skipped.append(Skipped(where, f"not a JSON object with string 'image' and 'caption' ({err})"))
            continue
        path = (base / image) if not os.path.isabs(image) else Path(image)
        if not path.is_file():
            skipped.append(Skipped(f"{where} {image}", "image file does not exist"))
            continue
        if not caption.strip():
            skipped.append(Skipped(f"{where} {image}", "empty caption"))
            continue
        name = f"{image}#{lineno}"
        items.append(SourceItem(name=name, path=str(path), caption=caption.strip(), group=str(path.resolve())))
        entries.append((name + caption, path.stat().st_size))
    if not items and not skipped:
        raise SourceError(f"SRC {manifest}: the JSONL manifest lists no samples")
    return Source("captions", items, skipped=skipped, digest=digest_of(entries))

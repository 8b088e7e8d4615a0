"""Inputs of `pagoda prepare`: turn SRC into a list of items (a file to load, or ready pixels) with labels.

SRC is a local path, a file:// URL, or an object-store URL the storage layer opens (`s3://bucket/prefix`). A
folder is listed ONCE (os.walk locally, one recursive listing on S3, never a request per folder), and the same
rules apply to both, so a folder and its copy on S3 give the same items, in the same order, with the same digest.

Layouts (`kind`, or detected by `auto`):
- folder:   images anywhere below SRC, unlabelled.
- classes:  one subfolder per class (ImageNet layout); class ids follow the sorted folder names.
- captions: images with a same-stem `.txt` caption beside them, or a JSONL manifest of
            {"image": path relative to the JSONL file (or a full URL), "caption": text} (SRC is the .jsonl file).
- builtin:NAME: a dataset built from installed packages (see `builtin.py`).
- webdataset: existing WebDataset .tar shards (img2dataset's KEY.jpg + KEY.txt + KEY.json), a folder/prefix of
            them or a brace pattern (`s3://b/laion/{00000..00127}.tar`); one item per shard. They are indexed in
            place by `wds_source`, never re-sharded (never detected by `auto`: name the kind).

Enumeration only lists files (and reads caption files); decoding happens later in the prepare workers, where
corrupt or non-image files are caught, counted and reported. Problems visible here (a missing caption, a bad
JSONL line) are reported the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pagoda_dist import storage

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Files that describe a dataset rather than being part of it: never treated as (non-)image inputs.
SIDECAR_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md"}
KINDS = ("auto", "folder", "classes", "captions", "webdataset")
SOURCE_HINT = ("pass an image folder, a class-per-subfolder tree, a captioned folder or a .jsonl manifest (a local "
               "path or an s3:// URL), or builtin:photo-tiles / builtin:fashion-mnist")
READ_THREADS = 32  # concurrent caption reads from an object store (each is one small GET)


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
    """Enumerates SRC (local path, file:// or object-store URL) of the given layout; raises SourceError when it is
    unusable (storage failures such as a missing bucket or refused credentials raise their StorageError)."""
    if kind not in KINDS:
        raise SourceError(f"source kind {kind!r} is not one of {KINDS}")
    if kind == "webdataset":
        return _webdataset(src)
    if storage.is_remote(src):
        return _open_remote(src, kind)
    root = Path(src[len("file://"):] if src.startswith("file://") else src).expanduser()
    if not root.exists():
        raise SourceError(f"SRC {root} does not exist; {SOURCE_HINT}")
    if root.is_file():
        if root.suffix.lower() != ".jsonl":
            raise SourceError(f"SRC {root} is a file; only a .jsonl caption manifest can be given as a file")
        _check_jsonl_kind(str(root), kind)
        return _jsonl(str(root), root.name, root.read_bytes(), _local_locator(root.parent))
    return _layout(_local_tree(root), kind)


def _open_remote(src: str, kind: str) -> Source:
    if src.rstrip("/").lower().endswith(".jsonl"):
        _check_jsonl_kind(src, kind)
        try:
            raw = storage.read_bytes(src)
        except storage.ObjectNotFound:
            raise SourceError(f"SRC {src} does not exist; {SOURCE_HINT}") from None
        base, name = src.rstrip("/").rsplit("/", 1)
        return _jsonl(src, name, raw, _remote_locator(base))
    listing = storage.list_files(src)  # one recursive listing of the whole prefix
    if not listing:
        if storage.exists(src):
            raise SourceError(f"SRC {src} is an object, not a prefix; only a .jsonl caption manifest can be given "
                              "as a single object")
        raise SourceError(f"SRC {src} does not exist or holds no objects; check the URL, or {SOURCE_HINT}")
    return _layout(_remote_tree(src, listing), kind)


def _check_jsonl_kind(where: str, kind: str) -> None:
    if kind not in ("auto", "captions"):
        raise SourceError(f"SRC {where} is a JSONL manifest, which is a captions source, not {kind!r}")


# ------------------------------------------------------------------------------------------ the listing
@dataclass(frozen=True)
class _Tree:
    """A listed source folder, local or remote: what the layouts below need, and nothing storage-specific."""

    base: str                 # SRC: a relative path joined to it is the item's path (local folder or URL)
    files: dict[str, int]     # candidate inputs {relative path: size}, in input order
    sidecars: dict[str, int]  # .txt/.json/... files (captions), {relative path: size}
    folders: list[str]        # top-level subfolders (class names), sorted

    def path(self, rel: str) -> str:
        return storage.join(self.base, rel) if storage.is_remote(self.base) else str(Path(self.base) / rel)


def _input_order(rel: str) -> tuple[str, ...]:
    # By path components, as pathlib sorts: "a/b" before "a-b/c" (a plain string sort would swap them).
    return tuple(rel.split("/"))


def _is_sidecar(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in SIDECAR_SUFFIXES


def _local_tree(root: Path) -> _Tree:
    """Non-hidden files below root (os.walk, symlinked folders not followed), split into inputs and sidecars."""
    files: dict[str, int] = {}
    sidecars: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            (sidecars if _is_sidecar(rel) else files)[rel] = path.stat().st_size
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return _Tree(str(root), dict(sorted(files.items(), key=lambda kv: _input_order(kv[0]))), sidecars,
                 folders)


def _remote_tree(src: str, listing: dict[str, int]) -> _Tree:
    """The same split of one recursive object listing; a key ending in '/' is a folder marker, not a file."""
    files: dict[str, int] = {}
    sidecars: dict[str, int] = {}
    folders: set[str] = set()
    for rel, size in listing.items():
        parts = rel.rstrip("/").split("/")
        if not parts[0] or any(p.startswith(".") for p in parts):
            continue
        if len(parts) > 1 or rel.endswith("/"):
            folders.add(parts[0])
        if not rel.endswith("/"):
            (sidecars if _is_sidecar(rel) else files)[rel] = size
    return _Tree(src, dict(sorted(files.items(), key=lambda kv: _input_order(kv[0]))), sidecars,
                 sorted(folders))


def _layout(tree: _Tree, kind: str) -> Source:
    if not tree.files:
        raise SourceError(f"SRC {tree.base} holds no files (hidden files and .txt/.json/.csv/.md sidecars aside)")
    if kind == "auto":
        kind = _detect(tree)
    if kind == "captions":
        return _captions(tree)
    if kind == "classes":
        return _classes(tree)
    return _folder(tree)


def _caption_of(rel: str) -> str:
    return PurePosixPath(rel).with_suffix(".txt").as_posix()


def _detect(tree: _Tree) -> str:
    if any(_caption_of(rel) in tree.sidecars for rel in tree.files):
        return "captions"
    return "folder" if any("/" not in rel for rel in tree.files) else "classes"


def _item(tree: _Tree, rel: str, **labels: object) -> SourceItem:
    return SourceItem(name=rel, path=tree.path(rel), group=rel, **labels)  # type: ignore[arg-type]


def digest_of(entries: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for name, size in entries:
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _folder(tree: _Tree) -> Source:
    return Source("folder", [_item(tree, rel) for rel in tree.files], digest=digest_of(list(tree.files.items())))


def _classes(tree: _Tree) -> Source:
    if not tree.folders:
        raise SourceError(f"SRC {tree.base}: a class layout needs one subfolder per class; found none")
    index = {name: i for i, name in enumerate(tree.folders)}
    items, skipped = [], []
    for rel in tree.files:
        folder, sep, _ = rel.partition("/")
        if not sep:
            skipped.append(Skipped(rel, "file at the top level of a class layout (belongs to no class)"))
            continue
        items.append(_item(tree, rel, cls=index[folder]))
    if not items:
        raise SourceError(f"SRC {tree.base}: the class subfolders {tree.folders[:5]} hold no files")
    empty = sorted(set(tree.folders) - {i.name.partition("/")[0] for i in items})
    notes = [f"class folders without files: {', '.join(empty)}"] if empty else []
    return Source("classes", items, class_names=list(tree.folders), skipped=skipped,
                  digest=digest_of(list(tree.files.items())), notes=notes)


def _captions(tree: _Tree) -> Source:
    captioned = [rel for rel in tree.files if _caption_of(rel) in tree.sidecars]
    texts = dict(zip(captioned, _read_captions([tree.path(_caption_of(rel)) for rel in captioned])))
    items, skipped = [], []
    for rel in tree.files:
        name = PurePosixPath(_caption_of(rel)).name
        if rel not in texts:
            skipped.append(Skipped(rel, f"no caption file {name} beside it"))
        elif not texts[rel]:
            skipped.append(Skipped(rel, f"caption file {name} is empty"))
        else:
            items.append(_item(tree, rel, caption=texts[rel]))
    entries = list(tree.files.items()) + [(_caption_of(rel), tree.sidecars[_caption_of(rel)]) for rel in captioned]
    return Source("captions", items, skipped=skipped, digest=digest_of(entries))


def _caption_text(raw: bytes) -> str:
    """A caption file's text as Python's text mode reads it (UTF-8, bad bytes replaced, universal newlines)."""
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").strip()


def _read_captions(paths: list[str]) -> list[str]:
    """Caption texts of `paths` in order; many small reads from an object store go out concurrently."""
    if not any(storage.is_remote(p) for p in paths):
        return [_caption_text(Path(p).read_bytes()) for p in paths]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return [_caption_text(raw) for raw in pool.map(storage.read_bytes, paths)]


# --------------------------------------------------------------------------------------- JSONL manifests
# image as written in the manifest -> (path to load, group, size), or None when there is no such file
Locator = Callable[[str], "tuple[str, str, int] | None"]


def _local_locator(base: Path) -> Locator:
    def locate(image: str) -> tuple[str, str, int] | None:
        path = (base / image) if not os.path.isabs(image) else Path(image)
        return (str(path), str(path.resolve()), path.stat().st_size) if path.is_file() else None
    return locate


def _remote_locator(base: str) -> Locator:
    """Images relative to the manifest's prefix (one recursive listing answers for all of them), or full URLs
    (one request each)."""
    listing: dict[str, int] | None = None

    def locate(image: str) -> tuple[str, str, int] | None:
        nonlocal listing
        if storage.is_remote(image):
            try:
                return image, image, storage.size(image)
            except storage.ObjectNotFound:
                return None
        rel = posixpath.normpath(image.lstrip("/"))
        if rel.startswith("../"):
            return None
        if listing is None:
            listing = storage.list_files(base)
        url = storage.join(base, rel)
        return (url, url, listing[rel]) if rel in listing else None
    return locate


def _jsonl(where: str, name: str, raw: bytes, locate: Locator) -> Source:
    """The samples of manifest `where` (lines are reported as `name:LINE`)."""
    items, skipped, entries = [], [], []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{name}:{lineno}"
        try:
            record = json.loads(line)
            image, caption = record["image"], record["caption"]
            if not isinstance(image, str) or not isinstance(caption, str):
                raise TypeError("'image' and 'caption' must be strings")
        except (ValueError, KeyError, TypeError) as err:
            skipped.append(Skipped(at, f"not a JSON object with string 'image' and 'caption' ({err})"))
            continue
        found = locate(image)
        if found is None:
            skipped.append(Skipped(f"{at} {image}", "image file does not exist"))
            continue
        if not caption.strip():
            skipped.append(Skipped(f"{at} {image}", "empty caption"))
            continue
        path, group, size = found
        item = SourceItem(name=f"{image}#{lineno}", path=path, caption=caption.strip(), group=group)
        items.append(item)
        entries.append((item.name + caption, size))
    if not items and not skipped:
        raise SourceError(f"SRC {where}: the JSONL manifest lists no samples")
    return Source("captions", items, skipped=skipped, digest=digest_of(entries))


# --------------------------------------------------------------------------------- existing WebDataset shards
def expand_braces(pattern: str) -> list[str]:
    """The shard names of a webdataset/img2dataset brace pattern: `{000..002}` is a zero-padded range, `{a,b}` a
    list; several braces multiply out, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = bounds.groups()
        choices = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def _webdataset(src: str) -> Source:
    """One item per .tar shard (name relative to the shards' folder, path its URL), in input order."""
    hint = "pass a folder or s3:// prefix of .tar shards, or a brace pattern like s3://bucket/d/{00000..00099}.tar"
    if "{" in src:
        base = src[: src.index("{")].rsplit("/", 1)[0]
        names = [url[len(base) + 1:] for url in expand_braces(src)]
    else:
        base, names = src.rstrip("/"), None
    if storage.is_remote(base):
        listing = storage.list_files(base)
    else:
        root = Path(base.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise SourceError(f"SRC {src}: {root} is not a folder; {hint}")
        listing = _local_tree(root).files  # .tar is never a sidecar
    if names is None:
        names = sorted((rel for rel in listing if rel.endswith(".tar") and not _is_sidecar(rel)), key=_input_order)
        if not names:
            raise SourceError(f"SRC {src} holds no .tar shards; {hint}")
    missing = [name for name in names if name not in listing]
    if missing:
        raise SourceError(f"SRC {src}: {len(missing)} shard(s) of the pattern do not exist, e.g. "
                          f"{storage.join(base, missing[0])}; fix the pattern's range")
    tree = _Tree(base, {}, {}, [])  # for its path rule: names joined to the shards' folder, local or remote
    items = [SourceItem(name=name, path=tree.path(name), group=name) for name in names]
    return Source("webdataset", items, digest=digest_of([(name, listing[name]) for name in names]))

"""Open, read, write, list and copy any storage URL, with retries and clear errors.

Every function takes URLs (`s3://bucket/key`, `file:///path`, plain paths) and raises only `StorageError`
subclasses. Whole-object operations are retried on transient failures; a file object from `open_url` gets s3fs's
own retries for mid-stream read hiccups only, so a long streaming reader should reopen on `StorageError`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from . import settings
from .errors import ObjectNotFound, is_missing_bucket
from .retry import call_with_retry
from .urls import filesystem, is_remote, join, to_url

T = TypeVar("T")


def _run(url: str, action: str, fn: Callable[[], T]) -> T:
    endpoint = settings.describe_endpoint() if is_remote(url) else ""
    return call_with_retry(fn, url=url, endpoint=endpoint, action=action, policy=settings.current().retry)


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> IO:
    """A file object for `url`; opening is retried, later reads/writes are the caller's to handle.

    Local writes create missing parent folders. S3 writes become visible only on close (one atomic PUT or a
    completed multipart upload).
    """
    fs, path = filesystem(url)
    return _run(url, "open", lambda: fs.open(path, mode, **kwargs))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes, or those in [start, end) (Python slice rules; negative `start` counts from the end)."""
    fs, path = filesystem(url)
    return _run(url, "read", lambda: fs.cat_file(path, start=start, end=end))


def _write_local_atomic(path: str, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (one S3 PUT; temp file + rename locally)."""
    fs, path = filesystem(url)
    if is_remote(url):
        _run(url, "write", lambda: fs.pipe_file(path, bytes(data)))
    else:
        _run(url, "write", lambda: _write_local_atomic(path, bytes(data)))


def info(url: str) -> dict[str, Any]:
    """fsspec's info dict for `url` (`size`, `type` = file/directory, ...)."""
    fs, path = filesystem(url)
    return _run(url, "stat", lambda: fs.info(path))


def size(url: str) -> int:
    """The object's size in bytes."""
    return int(info(url)["size"])


def exists(url: str) -> bool:
    """Whether an object (or a folder/prefix) exists at `url`. A missing bucket is an error, not False."""
    try:
        info(url)
        return True
    except ObjectNotFound:
        return False


def _listing(url: str, action: str, fn: Callable[[], T], empty: T) -> T:
    """Run a listing; a missing folder/prefix lists as empty (S3 has no folders, so locally it matches)."""
    try:
        return _run(url, action, fn)
    except ObjectNotFound:
        return empty


def list_dir(url: str) -> list[str]:
    """URLs of the direct children of folder/prefix `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url)
    names = _listing(url, "list", lambda: fs.ls(path.rstrip("/") or path, detail=False), [])
    base = path.rstrip("/")
    return sorted(to_url(url, name.rstrip("/")) for name in names if name.rstrip("/") != base)


def list_files(url: str) -> dict[str, int]:
    """All files below `url` (recursively) as {relative path: size}; {} when it does not exist."""
    fs, path = filesystem(url)
    found = _listing(url, "list", lambda: fs.find(path, detail=True), {})
    root = path.rstrip("/")
    return {name[len(root):].lstrip("/"): int(entry.get("size") or 0)
            for name, entry in found.items() if entry.get("type", "file") == "file" and name != root}


def glob(pattern: str) -> list[str]:
    """URLs matching `pattern` (`*`, `?`, `[...]`, `**`), sorted."""
    fs, path = filesystem(pattern)
    return sorted(to_url(pattern, p) for p in _listing(pattern, "glob", lambda: fs.glob(path), []))


def remove(url: str, recursive: bool = True) -> None:
    """Delete `url` (with everything below it when `recursive`); deleting nothing is not an error."""
    fs, path = filesystem(url)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise  # a missing bucket is a configuration error worth reporting
    _run(url, "delete", rm)


def copy_file(src_url: str, dst_url: str) -> None:
    """Copy one object/file between any two URLs (through this process when the file systems differ)."""
    sfs, spath = filesystem(src_url)
    dfs, dpath = filesystem(dst_url)
    if sfs is dfs:
        _run(dst_url, "copy", lambda: sfs.copy(spath, dpath))
    elif not is_remote(src_url):
        _run(dst_url, "upload", lambda: dfs.put_file(spath, dpath))
    elif not is_remote(dst_url):
        _run(src_url, "download", lambda: sfs.get_file(spath, dpath))
    else:
        write_bytes(dst_url, read_bytes(src_url))


def upload_dir(local_dir: str | os.PathLike, url: str) -> dict[str, int]:
    """Copy every file under `local_dir` to the same relative path under `url`; returns {relative path: size}."""
    root = Path(local_dir)
    if not root.is_dir():
        raise ObjectNotFound(f"upload {root}: not a local folder; pass the folder that holds the files.",
                             url=str(root))
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    if not files:
        return {}
    fs, _ = filesystem(url)
    targets = [filesystem(join(url, rel))[1] for rel in files]
    sources = [str(p) for p in files.values()]
    # One batched call: s3fs uploads the files concurrently; a retry re-sends the batch (puts are idempotent).
    _run(url, "upload", lambda: fs.put(sources, targets))
    return {rel: p.stat().st_size for rel, p in files.items()}


def download_dir(url: str, local_dir: str | os.PathLike) -> dict[str, int]:
    """Copy every object under `url` into `local_dir` (same relative paths); returns {relative path: size}."""
    files = list_files(url)
    if not files:
        raise ObjectNotFound(f"download {url}: nothing found under this prefix.", url=url)
    fs, _ = filesystem(url)
    dest = Path(local_dir)
    sources = [filesystem(join(url, rel))[1] for rel in files]
    targets = [str(dest / rel) for rel in files]
    for t in targets:
        Path(t).parent.mkdir(parents=True, exist_ok=True)
    _run(url, "download", lambda: fs.get(sources, targets))
    return files


__all__ = [
    "copy_file", "download_dir", "exists", "glob", "info", "list_dir", "list_files", "open_url",
    "read_bytes", "remove", "size", "upload_dir", "write_bytes",
]

"""Network weights and reference statistics from any storage URL, as local files.

The networks load from local files (EfficientNet-Lite0 with torch.load(weights_only=True); torch-fidelity and
open_clip take a path), so a URL is resolved to a file first: a local path (or file:// URL) is used where it lies; an
object-store URL (s3://...) is copied once into a cache folder, where a later run, or another worker on the same
machine, finds it again while its size still matches the object's.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pagoda_dist import storage


def local_file(url: str, cache_dir: str | Path, key: str) -> Path:
    """A local file holding `url`'s bytes; FileNotFoundError naming config key `key` when there is none."""
    if not storage.is_remote(url):
        path = Path(url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} does not exist; give a local file or an s3:// URL "
                                    "(files are never downloaded from the internet)")
        return path
    try:
        size = storage.size(url)
    except storage.ObjectNotFound:
        raise FileNotFoundError(f"{key}: {url} does not exist; upload the file there or fix the URL") from None
    # One folder per URL keeps two files of the same name apart; the name itself stays (the FID Inception file's
    # name carries the start of its hash, which messages quote).
    dest = Path(cache_dir).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # concurrent workers never see half a file
    try:
        storage.copy_file(url, str(partial))
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest

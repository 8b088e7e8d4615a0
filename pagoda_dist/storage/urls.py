"""URLs to fsspec file systems: `s3://bucket/key`, `file:///abs/path`, plain paths (and other fsspec protocols).

One S3FileSystem per process and settings, keyed on the PID so a forked child or a Ray worker never reuses its
parent's event loop and connection pool.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import settings

# Environment that changes which credentials/endpoint botocore picks; part of the client cache key (hashed).
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")

_cache_lock = threading.Lock()
_s3_cache: dict[tuple[int, settings.S3Settings, str], fsspec.AbstractFileSystem] = {}
_local = LocalFileSystem(auto_mkdir=True)


def _clear_cache() -> None:
    with _cache_lock:
        _s3_cache.clear()


settings.on_change(_clear_cache)


def scheme(url: str) -> str:
    """`s3`, `file` (also for plain paths) or another fsspec protocol name."""
    if "://" not in url:
        return "file"
    proto = url.split("://", 1)[0].lower()
    return "s3" if proto in ("s3", "s3a") else proto


def is_remote(url: str) -> bool:
    """True for object-store URLs (anything but local files)."""
    return scheme(url) != "file"


def _env_fingerprint() -> str:
    # Hashed so the cache key never holds a secret in clear; the env itself does, but nothing here copies it.
    joined = "\0".join(f"{k}={os.environ.get(k, '')}" for k in _CLIENT_ENV)
    return hashlib.sha256(joined.encode()).hexdigest()


def botocore_retries() -> dict[str, str]:
    """botocore's per-request retry settings: the retry mode configured for botocore (AWS_RETRY_MODE or the
    profile's retry_mode), else "standard" instead of botocore's legacy default. The number of attempts is left
    out, so botocore takes AWS_MAX_ATTEMPTS / the profile's max_attempts when set (else its mode's default)."""
    import botocore.session

    mode = os.environ.get("AWS_RETRY_MODE", "").strip()
    if not mode:
        try:  # botocore's own lookup would fall back to its "legacy" default, hiding whether anyone set it
            mode = str(botocore.session.Session().get_scoped_config().get("retry_mode") or "").strip()
        except Exception:  # noqa: BLE001 - unreadable AWS config file or missing profile: botocore reports it on use
            mode = ""
    return {"mode": mode or "standard"}


def _make_s3(conf: settings.S3Settings) -> fsspec.AbstractFileSystem:
    import s3fs  # deferred: importing aiobotocore costs ~0.3 s that local-only users need not pay

    endpoint = settings.effective_endpoint()
    config: dict = {
        # botocore retries each request in its standard mode (a few quick attempts), or as AWS_RETRY_MODE /
        # AWS_MAX_ATTEMPTS / the AWS config file say; retry.py retries whole operations within the time budget.
        "retries": botocore_retries(),
        "connect_timeout": conf.connect_timeout_s,
        "read_timeout": conf.read_timeout_s,
    }
    if endpoint:
        # Custom endpoints (SeaweedFS, MinIO, a k8s service name) rarely serve virtual-host bucket names.
        config["s3"] = {"addressing_style": "path"}
    client_kwargs = {"region_name": conf.region} if conf.region else {}
    fs = s3fs.S3FileSystem(
        endpoint_url=conf.endpoint_url,  # None lets botocore read AWS_ENDPOINT_URL[_S3] / the profile
        client_kwargs=client_kwargs,
        config_kwargs=config,
        skip_instance_cache=True,  # we cache ourselves, keyed on the PID
        use_listings_cache=False,  # commit markers must be seen as soon as they are written
    )
    fs.retries = 2  # s3fs's own retries then cover only mid-stream read hiccups of files from open_url
    return fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system for `url` and the path within it (`bucket/key` for S3, an absolute path locally)."""
    kind = scheme(url)
    if kind == "file":
        raw = url[len("file://"):] if url.startswith("file://") else url
        return _local, str(Path(raw).expanduser().absolute())
    if kind == "s3":
        path = url.split("://", 1)[1].lstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"S3 URL {url!r} has no bucket; expected s3://bucket/key")
        conf = settings.current()
        key = (os.getpid(), conf, _env_fingerprint())
        with _cache_lock:
            fs = _s3_cache.get(key)
            if fs is None:
                fs = _s3_cache[key] = _make_s3(conf)
        return fs, path
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url` with `parts` appended, '/'-separated whatever the scheme (`join("s3://b/x/", "a", "f")`)."""
    out = url
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = part if not out else f"{out.rstrip('/')}/{part}"
    return out


def relative(url: str, base: str) -> str:
    """`url`'s path below `base`, '/'-separated (`relative("s3://b/x/a/f", "s3://b/x")` == "a/f")."""
    _, path = filesystem(url)
    _, root = filesystem(base)
    root = root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        raise ValueError(f"{url} is not below {base}")
    return path[len(root):].lstrip("/")


def to_url(template: str, path: str) -> str:
    """Turn a file-system `path` back into a URL of the same form as `template` (scheme kept or omitted)."""
    kind = scheme(template)
    if kind == "file":
        return f"file://{path}" if template.startswith("file://") else path
    proto = template.split("://", 1)[0]
    return f"{proto}://{path.lstrip('/')}"

"""Process-wide S3 settings: the one place storage learns its endpoint, region and retry policy (budget).

Credentials are never held here: botocore resolves them from its standard sources (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials). The endpoint and region come
from `configure()` (the CLI calls it from the config's storage section) or, when not set there, from botocore's
standard sources too (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, ~/.aws/config).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .retry import BUDGET_KEY, DEFAULT_BUDGET_S, RetryPolicy

# Carries the retry budget to child processes (Ray workers) that call `configure()` without one.
BUDGET_ENV = "PAGODA_S3_RETRY_BUDGET_S"


@dataclass(frozen=True)
class S3Settings:
    """Overrides applied to every S3 client this process makes."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333; None: botocore's own resolution
    region: str | None = None        # e.g. us-east-1; None: botocore's own resolution
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout_s: float = 5.0   # per attempt
    read_timeout_s: float = 60.0     # per attempt; large parts on a busy server take a while

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"storage.endpoint_url must look like http://host:port or https://host, "
                                 f"got {self.endpoint_url!r}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("storage timeouts must be > 0 seconds")


def _budget_from_env() -> float:
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} (the forwarded {BUDGET_KEY}) is not a number of seconds") from None


def _unconfigured() -> S3Settings:
    """Settings of a process that has not called `configure()`: botocore's defaults, and the retry budget the
    environment forwards (a Ray actor may apply its environment after importing this module)."""
    try:
        return S3Settings(retry=RetryPolicy(budget_s=_budget_from_env()))
    except ValueError:  # reported by the first configure() instead of failing every call
        return S3Settings()


_lock = threading.Lock()
_settings: S3Settings | None = None  # None until `configure()`
_listeners: list[Callable[[], None]] = []


def configure(endpoint_url: str | None = None, region: str | None = None, *, retry: RetryPolicy | None = None,
              retry_budget_s: float | None = None, connect_timeout_s: float = 5.0,
              read_timeout_s: float = 60.0) -> S3Settings:
    """Set this process's S3 overrides (call with no arguments to return to botocore's defaults).

    `retry_budget_s` (the config's storage.retry_budget_s) is how long a transiently failing operation is retried;
    None takes it from the environment (PAGODA_S3_RETRY_BUDGET_S, which `env_for_workers` forwards), else the
    default. `retry` replaces the whole policy (its own budget included) and wins over `retry_budget_s`.
    """
    global _settings
    if retry is None:
        retry = RetryPolicy(budget_s=_budget_from_env() if retry_budget_s is None else float(retry_budget_s))
    new = S3Settings(endpoint_url=endpoint_url or None, region=region or None, retry=retry,
                     connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
    with _lock:
        _settings = new
        listeners = list(_listeners)
    for notify in listeners:  # e.g. drop cached clients built with the old settings
        notify()
    return new


def current() -> S3Settings:
    """The settings in force now."""
    return _settings if _settings is not None else _unconfigured()


def on_change(callback: Callable[[], None]) -> None:
    """Run `callback` after every `configure()`."""
    with _lock:
        _listeners.append(callback)


def effective_endpoint() -> str | None:
    """The custom endpoint in force (config first, then botocore's env variables), or None for AWS itself."""
    return (current().endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def describe_endpoint() -> str:
    """The endpoint as error messages name it."""
    endpoint = effective_endpoint()
    if endpoint:
        return endpoint
    region = current().region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return f"the AWS S3 endpoint{f' for region {region}' if region else ''}"


# Names of settings that are safe to pass to other processes: locations and names, never key material.
_FORWARDABLE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


def env_for_workers() -> dict[str, str]:
    """Non-secret S3 settings for Ray workers and other child processes (endpoint, region, profile, file paths,
    botocore's retry mode and attempts, and the retry budget in force here).

    Credentials themselves are left to each machine's standard sources (or the shared credentials file whose
    path is forwarded), so no secret travels through a job spec or a log.
    """
    conf = current()
    env = {name: os.environ[name] for name in _FORWARDABLE_ENV if os.environ.get(name)}
    if conf.endpoint_url:
        env["AWS_ENDPOINT_URL"] = conf.endpoint_url
        env.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over the configured endpoint in the worker
    if conf.region:
        env["AWS_REGION"] = conf.region
        env.pop("AWS_DEFAULT_REGION", None)
    env[BUDGET_ENV] = f"{conf.retry.budget_s:g}"
    return env

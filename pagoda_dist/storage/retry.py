"""Retry transient storage failures with exponential backoff and full jitter.

One retry layer for the whole package: the S3 client below it is configured not to retry on its own, so the
number of attempts and the wait between them are exactly what `RetryPolicy` says.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import Kind, StorageError, classify, translate

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure."""

    max_attempts: int = 6      # attempts in all, the first included
    base_delay_s: float = 0.2  # ceiling of the first wait; doubles each retry
    max_delay_s: float = 10.0  # ceiling of any single wait

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, retry_index: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based): uniform in [0, min(cap, base*2^i)].

        Full jitter keeps many workers that failed together from retrying together.
        """
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** retry_index))
        return (rng or random).uniform(0.0, ceiling)


def call_with_retry(fn: Callable[[], T], *, url: str, endpoint: str, action: str, policy: RetryPolicy,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying transient failures; any failure that escapes is a `StorageError` naming `url`."""
    attempt = 1
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every raw failure is classified, then re-raised as StorageError
            if classify(exc) is Kind.TRANSIENT and attempt < policy.max_attempts:
                wait = policy.delay(attempt - 1)
                log.warning("%s %s: transient %s (attempt %d/%d), retrying in %.2fs", action, url,
                            type(exc).__name__, attempt, policy.max_attempts, wait)
                sleep(wait)
                attempt += 1
                continue
            raise translate(exc, url=url, endpoint=endpoint, action=action, attempts=attempt) from exc

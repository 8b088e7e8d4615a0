"""Retry transient storage failures with capped exponential backoff and full jitter, within a time budget.

Two layers retry an S3 call. Below, botocore retries each request a few times in its *standard* mode (or as
AWS_RETRY_MODE / AWS_MAX_ATTEMPTS / the AWS config file say). Here, each whole operation (a read, a write, a batched
upload) is retried until it succeeds, fails permanently, or its time budget runs out (`storage.retry_budget_s`,
counted from the start of the first attempt that failed transiently), so an object store that restarts, or stays
down for minutes, does not fail the training attempt. Permanent failures (access denied, no such bucket or object,
bad credentials) are never retried.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import Kind, StorageError, classify, translate

log = logging.getLogger(__name__)
T = TypeVar("T")

BUDGET_KEY = "storage.retry_budget_s"  # the config key that sets `RetryPolicy.budget_s`; error messages name it
DEFAULT_BUDGET_S = 180.0               # rides out a 2-minute outage of the object store with room to spare


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how patiently to retry a transient failure.

    A failed attempt waits uniform(0, min(max_delay_s, base_delay_s * 2^i)) seconds ("full jitter", so workers
    that failed together do not retry together) before attempt i+2. It gives up once `budget_s` seconds have passed
    since the first failed attempt began (a wait never runs past that deadline), or after `max_attempts` attempts
    if that is set.
    """

    max_attempts: int | None = None  # attempts in all, the first included; None: as many as the budget allows
    base_delay_s: float = 0.2         # ceiling of the first wait; doubles each retry
    max_delay_s: float = 10.0         # ceiling of any single wait
    budget_s: float = DEFAULT_BUDGET_S  # give up this many seconds after the first failed attempt began

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1 (or None), got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if not (self.budget_s >= 0 and math.isfinite(self.budget_s)):
            raise ValueError(f"{BUDGET_KEY} must be a finite number of seconds >= 0, got {self.budget_s}")

    def delay(self, retry_index: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based): uniform in [0, min(cap, base*2^i)]."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** min(retry_index, 62)))
        return (rng or random).uniform(0.0, ceiling)


def call_with_retry(fn: Callable[[], T], *, url: str, endpoint: str, action: str, policy: RetryPolicy,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> T:
    """Run `fn`, retrying transient failures; any failure that escapes is a `StorageError` naming `url`."""
    attempt = 1
    first_failure: float | None = None  # when the first attempt that failed began
    while True:
        started = clock()
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every raw failure is classified, then re-raised as StorageError
            if classify(exc) is not Kind.TRANSIENT:
                raise translate(exc, url=url, endpoint=endpoint, action=action, attempts=attempt) from exc
            now = clock()
            if first_failure is None:
                first_failure = started
            remaining = policy.budget_s - (now - first_failure)
            out_of_attempts = policy.max_attempts is not None and attempt >= policy.max_attempts
            if out_of_attempts or remaining <= 0:
                why = (f"gave up after {now - first_failure:.1f} s of retries: the retry budget {BUDGET_KEY}="
                       f"{policy.budget_s:g} s ran out (raise it to ride out longer outages)") if not out_of_attempts \
                    else ""
                raise translate(exc, url=url, endpoint=endpoint, action=action, attempts=attempt,
                                note=why) from exc
            wait = min(policy.delay(attempt - 1), remaining)
            log.warning("%s %s: transient %s (attempt %d, %.0f s of the %g s retry budget left), retrying in %.2fs",
                        action, url, type(exc).__name__, attempt, remaining, policy.budget_s, wait)
            sleep(wait)
            attempt += 1

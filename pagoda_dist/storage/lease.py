"""A run's lease: one driver at a time writes a run.

The lease is one small JSON object, `RUN_URL/LEASE`: its owner (host, pid), a random token, when it was taken and
last renewed, and its time to live. A driver takes it before any work, renews it from a background thread every
third of its time to live, and deletes it when it is done. A second driver is refused with who holds the lease. A
lease not renewed within its time to live (its driver died, or lost the store that long) is stale and may be
taken; so is one whose owner is a process of this host that no longer exists.

Object stores offer no portable compare-and-swap, so taking is: read, write ours, wait a moment, read back. Two
drivers racing within that moment can both believe they won; every renewal therefore reads before it writes, and
writers check the lease (`LeaseToken.check`) before they commit, so the one whose token was overwritten stops
before it commits anything.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ObjectNotFound, StorageError
from .ops import read_bytes, remove, write_bytes
from .urls import join

LEASE_NAME = "LEASE"


class LeaseHeld(StorageError):
    """Another driver holds the run's lease."""


class LeaseLost(StorageError):
    """This driver's lease was taken over (it had expired, or two drivers raced); it must stop writing."""


def _describe(record: dict[str, Any], now: float) -> str:
    renewed = now - float(record.get("renewed_unix", 0.0))
    left = float(record.get("ttl_s", 0.0)) - renewed
    return (f"{record.get('host', '?')} pid {record.get('pid', '?')} (renewed {renewed:.0f} s ago, expires in "
            f"{max(left, 0.0):.0f} s unless renewed)")


def _read(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(read_bytes(url))
    except ObjectNotFound:
        return None
    except ValueError:  # a torn or foreign object: treat as no lease, the write below replaces it
        return None


@dataclass(frozen=True)
class LeaseToken:
    """What a writer needs to check that it still owns the run (picklable, shipped to workers)."""

    url: str
    token: str

    def check(self) -> None:
        """LeaseLost unless the lease at `url` still carries this token."""
        record = _read(self.url)
        if record is None or record.get("token") != self.token:
            holder = _describe(record, time.time()) if record else "nobody (the lease was deleted)"
            raise LeaseLost(f"{self.url}: this driver no longer holds the run's lease, {holder} does; nothing more "
                            "is committed. Let that driver finish, or stop it and run again.", url=self.url)


class RunLease:
    """Takes, renews and releases the lease of the run at `run_url` (see the module's docstring).

        with RunLease(cfg.run_url, ttl_s=120) as token:
            ...  # token.check() before each commit
    """

    def __init__(self, run_url: str, ttl_s: float, *, on_lost: Callable[[str], None] | None = None,
                 settle_s: float | None = None) -> None:
        self.url = join(run_url, LEASE_NAME)
        self.ttl_s = float(ttl_s)
        self.on_lost = on_lost                     # called once, from the renewal thread, when the lease is lost
        self.settle_s = min(1.0, self.ttl_s / 20) if settle_s is None else settle_s
        self.token = LeaseToken(self.url, uuid.uuid4().hex)
        self._acquired = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, now: float) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token.token,
                "acquired_unix": self._acquired or now, "renewed_unix": now, "ttl_s": self.ttl_s}

    @staticmethod
    def stale(record: dict[str, Any], now: float) -> bool:
        """Whether a lease may be taken: not renewed within its time to live, or held by a process of this host
        that has exited."""
        if now - float(record.get("renewed_unix", 0.0)) > float(record.get("ttl_s", 0.0)):
            return True
        if record.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(record.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):  # alive under another user, or an odd pid: held
            return False
        return False

    def acquire(self) -> LeaseToken:
        """Takes the lease; LeaseHeld, naming the holder, while another driver holds it."""
        now = time.time()
        record = _read(self.url)
        if record is not None and record.get("token") != self.token.token and not self.stale(record, now):
            raise LeaseHeld(f"{self.url}: the run is held by another driver, {_describe(record, now)}. Wait for it "
                            "to finish, or stop it; a driver that died releases the run when its lease expires.",
                            url=self.url)
        self._acquired = now
        write_bytes(self.url, json.dumps(self._record(now), indent=1).encode())
        time.sleep(self.settle_s)  # a racing driver's write lands within this moment; read back who won
        record = _read(self.url)
        if record is None or record.get("token") != self.token.token:
            raise LeaseHeld(f"{self.url}: another driver took the run at the same moment"
                            f"{', ' + _describe(record, time.time()) if record else ''}; run again once it is done.",
                            url=self.url)
        return self.token

    def renew(self) -> None:
        """Extends the lease; LeaseLost when another driver's token is there now."""
        self.token.check()
        write_bytes(self.url, json.dumps(self._record(time.time()), indent=1).encode())

    def release(self) -> None:
        """Deletes the lease if it is still ours."""
        try:
            self.token.check()
        except (LeaseLost, StorageError):
            return
        remove(self.url, recursive=False)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as lost:
                if self.on_lost is not None:
                    self.on_lost(str(lost))
                return
            except StorageError:
                continue  # the store is down: keep trying; the check before each commit is what fences

    def __enter__(self) -> LeaseToken:
        token = self.acquire()
        self._thread = threading.Thread(target=self._renew_forever, name="run-lease", daemon=True)
        self._thread.start()
        return token

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()

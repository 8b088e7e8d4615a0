"""SIGTERM (preemption) handling for training workers: note the request, let the loop save, and never overstay.

Python signal handlers can only be installed from a process's main thread, and a Ray Train worker runs the
training function in another thread while its main thread serves actor calls. `ray_backend.PreemptibleTorchConfig`
therefore installs the handler through Ray Train's backend hook, which executes on each worker's main thread when
the worker group starts (and again on every restart). The handler only sets a flag; the training loop polls it at
step boundaries (agreeing across ranks, so all ranks save the same step), saves and returns. A watchdog ends the
process `grace_s` seconds after the signal in case the save cannot finish (e.g. a peer is already gone).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM

_requested = threading.Event()
_watchdog: threading.Timer | None = None
_lock = threading.RLock()  # re-entrant: a second SIGTERM may arrive inside the handler


def install_sigterm_handler(grace_s: float) -> None:
    """Makes SIGTERM request a save-and-stop instead of killing this process (call from the main thread)."""

    def on_sigterm(signum: int, frame: Any) -> None:
        global _watchdog
        _requested.set()
        with _lock:
            if _watchdog is None:
                _watchdog = threading.Timer(grace_s, os._exit, args=(EXIT_CODE,))
                _watchdog.daemon = True
                _watchdog.start()

    signal.signal(signal.SIGTERM, on_sigterm)


def stop_requested() -> bool:
    return _requested.is_set()


def stopped_cleanly() -> None:
    """The loop saved after a stop request: call off the watchdog (the process exits when Ray retires it)."""
    with _lock:
        if _watchdog is not None:
            _watchdog.cancel()

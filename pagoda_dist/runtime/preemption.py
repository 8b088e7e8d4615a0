"""SIGTERM (preemption) handling: note the request, let the training loop save, and never overstay the grace period.

Workers. Python signal handlers can only be installed from a process's main thread, and a Ray Train worker runs
the training function in another thread while its main thread serves actor calls. `ray_backend.PreemptibleTorchConfig`
therefore installs the handler through Ray Train's backend hook, which executes on each worker's main thread when
the worker group starts (and again on every restart). The handler only sets a flag; the training loop polls it at
step boundaries (agreeing across ranks through a vote that travels during the next step, so all ranks save the same
step: the one after the step under way), saves and returns. A watchdog ends the process `grace_s` seconds after
the request in case the save cannot finish (e.g. a peer is already gone).

Driver. A scheduler may signal only the process that called `train_stage` (a batch system's job step, a pod whose
workers run elsewhere). `forwarding_sigterm` turns that signal into the same request on every worker, through a
relay the workers wait on (`follow`), and bounds the driver by the same grace period.

The other steps (prepare, precompute, evaluate) stop in the driver: inside `stopping_on_sigterm`, SIGTERM sets the
same flag; their loops poll `stop_requested()`, hand out no new unit of work (a shard, an evaluation slice), let
the units in flight commit, and raise `Stopped`, which the command line turns into exit code `EXIT_CODE`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM


class Stopped(RuntimeError):
    """A step stopped on SIGTERM with its finished work committed: the same command resumes it."""

_requested = threading.Event()
_watchdog: threading.Timer | None = None
_lock = threading.RLock()  # re-entrant: a second SIGTERM may arrive inside the handler


def _arm_watchdog(grace_s: float) -> None:
    global _watchdog
    with _lock:
        if _watchdog is None:
            _watchdog = threading.Timer(grace_s, os._exit, args=(EXIT_CODE,))
            _watchdog.daemon = True
            _watchdog.start()


def request_stop(grace_s: float) -> None:
    """Asks the loop to save and stop; this process ends `grace_s` seconds from now unless `stopped_cleanly`."""
    _requested.set()
    _arm_watchdog(grace_s)


def install_sigterm_handler(grace_s: float) -> None:
    """Makes SIGTERM request a save-and-stop instead of killing this process (call from the main thread)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: request_stop(grace_s))


def follow(wait_for_driver: Callable[[], Any], grace_s: float) -> None:
    """Starts a daemon thread that requests a stop once `wait_for_driver()` returns (the driver got SIGTERM).

    If `wait_for_driver` raises (the relay is gone because the run ended), nothing is requested."""

    def run() -> None:
        try:
            wait_for_driver()
        except Exception:  # noqa: BLE001 - any failure means there is no driver request to pass on
            return
        request_stop(grace_s)

    threading.Thread(target=run, name="preemption-follow", daemon=True).start()


def stop_requested() -> bool:
    return _requested.is_set()


@contextlib.contextmanager
def stopping_on_sigterm(grace_s: float) -> Iterator[None]:
    """While the body runs, SIGTERM to this process requests a stop (`stop_requested()`) instead of killing it, and
    ends the process with `EXIT_CODE` `grace_s` seconds later if it is still running then. A request made before
    the body starts still counts. Outside the main thread (where no handler can be installed) the body runs
    unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: request_stop(grace_s))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_cleanly() -> None:
    """The loop ended with its state saved: call off the watchdog (the process exits when Ray retires it)."""
    with _lock:
        if _watchdog is not None:
            _watchdog.cancel()


@contextlib.contextmanager
def forwarding_sigterm(forward: Callable[[], Any], grace_s: float) -> Iterator[None]:
    """While the body runs, SIGTERM to this process calls `forward()` (which asks every worker to save and stop)
    and ends this process with `EXIT_CODE` if the body has not returned `grace_s` seconds later.

    `forward` runs in a helper thread: a signal handler interrupts the main thread anywhere, including inside
    Ray's own calls, where starting another remote call is not safe. Outside the main thread (where no handler can
    be installed) the body runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signalled, finished = threading.Event(), threading.Event()
    watchdog = threading.Timer(grace_s, os._exit, args=(EXIT_CODE,))
    watchdog.daemon = True

    def on_sigterm(signum: int, frame: Any) -> None:
        if not signalled.is_set():
            signalled.set()
            watchdog.start()

    def relay() -> None:
        signalled.wait()
        if not finished.is_set():
            forward()

    thread = threading.Thread(target=relay, name="preemption-forward", daemon=True)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        signalled.set()  # releases the relay thread
        watchdog.cancel()
        signal.signal(signal.SIGTERM, previous)
        thread.join(timeout=5.0)

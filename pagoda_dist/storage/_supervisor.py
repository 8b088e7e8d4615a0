"""Keeps the embedded S3 server (`weed`) alive exactly as long as someone uses it.

Run as a script (`python _supervisor.py < spec.json`, standard library only, so it starts fast and imports nothing of
pagoda's), in its own session, by the process that starts the server. It starts `weed` as its child and then:

* stops it when no *lease* is left in `leases/`: each process that uses the server holds one, named by its PID and
  start time (`LocalS3Server.session()`); `pagoda s3 up` holds the `pinned` one until `pagoda s3 down`. A lease
  whose process is gone (exited, or SIGKILLed without cleaning up) no longer counts, so a crashed driver's server
  stops within a second or two, while one another process still uses keeps running;
* makes the kernel kill `weed` if the supervisor itself dies (PR_SET_PDEATHSIG), so no path leaves an orphan;
* stops `weed` on SIGTERM/SIGINT/SIGHUP, and exits when `weed` does.

Decisions to stop are taken under the data folder's lock file, which starters hold while they register a lease and
start, so a server is never stopped under a process that has just joined it.

The lease and lock helpers here are also what `local_s3` uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PINNED = "pinned"  # the lease `pagoda s3 up` holds: the server runs until stopped explicitly
POLL_S = 0.25


# -- processes and leases -----------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """True when `pid` runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("0" where /proc is missing): with the PID it names one
    process, even after the PID is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def lease_name(pid: int) -> str:
    return f"{pid}.{start_time(pid)}"


def lease_is_live(name: str) -> bool:
    """Whether the lease file `name` still stands for a running process (`pinned` always does)."""
    if name == PINNED:
        return True
    pid_text, _, started = name.partition(".")
    try:
        pid = int(pid_text)
    except ValueError:
        return False  # a stray file, not a lease
    if not pid_alive(pid):
        return False
    return started in ("", "0") or start_time(pid) in (started, "0")


def live_leases(lease_dir: Path) -> list[str]:
    """Names of the leases whose holders still run."""
    try:
        names = [p.name for p in lease_dir.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    return [n for n in names if lease_is_live(n)]


def prune_dead_leases(lease_dir: Path) -> None:
    """Deletes the leases of processes that are gone."""
    try:
        names = [p.name for p in lease_dir.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return
    for name in names:
        if not lease_is_live(name):
            (lease_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """The data folder's exclusive lock (released by the kernel if the holder dies)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def read_pid_file(pid_file: Path) -> dict | None:
    try:
        body = json.loads(pid_file.read_text())
        return {"pid": int(body["pid"]), "port": int(body["port"]),
                "supervisor": int(body["supervisor"]) if body.get("supervisor") else None}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_private(path: Path, text: str) -> None:
    """Create `path` readable by the owner only from the first byte (no window with wider permissions)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case umask or an old file left other bits
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- the supervisor ----------------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _child_setup(parent: int):
    """Runs in `weed` between fork and exec: die with the supervisor; create files and sockets owner-only."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def setup() -> None:
        os.umask(0o077)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)
    return setup


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _stop_weed(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # a wedged server; its acknowledged writes are already on disk
        proc.wait(timeout=10)


def remove_dead_sockets(paths: list[str]) -> None:
    """weed leaves its gRPC sockets in /tmp when it stops: delete those of `paths` that nobody listens on."""
    import socket

    for path in map(Path, paths):
        if not path.is_socket():
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
                continue  # a live server's (another data folder's, on the same ports)
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _drop_pid_file(pid_file: Path) -> None:
    """Removes the pid file if it still names this supervisor (a newer server may have replaced it)."""
    recorded = read_pid_file(pid_file)
    if recorded is not None and recorded["supervisor"] == os.getpid():
        pid_file.unlink(missing_ok=True)


def supervise(spec: dict) -> int:
    data_dir = Path(spec["data_dir"])
    pid_file, lease_dir, lock_file = data_dir / "weed.pid", data_dir / "leases", data_dir / "server.lock"
    stop_timeout_s = float(spec.get("stop_timeout_s", 6.0))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    proc: subprocess.Popen | None = None
    try:
        with open(spec["log"], "ab") as log:
            proc = subprocess.Popen(spec["argv"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=spec["cwd"], preexec_fn=_child_setup(os.getpid()))
        write_private(pid_file, json.dumps({"pid": proc.pid, "port": spec["port"], "supervisor": os.getpid()}))
        while True:
            if proc.poll() is not None:
                break
            if not live_leases(lease_dir):
                with locked(lock_file):  # a starter registering a lease right now is waited for
                    if proc.poll() is None and not live_leases(lease_dir):
                        _drop_pid_file(pid_file)  # from here on the server counts as stopped
                        _stop_weed(proc, stop_timeout_s)
                        prune_dead_leases(lease_dir)
                        break
            time.sleep(POLL_S)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup whatever arrives now
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if proc is not None:
            _stop_weed(proc, stop_timeout_s)
            remove_dead_sockets(spec.get("sockets", []))
        _drop_pid_file(pid_file)
    return 0 if proc is None or proc.returncode in (0, -signal.SIGTERM) else 1


def main() -> int:
    try:
        spec = json.loads(sys.stdin.read())
    except (ValueError, OSError) as exc:
        print(f"pagoda s3 supervisor: bad spec on stdin: {exc}", file=sys.stderr)
        return 2
    try:
        return supervise(spec)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            print(f"pagoda s3 supervisor: cannot start {spec.get('argv', ['?'])[0]}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

"""A private temporary folder per precompute process, and the removal of those whose process is gone.

A pair shard bound for an object store is written to a local temporary file first (`data.shards.ShardWriter`). A
process that is killed (SIGKILL, a lost node, the driver's end taking its actors along) never removes that file, so
each actor points Python's temporary folder at `ROOT/HOST-PID` and, before that, deletes the folders of this host
whose process no longer runs: the next precompute on the machine cleans what an earlier one left. Only folders of
dead processes are touched, so concurrent precomputes never delete each other's files. (Local outputs need none of
this: their temporary files sit beside the shard, and a shard that is redone starts by clearing its folder.)
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

ROOT_NAME = "pagoda-precompute"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep(root: Path, host: str) -> list[Path]:
    """Deletes `root/HOST-PID` folders of `host` whose process is gone; returns them."""
    removed = []
    prefix = f"{host}-"
    for folder in root.glob(f"{prefix}*") if root.is_dir() else ():
        pid = folder.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def private_scratch(root: Path | None = None) -> Path:
    """Sweeps `root` (default: the system temporary folder's pagoda-precompute/), then makes this process's folder
    there the default for `tempfile` (process-wide: call it only in a process of its own, such as an actor)."""
    root = root if root is not None else Path(tempfile.gettempdir()) / ROOT_NAME
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    sweep(root, host)
    own = root / f"{host}-{os.getpid()}"
    own.mkdir(exist_ok=True)
    tempfile.tempdir = str(own)
    return own


__all__ = ["private_scratch", "sweep"]

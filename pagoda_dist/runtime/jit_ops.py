"""One ninja for every JIT build of DeepSpeed's C++ ops."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def use_environment_ninja() -> None:
    """Puts this interpreter's bin folder first on PATH when it holds ninja (pip installs one with DeepSpeed).

    Torch's JIT builds run whichever `ninja` PATH finds, and ninja versions hash build commands differently: a
    process that found the system's ninja and one that found the environment's would each take the other's build
    in the shared extensions folder for stale and rebuild it (minutes on a small machine, with every rank waiting
    on the lock). Calling this first in every process that loads ops (workers, the warm-up script) keeps one.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if (Path(bin_dir) / "ninja").exists() and (not path or path[0] != bin_dir):
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in path if p != bin_dir]])

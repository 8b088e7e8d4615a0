"""A real single-node Slurm for tests, brought up by scripts/slurm_up.sh (loopback only, root, apt).

Import the fixture into a test module: `from tests.slurm_fixture import slurm_cluster  # noqa: F401`. It skips, with the
reason, where Slurm cannot exist (not root, no apt and no Slurm, packages not installable) and fails where it is
installed but does not start. Daemons it started are stopped again (by their PID files) at the end of the
session; daemons that were already up (CI runs scripts/slurm_up.sh first) are left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_UP = Path(__file__).resolve().parents[1] / "scripts" / "slurm_up.sh"
EXIT_CANNOT_INSTALL = 3  # scripts/slurm_up.sh: the packages cannot be installed here
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmCluster:
    """The running test cluster: its config, and helpers to inspect and wait for jobs."""

    conf: str

    @property
    def env(self) -> dict[str, str]:
        """This process's environment plus SLURM_CONF, for sbatch/scontrol and `pagoda launch slurm`."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def _run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=self.env,
                              check=False)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, Restarts, ExitCode, Reason, ...)."""
        done = self._run("scontrol", "show", "job", "--oneliner", job_id)
        if done.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
        fields: dict[str, str] = {}
        for token in done.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Waits until the job reaches a final state; on timeout cancels it and fails with its log's tail."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                self.cancel(job_id)
                tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
                raise AssertionError(f"Slurm job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                                     f"(reason {info.get('Reason')}); log tail:\n{tail}")
            time.sleep(1.0)
            info = self.job(job_id)
        return info

    def cancel(self, job_id: str) -> None:
        self._run("scancel", job_id)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node Slurm on 127.0.0.1 (started here if it is not up yet)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: scripts/slurm_up.sh installs slurmctld/slurmd/munge and runs them as root")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    status = subprocess.run(["bash", str(SLURM_UP), "status"], capture_output=True, timeout=30, check=False)
    was_up = status.returncode == 0
    done = subprocess.run(["bash", str(SLURM_UP), "up"], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode == EXIT_CANNOT_INSTALL:
        pytest.skip(f"Slurm packages cannot be installed here: {done.stderr.strip()[-500:]}")
    if done.returncode != 0:
        pytest.fail(f"scripts/slurm_up.sh up failed ({done.returncode}):\n{done.stderr[-3000:]}")
    conf = next(line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("SLURM_CONF="))
    try:
        yield SlurmCluster(conf)
    finally:
        if not was_up:
            subprocess.run(["bash", str(SLURM_UP), "down"], capture_output=True, timeout=120, check=False)

"""Results that must outlive the machine that wrote them: a stage's metrics.jsonl and its wandb run folder are
written on rank 0's local disk and copied under RUN_URL/STAGE/ after every checkpoint commit and when the stage
ends, so a lost pod loses at most what came after the last commit (the checkpoint it resumes from).

    RUN_URL/STAGE/metrics.jsonl         every progress record (a resumed attempt appends; replayed steps repeat)
    RUN_URL/STAGE/wandb.json            the stage's wandb run id (telemetry.stage_wandb_id)
    RUN_URL/STAGE/wandb/RUN-FOLDER/     each attempt's wandb folder (offline-run-TIME-ID/), for `wandb sync`

Only files that changed since the last copy travel. wandb's debug logs and scratch (`logs/`, `tmp/`) stay behind:
`wandb sync` needs neither, and they describe the host. No file that holds the value of a credential in this
process's environment is ever copied (wandb keeps API keys out of its run folders; this makes sure).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pagoda_dist import storage
from pagoda_dist.config import SECRET_WORDS

from .telemetry import stage_wandb_id, start_wandb

WANDB_LEFT_OUT = ("logs", "tmp")  # top-level parts of a wandb run folder that are not copied
METRICS_FILE = "metrics.jsonl"
_MIN_SECRET_LEN = 8  # shorter values (a "1", a region name) would match everywhere and protect nothing


def secret_values() -> list[bytes]:
    """The values of this environment's credentials (names holding config.SECRET_WORDS, or AWS_ACCESS_KEY_ID)."""
    return [value.encode() for name, value in os.environ.items()
            if (any(word in name.lower() for word in SECRET_WORDS) or name == "AWS_ACCESS_KEY_ID")
            and len(value) >= _MIN_SECRET_LEN]


class ResultsSync:
    """Copies local result files and folders to their URLs, each file only when it changed since the last copy.
    Rank 0 of a stage holds one; `sync` is cheap when nothing changed (one stat per file)."""

    def __init__(self) -> None:
        self._sources: dict[Path, tuple[str, tuple[str, ...]]] = {}  # local file or folder -> URL, parts left out
        self._copied: dict[Path, tuple[int, int]] = {}  # local file -> (size, mtime_ns) when last copied
        self._secrets = secret_values()

    def add(self, local: Path, url: str, leave_out: tuple[str, ...] = ()) -> None:
        """Copies `local` (a file, or a folder with everything below it but its top-level parts named in
        `leave_out`) to `url` at every `sync`; nothing when `url` is `local` itself (a run folder on local disk
        already holds it)."""
        if not storage.is_remote(url) and Path(url.removeprefix("file://")).absolute() == local.absolute():
            return
        self._sources[local] = (url, leave_out)

    def sync(self) -> list[str]:
        """Copies what changed; returns the URLs written. A storage failure is reported, not raised: results are
        copied again at the next sync, and training must not stop for them."""
        written = []
        for local, (url, leave_out) in self._sources.items():
            for path, target in _files(local, url, leave_out):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # wandb replaces some files as it goes
                    continue
                key = (stat.st_size, stat.st_mtime_ns)
                if self._copied.get(path) == key:
                    continue
                data = path.read_bytes()
                if any(secret in data for secret in self._secrets):
                    print(f"[results] not copying {path}: it holds a credential from this environment", flush=True)
                    self._copied[path] = key
                    continue
                try:
                    storage.write_bytes(target, data)
                except storage.StorageError as err:
                    print(f"[results] could not copy {path} to {target} ({err}); trying again at the next "
                          "checkpoint", flush=True)
                    continue
                self._copied[path] = key
                written.append(target)
        return written


def _files(local: Path, url: str, leave_out: tuple[str, ...]) -> list[tuple[Path, str]]:
    """The files to copy, with their URLs (symlinks are not followed: wandb's `latest-run` points elsewhere)."""
    if local.is_file():
        return [(local, url)]
    if not local.is_dir():
        return []
    out = []
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local)
        if path.is_file() and not path.is_symlink() and rel.parts[0] not in leave_out:
            out.append((path, storage.join(url, rel.as_posix())))
    return out


def stage_results(stage_url: str, local_dir: Path, *, wandb_mode: str, wandb_project: str, run_name: str,
                  stage: str, config: dict[str, Any] | None = None) -> tuple[Any, ResultsSync]:
    """The stage's wandb run (started, or resumed by the id kept at `stage_url`; None when `wandb_mode` is
    'disabled') writing under `local_dir`/STAGE/, and a sync that copies that folder and `local_dir`/STAGE/
    metrics.jsonl under `stage_url`. One process of a stage calls this (rank 0, or the driver after the stage)."""
    sync = ResultsSync()
    local = local_dir / stage
    sync.add(local / METRICS_FILE, storage.join(stage_url, METRICS_FILE))
    run = None
    if wandb_mode != "disabled":
        run = start_wandb(wandb_mode, wandb_project, run_id=stage_wandb_id(stage_url), name=f"{run_name}-{stage}",
                          group=run_name, directory=local, config=config)
    if run is not None and not run.disabled:  # WANDB_MODE=disabled gives a run that writes nothing
        folder = Path(run.settings.sync_dir)
        sync.add(folder, storage.join(stage_url, "wandb", folder.name), leave_out=WANDB_LEFT_OUT)
    return run, sync

"""Checkpoints of a stage on any storage URL: `RUN_URL/STAGE/step-NNNNNNNNN/` (N = images seen), committed atomically.

Layout of one checkpoint (every rank uploads its own files, rank 0 writes the COMMIT marker last):

    engines/NAME/state/...  each DeepSpeed engine's files: model states and every rank's ZeRO optimizer shard
    rank-RRRRR.pt           per rank: its data reader position and its RNG states (torch, numpy, python)
    ema.pt                  fp32 EMA of the first trainable network
    export.pt               for inference: architecture, fp32 EMA and fp32 live weights (loadable weights_only)
    export.safetensors      the fp32 EMA weights alone, loadable without unpickling; the export's record as metadata
    export.json             that record: the export without its weights (stage, images seen, architecture and the
                            stage's `export_metadata`)
    meta.json               stage, images seen, world size, ZeRO stage, precision, architecture, resolved config
    COMMIT                  storage.commit's marker listing every part with its size; written last

A folder without a valid marker is ignored by readers and deleted by the next writer, so a crash or a storage
failure at any point of a save leaves the previous checkpoint as the latest. Loading uses `weights_only=True`
everywhere except inside DeepSpeed's `load_checkpoint`, whose checkpoint engine unpickles its own files with
`weights_only=False` (DeepSpeed 0.19 stores Python objects such as its config and param-shape maps there); those
files are ones this run wrote into its own run folder, the same trust as the run's code.
"""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file as save_safetensors

from pagoda_dist import storage
from pagoda_dist.config import Config

from .comm import Comm, SoloComm

STEP_PATTERN = re.compile(r"^step-(\d{9,})$")
FORMAT = 1
EXPORT_NAME = "export.pt"  # a checkpoint's inference weights (see the layout above)
EXPORT_SAFETENSORS = "export.safetensors"
EXPORT_RECORD = "export.json"
RECORD_KEY = "pagoda_export"  # the safetensors metadata entry holding the record (JSON text)


class CheckpointMismatch(RuntimeError):
    """A committed checkpoint cannot be resumed by this run as configured (world size, ZeRO, architecture...)."""


class NoExport(FileNotFoundError):
    """A stage has no committed checkpoint with an export (not trained yet, or still saving)."""


class ExportUnreadable(ValueError):
    """An export file that does not decode: damaged, truncated, or not an export at all."""


# What a checkpoint must share with the run that resumes it, and what to do when it differs.
RESUME_KEYS = {
    "world_size": "Set runtime.num_workers={saved} to resume",
    "zero_stage": "Set runtime.zero_stage={saved} to resume",
    "precision": "Set runtime.precision={saved} to resume",
    "engines": "The stage's trainable networks changed",
    "architecture": "The networks' architecture changed (check the model config)",
}


def resume_layout(cfg: Config, world_size: int) -> dict[str, Any]:
    """The layout keys of RESUME_KEYS that the config and the world size decide (a worker adds its networks')."""
    rt = cfg.runtime
    return {"world_size": world_size, "zero_stage": rt.zero_stage, "precision": rt.precision}


def check_resumable(expected: dict[str, Any], saved: dict[str, Any], url: str) -> None:
    """Refuses a checkpoint (its meta `saved`) that this run cannot continue exactly; compares the RESUME_KEYS that
    `expected` holds (the driver knows the layout before any worker starts; a worker also knows its networks)."""
    for key, hint in RESUME_KEYS.items():
        if key in expected and saved.get(key) != expected[key]:
            raise CheckpointMismatch(
                f"{url} was saved with {key}={saved.get(key)!r} but this run has {key}={expected[key]!r}; resuming "
                f"would not continue the run exactly. {hint.format(saved=repr(saved.get(key)))}, or start a new "
                "run (another run.name).")


class EngineState(Protocol):
    """What the store needs from a driver: save/load of its networks' (sharded) state in a local folder."""

    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...


@dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint: where it is and how many images had been seen."""

    url: str
    nimg: int


@dataclass
class SavePayload:
    """Everything one rank contributes to a checkpoint; the rank-0-only fields are None elsewhere."""

    nimg: int
    engines: EngineState
    data_state: dict[str, Any]
    meta: dict[str, Any]                           # identical on all ranks (checked against on resume)
    ema: dict[str, torch.Tensor] | None = None     # rank 0
    export: dict[str, Any] | None = None           # rank 0


@dataclass
class Loaded:
    """What `CheckpointStore.load` hands back to one rank (engines are restored in place)."""

    ref: CheckpointRef
    meta: dict[str, Any]
    data_state: dict[str, Any] | None
    rng: dict[str, Any]                            # apply with `restore_rng` right before training continues
    ema: dict[str, torch.Tensor] | None            # on rank 0


def step_name(nimg: int) -> str:
    return f"step-{nimg:09d}"


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """Committed checkpoints of one stage of one run (`run_url/stage/step-N`)."""

    def __init__(self, run_url: str, stage: str, *, scratch: str | Path | None = None) -> None:
        self.url = storage.join(run_url, stage)
        self.stage = stage
        self.scratch = Path(scratch) if scratch is not None else None  # local temp space (None: system temp)

    def step_url(self, nimg: int) -> str:
        return storage.join(self.url, step_name(nimg))

    # ------------------------------------------------------------------------------------------------ reading
    def committed(self) -> list[CheckpointRef]:
        """Committed, complete checkpoints, oldest first (folders without a valid COMMIT marker are left out)."""
        refs = []
        for url in storage.committed_children(self.url):
            match = STEP_PATTERN.match(url.rstrip("/").rsplit("/", 1)[-1])
            if match:
                refs.append(CheckpointRef(url, int(match.group(1))))
        return sorted(refs, key=lambda r: r.nimg)

    def latest_committed(self) -> CheckpointRef | None:
        refs = self.committed()
        return refs[-1] if refs else None

    def export_url(self, ref: CheckpointRef) -> str:
        """Where checkpoint `ref` keeps its export (architecture, fp32 EMA and live weights)."""
        return storage.join(ref.url, EXPORT_NAME)

    def latest_export(self) -> tuple[str, int]:
        """The export of the latest committed checkpoint and the images it had seen; NoExport saying what is
        there instead when there is none."""
        ref = self.latest_committed()
        if ref is None:
            present = storage.list_dir(self.url)
            detail = (f"found only uncommitted folders ({', '.join(u.rstrip('/').rsplit('/', 1)[-1] for u in present[:3])}"
                      "): a run may still be saving or died midway" if present else "nothing is there")
            raise NoExport(f"no committed {self.stage} checkpoint under {self.url} ({detail}); train the {self.stage} "
                           "stage first (`pagoda run CONFIG`) or point run.root / run.name at its run")
        parts = storage.read_commit(ref.url).parts
        if EXPORT_NAME not in parts:
            raise NoExport(f"{self.stage} checkpoint {ref.url} has no {EXPORT_NAME} (parts: {', '.join(sorted(parts))})")
        return self.export_url(ref), ref.nimg

    def read_meta(self, ref: CheckpointRef) -> dict[str, Any]:
        return json.loads(storage.read_bytes(storage.join(ref.url, "meta.json")))

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, payload: SavePayload, comm: Comm | SoloComm = SoloComm()) -> CheckpointRef:
        """Writes one checkpoint from every rank and commits it (collective: every rank calls this)."""
        url = self.step_url(payload.nimg)
        if comm.rank == 0:
            storage.remove(url, recursive=True)  # leftovers of a writer that died before committing
        comm.barrier()
        ok, uploaded, error = True, {}, ""
        with self._tempdir(f"save-r{comm.rank}") as local:
            try:
                payload.engines.save_state(local / "engines")
                rank_state = {"nimg": payload.nimg, "data": payload.data_state, "rng": capture_rng()}
                torch.save(rank_state, local / f"rank-{comm.rank:05d}.pt")
                if comm.rank == 0:
                    torch.save(payload.ema, local / "ema.pt")
                    write_export(payload.export, local)
                    meta = {**payload.meta, "format": FORMAT, "stage": self.stage, "nimg": payload.nimg}
                    (local / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
                uploaded = storage.upload_dir(local, url)  # retried by the storage layer
            except Exception as exc:  # noqa: BLE001 - reported to all ranks below, then raised everywhere
                ok, error = False, f"rank {comm.rank}: {type(exc).__name__}: {exc}"
        # Commit only when every rank's files landed; otherwise all ranks fail together (no rank hangs waiting).
        if not comm.all(ok):
            raise RuntimeError(f"checkpoint {url} was not committed: a rank failed to write its part"
                               + (f" ({error})" if error else "") + "; the previous checkpoint stays the latest")
        expected = {rel: size for part in comm.gather(uploaded) for rel, size in part.items()}
        if comm.rank == 0:
            storage.commit_existing(url, meta={"stage": self.stage, "nimg": payload.nimg}, expected=expected)
        comm.barrier()
        return CheckpointRef(url, payload.nimg)

    def prune(self, keep: int) -> list[str]:
        """Deletes committed checkpoints beyond the newest `keep`, and uncommitted leftovers older than the newest
        commit; returns the deleted URLs. Call after a commit, from one process."""
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a crash mid-save needs a fallback), got {keep}")
        refs = self.committed()
        if not refs:
            return []
        newest = refs[-1].nimg
        committed = {r.url for r in refs}
        doomed = [r.url for r in refs[:-keep]]
        # Children that hold files (some S3 servers list emptied prefixes as folders; those need nothing).
        children = {rel.partition("/")[0] for rel in storage.list_files(self.url) if "/" in rel}
        for child in sorted(children):
            match = STEP_PATTERN.match(child)
            url = storage.join(self.url, child)
            if match and url not in committed and int(match.group(1)) < newest:
                doomed.append(url)
        for url in doomed:
            # Marker first: a prune interrupted midway leaves an uncommitted folder, never a broken committed one.
            storage.remove(storage.join(url, storage.COMMIT_MARKER), recursive=False)
            storage.remove(url, recursive=True)
        return doomed

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, ref: CheckpointRef, engines: EngineState, comm: Comm | SoloComm = SoloComm(),
             check: Callable[[dict[str, Any]], None] | None = None) -> Loaded:
        """Restores `engines` in place and returns this rank's data position, RNG states and EMA (rank 0).

        `check(meta)` runs first on every rank and raises `CheckpointMismatch` to refuse the checkpoint.
        """
        meta = self.read_meta(ref)
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"{ref.url}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT}")
        if check is not None:
            check(meta)
        with self._tempdir(f"load-r{comm.rank}") as local:
            # ZeRO-1/2 loads read every rank's optimizer shard, so each rank fetches the whole folder.
            storage.download_dir(ref.url, local)
            engines.load_state(local / "engines")
            rank_file = local / f"rank-{comm.rank:05d}.pt"
            if not rank_file.exists():
                raise CheckpointMismatch(f"{ref.url} holds no state for rank {comm.rank} (saved by "
                                         f"{meta.get('world_size')} ranks)")
            rank_state = torch.load(rank_file, weights_only=True)
            ema = torch.load(local / "ema.pt", weights_only=True) if comm.rank == 0 else None
        return Loaded(ref, meta, rank_state["data"], rank_state["rng"], ema)

    def _tempdir(self, prefix: str) -> _TempDir:
        return _TempDir(prefix, self.scratch)


class _TempDir:
    """A private local folder removed on exit (checkpoints pass through local disk on their way to storage)."""

    def __init__(self, prefix: str, parent: Path | None) -> None:
        self.prefix, self.parent, self.path = prefix, parent, None

    def __enter__(self) -> Path:
        if self.parent is not None:
            self.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"pagoda-{self.prefix}-", dir=self.parent))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def export_record(export: dict[str, Any]) -> dict[str, Any]:
    """An export without its weights (the entries that are dicts of tensors): plain data, stored as JSON."""
    def is_weights(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(t, torch.Tensor) for t in value.values())

    return {key: value for key, value in export.items() if not is_weights(value)}


def write_export(export: dict[str, Any], folder: Path) -> None:
    """Writes an export into `folder` as EXPORT_NAME (all of it), EXPORT_SAFETENSORS (its "ema" weights, its record
    as metadata) and EXPORT_RECORD (the record alone)."""
    torch.save(export, folder / EXPORT_NAME)
    record = export_record(export)
    weights = {name: t.detach().cpu().contiguous() for name, t in export["ema"].items()}
    metadata = {RECORD_KEY: json.dumps(record, sort_keys=True)}
    save_safetensors(weights, str(folder / EXPORT_SAFETENSORS), metadata=metadata)
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


def _safetensors_record(data: bytes, url: str) -> dict[str, Any]:
    """The record in a safetensors file's metadata (its header: a little-endian u64 length, then JSON)."""
    size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if not 0 <= size <= len(data) - 8:
        raise ExportUnreadable(f"{url}: truncated or not a safetensors file ({len(data)} bytes); copy it again")
    header = json.loads(data[8:8 + size])
    text = (header.get("__metadata__") or {}).get(RECORD_KEY)
    if text is None:
        raise ExportUnreadable(f"{url}: a safetensors file without the {RECORD_KEY!r} record in its metadata, so not "
                               "a pagoda export; load the export.safetensors of a pagoda checkpoint")
    return json.loads(text)


def load_export(url: str) -> dict[str, Any]:
    """Reads a checkpoint's export from any URL onto the CPU: EXPORT_NAME with weights_only=True, or
    EXPORT_SAFETENSORS as {**its record, "ema": its weights}. ExportUnreadable when the bytes do not decode."""
    data = storage.read_bytes(url)
    try:
        if url.endswith(".safetensors"):
            return {**_safetensors_record(data, url), "ema": load_safetensors(data)}
        if not data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive; torch's own error blames pickle
            raise ExportUnreadable(f"{url}: not a torch checkpoint (no zip archive: it starts with {data[:8]!r}); the "
                                   "file is damaged or is no export: copy it again, or point at a checkpoint's export")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except ExportUnreadable:
        raise
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in zip, pickle, JSON or safetensors code alike
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ExportUnreadable(f"{url}: not a readable export ({type(err).__name__}: {detail}); the file is damaged "
                               "or is no export: copy it again, or point at a checkpoint's export") from None

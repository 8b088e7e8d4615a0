"""Checkpoints of a stage on any storage URL: `RUN_URL/STAGE/step-NNNNNNNNN/` (N = images seen), committed atomically.

Layout of one checkpoint (every rank uploads its own files, rank 0 writes the COMMIT marker last):

    engines/NAME/state/...  each DeepSpeed engine's files: model states and every rank's ZeRO optimizer shard
    rank-RRRRR.pt           per rank: its data reader position, its RNG states (torch, numpy, python) and its
                            open log window (loss sums since the last log point)
    ema.pt                  fp32 EMA of the first trainable network
    export.pt               for inference: architecture, fp32 EMA and fp32 live weights (loadable weights_only)
    export.safetensors      the fp32 EMA weights alone, loadable without unpickling; the export's record as metadata
    export.json             that record: the export without its weights (stage, images seen, architecture and the
                            stage's `export_metadata`)
    meta.json               stage, images seen, world size, ZeRO stage, precision, architecture, resolved config
    COMMIT                  storage.commit's marker listing every part with its size and SHA-256 (hashed on the
                            rank that wrote it, before the upload); written last

A folder without a valid marker is ignored by readers and deleted by the next writer, so a crash or a storage
failure at any point of a save leaves the previous checkpoint as the latest. Loading checks every part against the
marker (sizes, and SHA-256 on the downloaded copy); a checkpoint that fails is reported by name, moved to
`STAGE/damaged/` and the next older one is loaded. With committed checkpoints damaged and none loadable a stage
refuses to start from zero unless asked to (`from_scratch`). Pruning deletes only what a newer checkpoint this
store verified supersedes. Loading uses `weights_only=True`
everywhere except inside DeepSpeed's `load_checkpoint`, whose checkpoint engine unpickles its own files with
`weights_only=False` (DeepSpeed 0.19 stores Python objects such as its config and param-shape maps there); those
files are ones this run wrote into its own run folder, the same trust as the run's code.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import struct
import tempfile
import time
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
from pagoda_dist.storage.lease import LeaseToken

from .comm import Comm, SoloComm

STEP_PATTERN = re.compile(r"^step-(\d{9,})$")
DAMAGED = "damaged"  # STAGE/damaged/step-N-UNIXTIME/: checkpoints that failed to load, kept as evidence
FORMAT = 1
EXPORT_NAME = "export.pt"  # a checkpoint's inference weights (see the layout above)
EXPORT_SAFETENSORS = "export.safetensors"
EXPORT_RECORD = "export.json"
RECORD_KEY = "pagoda_export"  # the safetensors metadata entry holding the record (JSON text)


class CheckpointMismatch(RuntimeError):
    """A committed checkpoint cannot be resumed by this run as configured (world size, ZeRO, architecture...)."""


class CheckpointDamaged(RuntimeError):
    """Checkpoints of a stage were committed but none of them loads; the stage will not quietly start from zero."""


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


def elastic_refusal(expected: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot continue on another world size; None when it can: the same global batch (the data
    stream keeps its global batches, `data.order.Layout`) and optimizer state that `drivers.DeepSpeedDriver`
    re-partitions (ZeRO-1/2's flat fp32 partitions; ZeRO-0 keeps whole state)."""
    stage, bf16 = saved.get("zero_stage"), saved.get("precision") == "bf16"
    if stage not in (0, 1, 2) or (bf16 and stage != 2):
        return (f"ZeRO stage {stage} with {saved.get('precision')} keeps state partitioned in a way that is not "
                "re-partitioned for another world size (ZeRO-2, or fp32 with ZeRO-0/1, is)")
    if saved.get("batch_size") is None:
        return "the checkpoint does not record its global batch"
    if "batch_size" in expected and saved["batch_size"] != expected["batch_size"]:
        return f"the global batch changed from {saved['batch_size']} to {expected['batch_size']}; keep it"
    return None


def check_resumable(expected: dict[str, Any], saved: dict[str, Any], url: str) -> None:
    """Refuses a checkpoint (its meta `saved`) that this run cannot continue; compares the RESUME_KEYS that
    `expected` holds (the driver knows the layout before any worker starts; a worker also knows its networks).
    Another world size is accepted where `elastic_refusal` finds no reason against it."""
    for key, hint in RESUME_KEYS.items():
        if key in expected and saved.get(key) != expected[key]:
            why = "would not continue the run exactly"
            if key == "world_size":
                reason = elastic_refusal(expected, saved)
                if reason is None:
                    continue
                why = f"cannot continue on another number of workers: {reason}"
            raise CheckpointMismatch(
                f"{url} was saved with {key}={saved.get(key)!r} but this run has {key}={expected[key]!r}; resuming "
                f"{why}. {hint.format(saved=repr(saved.get(key)))}, or start a new run (another run.name).")


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
    window: dict[str, Any] | None = None           # the rank's open log window (`Telemetry.window`)


@dataclass
class Loaded:
    """What `CheckpointStore.load` hands back to one rank (engines are restored in place)."""

    ref: CheckpointRef
    meta: dict[str, Any]
    data_state: dict[str, Any] | None
    rng: dict[str, Any] | None                     # apply with `restore_rng` right before training continues
                                                   # (None: a rank new to the run after a world-size change)
    ema: dict[str, torch.Tensor] | None            # on rank 0
    window: dict[str, Any] | None = None           # the rank's open log window (None: saved without one)


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

    def __init__(self, run_url: str, stage: str, *, scratch: str | Path | None = None,
                 lease: LeaseToken | None = None) -> None:
        self.url = storage.join(run_url, stage)
        self.stage = stage
        self.scratch = Path(scratch) if scratch is not None else None  # local temp space (None: system temp)
        self.lease = lease  # checked before every write (None: the caller vouches that it is the run's one writer)
        self._verified: set[str] = set()  # checkpoints this store committed, or downloaded and checked, here

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
        return self._export_of(self.latest_committed())

    def export_from(self, nimg: int) -> tuple[str, int]:
        """The export of the first committed checkpoint at or after `nimg` images and the images it had seen
        (checkpoints land on batch boundaries, so 10k asks for the one at 10016); NoExport naming those there are."""
        refs = self.committed()
        ref = next((r for r in refs if r.nimg >= nimg), None)
        if refs and ref is None:
            raise NoExport(f"no committed {self.stage} checkpoint at or after {nimg} images under {self.url}; "
                           f"committed: {', '.join(str(r.nimg) for r in refs)} images")
        return self._export_of(ref)

    def _export_of(self, ref: CheckpointRef | None) -> tuple[str, int]:
        """(export URL, images seen) of `ref`; NoExport saying what is there when it is None or has no export."""
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

    def damaged(self) -> list[str]:
        """Checkpoints set aside by `load_latest` or `prune` (under STAGE/damaged/), oldest first."""
        return storage.list_dir(storage.join(self.url, DAMAGED))

    def _marked(self) -> list[tuple[CheckpointRef, list[str]]]:
        """Every step folder with a commit marker and what is wrong with it ([] when whole), oldest first."""
        out = []
        for url, problems in storage.marked_children(self.url).items():
            match = STEP_PATTERN.match(url.rstrip("/").rsplit("/", 1)[-1])
            if match:
                out.append((CheckpointRef(url, int(match.group(1))), problems))
        return sorted(out, key=lambda item: item[0].nimg)

    def _set_aside(self, ref: CheckpointRef) -> str:
        """Moves a damaged checkpoint to STAGE/damaged/ (marker first, so no reader ever sees half of it)."""
        target = storage.join(self.url, DAMAGED, f"{ref.url.rstrip('/').rsplit('/', 1)[-1]}-{int(time.time())}")
        files = storage.list_files(ref.url)
        for rel in sorted(files, key=lambda rel: rel != storage.COMMIT_MARKER):
            storage.copy_file(storage.join(ref.url, rel), storage.join(target, rel))
        storage.remove(storage.join(ref.url, storage.COMMIT_MARKER), recursive=False)
        storage.remove(ref.url, recursive=True)
        return target

    def _fence(self) -> None:
        if self.lease is not None:
            self.lease.check()

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, payload: SavePayload, comm: Comm | SoloComm = SoloComm()) -> CheckpointRef:
        """Writes one checkpoint from every rank and commits it (collective: every rank calls this)."""
        url = self.step_url(payload.nimg)
        ok, uploaded, error = True, {}, ""
        if comm.rank == 0:
            try:
                self._fence()
                storage.remove(url, recursive=True)  # leftovers of a writer that died before committing
            except Exception as exc:  # noqa: BLE001 - every rank raises it below
                ok, error = False, f"rank 0: {type(exc).__name__}: {exc}"
        if not comm.all(ok):
            raise RuntimeError(f"checkpoint {url} was not written" + (f" ({error})" if error else "") +
                               "; the previous checkpoint stays the latest")
        with self._tempdir(f"save-r{comm.rank}") as local:
            try:
                payload.engines.save_state(local / "engines")
                rank_state = {"nimg": payload.nimg, "data": payload.data_state, "rng": capture_rng(),
                              "window": payload.window}
                torch.save(rank_state, local / f"rank-{comm.rank:05d}.pt")
                if comm.rank == 0:
                    torch.save(payload.ema, local / "ema.pt")
                    write_export(payload.export, local)
                    meta = {**payload.meta, "format": FORMAT, "stage": self.stage, "nimg": payload.nimg}
                    (local / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
                uploaded = storage.file_parts(local)  # hashed here, from the bytes this rank wrote
                storage.upload_dir(local, url)  # retried by the storage layer
            except Exception as exc:  # noqa: BLE001 - reported to all ranks below, then raised everywhere
                ok, error = False, f"rank {comm.rank}: {type(exc).__name__}: {exc}"
        # Commit only when every rank's files landed; otherwise all ranks fail together (no rank hangs waiting).
        if not comm.all(ok):
            raise RuntimeError(f"checkpoint {url} was not committed: a rank failed to write its part"
                               + (f" ({error})" if error else "") + "; the previous checkpoint stays the latest")
        expected: dict[str, storage.PartInfo] = {}
        clashes = set()
        for parts in comm.gather(uploaded):
            clashes |= {rel for rel, part in parts.items() if expected.setdefault(rel, part) != part}
        if comm.rank == 0:
            try:
                if clashes:  # two ranks wrote one path with different bytes: the object holds only one of them
                    raise RuntimeError(f"ranks wrote different bytes to {', '.join(sorted(clashes)[:3])}")
                self._fence()
                storage.commit_existing(url, meta={"stage": self.stage, "nimg": payload.nimg}, expected=expected)
            except Exception as exc:  # noqa: BLE001 - every rank raises it below, none waits for a commit
                ok, error = False, f"rank 0: {type(exc).__name__}: {exc}"
        if not comm.all(ok):
            raise RuntimeError(f"checkpoint {url} was not committed ({error or 'rank 0 failed to commit'}); the "
                               "previous checkpoint stays the latest")
        self._verified.add(url)
        return CheckpointRef(url, payload.nimg)

    def prune(self, keep: int) -> list[str]:
        """Deletes committed checkpoints beyond the newest `keep`, and uncommitted leftovers older than the newest
        commit; returns the deleted URLs. Call after a commit, from one process.

        Only a checkpoint this store verified (committed it, or downloaded and checked it) supersedes others:
        when the newest is not one, nothing is deleted. Committed checkpoints whose parts no longer match their
        marker are moved to STAGE/damaged/, never deleted."""
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a crash mid-save needs a fallback), got {keep}")
        marked = self._marked()
        refs = [ref for ref, problems in marked if not problems]
        if not refs or refs[-1].url not in self._verified:
            return []
        self._fence()
        for ref, problems in marked:
            if problems:
                print(f"[{self.stage}] checkpoint {ref.url} is damaged ({'; '.join(problems)}); moved to "
                      f"{self._set_aside(ref)}", flush=True)
        newest = refs[-1].nimg
        committed = {r.url for r, _ in marked}
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

        `check(meta)` runs first on every rank and raises `CheckpointMismatch` to refuse the checkpoint. Every part
        is checked against the commit marker before anything is unpickled; a part that does not match, or engine
        state that does not load, raises `storage.CommitDamaged` naming it, on every rank together.
        """
        try:
            meta = self.read_meta(ref)
        except ValueError as exc:
            raise storage.CommitDamaged(f"{ref.url}: damaged: meta.json is not JSON ({exc})", url=ref.url) from None
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"{ref.url}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT}")
        if check is not None:
            check(meta)
        with self._tempdir(f"load-r{comm.rank}") as local:
            # ZeRO-1/2 loads read every rank's optimizer shard, so each rank fetches the whole folder; the ranks
            # agree on each part before DeepSpeed's (collective) load starts, so no rank enters it alone.
            _agree(comm, ref, lambda: storage.download_committed(ref.url, local))
            _agree(comm, ref, lambda: engines.load_state(local / "engines"))
            saved_world = int(meta.get("world_size", comm.world_size))
            rank_state = _rank_state(local, ref, comm.rank, comm.world_size, saved_world)
            ema = torch.load(local / "ema.pt", weights_only=True) if comm.rank == 0 else None
        self._verified.add(ref.url)
        return Loaded(ref, meta, rank_state["data"], rank_state["rng"], ema, rank_state.get("window"))

    def load_latest(self, engines: EngineState, comm: Comm | SoloComm = SoloComm(),
                    check: Callable[[dict[str, Any]], None] | None = None, *, from_scratch: bool = False
                    ) -> Loaded | None:
        """Loads the newest committed checkpoint that is whole, matches its checksums and loads (collective).

        Each one that fails is reported by name and moved to STAGE/damaged/ (kept as evidence, and out of the way
        of new saves), and the next older one is tried. None when there is nothing to resume. When checkpoints
        were damaged and none loads, raises `CheckpointDamaged` saying what to do, unless `from_scratch`: then
        the stage starts from zero and the damaged ones stay under STAGE/damaged/.
        """
        marked = comm.broadcast(self._marked() if comm.rank == 0 else None)
        failed: list[tuple[CheckpointRef, str]] = []
        loaded = None
        for ref, problems in reversed(marked):
            if not problems:
                try:
                    loaded = self.load(ref, engines, comm, check)
                    break
                except storage.CommitDamaged as exc:
                    problems = [str(exc)]
            failed.append((ref, "; ".join(problems)))
            if comm.rank == 0:
                print(f"[{self.stage}] cannot resume from {ref.url}: {failed[-1][1]}; trying the checkpoint before "
                      "it", flush=True)
        if comm.rank == 0:
            for ref, _ in failed:
                print(f"[{self.stage}] moved damaged checkpoint {ref.url} to {self._set_aside(ref)}", flush=True)
        if loaded is None and not from_scratch:
            self.refuse_fresh_start(comm.broadcast(self.damaged() if comm.rank == 0 else None))
        return loaded

    def refuse_fresh_start(self, damaged: list[str] | None = None) -> None:
        """Raises `CheckpointDamaged`, saying what to do, when checkpoints of this stage were set aside as damaged
        (`damaged()`, unless given): call it where the stage would otherwise start from zero."""
        damaged = self.damaged() if damaged is None else damaged
        if damaged:
            names = ", ".join(url.rstrip("/").rsplit("/", 1)[-1] for url in damaged[-3:])
            raise CheckpointDamaged(
                f"{self.stage}: no checkpoint of this stage loads, and {len(damaged)} damaged one(s) are kept under "
                f"{storage.join(self.url, DAMAGED)} ({names}). Restore one from a copy (as its step-N folder), or "
                "start this stage again from zero with `pagoda run CONFIG --from-scratch` (they stay where they are).")

    def _tempdir(self, prefix: str) -> _TempDir:
        return _TempDir(prefix, self.scratch)


def _agree(comm: Comm | SoloComm, ref: CheckpointRef, action: Callable[[], Any]) -> None:
    """Runs `action` on every rank; when it fails on any rank, raises on all of them: the store's own error when
    storage failed (nothing is known to be damaged), else `CommitDamaged` (a part that does not match or load)."""
    failure = None
    try:
        action()
    except (storage.StorageUnavailable, storage.EndpointUnreachable, storage.AccessDenied) as exc:
        failure = ("storage", f"rank {comm.rank}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a part that fails its check, or bytes that do not load
        failure = ("damaged", str(exc) if isinstance(exc, storage.CommitDamaged) else
                   f"{ref.url}: damaged: rank {comm.rank}: {type(exc).__name__}: {str(exc)[:300]}")
    failures = [f for f in comm.gather(failure) if f is not None]
    if not failures:
        return
    kind, detail = next((f for f in failures if f[0] == "storage"), failures[0])
    if kind == "storage":
        raise storage.StorageError(f"{ref.url}: could not be read ({detail}); nothing is known to be damaged: run "
                                   "again once storage answers", url=ref.url)
    raise storage.CommitDamaged(detail, url=ref.url)


def _rank_state(local: Path, ref: CheckpointRef, rank: int, world_size: int, saved_world: int) -> dict[str, Any]:
    """Rank `rank`'s part of the checkpoint in `local`. Resumed on another world size (see `check_resumable`), a
    rank continues the saved rank of its number (data state, RNG streams); a rank new to the run takes rank 0's data
    state (the data layer maps it to its own share) and no RNG state (it is seeded as in a fresh run); and every rank
    takes the mean of the saved ranks' open log windows, so the next log's mean over ranks is what it would have
    been."""
    def read(r: int) -> dict[str, Any]:
        path = local / f"rank-{r:05d}.pt"
        if not path.exists():
            raise CheckpointMismatch(f"{ref.url} holds no state for rank {r} (saved by {saved_world} ranks)")
        return torch.load(path, weights_only=True)

    if saved_world == world_size:
        return read(rank)
    saved = [read(r) for r in range(saved_world)]
    own = saved[rank] if rank < saved_world else {**saved[0], "rng": None}
    windows = [s.get("window") for s in saved]
    if any(w is None for w in windows):
        return {**own, "window": None}
    keys = {k for w in windows for k in w["sums"]}
    sums = {k: sum(w["sums"].get(k, 0.0) for w in windows) / saved_world for k in sorted(keys)}
    return {**own, "window": {"sums": sums, "steps": windows[0]["steps"]}}


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


def _check_against_commit(url: str, data: bytes) -> None:
    """ExportUnreadable when `url`'s folder is a committed set recording another SHA-256 for it (an export copied
    elsewhere, or from a set committed without checksums, is not checked)."""
    folder, _, name = url.rstrip("/").rpartition("/")
    try:
        part = storage.read_commit(folder).parts.get(name) if folder else None
    except (storage.NotCommitted, storage.ObjectNotFound):
        return
    if part is not None and part.sha256 is not None and hashlib.sha256(data).hexdigest() != part.sha256:
        raise ExportUnreadable(f"{url}: damaged: does not match the SHA-256 its checkpoint's COMMIT records "
                               f"({len(data)} bytes); restore it from a copy, or retrain that stage")


def load_export(url: str) -> dict[str, Any]:
    """Reads a checkpoint's export from any URL onto the CPU: EXPORT_NAME with weights_only=True, or
    EXPORT_SAFETENSORS as {**its record, "ema": its weights}. ExportUnreadable when the bytes do not decode, or
    when the file sits in a committed checkpoint whose marker records another SHA-256 for it."""
    data = storage.read_bytes(url)
    _check_against_commit(url, data)
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

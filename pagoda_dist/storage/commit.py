"""Atomic commit of a set of objects (a checkpoint, a shard set) under one prefix URL.

Protocol: write every part, then a `COMMIT` marker last. The marker is one atomic write (an S3 PUT, or temp file
+ rename locally) listing each part with its size and, when the writer hashed it (`CommitSet.put`, `file_parts`),
its SHA-256. A set counts as committed only when its marker exists and every part it lists is present with that
size, so a writer that dies at any point leaves nothing that looks committed; the next writer to the same prefix
deletes its leftovers before writing. `download_committed` checks every recorded SHA-256 on the copy it downloads,
which catches what sizes cannot (a same-size corruption).

One writer per prefix at a time (e.g. rank 0 after a barrier); concurrent writers to one prefix are not supported
(a run's lease, `storage.lease`, keeps a second driver out of a run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import (AccessDenied, AlreadyCommitted, BucketNotFound, EndpointUnreachable, NotCommitted, ObjectNotFound,
                     StorageError, StorageUnavailable)
from .ops import copy_file, download_dir, exists, list_files, read_bytes, remove, write_bytes
from .urls import join

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMIT"
FORMAT = "pagoda-commit/1"

PartSource = Union[bytes, bytearray, memoryview, os.PathLike]


@dataclass(frozen=True)
class PartInfo:
    """One committed object: its size, and its SHA-256 when the data passed through `CommitSet.put`."""

    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class CommitInfo:
    """What a commit marker records."""

    prefix: str
    parts: dict[str, PartInfo]
    meta: dict[str, Any] = field(default_factory=dict)
    created_unix: float = 0.0

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "created_unix": self.created_unix,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_unix)),
            "parts": {rel: {"size": p.size, **({"sha256": p.sha256} if p.sha256 else {})}
                      for rel, p in sorted(self.parts.items())},
            "meta": self.meta,
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, prefix: str, raw: bytes) -> CommitInfo:
        marker = join(prefix, COMMIT_MARKER)
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
            parts = {rel: PartInfo(int(p["size"]), p.get("sha256")) for rel, p in body["parts"].items()}
            return cls(prefix, parts, dict(body.get("meta") or {}), float(body.get("created_unix", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"read commit {marker}: the marker is not a valid commit record ({exc}); delete the "
                               "folder or restore it from a good copy.", url=marker) from exc

    def problems(self, present: Mapping[str, int]) -> list[str]:
        """What is wrong with this set given the files `present` ({relative path: size}); [] when it is whole."""
        out = []
        for rel, part in sorted(self.parts.items()):
            if rel not in present:
                out.append(f"{rel} is missing")
            elif present[rel] != part.size:
                out.append(f"{rel} has {present[rel]} bytes, the commit says {part.size}")
        return out


def _check_rel(rel: str) -> str:
    clean = rel.strip("/")
    if not clean or clean == COMMIT_MARKER or any(seg in ("", ".", "..") for seg in clean.split("/")):
        raise ValueError(f"bad part name {rel!r}: use a relative path like 'model/weights.pt' (not "
                         f"'{COMMIT_MARKER}', no '..')")
    return clean


class CommitDamaged(StorageError):
    """A committed set whose parts do not match its marker (missing, another size, another SHA-256)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_parts(local_dir: str | os.PathLike) -> dict[str, PartInfo]:
    """Size and SHA-256 of every file below `local_dir` ({relative path: PartInfo}): hash files where they were
    written, before an upload, so the marker records what the writer meant and not what storage returned."""
    root = Path(local_dir)
    return {p.relative_to(root).as_posix(): PartInfo(p.stat().st_size, _sha256_file(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


def is_committed(prefix: str) -> bool:
    """Whether `prefix` has a commit marker (use `verify` to also check its parts)."""
    return exists(join(prefix, COMMIT_MARKER))


def read_commit(prefix: str) -> CommitInfo:
    """The commit record of `prefix`; `NotCommitted` when it has no marker."""
    marker = join(prefix, COMMIT_MARKER)
    try:
        raw = read_bytes(marker)
    except ObjectNotFound as exc:
        raise NotCommitted(f"read commit {prefix}: not committed (no {COMMIT_MARKER} marker); a writer may still "
                           "be at work or may have died midway.", url=prefix, endpoint=exc.endpoint) from exc
    return CommitInfo.from_json(prefix, raw)


def verify(prefix: str) -> list[str]:
    """Problems with the committed set at `prefix` ([] when whole); `NotCommitted` when it has no marker."""
    return read_commit(prefix).problems(list_files(prefix))


def download_committed(prefix: str, local_dir: str | os.PathLike) -> CommitInfo:
    """Downloads the committed set at `prefix` into `local_dir` and checks every part against its marker: size, and
    the SHA-256 where one is recorded (hashed from the local copy, so nothing is read twice from storage).
    `CommitDamaged` names each part that does not match; `NotCommitted` when there is no marker."""
    info = read_commit(prefix)
    problems = info.problems(list_files(prefix))
    if not problems:
        download_dir(prefix, local_dir)
        root = Path(local_dir)
        for rel, part in sorted(info.parts.items()):
            local = root / rel
            if part.sha256 is not None and _sha256_file(local) != part.sha256:
                problems.append(f"{rel} does not match its SHA-256 ({part.size} bytes, same size: corrupted in "
                                "place)")
    if problems:
        raise CommitDamaged(f"{prefix}: damaged: {'; '.join(problems)}", url=prefix)
    return info


def _write_marker(prefix: str, parts: dict[str, PartInfo], meta: Mapping[str, Any] | None) -> CommitInfo:
    info = CommitInfo(prefix, dict(parts), dict(meta or {}), time.time())
    raw = info.to_json()
    json.loads(raw)  # meta must round-trip; fail here rather than leave an unreadable marker
    write_bytes(join(prefix, COMMIT_MARKER), raw)
    return info


class CommitSet:
    """Writes parts under a prefix, then commits them.

        cs = CommitSet("s3://bucket/run/step-000001000").begin()
        cs.put("model.pt", path_to_file)
        cs.put("state.json", b"{...}")
        cs.commit({"step": 1000})
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.parts: dict[str, PartInfo] = {}
        self._begun = False
        self._committed = False

    def begin(self) -> CommitSet:
        """Refuse a committed prefix; delete leftovers of a writer that died before committing."""
        if is_committed(self.prefix):
            raise AlreadyCommitted(f"write {self.prefix}: already committed. Commits are immutable: write a new "
                                   "prefix, or delete this one first if it must be replaced.", url=self.prefix)
        remove(self.prefix, recursive=True)
        self._begun = True
        return self

    def put(self, rel: str, source: PartSource) -> PartInfo:
        """Write one part from bytes or a local file path."""
        if not self._begun or self._committed:
            raise RuntimeError("CommitSet.put needs begin() first and cannot follow commit()")
        rel = _check_rel(rel)
        url = join(self.prefix, rel)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            write_bytes(url, data)
            part = PartInfo(len(data), hashlib.sha256(data).hexdigest())
        elif isinstance(source, os.PathLike):
            path = Path(source)
            if not path.is_file():
                raise ObjectNotFound(f"commit part {rel}: local file {path} does not exist.", url=str(path))
            part = PartInfo(path.stat().st_size, _sha256_file(path))
            copy_file(str(path.absolute()), url)
        else:
            raise TypeError(f"part {rel!r}: pass bytes or a pathlib.Path, not {type(source).__name__}")
        self.parts[rel] = part
        return part

    def put_dir(self, local_dir: str | os.PathLike, under: str = "") -> None:
        """Write every file below `local_dir` as a part (at `under/relative path`)."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            self.put(f"{under.strip('/')}/{rel}" if under.strip("/") else rel, path)

    def commit(self, meta: Mapping[str, Any] | None = None) -> CommitInfo:
        """Write the marker (last); the set is visible to readers from now on."""
        if not self._begun or self._committed:
            raise RuntimeError("CommitSet.commit needs begin() first and runs once")
        if not self.parts:
            raise ValueError(f"commit {self.prefix}: no parts were written")
        problems = CommitInfo(self.prefix, self.parts).problems(list_files(self.prefix))
        if problems:  # never publish a set we can see is incomplete
            raise StorageError(f"commit {self.prefix}: parts did not land: {'; '.join(problems)}", url=self.prefix)
        info = _write_marker(self.prefix, self.parts, meta)
        self._committed = True
        return info


def write_committed(prefix: str, parts: Mapping[str, PartSource], meta: Mapping[str, Any] | None = None
                    ) -> CommitInfo:
    """Write `parts` ({relative path: bytes or local file}) under `prefix`, then commit them."""
    cs = CommitSet(prefix).begin()
    for rel, source in parts.items():
        cs.put(rel, source)
    return cs.commit(meta)


def commit_existing(prefix: str, meta: Mapping[str, Any] | None = None,
                    expected: Mapping[str, int] | Mapping[str, PartInfo] | None = None) -> CommitInfo:
    """Commit what others already wrote under `prefix` (e.g. each rank's checkpoint shard, after a barrier).

    With `expected` ({relative path: size, or -1 for any size}) the commit fails unless those parts are all there.
    With `expected` as {relative path: PartInfo} (what the writers hashed, see `file_parts`) the marker records
    exactly those parts with their SHA-256, and a file under `prefix` that no writer reported fails the commit
    (something else is writing there) rather than being committed with them.
    """
    prefix = prefix.rstrip("/")
    if is_committed(prefix):
        raise AlreadyCommitted(f"commit {prefix}: already committed.", url=prefix)
    present = {rel: n for rel, n in list_files(prefix).items() if rel != COMMIT_MARKER}
    if not present:
        raise ObjectNotFound(f"commit {prefix}: nothing was written under this prefix.", url=prefix)
    if expected is None:
        return _write_marker(prefix, {rel: PartInfo(n) for rel, n in present.items()}, meta)
    sizes = {rel: e.size if isinstance(e, PartInfo) else e for rel, e in expected.items()}
    missing = [f"{rel} ({'any size' if n < 0 else f'{n} bytes'})" for rel, n in sorted(sizes.items())
               if rel not in present or (n >= 0 and present[rel] != n)]
    if missing:
        raise StorageError(f"commit {prefix}: expected parts are missing or the wrong size: "
                           f"{', '.join(missing)}", url=prefix)
    if not all(isinstance(e, PartInfo) for e in expected.values()):
        return _write_marker(prefix, {rel: PartInfo(n) for rel, n in present.items()}, meta)
    strangers = sorted(set(present) - set(expected))
    if strangers:
        raise StorageError(f"commit {prefix}: files no writer of this commit reported: {', '.join(strangers[:5])}"
                           f"{' ...' if len(strangers) > 5 else ''}; another process is writing here. Nothing was "
                           "committed.", url=prefix)
    return _write_marker(prefix, dict(expected), meta)


def _natural_key(url: str) -> list:
    # step-9 before step-10 even without zero padding
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", url.rstrip("/").rsplit("/", 1)[-1])]


def marked_children(parent_url: str) -> dict[str, list[str]]:
    """Every direct child of `parent_url` with a commit marker, as {URL: its problems} ([] when whole), in natural
    order (`step-9` < `step-10`). An unreadable marker is a problem of its set; a failing store raises."""
    files = list_files(parent_url)  # one recursive listing serves every child's check
    by_child: dict[str, dict[str, int]] = {}
    for rel, n in files.items():
        child, _, rest = rel.partition("/")
        if rest:
            by_child.setdefault(child, {})[rest] = n
    out: dict[str, list[str]] = {}
    for child, present in sorted(by_child.items(), key=lambda item: _natural_key(item[0])):
        if COMMIT_MARKER not in present:
            continue
        url = join(parent_url, child)
        try:
            out[url] = read_commit(url).problems(present)
        except (StorageUnavailable, EndpointUnreachable, AccessDenied, BucketNotFound):
            # The store failed, not the set: skipping it would quietly resume from an older checkpoint.
            raise
        except StorageError as exc:  # an unreadable or vanished marker: this set is broken
            out[url] = [str(exc)]
    return out


def committed_children(parent_url: str, verify_parts: bool = True) -> list[str]:
    """URLs of the direct children of `parent_url` that are committed (and whole, when `verify_parts`), in natural
    order (`step-9` < `step-10`). Uncommitted and half-written sets are left out, and broken ones (see
    `marked_children`) too when `verify_parts`."""
    out = []
    for url, problems in marked_children(parent_url).items():
        if problems and verify_parts:
            log.warning("skipping %s: commit marker present but %s", url, "; ".join(problems))
            continue
        out.append(url)
    return out


def latest_committed(parent_url: str) -> str | None:
    """The last of `committed_children(parent_url)`, or None."""
    children = committed_children(parent_url)
    return children[-1] if children else None

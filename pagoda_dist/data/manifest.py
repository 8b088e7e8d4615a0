"""`manifest.json`: what a shard folder holds (splits, shards, counts, classes, resolution, skipped inputs).

A shard folder is usable only once committed: shards and their indexes first, then `manifest.json`, then the
storage COMMIT marker listing every file with its size (`storage.commit_existing`). Readers refuse an
uncommitted folder, so a prepare or precompute that died midway is never read as a smaller dataset.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pagoda_dist import storage
from pagoda_dist.data.shards import ShardInfo, index_name
from pagoda_dist.data.sources import Skipped

MANIFEST_NAME = "manifest.json"
FORMAT = "pagoda-shards/1"
KINDS = ("images", "latent-pairs")
MAX_LISTED_SKIPS = 1000  # the manifest lists this many skipped inputs; the count is always exact


class ManifestError(ValueError):
    """A shard folder is missing, uncommitted, or its manifest is malformed."""


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that determine a folder's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """The description of one committed shard folder."""

    kind: str                                  # "images" (prepare) or "latent-pairs" (precompute)
    resolution: int                            # side of the stored images, px
    channels: int                              # 1 (grey) or 3 (RGB)
    image_format: str                          # "png" or "jpeg"
    splits: dict[str, list[ShardInfo]]         # split name -> shards in order
    class_names: list[str] | None = None       # class id -> name, or None when unlabelled
    has_captions: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # what produced it (compared on re-runs)
    inputs: int = 0                            # inputs considered
    skipped: list[Skipped] = field(default_factory=list)     # first MAX_LISTED_SKIPS of them
    skipped_count: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)      # e.g. latent shape / teacher of a pair folder
    created: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def count(self, split: str) -> int:
        return sum(s.count for s in self.splits.get(split, []))

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split`; a clear error when the split is absent or empty."""
        shards = self.splits.get(split) or []
        if not shards:
            have = ", ".join(f"{k} ({self.count(k)})" for k in self.splits) or "none"
            raise ManifestError(f"the dataset has no '{split}' samples (splits: {have})")
        return shards

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT, "kind": self.kind, "resolution": self.resolution, "channels": self.channels,
            "image_format": self.image_format, "class_names": self.class_names, "has_captions": self.has_captions,
            "counts": {split: self.count(split) for split in self.splits},
            "splits": {split: [s.to_dict() for s in shards] for split, shards in self.splits.items()},
            "settings": self.settings, "fingerprint": self.fingerprint, "inputs": self.inputs,
            "skipped_count": self.skipped_count,
            "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped[:MAX_LISTED_SKIPS]],
            "notes": self.notes, "extra": self.extra,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return json.dumps(body, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes, where: str = "manifest.json") -> Manifest:
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
            return Manifest(
                kind=body["kind"], resolution=int(body["resolution"]), channels=int(body["channels"]),
                image_format=body["image_format"],
                splits={k: [ShardInfo.from_dict(s) for s in v] for k, v in body["splits"].items()},
                class_names=body.get("class_names"), has_captions=bool(body.get("has_captions")),
                settings=dict(body.get("settings") or {}), inputs=int(body.get("inputs", 0)),
                skipped=[Skipped(s["source"], s["reason"]) for s in body.get("skipped", [])],
                skipped_count=int(body.get("skipped_count", 0)), notes=list(body.get("notes", [])),
                extra=dict(body.get("extra") or {}), created=str(body.get("created", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{where}: not a valid shard manifest ({err})") from None

    def files(self) -> list[str]:
        """Every file the folder must hold besides the manifest: shards and their indexes."""
        return [name for shards in self.splits.values() for s in shards for name in (s.name, index_name(s.name))]


def read_manifest(url: str) -> Manifest:
    """The manifest of the committed shard folder at `url`; ManifestError when absent, uncommitted or damaged."""
    if not storage.is_committed(url):
        hint = ("a prepare or precompute job did not finish there: re-run it"
                if storage.exists(storage.join(url, MANIFEST_NAME)) else
                "nothing was prepared there: run `pagoda prepare SRC OUT` (or check data.shards in the config)")
        raise ManifestError(f"{url} is not a committed shard folder ({hint})")
    problems = storage.verify(url)  # one listing: a shard lost or cut short after the commit shows up here
    if problems:
        raise ManifestError(f"{url} is committed but damaged ({'; '.join(problems[:3])}); re-run the job that "
                            "wrote it (prepare: with overwrite)")
    where = storage.join(url, MANIFEST_NAME)
    return Manifest.from_json(storage.read_bytes(where), where)


def commit_manifest(url: str, manifest: Manifest) -> None:
    """Writes `manifest.json` after the shards, then commits the folder (COMMIT marker listing every file)."""
    storage.write_bytes(storage.join(url, MANIFEST_NAME), manifest.to_json())
    expected = {name: -1 for name in manifest.files()}
    expected.update({s.name: s.bytes for shards in manifest.splits.values() for s in shards})
    expected[MANIFEST_NAME] = -1
    storage.commit_existing(url, meta={"kind": manifest.kind, "fingerprint": manifest.fingerprint},
                            expected=expected)

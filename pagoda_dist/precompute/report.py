"""What a precompute run did: counts, inversion quality (PSNR of sample(invert(x)) vs x, and each shard's latent
std / sigma_max: a faithful inversion of the data gives latents as spread as the prior's N(0, sigma_max^2)),
corrupt samples skipped, cost, failures."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .worker import ShardResult

MAX_LISTED = 20  # shards (latent spread) and corrupt samples the summary names one by one


class PrecomputeError(ValueError):
    """Precompute cannot start: bad inputs, no committed teacher, a missing CLIP file, or foreign output."""


@dataclass(frozen=True)
class Quality:
    """PSNR (dB) of the round trip over the checked subset of every shard."""

    mean: float
    min: float
    n: int

    @staticmethod
    def of(results: list[ShardResult]) -> Quality:
        checked = [r for r in results if r.psnr_n > 0 and not math.isnan(r.psnr_mean)]
        n = sum(r.psnr_n for r in checked)
        if not n:
            return Quality(float("nan"), float("nan"), 0)
        return Quality(sum(r.psnr_mean * r.psnr_n for r in checked) / n, min(r.psnr_min for r in checked), n)

    def to_dict(self) -> dict[str, Any]:
        nan = math.isnan(self.mean)
        return {"mean_db": None if nan else round(self.mean, 3), "min_db": None if nan else round(self.min, 3),
                "images": self.n}


@dataclass
class PrecomputeReport:
    """The outcome of `run_precompute`; `summary()` is what the command prints."""

    pairs_url: str
    reused: bool                                  # the set was committed already with these settings
    shards_total: int
    shards_computed: int
    shards_skipped: int                           # committed by an earlier (interrupted) run
    images_total: int
    images_computed: int
    latents_per_image: int                        # 2 with flip
    network_evals_per_latent: int
    quality: Quality
    elapsed_s: float
    failed: dict[str, str] = field(default_factory=dict)   # input shard -> last error
    actors_started: int = 0
    actor_deaths: int = 0
    retries: int = 0
    peak_actors: int = 0
    text_encoder: dict[str, Any] | None = None
    teacher_url: str = ""
    committed: bool = False                       # the set's manifest and COMMIT marker were written
    shards: list[ShardResult] = field(default_factory=list)  # every committed shard of the set, by name

    @property
    def images_skipped(self) -> int:
        """Corrupt input samples left out of the committed shards."""
        return sum(r.skipped for r in self.shards)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def images_per_s(self) -> float:
        return self.images_computed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        q = self.quality
        psnr = f"{q.mean:.2f} dB mean, {q.min:.2f} dB min over {q.n} images" if q.n else "not measured"
        if self.reused:
            head = f"{self.pairs_url}: already complete (same settings, nothing to do)"
        else:
            head = (f"{self.pairs_url}: {self.shards_computed} shards computed, {self.shards_skipped} already "
                    f"committed, of {self.shards_total}; {self.images_computed} images in {self.elapsed_s:.1f}s "
                    f"({self.images_per_s:.2f} img/s)")
        lines = [head,
                 (f"  {self.images_total} images, {self.latents_per_image} latent(s) each; "
                  f"{self.network_evals_per_latent} teacher evaluations per latent"),
                 f"  inversion PSNR sample(invert(x)) vs x: {psnr}",
                 f"  teacher: {self.teacher_url}"]
        if self.shards:
            lines.append(_latent_spread(self.shards))
        if self.images_skipped:
            listed = [f"{r.name}: {entry}" for r in self.shards for entry in r.skipped_samples]
            lines.append(f"  skipped {self.images_skipped} corrupt input sample(s):")
            lines += [f"    {entry}" for entry in listed[:MAX_LISTED]]
            if self.images_skipped > min(len(listed), MAX_LISTED):
                lines.append(f"    ... and {self.images_skipped - min(len(listed), MAX_LISTED)} more")
        if self.text_encoder is not None:
            flag = " (RANDOMLY INITIALISED, not a trained CLIP)" if self.text_encoder.get("random_init") else ""
            lines.append(f"  text encoder: {self.text_encoder.get('arch')}{flag}")
        if self.actors_started:
            lines.append(f"  actors: {self.actors_started} started (peak {self.peak_actors}), "
                         f"{self.actor_deaths} died, {self.retries} shard retries")
        if self.failed:
            lines.append(f"  FAILED {len(self.failed)} shard(s); the set is not committed:")
            lines += [f"    {name}: {error}" for name, error in sorted(self.failed.items())]
        return "\n".join(lines)


def _latent_spread(shards: list[ShardResult]) -> str:
    """One line: latent std / sigma_max per shard (all of them up to MAX_LISTED, else the range)."""
    values = [(r.name.split("/")[0], r.latent_std) for r in shards if not math.isnan(r.latent_std)]
    if not values:
        return "  latent std / sigma_max: not measured"
    if len(values) <= MAX_LISTED:
        return "  latent std / sigma_max per shard: " + ", ".join(f"{name} {v:.3f}" for name, v in values)
    low, high = min(values, key=lambda x: x[1]), max(values, key=lambda x: x[1])
    mean = sum(v for _, v in values) / len(values)
    return (f"  latent std / sigma_max over {len(values)} shards: mean {mean:.3f}, lowest {low[1]:.3f} ({low[0]}), "
            f"highest {high[1]:.3f} ({high[0]}); each shard's in manifest.json")


class PrecomputeFailed(RuntimeError):
    """Some shards failed after all retries; the others are committed, the set is not. Carries the report."""

    def __init__(self, report: PrecomputeReport) -> None:
        names = ", ".join(sorted(report.failed))
        super().__init__(f"precompute: {len(report.failed)} shard(s) failed after retries: {names}; the other "
                         f"shards are committed and a re-run only redoes the failed ones\n{report.summary()}")
        self.report = report


__all__ = ["PrecomputeError", "PrecomputeFailed", "PrecomputeReport", "Quality"]

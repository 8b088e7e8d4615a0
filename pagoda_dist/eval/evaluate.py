"""`pagoda evaluate`: every stage of a run against held-out real images, at its own resolution.

For each stage: SWD per Laplacian level and FID-EffNetLite0 of N generated images against N real ones (the
teacher with its PF-ODE sampler, the generators in one step), next to the real-vs-real floor (the real set against
eval.floor_images other held-out images) and, for each grown stage, the bicubic-upsampled output of the stage below
from the same noise: growing has to add real detail at the fine levels, not just resample. Conditions (class labels
or text embeddings) are those of the held-out images, so the generated set follows the real one's class balance.
Standard FID joins with `eval.inception_weights` (against held-out images, or `eval.reference_stats`), and CLIP
score (generated image vs the caption it was conditioned on; the real images' own score beside it) for
text-to-image runs with `eval.clip_weights`. Results go to RUN/eval/metrics.json (written last), grids to
RUN/eval/*.png.

The work is cut into slices of image indices (`slices`): scored here one after another, or with eval.workers > 0 on
a pool of Ray actors (`distributed`), with the same numbers either way. Each slice is committed under RUN/eval/slices
as it is scored, so an evaluation stopped on SIGTERM (exit 143) resumes where it stopped; the folder is deleted once
metrics.json is written.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.config import Config
from pagoda_dist.data.grid import save_grid
from pagoda_dist.eval.inputs import bicubic, feature_nets, generate, load_network, read_held_out
from pagoda_dist.eval.metrics import Reference, compare, reference
from pagoda_dist.eval.slices import Executor, InProcess, assemble, grids, make_plan
from pagoda_dist.eval.swd import PatchSampling
from pagoda_dist.interfaces import Condition
from pagoda_dist.runtime import preemption

__all__ = ["HeldOut", "Scorer", "bicubic", "evaluate_run", "generate", "held_out", "load_network"]


@dataclass
class HeldOut:
    """Two disjoint real sets at the full resolution and the conditions (and captions) of the first, which the
    generated set reuses."""

    real: Tensor
    real_floor: Tensor
    condition: Condition
    captions: list[str] | None = None


def held_out(cfg: Config, count: int, floor: int | None = None) -> HeldOut:
    """The first `count` held-out samples (evaluation order) and the `floor` after them (default: `count`)."""
    floor = count if floor is None else floor
    data = read_held_out(cfg, 0, count + floor)
    cond = data.condition[:count] if not data.condition.is_empty else data.condition
    captions = data.captions[:count] if data.captions is not None else None
    return HeldOut(data.images[:count], data.images[count:], cond, captions)


class Scorer:
    """Every metric the config asks for, of image sets held in memory, with the networks loaded once: SWD per level
    and FID-EffNetLite0 always, standard FID with Inception weights, CLIP score for text-to-image."""

    def __init__(self, cfg: Config) -> None:
        self.seed = cfg.run.seed
        self.nets = feature_nets(cfg)
        self._references: dict[int, tuple[Tensor, Reference]] = {}

    def _reference(self, real: Tensor) -> Reference:
        """The statistics of a real set, computed once: every set scored against it reuses them."""
        if id(real) not in self._references:
            ref = reference(self.nets.features(real, PatchSampling(self.seed, 0, len(real))))
            self._references[id(real)] = (real, ref)  # holding `real` keeps its id from being reused
        return self._references[id(real)][1]

    def __call__(self, real: Tensor, fake: Tensor, captions: list[str] | None = None) -> dict[str, float]:
        """Metrics of `fake` against `real`; CLIP score pairs fake image i with caption i."""
        other = self.nets.features(fake, PatchSampling(self.seed, 1, len(fake)), captions=captions)
        return compare(self._reference(real), self.seed, other)


@contextlib.contextmanager
def executor(cfg: Config) -> Iterator[Executor]:
    """Where the slices are scored: this process (eval.workers 0), or a pool of Ray actors on the configured
    cluster (a local Ray is started, and stopped after, when none is running)."""
    workers = cfg.eval.workers
    if workers == 0:
        yield InProcess()
        return
    import ray

    from pagoda_dist.eval.distributed import RayPool
    from pagoda_dist.runtime.ray_session import ensure_ray

    started = ensure_ray(cfg, workers * cfg.runtime.cpus_per_worker)
    try:
        yield RayPool(workers)
    finally:
        if started:
            ray.shutdown()


def evaluate_run(cfg: Config) -> dict[str, Any]:
    """Evaluates every committed stage of the run; writes RUN/eval/metrics.json and grids; returns the metrics."""
    plan = make_plan(cfg)
    kept = len(storage.committed_children(plan.slices_url)) if plan.slices_url else 0
    if kept:
        print(f"[evaluate] {kept} of {len(plan.slices)} slices committed by an earlier evaluation: loading them from "
              f"{plan.slices_url}", flush=True)
    # The handler goes in after the executor's ray.init, which installs its own: SIGTERM stops between slices.
    with executor(cfg) as ex, preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s):
        parts = ex.score_slices(plan)
        results = assemble(plan, parts, ex)
        images = grids(plan, parts, ex)
    eval_url = storage.join(cfg.run_url, "eval")
    for name, entry in results["stages"].items():
        storage.write_bytes(storage.join(eval_url, f"{name}.png"), save_grid(images[name]))
        print(f"[evaluate] {name} ({entry['resolution']}px): " + _line(entry["metrics"])
              + (f" | bicubic from below: {_line(entry['bicubic_from_below'])}" if "bicubic_from_below" in entry
                 else ""), flush=True)
    storage.write_bytes(storage.join(eval_url, "real.png"), save_grid(images["real"]))
    storage.write_bytes(storage.join(eval_url, "metrics.json"), json.dumps(results, indent=1).encode())
    storage.remove(storage.join(eval_url, "slices"), recursive=True)  # with any older plan's slices
    return results


def _line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())

"""One evaluation cut into slices of image indices, each scored wherever it runs, and put back together.

Every set an evaluation compares (the real images and the floor set at each resolution, each stage's samples, each
grown stage's bicubic baseline) is indexed 0 .. N-1 in the same order: image i of every stage comes from noise i
and condition i, the condition of held-out image i. A slice [start, stop) reads its own held-out images, draws its
own noise, generates every stage's samples for it and reduces each set to `SetFeatures`; only those leave the
process. `assemble` turns the slices' features, taken in slice order, into the rows of metrics.json.

What a slice computes depends on its bounds alone (never on which process scores it, or how many do), so the metrics
are the same for any number of workers. The reductions are the same code in this process and in Ray's one-CPU
tasks; only the Frechet distances can differ between the two, by float rounding, as BLAS sums covariance products
and LAPACK finds eigenvalues differently on another number of threads. With one slice (eval.num_images <=
eval.images_per_task) every network runs on exactly the batches the earlier single-process evaluation used.

Each slice's outputs are committed under the run (`Plan.slices_url`, named by a fingerprint of everything a slice's
content depends on) by whoever scores it, as soon as it is scored; a later evaluation of the same plan loads them
instead of scoring them again, so an evaluation stopped on SIGTERM resumes where it stopped, with the same numbers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.chain import StageKind, chain
from pagoda_dist.config import Config, to_dict
from pagoda_dist.data.tensors import downsample
from pagoda_dist.eval.fid import FeatureStats
from pagoda_dist.eval.inputs import bicubic, feature_nets, generate, load_export_network, read_held_out
from pagoda_dist.eval.metrics import SetFeatures, compare, reference
from pagoda_dist.eval.swd import PatchSampling, descriptors
from pagoda_dist.runtime import CheckpointStore, preemption
from pagoda_dist.storage.commit import CommitDamaged
from pagoda_dist.storage.errors import NotCommitted

SKIP_CHUNK = 1 << 24  # uniform draws per step when the noise generator skips ahead (64 MB of scratch)
Key = tuple[str, Any]  # what one output of a slice is: ("real", res), ("stage", name), ("grid", name), ...
PAYLOAD = "slice.pt"  # the one part of a committed slice
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageJob:
    """A stage to evaluate, pinned to the export the driver found, so every slice scores the same checkpoint."""

    name: str
    kind: StageKind
    resolution: int
    export_url: str


@dataclass(frozen=True)
class Plan:
    """Everything a slice needs, fixed by the driver before any slice runs."""

    cfg: Config
    stages: tuple[StageJob, ...]
    slices: tuple[tuple[int, int], ...]                   # [start, stop) image indices
    noise_states: tuple[Tensor, ...]                      # the noise generator's state at each slice's start
    reference_urls: dict[int, str] = field(default_factory=dict)  # resolution -> FID reference statistics
    slices_url: str | None = None  # where each scored slice is committed (`SliceScorer`); None: nowhere

    @property
    def resolutions(self) -> list[int]:
        """The resolutions of the stages, each once, in chain order."""
        return list(dict.fromkeys(job.resolution for job in self.stages))

    def keys(self) -> list[Key]:
        """The outputs of every slice, in a fixed order (a Ray task returns them as that many objects)."""
        keys: list[Key] = [("seconds", None), ("grid", "real")]
        for res in self.resolutions:
            keys.append(("real", res))
            if self.cfg.eval.floor_count:
                keys += [("floor", res), ("real-vs-floor", res)]
        below = None  # the last one-step stage: a grown stage is compared with its bicubic upsampling
        for job in self.stages:
            keys += [("stage", job.name), ("grid", job.name)]
            if job.kind == "grow" and below is not None:
                keys.append(("bicubic", job.name))
            if job.kind != "teacher":
                below = job
        return keys


def make_plan(cfg: Config) -> Plan:
    """The plan of evaluating `cfg`'s run: its stages' latest exports, the slices and their noise states."""
    stages = tuple(StageJob(spec.name, spec.kind, spec.resolution,
                            CheckpointStore(cfg.run_url, spec.name).latest_export()[0]) for spec in chain(cfg))
    n, size = cfg.eval.num_images, cfg.eval.images_per_task
    slices = tuple((start, min(start + size, n)) for start in range(0, n, size))
    c, r = cfg.model.in_channels, cfg.model.resolution
    states = noise_states(cfg.run.seed + 1, c * r * r, [start for start, _ in slices])
    url = cfg.eval.reference_stats
    final = stages[-1].resolution
    references = {} if url is None else {res: url.format(resolution=res) for res in {j.resolution for j in stages}
                                         if "{resolution}" in url or res == final}
    kept = storage.join(cfg.run_url, "eval", "slices", fingerprint(cfg, stages, slices))
    return Plan(cfg, stages, slices, tuple(states), references, kept)


def fingerprint(cfg: Config, stages: tuple[StageJob, ...], slices: tuple[tuple[int, int], ...]) -> str:
    """A name for what the slices of this evaluation hold: it changes with the config (every key but eval.workers:
    a slice is the same on any number of workers), each stage's export (its checkpoint's commit record: the step,
    the parts' sizes and hashes, when it was committed) and the slice bounds. The noise states follow from these."""
    settings = to_dict(cfg)
    settings["eval"].pop("workers")
    exports = {job.name: [job.export_url, storage.read_commit(job.export_url.rsplit("/", 1)[0]).to_json().decode()]
               for job in stages}
    body = json.dumps({"config": settings, "exports": exports, "slices": slices}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def noise_states(seed: int, per_image: int, starts: list[int]) -> list[Tensor]:
    """The state of the noise generator (seeded `seed`) at each image index in `starts` (increasing): restored, it
    draws for images start, start + 1, ... what one torch.randn over all images draws for them.

    torch's CPU randn of float32 turns uniform draws into normals in blocks of 16 (Box-Muller) and consumes exactly one
    32-bit draw per element when a tensor holds a multiple of 16 elements, as uniform_ does; so skipping k images is
    k * per_image uniform draws. tests/test_eval_scale.py holds torch to this.
    """
    if per_image % 16:
        raise ValueError(f"noise of {per_image} values per image: skipping ahead needs a multiple of 16")
    g = torch.Generator().manual_seed(seed)
    scratch = torch.empty(min(SKIP_CHUNK, max(starts, default=0) * per_image))
    states, at = [], 0
    for start in starts:
        skip = (start - at) * per_image
        while skip > 0:
            scratch[: min(skip, SKIP_CHUNK)].uniform_(generator=g)
            skip -= SKIP_CHUNK
        states.append(g.get_state())
        at = start
    return states


class SliceScorer:
    """Scores slices of one plan in this process, with the feature networks and each stage's network loaded once."""

    def __init__(self, plan: Plan, device: str | torch.device = "cpu") -> None:
        self.plan, self.device = plan, device
        self.keys = set(plan.keys())
        self.nets = feature_nets(plan.cfg, device)
        self._networks: dict[str, torch.nn.Module] = {}

    def network(self, job: StageJob) -> torch.nn.Module:
        if job.name not in self._networks:
            self._networks[job.name] = load_export_network(job.export_url).to(self.device)
        return self._networks[job.name]

    def __call__(self, index: int) -> dict[Key, Any]:
        """The outputs of slice `index`: as committed by an earlier evaluation of the plan, else scored and
        committed now (`Plan.slices_url`; scored only, when it is None)."""
        url = None if self.plan.slices_url is None else storage.join(self.plan.slices_url, f"slice-{index:05d}")
        out = None if url is None else load_slice(self.plan, url)
        if out is None:
            out = self.compute(index)
            if url is not None:
                storage.write_committed(url, {PAYLOAD: encode(self.plan, out)}, {"bounds": self.plan.slices[index]})
        return out

    @torch.no_grad()
    def compute(self, index: int) -> dict[Key, Any]:
        """Every output of slice `index` (see `Plan.keys`): the features of each set, the grid images it holds, and
        the seconds it spent generating each stage's samples."""
        plan, cfg = self.plan, self.plan.cfg
        start, stop = plan.slices[index]
        e, seed, grid = cfg.eval, cfg.run.seed, cfg.logging.grid_size ** 2
        floor_n, swd_n = e.floor_count, e.swd_count
        floor_here = max(0, min(stop, floor_n) - start)  # how many of this slice's indices the floor set has
        held = read_held_out(cfg, start, stop - start)
        floor_images = read_held_out(cfg, e.num_images + start, floor_here).images if floor_here else None
        g = torch.Generator()
        g.set_state(plan.noise_states[index])
        c, r = cfg.model.in_channels, cfg.model.resolution
        noise = torch.randn(stop - start, c, r, r, generator=g).to(self.device)
        condition = held.condition.to(self.device)
        features = self.nets.features

        out: dict[Key, Any] = {("grid", "real"): held.images[: max(0, grid - start)]}
        for res in plan.resolutions:
            real = downsample(held.images, res)
            # The real images' captions score the real CLIP score, which the floor row reports.
            feats = features(real, PatchSampling(seed, 0, swd_n), start, held.captions if floor_n else None)
            out[("real", res)] = feats
            if floor_n:
                # The floor compares the floor set (the reference) with as many real images (the compared set).
                size = min(floor_n, swd_n)
                own_fid = res not in plan.reference_urls  # a reference file stands in for the floor set's FID side
                out[("floor", res)] = out[("real-vs-floor", res)] = None
                if floor_here:
                    out[("floor", res)] = features(downsample(floor_images, res), PatchSampling(seed, 0, size), start,
                                                   inception=own_fid)
                    out[("real-vs-floor", res)] = feats.head(
                        floor_here, descriptors(real[:floor_here], PatchSampling(seed, 1, size), start))
        seconds: dict[str, float] = {}
        below: Tensor | None = None  # the samples of the last one-step stage, for the bicubic baseline
        for job in plan.stages:
            began = time.perf_counter()
            fake = generate(cfg, self.network(job), noise, condition).cpu()
            seconds[job.name] = time.perf_counter() - began
            out[("stage", job.name)] = features(fake, PatchSampling(seed, 1, swd_n), start, held.captions)
            out[("grid", job.name)] = fake[: max(0, grid - start)]
            if ("bicubic", job.name) in self.keys:
                out[("bicubic", job.name)] = features(bicubic(below, job.resolution), PatchSampling(seed, 1, swd_n),
                                                      start, held.captions)
            if job.kind != "teacher":
                below = fake
        out[("seconds", None)] = seconds
        return out


def encode(plan: Plan, out: dict[Key, Any]) -> bytes:
    """A slice's outputs as torch.save bytes of tensors, numbers and strings only (loadable with weights_only)."""
    def value(v: Any) -> Any:
        if isinstance(v, SetFeatures):
            arrays = {"effnet": v.effnet, "inception": v.inception, "clip": v.clip}
            return {"heights": list(v.heights), "swd": [torch.tensor(a) for a in v.swd],
                    **{k: None if a is None else torch.tensor(a) for k, a in arrays.items()}}
        return v.clone() if isinstance(v, Tensor) else v  # a clone: a view would save its whole storage
    keys, buf = plan.keys(), io.BytesIO()
    torch.save({"keys": [list(key) for key in keys], "values": [value(out[key]) for key in keys]}, buf)
    return buf.getvalue()


def decode(plan: Plan, raw: dict[str, Any]) -> dict[Key, Any]:
    """The outputs `encode` saved (ValueError when they are not those of this plan's slices)."""
    keys = plan.keys()
    if raw.get("keys") != [list(key) for key in keys]:
        raise ValueError(f"it holds the outputs {raw.get('keys')}, the plan's slices have {keys}")

    def value(key: Key, v: Any) -> Any:
        if key[0] in ("seconds", "grid") or v is None:
            return v

        def array(t: Tensor | None) -> np.ndarray | None:
            return None if t is None else t.numpy()
        return SetFeatures(v["heights"], v["effnet"].numpy(), array(v["inception"]), [t.numpy() for t in v["swd"]],
                           array(v["clip"]))
    return {key: value(key, v) for key, v in zip(keys, raw["values"])}


def load_slice(plan: Plan, url: str) -> dict[Key, Any] | None:
    """The outputs committed at `url`, or None when there are none or they fail their SHA-256 (then they are
    deleted, to be scored and committed again)."""
    if not storage.is_committed(url):
        return None
    with tempfile.TemporaryDirectory(prefix="pagoda-slice-") as tmp:
        try:
            storage.download_committed(url, tmp)
            return decode(plan, torch.load(Path(tmp) / PAYLOAD, weights_only=True))
        except (CommitDamaged, NotCommitted, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            log.warning("evaluation slice %s is not usable (%s); scoring it again", url, err)
    storage.remove(url, recursive=True)
    return None


class Executor(Protocol):
    """Where slices are scored and their features reduced: this process, or a Ray cluster (`distributed`)."""

    def score_slices(self, plan: Plan) -> dict[Key, list[Any]]:
        """Every slice's outputs, per key, in slice order (values, or handles that `get` resolves)."""

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs fn(*args, **kwargs) where the features are (handles among `args` resolved first); its handle."""

    def get(self, handles: dict[Any, Any]) -> dict[Any, Any]:
        """The values of a dict of handles."""


class InProcess:
    """Scores every slice here, one after another (eval.workers 0)."""

    def score_slices(self, plan: Plan) -> dict[Key, list[Any]]:
        scorer = SliceScorer(plan)
        keys = plan.keys()
        parts: dict[Key, list[Any]] = {key: [] for key in keys}
        for index in range(len(plan.slices)):
            stop_if_requested(index, len(plan.slices))
            out = scorer(index)
            for key, values in parts.items():
                values.append(out[key])
        return parts

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def get(self, handles: dict[Any, Any]) -> dict[Any, Any]:
        return handles


def stop_if_requested(done: int, total: int) -> None:
    """Raises preemption.Stopped on a stop request (SIGTERM), between slices. Scored slices are committed as they
    are scored (`SliceScorer`): the same command loads them and scores the rest."""
    if preemption.stop_requested():
        raise preemption.Stopped(f"evaluation stopped on SIGTERM after {done} of {total} slices, which are "
                                 "committed; run the same command to score the rest")


def reference_stats(url: str) -> FeatureStats:
    """FID reference statistics from a .npz at any storage URL (read in place: only its two arrays travel)."""
    if not storage.exists(url):
        raise FileNotFoundError(f"eval.reference_stats: {url} does not exist; upload the statistics there or fix "
                                "the URL")
    with storage.open_url(url) as f:
        return FeatureStats.load(f, name=url)


def assemble(plan: Plan, parts: dict[Key, list[Any]], ex: Executor) -> dict[str, Any]:
    """The metrics of every stage, floor and baseline from the slices' outputs (reductions run through `ex`)."""
    cfg = plan.cfg
    e, seed = cfg.eval, cfg.run.seed
    floor_slices = sum(start < e.floor_count for start, _ in plan.slices)  # the slices that hold floor images
    rows: dict[Key, Any] = {}
    references: dict[int, Any] = {}  # per resolution, the real set's reference, computed once
    for res in plan.resolutions:
        url = plan.reference_urls.get(res)
        file_stats = None if url is None else reference_stats(url)
        references[res] = ex.call(reference, *parts[("real", res)], inception=file_stats)
        if e.floor_count:
            floor = ex.call(reference, *parts[("floor", res)][:floor_slices], inception=file_stats)
            rows[("floor", res)] = ex.call(compare, floor, seed, *parts[("real-vs-floor", res)][:floor_slices])
    for job in plan.stages:
        for kind in ("stage", "bicubic"):
            if (kind, job.name) in parts:
                rows[(kind, job.name)] = ex.call(compare, references[job.resolution], seed, *parts[(kind, job.name)])
    values = ex.get(rows)
    seconds = ex.get(dict(enumerate(parts[("seconds", None)])))
    results: dict[str, Any] = {"num_images": e.num_images, "floor_images": e.floor_count,
                               "real_set": f"{cfg.pairs_url} (val)", "stages": {}, "floor": {}}
    if e.inception_weights:  # say which reference statistics the FID figures use
        results["fid_reference"] = {res: plan.reference_urls.get(res, "held-out real images")
                                    for res in plan.resolutions}
    for res in plan.resolutions:
        if ("floor", res) in values:
            results["floor"][res] = values[("floor", res)]
    for job in plan.stages:
        entry: dict[str, Any] = {"resolution": job.resolution,
                                 "generate_s": sum(s[job.name] for s in seconds.values()),
                                 "metrics": values[("stage", job.name)]}
        if ("bicubic", job.name) in values:
            entry["bicubic_from_below"] = values[("bicubic", job.name)]
        results["stages"][job.name] = entry
    return results


def grids(plan: Plan, parts: dict[Key, list[Any]], ex: Executor) -> dict[str, Tensor]:
    """The first grid_size^2 images of the real set and of each stage, gathered from the slices that hold them."""
    grid = plan.cfg.logging.grid_size ** 2
    holding = sum(start < grid for start, _ in plan.slices)
    names = ["real", *(job.name for job in plan.stages)]
    images = ex.get({(name, i): parts[("grid", name)][i] for name in names for i in range(holding)})
    return {name: torch.cat([images[(name, i)] for i in range(holding)]) for name in names}


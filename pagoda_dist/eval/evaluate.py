"""`pagoda evaluate`: every stage of a run against held-out real images, at its own resolution.

For each stage: SWD per Laplacian level and FID-EffNetLite0 of N generated images against N real ones (the
teacher with its PF-ODE sampler, the generators in one step), next to the real-vs-real floor (two disjoint real
sets) and, for each grown stage, the bicubic-upsampled output of the stage below from the same noise: growing has
to add real detail at the fine levels, not just resample. Conditions (class labels or text embeddings) are those
of the held-out images, so the generated set follows the real one's class balance. Standard FID joins when
`eval.inception_weights` names a local Inception file, and CLIP score (generated image vs the caption it was
conditioned on; the real images' own score beside it) for text-to-image runs with `eval.clip_weights`. Results go
to RUN/eval/metrics.json (written last), sample grids to RUN/eval/*.png.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.config import Config
from pagoda_dist.data.tensors import downsample
from pagoda_dist.eval.clip_score import clip_score, load_clip
from pagoda_dist.eval.fid import FeatureStats, effnet_features, frechet_distance, inception_features
from pagoda_dist.eval.grid import save_grid
from pagoda_dist.eval.metrics import image_metrics
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.models.efficientnet_lite0 import load_efficientnet_lite0
from pagoda_dist.models.generator import with_sampling_guidance
from pagoda_dist.stages import TeacherStage, grow_stage_name, network_from_export


@dataclass
class HeldOut:
    """Two disjoint real sets at the full resolution and the conditions (and captions) of the first, which the
    generated set reuses."""

    real: Tensor
    real_floor: Tensor
    condition: Condition
    captions: list[str] | None = None


class Scorer:
    """Every metric the config asks for, with its networks loaded once: SWD per level and FID-EffNetLite0 always,
    standard FID with local Inception weights, CLIP score for text-to-image with local (or explicitly random) CLIP."""

    def __init__(self, cfg: Config) -> None:
        e = cfg.eval
        self.seed = cfg.run.seed
        self.effnet = load_efficientnet_lite0(e.effnet_weights)
        self.inception = None
        if e.inception_weights:
            from pagoda_dist.eval.inception import load_fid_inception

            self.inception = load_fid_inception(e.inception_weights)
        self.clip = None
        if cfg.model.text_dim and (e.clip_weights or e.clip_random_init):
            self.clip = load_clip(e.clip_model, e.clip_weights, random_init=e.clip_random_init)
        self._references: dict[int, tuple[Tensor, FeatureStats, FeatureStats | None]] = {}

    def _reference_stats(self, real: Tensor) -> tuple[FeatureStats, FeatureStats | None]:
        """EfficientNet (and Inception) statistics of a real set, computed once: every stage and checkpoint scored
        against the same set reuses them."""
        if id(real) not in self._references:
            effnet = FeatureStats.of(effnet_features(real, self.effnet))
            inception = None if self.inception is None else FeatureStats.of(inception_features(real, self.inception))
            self._references[id(real)] = (real, effnet, inception)  # holding `real` keeps its id from being reused
        return self._references[id(real)][1:]

    def __call__(self, real: Tensor, fake: Tensor, captions: list[str] | None = None) -> dict[str, float]:
        """Metrics of `fake` against `real`; CLIP score pairs fake image i with caption i."""
        effnet_stats, inception_stats = self._reference_stats(real)
        out = image_metrics(real, fake, seed=self.seed, effnet=self.effnet, real_stats=effnet_stats)
        if inception_stats is not None:
            out["FID"] = frechet_distance(inception_stats, FeatureStats.of(inception_features(fake, self.inception)))
        if self.clip is not None and captions is not None:
            out["CLIP score"] = clip_score(fake, captions, *self.clip)
        return out


def stage_names(cfg: Config) -> list[str]:
    return ["teacher", "distill", *[grow_stage_name(r) for r in cfg.grow.resolutions]]


def stage_resolution(cfg: Config, stage: str) -> int:
    return int(stage.split("-")[1]) if stage.startswith("grow-") else cfg.model.resolution


def held_out(cfg: Config, count: int) -> HeldOut:
    """2 x `count` validation samples of the latent-pair set (full-resolution images with their conditions)."""
    from pagoda_dist.data.reader import StreamingReader

    mode = "class" if cfg.model.num_classes else "text" if cfg.model.text_dim else "none"
    reader = StreamingReader(cfg.pairs_url, batch_size=min(2 * count, 256), split="val", condition=mode,
                             seed=cfg.run.seed, shuffle_window=cfg.data.shuffle_buffer)
    if 2 * count > reader.samples_per_epoch:
        raise ValueError(f"eval.num_images={count} needs {2 * count} held-out images; {cfg.pairs_url} has "
                         f"{reader.samples_per_epoch} in its 'val' split: lower eval.num_images")
    images, conditions, captions, have = [], [], [], 0
    for batch in reader:
        images.append(batch.image)
        conditions.append(batch.condition)
        captions.extend(batch.captions or [])
        have += len(batch)
        if have >= 2 * count:
            break
    x = torch.cat(images)[: 2 * count]
    cond = Condition.cat(conditions)[:count] if not conditions[0].is_empty else Condition()
    return HeldOut(x[:count], x[count:], cond, captions[:count] if len(captions) >= count else None)


def load_network(cfg: Config, stage: str) -> torch.nn.Module:
    """The EMA network of a stage's latest committed checkpoint."""
    from pagoda_dist.pipeline import stage_export_url
    from pagoda_dist.runtime import load_export

    url = stage_export_url(cfg, stage)
    return network_from_export(load_export(url), source=url).eval()


@torch.no_grad()
def generate(cfg: Config, stage: str, net: torch.nn.Module, noise: Tensor, condition: Condition,
             batch_size: int = 250, guidance: float | None = None) -> Tensor:
    """Images in [-1, 1] from unit base-resolution `noise`: the teacher's sampler, or one generator step.

    guidance: the classifier-free guidance scale (None: teacher.sampler.guidance) of the teacher's sampler, and the
    input of a guidance-aware generator; other generators have none and sample as they were trained.
    """
    w = cfg.teacher.sampler.guidance if guidance is None else guidance
    teacher = TeacherStage(cfg, net) if stage == "teacher" else None
    out = []
    for i in range(0, len(noise), batch_size):
        z, c = noise[i:i + batch_size], condition[i:i + batch_size] if not condition.is_empty else condition
        if teacher is not None:
            out.append(teacher.sample(net, z, c, guidance=w))
        else:
            out.append(net(z * cfg.diffusion.sigma_max, with_sampling_guidance(net, c, w)).clamp(-1, 1))
    return torch.cat(out)


def bicubic(images: Tensor, resolution: int) -> Tensor:
    return F.interpolate(images, size=resolution, mode="bicubic", align_corners=False).clamp(-1, 1)


def evaluate_run(cfg: Config) -> dict[str, Any]:
    """Evaluates every committed stage of the run; writes RUN/eval/metrics.json and grids; returns the metrics."""
    n = cfg.eval.num_images
    data = held_out(cfg, n)
    score = Scorer(cfg)
    g = torch.Generator().manual_seed(cfg.run.seed + 1)
    channels, base = cfg.model.in_channels, cfg.model.resolution
    noise = torch.randn(n, channels, base, base, generator=g)
    eval_url = storage.join(cfg.run_url, "eval")
    results: dict[str, Any] = {"num_images": n, "real_set": f"{cfg.pairs_url} (val)", "stages": {}, "floor": {}}
    previous: Tensor | None = None
    reals: dict[int, tuple[Tensor, Tensor]] = {}  # one real set per resolution: its feature statistics are reused
    for stage in stage_names(cfg):
        res = stage_resolution(cfg, stage)
        if res not in reals:
            reals[res] = downsample(data.real, res), downsample(data.real_floor, res)
        real, floor = reals[res]
        if res not in results["floor"]:
            # real vs real; the first set plays "generated" so that its own captions give the real CLIP score
            results["floor"][res] = score(floor, real, data.captions)
        start = time.time()
        fake = generate(cfg, stage, load_network(cfg, stage), noise, data.condition)
        seconds = time.time() - start
        entry: dict[str, Any] = {"resolution": res, "generate_s": seconds,
                                 "metrics": score(real, fake, data.captions)}
        if stage.startswith("grow-") and previous is not None:
            entry["bicubic_from_below"] = score(real, bicubic(previous, res), data.captions)
        results["stages"][stage] = entry
        grid = cfg.logging.grid_size ** 2
        storage.write_bytes(storage.join(eval_url, f"{stage}.png"), save_grid(fake[:grid]))
        print(f"[evaluate] {stage} ({res}px): " + _line(entry["metrics"])
              + (f" | bicubic from below: {_line(entry['bicubic_from_below'])}" if "bicubic_from_below" in entry
                 else ""), flush=True)
        if stage != "teacher":
            previous = fake
    storage.write_bytes(storage.join(eval_url, "real.png"), save_grid(data.real[: cfg.logging.grid_size ** 2]))
    storage.write_bytes(storage.join(eval_url, "metrics.json"), json.dumps(results, indent=1).encode())
    return results


def _line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())

"""`pagoda run CONFIG --dry-run`: what a run would do and cost, before any cluster time is spent.

Validates the config (already done by loading it), then lays out every step of the chain: resolution, images,
global and per-rank batch, optimizer steps, parameters (all and trainable) and training FLOPs per image and in
total, plus the teacher's saving from training at the base resolution. Networks are built on torch's meta device,
so a paper-scale config (a 300M-parameter UNet, a generator grown to 512 px) is laid out in seconds on a laptop.
Nothing is started, read from storage or written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagoda_dist.config import Config
from pagoda_dist.eval.report import adversarial_networks, compute_ledger, unet
from pagoda_dist.stages import grow_stage_name


@dataclass
class StageLine:
    name: str
    resolution: int
    kimg: float
    batch: int
    params: int
    trainable: int
    flops_per_image: float

    @property
    def steps(self) -> int:
        return int(round(self.kimg * 1000 / self.batch))

    @property
    def total_flops(self) -> float:
        return self.flops_per_image * self.kimg * 1000


def _count(*nets: nn.Module | None) -> tuple[int, int]:
    params = [p for net in nets if net is not None for p in net.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def stage_lines(cfg: Config, ledger: dict[str, Any]) -> list[StageLine]:
    """One line per training stage of `compute_ledger`'s stages, with parameter counts (built on the meta device)."""
    names = ["teacher", "distill", *(grow_stage_name(r) for r in cfg.grow.resolutions)]
    lines = []
    for name in names:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # see eval.report
            nets = (unet(cfg, cfg.model.resolution),) if name == "teacher" else \
                adversarial_networks(cfg, ledger[name]["resolution"])
        params, trainable = _count(*nets)
        train = cfg.train_config(name)
        lines.append(StageLine(name, ledger[name]["resolution"], train.total_kimg, train.batch_size, params,
                               trainable, ledger[name]["flops_per_image"]))
    return lines


def _text_to_image_lines(cfg: Config) -> list[str]:
    """The paper's text-to-image additions a config turns on, one line each (none when off)."""
    adv, lines = cfg.distill.adversarial, []
    if adv.guidance_range:
        low, high = adv.guidance_range
        lines.append(f"  guidance:   guidance-aware generator, w ~ U[{low:g}, {high:g}] against the teacher's guided "
                     f"samples (x{adv.distill_loss_weight:g}); samples at w = {cfg.teacher.sampler.guidance:g}")
    weights = [f"x{a.clip_loss_weight:g} ({name})" for name, a in (("distill", adv), ("grow", cfg.grow.adversarial))
               if a.clip_loss_weight > 0]
    if weights:
        lines.append(f"  clip reg.:  {', '.join(weights)}, image tower of {cfg.precompute.clip_model}")
    return lines


def describe(cfg: Config, source: str) -> str:
    """The dry-run report as text."""
    r, m, pre = cfg.runtime, cfg.model, cfg.precompute
    ranks = r.num_workers
    ledger = compute_ledger(cfg, {})
    out = [f"[pagoda] dry run of {source}: the config is valid; nothing was started, read or written",
           f"  run:        {cfg.run_url}",
           f"  data:       {cfg.data.source or '(prepared)'} -> {cfg.shards_url} at {cfg.data.resolution}px"
           + (f", at most {cfg.data.limit} images" if cfg.data.limit else ""),
           f"  pairs:      {cfg.pairs_url}",
           f"  cluster:    {r.ray_address or 'local Ray'}; {ranks} worker(s) x "
           f"{'1 GPU' if r.use_gpu else f'{r.cpus_per_worker:g} CPU'}, ZeRO-{r.zero_stage}, {r.precision}",
           f"  condition:  " + (f"{m.num_classes} classes" if m.num_classes else
                                f"CLIP text ({pre.clip_model}, width {m.text_dim})" if m.text_dim else "none"),
           *_text_to_image_lines(cfg),
           "",
           f"  {'stage':<10} {'px':>4} {'kimg':>9} {'batch':>6} {'per rank':>8} {'steps':>9} {'params':>9} "
           f"{'trainable':>9} {'GFLOP/img':>10} {'PFLOP':>9}"]
    for line in stage_lines(cfg, ledger["stages"]):
        train = cfg.train_config(line.name)
        per_rank = line.batch // (ranks * train.grad_accum)
        out.append(f"  {line.name:<10} {line.resolution:>4} {line.kimg:>9g} {line.batch:>6} {per_rank:>8} "
                   f"{line.steps:>9} {line.params / 1e6:>8.1f}M {line.trainable / 1e6:>8.1f}M "
                   f"{line.flops_per_image / 1e9:>10.2f} {line.total_flops / 1e15:>9.3g}")
    inv = ledger["stages"]["precompute"]
    images = "each training image" + (f" (<= {cfg.data.limit})" if cfg.data.limit else "")
    out.append(f"  {'precompute':<10} {m.resolution:>4} {images}: {pre.solver} {pre.steps} points = "
               f"{inv['nfe_per_image']} network evaluations, {inv['flops_per_image'] / 1e9:.2f} GFLOP"
               + (" (x2 with flips)" if pre.flip else "") + f"; {pre.min_actors}-{pre.max_actors} actors")
    saving = ledger["teacher_saving"]
    out += ["  (params: every network of the stage, the generator and its discriminator where it has one; "
            "trainable: what the optimizers update)",
            "", f"  teacher training FLOPs per image: {saving['teacher_flops_per_image_at_base'] / 1e9:.2f} G at "
                f"{m.resolution}px vs {saving['teacher_flops_per_image_at_final'] / 1e9:.2f} G for the same network "
                f"at {saving['final_resolution']}px: {saving['ratio']:.1f}x saved by the low-resolution teacher"]
    return "\n".join(out)

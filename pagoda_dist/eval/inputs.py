"""What an evaluation reads and generates, in whichever process scores: held-out images by index, the networks
of a run's stages and their samples, and the feature networks (weights from a local path or any storage URL)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pagoda_dist.config import Config
from pagoda_dist.eval.clip_score import load_clip
from pagoda_dist.eval.metrics import FeatureNets
from pagoda_dist.eval.preflight import shortfall
from pagoda_dist.eval.weights import local_file
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.checkpoint_safety import network_from_export
from pagoda_dist.models.efficientnet_lite0 import load_efficientnet_lite0
from pagoda_dist.models.generator import OneStepGenerator, with_sampling_guidance
from pagoda_dist.runtime import CheckpointStore, load_export
from pagoda_dist.stages import TeacherStage


@dataclass
class HeldOutSlice:
    """Consecutive held-out samples: full-resolution images in [-1, 1], their conditions and captions, and (when
    asked for) their inversion latents at sigma_max scale."""

    images: Tensor
    condition: Condition
    captions: list[str] | None
    latent: Tensor | None = None


def read_held_out(cfg: Config, start: int, count: int, split: str = "val", latents: bool = False) -> HeldOutSlice:
    """Samples start .. start + count - 1 of the 'val' split of the latent-pair set, in the evaluation's fixed
    (seeded) order: any process reads the same samples for the same indices. `split="train"` reads the training
    split the same way, for measurements that need more real images than the held-out split has; `latents` also
    reads each image's inversion latent."""
    from pagoda_dist.data.reader import StreamingReader, condition_mode

    reader = StreamingReader(cfg.pairs_url, batch_size=min(count, 256), split=split,
                             condition=condition_mode(cfg.model), seed=cfg.run.seed,
                             shuffle_window=cfg.data.shuffle_buffer, needs_latents=latents)
    if start + count > reader.samples_per_epoch:
        where = f"{cfg.pairs_url} holds in its '{split}' split"
        raise ValueError(shortfall(cfg, reader.samples_per_epoch, where, need=start + count) if split == "val"
                         else f"reading {start + count} images, but {where} {reader.samples_per_epoch}")
    reader.load_state_dict({**reader.state_dict(), "position": start})  # the order does not depend on batching
    images, conditions, captions, inverted, have = [], [], [], [], 0
    for batch in reader:
        images.append(batch.image)
        if latents:
            inverted.append(batch.latent)
        conditions.append(batch.condition)
        captions.extend(batch.captions or [])
        have += len(batch)
        if have >= count:
            break
    cond = Condition.cat(conditions)[:count] if not conditions[0].is_empty else Condition()
    return HeldOutSlice(torch.cat(images)[:count], cond, captions[:count] if len(captions) >= count else None,
                        torch.cat(inverted)[:count] if latents else None)


def load_network(cfg: Config, stage: str) -> torch.nn.Module:
    """The EMA network of a stage's latest committed checkpoint."""
    url, _ = CheckpointStore(cfg.run_url, stage).latest_export()
    return load_export_network(url)


def load_export_network(url: str, weights: Literal["ema", "net"] = "ema") -> torch.nn.Module:
    """The EMA network (or, weights "net", the live one) of the export at `url`, in eval mode."""
    return network_from_export(load_export(url), source=url, weights=weights).eval()


@torch.no_grad()
def generate(cfg: Config, net: torch.nn.Module, noise: Tensor, condition: Condition, batch_size: int = 250,
             guidance: float | None = None) -> Tensor:
    """Images in [-1, 1] from unit base-resolution `noise`: one step of a generator, or the teacher's sampler.

    guidance: the classifier-free guidance scale (None: teacher.sampler.guidance) of the teacher's sampler, and the
    input of a guidance-aware generator; other generators have none and sample as they were trained.
    """
    w = cfg.teacher.sampler.guidance if guidance is None else guidance
    teacher = None if isinstance(net, OneStepGenerator) else TeacherStage(cfg, net)
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


def feature_nets(cfg: Config, device: str | torch.device = "cpu") -> FeatureNets:
    """Every feature network the config asks for, weights read from local paths or storage URLs (cached in
    eval.weights_cache): EfficientNet-Lite0 always, the FID Inception with eval.inception_weights, CLIP for a
    text-conditioned model with eval.clip_weights (or an explicitly random one)."""
    e = cfg.eval

    def weights(url: str | None, key: str) -> str | None:
        return None if url is None else str(local_file(url, e.weights_cache, key))

    effnet = load_efficientnet_lite0(weights(e.effnet_weights, "eval.effnet_weights"))
    inception = None
    if e.inception_weights:
        from pagoda_dist.eval.inception import load_fid_inception

        inception = load_fid_inception(weights(e.inception_weights, "eval.inception_weights"))
    clip = None
    if cfg.model.text_dim and (e.clip_weights or e.clip_random_init):
        clip = load_clip(e.clip_model, weights(e.clip_weights, "eval.clip_weights"),
                         random_init=e.clip_random_init, device=device)
    return FeatureNets(effnet, inception, clip, device)

"""Conditional multi-scale discriminator for the distil and grow stages (hinge logits, one tensor per scale).

Two kinds, picked by `DiscriminatorConfig.backbone`:
- "none": `num_scales` small conv nets, scale s judging the image average-pooled by 2**s (`conv_head` and
  `minibatch_std` shape how each one ends);
- "efficientnet_lite0": a projected discriminator, small heads on the multi-scale feature maps of a frozen
  ImageNet EfficientNet-Lite0 (the deepest `num_scales` of its four taps), and `pixel_scales` of the plain conv
  scales beside them on the image's own pixels.
Both end in a projection head: logit = w . phi + <e(cond), phi>, with a class table (NO_CLASS -> last row) or a
projection of the pooled text embedding, so the logits judge image-condition agreement, not just realism.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda_dist.config import DiscriminatorConfig
from pagoda_dist.interfaces import NO_CLASS, Condition
from pagoda_dist.models.blocks import backbone_input

MIN_RESOLUTION = 4  # the coarsest map a conv scale reduces to


def _act(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


class DownBlock(nn.Module):
    """Two 3x3 convs with LeakyReLU, 2x average-pool down; residual with a 1x1 skip, scaled to keep variance."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(_act(self.conv2(_act(self.conv1(x)))), 2)
        return (self.skip(F.avg_pool2d(x, 2)) + h) * math.sqrt(0.5)


class ProjectionHead(nn.Module):
    """Features (B, F) -> logits (B,), plus the inner product with the embedded condition (projection D)."""

    def __init__(self, features: int, num_classes: int = 0, text_dim: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(features, 1)
        self.class_embed = nn.Embedding(num_classes + 1, features) if num_classes else None
        self.text_embed = nn.Linear(text_dim, features, bias=False) if text_dim else None
        for table in (self.class_embed, self.text_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=features**-0.5)

    def forward(self, phi: Tensor, cond: Condition) -> Tensor:
        logits = self.linear(phi).squeeze(1)
        if self.class_embed is not None and cond.class_labels is not None:
            labels = cond.class_labels.to(phi.device, torch.long)
            rows = torch.where(labels == NO_CLASS, torch.full_like(labels, self.num_classes), labels)
            logits = logits + (self.class_embed(rows).to(phi.dtype) * phi).sum(1)
        if self.text_embed is not None and cond.text_pooled is not None:
            logits = logits + (self.text_embed(cond.text_pooled.to(phi.dtype)) * phi).sum(1)
        return logits


class ConvScale(nn.Module):
    """A small conv net for one image scale: from-RGB conv, DownBlocks to 4x4, conv, then features from that map:
    its mean over positions ("mean"), or a linear layer over the flattened map ("dense", StyleGAN's epilogue, which
    also judges where in the image things lie). With `minibatch_std` > 0 the last conv also sees StyleGAN's
    minibatch standard-deviation channel: how varied a group of that many images is, which no per-image judge sees.
    """

    def __init__(self, in_channels: int, resolution: int, channels: int, max_channels: int, head: str = "mean",
                 minibatch_std: int = 0) -> None:
        super().__init__()
        self.from_rgb = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks, ch, res = [], channels, resolution
        while res > MIN_RESOLUTION:
            out = min(2 * ch, max_channels)
            blocks.append(DownBlock(ch, out))
            ch, res = out, res // 2
        self.blocks = nn.Sequential(*blocks)
        self.minibatch_std = minibatch_std
        self.final = nn.Conv2d(ch + int(minibatch_std > 0), ch, 3, padding=1)
        self.dense = nn.Linear(ch * res * res, ch) if head == "dense" else None
        self.features = ch

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(_act(self.from_rgb(x)))
        if self.minibatch_std:
            h = torch.cat([h, minibatch_std(h, self.minibatch_std)], dim=1)
        h = _act(self.final(h))
        return h.mean(dim=(2, 3)) if self.dense is None else _act(self.dense(h.flatten(1)))


def minibatch_std(h: Tensor, group: int) -> Tensor:
    """(B, 1, H, W): per group of consecutive images, the standard deviation over the group of every feature,
    averaged to one value, broadcast to its images. The group is the largest divisor of B up to `group`, so any
    batch works; consecutive images share one, so a batch of reals and a batch of fakes judged apart never mix."""
    b, _, height, width = h.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    spread = h.float().reshape(b // g, g, -1).var(dim=1, unbiased=False).add(1e-8).sqrt().mean(dim=1)
    return spread.to(h.dtype).repeat_interleave(g).view(b, 1, 1, 1).expand(b, 1, height, width)


class FeatureScale(nn.Module):
    """A head on one frozen backbone feature map: 1x1 conv to `channels`, 3x3 conv, global mean -> features."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, 1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.features = channels

    def forward(self, x: Tensor) -> Tensor:
        return _act(self.conv(_act(self.proj(x)))).mean(dim=(2, 3))


class Discriminator(nn.Module):
    """D(x, cond) -> list of (B,) hinge logits, one per scale. `resolution` is the image size it judges."""

    def __init__(
        self,
        cfg: DiscriminatorConfig,
        resolution: int,
        *,
        in_channels: int = 3,
        num_classes: int = 0,
        text_dim: int = 0,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.backbone_input_size = cfg.backbone_input_size
        self.backbone_resize = cfg.backbone_resize
        if cfg.backbone == "efficientnet_lite0":
            # Imported only here: the plain discriminator needs neither the backbone code nor its weights.
            from pagoda_dist.models.efficientnet_lite0 import load_efficientnet_lite0

            if cfg.backbone_resize == "nearest" and cfg.backbone_input_size % resolution:
                raise ValueError(f"discriminator.backbone_resize=nearest: {resolution}px images do not upscale to "
                                 f"backbone_input_size={cfg.backbone_input_size} by an integer factor; set a "
                                 f"multiple of {resolution}, or backbone_resize=bilinear")
            self.backbone = load_efficientnet_lite0(cfg.backbone_weights)
            taps = self.backbone.feature_channels
            if cfg.num_scales > len(taps):
                raise ValueError(f"discriminator.num_scales={cfg.num_scales}: the efficientnet_lite0 backbone has "
                                 f"only {len(taps)} feature maps; use at most {len(taps)}")
            self.taps = list(range(len(taps) - cfg.num_scales, len(taps)))
            self.scales = nn.ModuleList([FeatureScale(taps[i], cfg.channels) for i in self.taps])
            self.pixel_scales = _conv_scales(cfg, "pixel_scales", cfg.pixel_scales, resolution, in_channels)
        else:
            self.backbone = None
            self.scales = _conv_scales(cfg, "num_scales", cfg.num_scales, resolution, in_channels)
            self.pixel_scales = nn.ModuleList()
        self.heads = nn.ModuleList([ProjectionHead(s.features, num_classes, text_dim)
                                    for s in [*self.scales, *self.pixel_scales]])

    def forward(self, x: Tensor, cond: Condition | None = None) -> list[Tensor]:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"discriminator built for {self.resolution}px got images {tuple(x.shape)}")
        cond = Condition() if cond is None else cond
        if self.backbone is None:
            return self._pixels(x, cond, self.scales, self.heads)
        pixel_heads = self.heads[len(self.scales):]
        return self._projected(x, cond) + self._pixels(x, cond, self.pixel_scales, pixel_heads)

    @staticmethod
    def _pixels(x: Tensor, cond: Condition, scales: nn.ModuleList, heads: Sequence[nn.Module]) -> list[Tensor]:
        """Logits of conv scales on the image itself, scale s on the image average-pooled by 2**s."""
        return [head(scale(F.avg_pool2d(x, 2**s) if s else x), cond)
                for s, (scale, head) in enumerate(zip(scales, heads))]

    def _projected(self, x: Tensor, cond: Condition) -> list[Tensor]:
        x = backbone_input(x, self.backbone_input_size, self.backbone_resize)
        feats = self.backbone.forward_features(x)  # frozen weights; gradients still reach x for the generator
        return [head(scale(feats[i]), cond) for i, scale, head in zip(self.taps, self.scales, self.heads)]


def _conv_scales(cfg: DiscriminatorConfig, key: str, count: int, resolution: int, in_channels: int) -> nn.ModuleList:
    """`count` conv scales on the image, scale s at resolution >> s; refused (naming `key`) below MIN_RESOLUTION."""
    coarsest = resolution >> max(count - 1, 0)
    if coarsest < MIN_RESOLUTION:
        most = int(math.log2(resolution // MIN_RESOLUTION)) + 1
        raise ValueError(f"discriminator.{key}={count} at resolution {resolution} judges a {coarsest}px image; use at "
                         f"most {most} scales (coarsest {MIN_RESOLUTION}px)")
    return nn.ModuleList([ConvScale(in_channels, resolution >> s, cfg.channels, 8 * cfg.channels, cfg.conv_head,
                                    cfg.minibatch_std) for s in range(count)])

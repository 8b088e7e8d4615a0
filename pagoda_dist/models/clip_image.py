"""The CLIP image tower: images -> open_clip's joint-space image embedding (`encode_image`), differentiable in the
images, for the text-to-image CLIP regulariser and the CLIP score.

The tower must belong to the same open_clip model whose text tower embedded the captions
(`precompute.clip_model` / `clip_weights` / `clip_random_init`): only then does cos(image embedding, text_pooled)
measure agreement with the caption. `create_clip_model` guarantees that for random towers too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pagoda_dist.models.blocks import antialiased_resize, backbone_input
from pagoda_dist.models.text_encoder import create_clip_model

# OpenAI CLIP's input statistics, for models built without a preprocessing config
DEFAULT_PREPROCESS: dict[str, Any] = {"size": (224, 224), "mean": (0.48145466, 0.4578275, 0.40821073),
                                      "std": (0.26862954, 0.26130258, 0.27577711)}


def clip_preprocess(x: Tensor, cfg: dict[str, Any]) -> Tensor:
    """RGB images in [0, 1] -> the tower's input: centre square crop, bicubic resize to its input size, CLIP mean/std
    normalisation. Differentiable (values outside [0, 1] are clamped, so they pass no gradient)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = antialiased_resize(x, tuple(cfg["size"]), mode="bicubic")
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, -1, 1, 1)
    return (x.clamp(0, 1) - mean) / std


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The input size and statistics an open_clip model (or its `visual` tower) expects."""
    visual = getattr(model, "visual", model)
    return getattr(visual, "preprocess_cfg", None) or DEFAULT_PREPROCESS


class ClipImageEncoder(nn.Module):
    """open_clip's image tower on images in [-1, 1] (1 or 3 channels, any square size): (B, C, H, W) -> (B, D).

    Frozen and always in eval mode (`train()` keeps it there): gradients flow through it to the images, never into
    its weights. Not a trainable network of any stage, so it has no optimizer, EMA or checkpoint.
    """

    def __init__(self, arch: str, weights_path: str | None, random_init: bool = False, *,
                 key: str = "precompute.clip_weights") -> None:
        super().__init__()
        model = create_clip_model(arch, weights_path, random_init, key=key)
        self.visual = model.visual
        self.preprocess_cfg = preprocess_config(model)
        self.arch = arch
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        """D, the joint embedding width (the text tower's `TextEncoder.dim`, i.e. `model.text_dim`)."""
        width = getattr(self.visual, "output_dim", None)
        if width is None:  # towers that do not record it (e.g. timm ones): measure it
            with torch.no_grad():
                width = self(torch.zeros(1, 3, *self.preprocess_cfg["size"])).shape[-1]
        return int(width)

    def train(self, mode: bool = True) -> ClipImageEncoder:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = backbone_input((images.float() + 1) / 2, None)
        return self.visual(clip_preprocess(x, self.preprocess_cfg)).float()


__all__ = ["ClipImageEncoder", "DEFAULT_PREPROCESS", "clip_preprocess", "preprocess_config"]

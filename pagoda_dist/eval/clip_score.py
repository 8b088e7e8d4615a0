"""CLIP score for text-to-image samples: 100 x mean over pairs of max(cos(image embedding, caption embedding), 0).

(The torchmetrics convention; Hessel et al.'s CLIPScore is 2.5 x the same mean cosine without the x 100.) Weights are
read from a local open_clip checkpoint; a randomly initialised model is only built when asked for explicitly, and
its score means nothing beyond exercising the code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip_image import clip_preprocess, preprocess_config
from ..models.text_encoder import create_clip_model, known_archs
from pagoda_dist.data.images import ImageBatch, to_rgb, to_unit_range

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def load_clip(arch: str = "ViT-B-32", weights_path: str | Path | None = None, random_init: bool = False,
              device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer]:
    """A frozen open_clip model and its tokenizer, from a local weights file (or random init when asked)."""
    import open_clip  # imported here: the training path without text never pays for it

    if weights_path is None:
        if not random_init:
            raise ValueError(f"CLIP score needs local open_clip weights for {arch} (eval.clip_weights); pass "
                             "random_init=True only for tests, where the score means nothing")
    # Check the file ourselves: open_clip treats a string that is not a file as a tag and would download it.
    elif not Path(weights_path).is_file():
        raise FileNotFoundError(f"open_clip weights file {weights_path} does not exist (eval.clip_weights); "
                                "weights are never downloaded")
    if arch not in known_archs():
        raise ValueError(f"unknown open_clip architecture {arch!r}; one of {', '.join(known_archs())}")
    model = create_clip_model(arch, None if weights_path is None else str(weights_path), random_init,
                              key="eval.clip_weights")
    return model.to(device), open_clip.get_tokenizer(arch)


@torch.no_grad()
def clip_cosines(images: ImageBatch, captions: Sequence[str], model: nn.Module, tokenizer: Tokenizer,
                 batch_size: int = 32, value_range: tuple[float, float] = (-1.0, 1.0),
                 device: str | torch.device = "cpu") -> np.ndarray:
    """(N,) float32 max(cos(image i embedding, caption i embedding), 0): what the score averages, per pair, so that
    slices of a set scored apart give the set's score (`mean_clip_score`)."""
    if len(images) != len(captions):
        raise ValueError(f"CLIP score pairs image i with caption i: got {len(images)} images, "
                         f"{len(captions)} captions")
    cfg = preprocess_config(model)
    out = []
    for start in range(0, len(captions), batch_size):
        x = to_rgb(to_unit_range(images[start:start + batch_size], value_range, "images")).to(device)
        img = F.normalize(model.encode_image(clip_preprocess(x, cfg)).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(list(captions[start:start + batch_size])).to(device)).float(),
                          dim=-1)
        out.append((img * txt).sum(dim=-1).clamp(min=0).cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)


def mean_clip_score(cosines: np.ndarray, batch_size: int = 32) -> float:
    """The CLIP score of a set from its per-pair cosines (summed per batch of `batch_size` in set order, as
    `clip_score` does, so both give the same float)."""
    if len(cosines) == 0:
        raise ValueError("CLIP score of an empty set is undefined")
    values = torch.from_numpy(np.ascontiguousarray(cosines))
    total = sum(values[i:i + batch_size].sum().item() for i in range(0, len(values), batch_size))
    return 100.0 * total / len(values)


def clip_score(images: ImageBatch, captions: Sequence[str], model: nn.Module, tokenizer: Tokenizer,
               batch_size: int = 32, value_range: tuple[float, float] = (-1.0, 1.0),
               device: str | torch.device = "cpu") -> float:
    """Mean CLIP score of (image i, caption i) pairs (see the module docstring for the scale)."""
    if len(captions) == 0:
        raise ValueError("CLIP score of an empty set is undefined")
    return mean_clip_score(clip_cosines(images, captions, model, tokenizer, batch_size, value_range, device),
                           batch_size)

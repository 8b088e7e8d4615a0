"""The CLIP text tower that turns captions into the text condition: open_clip, weights from a local file only.

`TextEncoder(arch, weights_path)` keeps only the text half of an open_clip model (the vision tower is dropped
after loading) and returns, per caption, the pooled embedding (B, D), the per-token embeddings (B, T, D) and
the mask of real tokens (B, T). Tokens go through the same final norm and projection as the pooled output, so
both have the joint-space width D = embed_dim that `ModelConfig.text_dim` names, and the pooled vector is
open_clip's `encode_text` (the token at the pooling position, e.g. end-of-text; equal up to float rounding).

Weights are never downloaded. A randomly initialised tower is built only when asked for explicitly
(`random_init=True`), from a fixed seed so that every process builds the same one; callers must record that
in whatever they write (`describe()` says so).

`TINY_ARCHS` are small architectures registered with open_clip on first use in each process (tests, CPU demos).
`create_clip_model` builds the whole open_clip model under these rules; the image tower of the CLIP regulariser
(`models.clip_image`) and the CLIP-score scorer build theirs with it, so a random image tower is the one that
belongs to the random text tower.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pagoda_dist.interfaces import Condition

# width 64, 2 layers: ~3.3M parameters (mostly the 49k-token vocabulary table), 64 prompts in ~0.2 s on a CPU.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "pagoda-tiny-text": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
RANDOM_INIT_SEED = 0  # every process (every precompute actor) must build the same random tower


class TextEncoderError(ValueError):
    """The text tower cannot be built: unknown architecture, missing or unreadable weights."""


@dataclass
class TextEmbedding:
    """The text condition of a batch of captions (see `pagoda_dist.interfaces.Condition`)."""

    pooled: Tensor  # (B, D) float32
    tokens: Tensor  # (B, T, D) float32
    mask: Tensor    # (B, T) bool, True for real tokens (start, words, end-of-text)

    def stored_condition(self) -> Condition:
        """The condition as the stages read it back from latent pairs, which store the embeddings in float16: a
        teacher that embeds its captions on the fly sees the same values as every stage after precompute."""
        return Condition(text_pooled=self.pooled.half().float(), text_tokens=self.tokens.half().float(),
                         text_mask=self.mask)


_registered: set[str] = set()


def register_tiny_archs() -> None:
    """Makes `TINY_ARCHS` known to open_clip in this process (idempotent)."""
    import open_clip

    missing = [name for name in TINY_ARCHS if name not in _registered]
    if not missing:
        return
    folder = Path(tempfile.mkdtemp(prefix="pagoda-clip-archs-"))
    for name in missing:
        (folder / f"{name}.json").write_text(json.dumps(TINY_ARCHS[name]))
    open_clip.add_model_config(folder)
    _registered.update(missing)


def known_archs() -> list[str]:
    """Architecture names open_clip can build here (its own plus `TINY_ARCHS`)."""
    import open_clip

    register_tiny_archs()
    return sorted(open_clip.list_models())


def check_weights_path(weights_path: str | None, random_init: bool, *, key: str = "clip_weights") -> None:
    """Fails fast (before any expensive work) unless the weights file exists, or random init was asked for."""
    if weights_path is None:
        if not random_init:
            raise TextEncoderError(f"{key}: no CLIP weights path given; set it to a local open_clip checkpoint "
                                   "(.safetensors / .pt), or allow a random text tower explicitly "
                                   "(clip_random_init=true)")
        return
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise TextEncoderError(f"{key}: CLIP weights file {weights_path} does not exist (weights are never "
                               "downloaded: copy an open_clip checkpoint there, or fix the path)")


def create_clip_model(arch: str, weights_path: str | None, random_init: bool = False, *,
                      key: str = "clip_weights") -> nn.Module:
    """The whole open_clip model `arch` on the CPU, frozen and in eval mode: weights from a local file, or (only
    with `random_init`) the random model every process builds the same way (seeded, without touching the
    caller's random state). `key` names the config key in errors."""
    import open_clip

    check_weights_path(weights_path, random_init, key=key)
    register_tiny_archs()
    if arch not in open_clip.list_models():
        raise TextEncoderError(f"clip_model: unknown open_clip architecture {arch!r}; e.g. ViT-B-32, "
                               f"ViT-L-14, or one of {sorted(TINY_ARCHS)}")
    path = None if weights_path is None else str(Path(weights_path).expanduser().absolute())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(arch, pretrained=path, device="cpu")
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise TextEncoderError(f"{key}: cannot load {path} into open_clip {arch!r} "
                               f"({type(err).__name__}: {err})") from None
    return model.requires_grad_(False).eval()


class TextEncoder(nn.Module):
    """An open_clip text tower: captions -> `TextEmbedding` (pooled, tokens, mask). Frozen, eval mode."""

    def __init__(self, arch: str, weights_path: str | None, random_init: bool = False) -> None:
        super().__init__()
        import open_clip

        model = create_clip_model(arch, weights_path, random_init)
        self.arch = arch
        self.weights_path = None if weights_path is None else str(Path(weights_path).expanduser().absolute())
        self.random_init = weights_path is None
        tower = getattr(model, "text", None)
        if tower is None:  # plain CLIP keeps the text tower's parts on the model itself
            tower = model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if any(not hasattr(tower, name) for name in needed):
            raise TextEncoderError(f"clip_model {arch!r}: its text tower is not an open_clip TextTransformer "
                                   "(e.g. a Hugging Face text tower); choose a CLIP architecture such as ViT-B-32")
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", getattr(tower, "attn_mask", None), persistent=False)
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.context_length = int(self.positional_embedding.shape[0])
        self.tokenizer = open_clip.get_tokenizer(arch, context_length=self.context_length)
        del model  # the vision tower is never used here
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        """D: the width of the pooled and the token embeddings (set `ModelConfig.text_dim` to it)."""
        proj = self.text_projection
        if proj is None:
            return int(self.positional_embedding.shape[-1])
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])

    def describe(self) -> dict[str, Any]:
        """What produced the embeddings, for output metadata (a random tower is flagged as such)."""
        return {"arch": self.arch, "weights": self.weights_path, "random_init": self.random_init,
                "dim": self.dim, "context_length": self.context_length}

    def _project(self, x: Tensor) -> Tensor:
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _pool_index(self, text: Tensor) -> Tensor:
        """Position of the pooled token in each row (open_clip's `text_global_pool` rules)."""
        batch, length = text.shape
        if self.pool_type == "argmax":  # end-of-text has the largest id in CLIP's vocabulary
            return text.argmax(dim=-1)
        if self.pool_type == "eos" and self.eos_id is not None:
            return (text == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(batch, dtype=torch.long, device=text.device)
        if self.pool_type == "last":
            return torch.full((batch,), length - 1, dtype=torch.long, device=text.device)
        raise TextEncoderError(f"clip_model {self.arch!r}: unsupported text pooling {self.pool_type!r}")

    @torch.inference_mode()
    def forward(self, captions: list[str]) -> TextEmbedding:
        """Embeds `captions` (too-long captions are cut at the context length, as open_clip does)."""
        if not captions:
            raise ValueError("TextEncoder needs at least one caption")
        device = self.positional_embedding.device
        text = self.tokenizer(list(captions)).to(device)
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else torch.float32
        x = self.token_embedding(text).to(cast) + self.positional_embedding.to(cast)
        x = self.transformer(x, attn_mask=self.attn_mask)
        tokens = self._project(self.ln_final(x)).float()
        index = self._pool_index(text)
        pooled = tokens[torch.arange(tokens.shape[0], device=device), index]
        positions = torch.arange(text.shape[1], device=device)
        # Real tokens: everything up to the pooled (end-of-text) position; CLIP's causal mask means later
        # positions only ever see padding.
        if self.pool_type in ("argmax", "eos"):
            mask = positions[None, :] <= index[:, None]
        else:
            mask = text != 0
        return TextEmbedding(pooled=pooled, tokens=tokens, mask=mask)


__all__ = ["TINY_ARCHS", "TextEmbedding", "TextEncoder", "TextEncoderError", "check_weights_path",
           "create_clip_model", "known_archs", "register_tiny_archs"]

"""The teacher network: an ADM/EDM-style UNet F(x_in, c_noise, cond) built from `ModelConfig`.

Module names are part of the contract (growing copies weights by name, the freeze policy selects by name/index):
  emb_noise, emb_map     noise embedding (Fourier features -> MLP)
  emb_class              class table, num_classes + 1 rows; the last row is "no class" (NO_CLASS labels)
  emb_text, text_null    pooled-text projection and the learned pooled embedding of a dropped caption
  enc.{i}                enc.0 is the input conv; then per level num_res_blocks UNetBlocks, and a
                         downsampling UNetBlock between levels
  mid.0, mid.1           residual block with attention (and cross-attention), residual block
  dec.{i}                per level (coarse to fine) num_res_blocks + 1 UNetBlocks that each take one skip, and an
                         upsampling UNetBlock between levels; the last entries are the finest-resolution blocks
  out                    the output head (norm, SiLU, conv)

With `model.adm_compatible` the same modules compute as ADM does (the layout of EDM's ImageNet-64 teacher, see
models/adm_convert.py): ADM's noise embedding, SiLU on the embedding before the blocks, GroupNorm eps 1e-5.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda_dist.config import ModelConfig
from pagoda_dist.interfaces import NO_CLASS, Condition
from pagoda_dist.models.blocks import ADMNoiseEmbedding, FourierEmbedding, OutputHead, UNetBlock

ADM_NORM_EPS = 1e-5  # ADM's GroupNorm default (ours: 1e-6)


def model_record(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg` as plain data for architecture records. `adm_compatible` appears only when True, so the records of
    every other network stay what they were before the field existed (resuming compares records for equality)."""
    record = dataclasses.asdict(cfg)
    if not record["adm_compatible"]:
        del record["adm_compatible"]
    return record


class UNet(nn.Module):
    """ADM/EDM-style UNet: F(x_in, c_noise, cond) -> tensor shaped like x_in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, mult, nrb = cfg.channels, cfg.channel_mult, cfg.num_res_blocks
        emb_dim = 4 * ch
        self.emb_dim = emb_dim
        block_kw: dict[str, Any] = dict(dropout=cfg.dropout, head_channels=cfg.head_channels, text_dim=cfg.text_dim)

        self.emb_noise = ADMNoiseEmbedding(ch) if cfg.adm_compatible else FourierEmbedding(ch)
        self.emb_map = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb_class = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        if cfg.text_dim:
            self.emb_text = nn.Linear(cfg.text_dim, emb_dim)
            self.text_null = nn.Parameter(torch.zeros(cfg.text_dim))
        else:
            self.emb_text, self.text_null = None, None

        # Encoder; remember each output's width for the decoder's skip concatenations.
        self.enc = nn.ModuleList([nn.Conv2d(cfg.in_channels, ch * mult[0], 3, padding=1)])
        skips = [ch * mult[0]]
        cur, res = ch * mult[0], cfg.resolution
        for level, m in enumerate(mult):
            if level > 0:
                self.enc.append(UNetBlock(cur, cur, emb_dim, resample="down", **block_kw))
                res //= 2
                skips.append(cur)
            for _ in range(nrb):
                self.enc.append(UNetBlock(cur, ch * m, emb_dim, attention=res in cfg.attn_resolutions, **block_kw))
                cur = ch * m
                skips.append(cur)

        self.mid = nn.ModuleList([
            UNetBlock(cur, cur, emb_dim, attention=True, **block_kw),
            UNetBlock(cur, cur, emb_dim, **block_kw),
        ])

        self.dec = nn.ModuleList()
        for level in reversed(range(len(mult))):
            if level < len(mult) - 1:
                self.dec.append(UNetBlock(cur, cur, emb_dim, resample="up", **block_kw))
                res *= 2
            for _ in range(nrb + 1):
                out_ch = ch * mult[level]
                attention = res in cfg.attn_resolutions
                self.dec.append(UNetBlock(cur + skips.pop(), out_ch, emb_dim, attention=attention, **block_kw))
                cur = out_ch
        self.out_channels = cur
        self.out = OutputHead(cur, cfg.in_channels)
        if cfg.adm_compatible:
            for module in self.modules():
                if isinstance(module, nn.GroupNorm):
                    module.eps = ADM_NORM_EPS
        if cfg.uses_channels_last:
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------- conditioning
    def embed(self, c_noise: Tensor, cond: Condition, batch: int) -> Tensor:
        """The (B, 4*channels) embedding of noise level and condition that drives every scale-shift norm.

        A condition the network was not built for is ignored (an unconditional model may be fed labelled data);
        a missing one counts as dropped, so `Condition()` samples unconditionally from any model.
        """
        c_noise = torch.as_tensor(c_noise, device=self.emb_map[0].weight.device)
        emb = self.emb_noise(c_noise.expand(batch) if c_noise.numel() == 1 else c_noise)
        emb = self.emb_map(emb.to(self.emb_map[0].weight.dtype))
        if self.emb_class is not None:
            emb = emb + self.emb_class(self._class_index(cond.class_labels, batch, emb.device))
        if self.emb_text is not None:
            emb = emb + self.emb_text(self._pooled_text(cond, batch))
        return emb

    def _class_index(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Table rows: the label, or the last row ("no class") for NO_CLASS or when no labels were given."""
        none = self.cfg.num_classes
        if labels is None:
            return torch.full((batch,), none, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        return torch.where(labels == NO_CLASS, torch.full_like(labels, none), labels)

    def _pooled_text(self, cond: Condition, batch: int) -> Tensor:
        """The pooled embedding, replaced by the learned null where the caption is dropped (mask all False)."""
        null = self.text_null.expand(batch, -1)
        pooled = cond.text_pooled
        if pooled is None:
            return null
        if pooled.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"Condition.text_pooled has width {pooled.shape[-1]}, model.text_dim is "
                             f"{self.cfg.text_dim}: embed captions with the text encoder the model was built for")
        if cond.text_mask is None:
            return pooled.to(null.dtype)
        dropped = ~cond.text_mask.bool().any(dim=1, keepdim=True)
        return torch.where(dropped, null, pooled.to(null.dtype))

    def _text_tokens(self, cond: Condition) -> tuple[Tensor | None, Tensor | None]:
        if self.emb_text is None or cond.text_tokens is None:
            return None, None
        if cond.text_tokens.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"Condition.text_tokens has width {cond.text_tokens.shape[-1]}, model.text_dim is "
                             f"{self.cfg.text_dim}")
        return cond.text_tokens, cond.text_mask

    # ------------------------------------------------------------------------------------------------ forward
    def features(self, x: Tensor, c_noise: Tensor, cond: Condition | None = None,
                 extra_emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Final decoder features at the input resolution (before the head) and the embedding.

        extra_emb: (B, 4*channels) added to the embedding, for inputs the teacher does not have (the one-step
        generator's guidance scale); the UNet's own parameters and names are the same with or without it.
        The embedding returned is the one the blocks consume (after ADM's SiLU with `model.adm_compatible`).
        """
        cond = Condition() if cond is None else cond
        if x.shape[-1] != self.cfg.resolution or x.shape[-2] != self.cfg.resolution:
            raise ValueError(f"UNet built for {self.cfg.resolution}px (model.resolution) got input {tuple(x.shape)}")
        if self.cfg.uses_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.embed(c_noise, cond, x.shape[0])
        if extra_emb is not None:
            emb = emb + extra_emb.to(emb.dtype)
        if self.cfg.adm_compatible:  # ADM applies SiLU to the embedding at the start of every block's projection
            emb = F.silu(emb)
        tokens, mask = self._text_tokens(cond)

        h = self.enc[0](x)
        skips = [h]
        for block in self.enc[1:]:
            h = block(h, emb, tokens, mask)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, tokens, mask)
        for block in self.dec:
            if block.res.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, tokens, mask)
        return h, emb

    def forward(self, x: Tensor, c_noise: Tensor, cond: Condition | None = None) -> Tensor:
        h, _ = self.features(x, c_noise, cond)
        # Contiguous NCHW out: the image has few channels (cheap copy) and callers may .view() it.
        return self.out(h).contiguous()

    def architecture(self) -> dict[str, Any]:
        """Plain-data description stored in checkpoints (see `checkpoint_safety`)."""
        return {"kind": "unet", "stage": "teacher", "resolution": self.cfg.resolution,
                "model": model_record(self.cfg)}

"""Building blocks of the ADM/EDM-style UNet: noise embedding, residual blocks, self- and cross-attention, head.

Layout notes that matter for speed: attention works on (B, H*W, C) token views, which are free (no copy) when the
activations are channels-last, so the whole network runs without layout conversions in that mode. Every residual
branch ends in a zero-initialised layer, so a freshly built block is the identity on its skip path: a new UNet
outputs zeros, and blocks appended when a generator grows start as (upsampled) identities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def antialiased_resize(x: Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Antialiased resampling of NCHW images, computed in float32: torch's CPU kernels have no bfloat16 version
    (a bf16 rehearsal on CPU stops there), and the filter sums many taps, which bf16 would round coarsely."""
    out = F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True)
    return out.to(x.dtype)


def backbone_input(x: Tensor, size: int | None, mode: str = "bilinear") -> Tensor:
    """Images as a frozen RGB backbone takes them: grey replicated to three channels, then resized square to `size`
    (None: as they are), antialiased "bilinear" or "nearest", an integer upscale that makes every pixel a k x k
    block. Bilinear x4 keeps 36% of the energy of a pattern at the image's own Nyquist frequency, so a backbone fed
    that way sees pixel-level texture damped and smeared; blocks pass it whole."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is None or x.shape[-1] == size:
        return x
    if mode == "nearest":
        if size % x.shape[-1]:
            raise ValueError(f"nearest resize from {x.shape[-1]}px to {size}px is not an integer upscale")
        return F.interpolate(x, scale_factor=size // x.shape[-1], mode="nearest")
    return antialiased_resize(x, size)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's dtype.

    Statistics over many pixels are where bf16 loses precision; and on the CPU the float32 kernel is also 2-3x
    faster than the bf16 one for channels-last inputs (measured here, torch 2.14). The affine parameters are taken
    to float32 too: DeepSpeed's bf16 mode holds them in bf16, and group_norm refuses a float32 input with bf16
    weights ("mixed dtype"); for float32 parameters the cast is a no-op.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm (float32) with up to 32 groups that always divide `channels`."""
    return GroupNorm32(math.gcd(32, channels), channels, eps=1e-6)


def zero_(module: nn.Module) -> nn.Module:
    """Zero-initialises a module's parameters (the last layer of a residual branch)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FourierEmbedding(nn.Module):
    """Sinusoidal features of a scalar per sample, defined for any real input (c_noise = log(sigma)/4 < 0 too).

    Frequencies are fixed and log-spaced (not random), so two networks built from the same config embed noise
    identically. The range suits c_noise in about [-1.6, 1.1]: the slowest component is monotone over that span
    and the fastest resolves a few-percent change of sigma.
    """

    def __init__(self, dim: int, min_freq: float = 0.25, max_freq: float = 32.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding: dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, dtype=torch.float64))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # Always float32: bf16 would round c_noise and the phases (sigma 0.002 and 80 must stay distinct).
        angles = x.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ADMNoiseEmbedding(nn.Module):
    """ADM's sinusoidal features of t = 1000 c_noise (DDPM's timestep scale): cos then sin at the descending
    frequencies 10000^(-i/half), each rounded as ADM rounds them in float32, so imported ADM weights see exactly the
    features they were trained on (`model.adm_compatible`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"ADMNoiseEmbedding: dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        angles = (1000 * x.float()).reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def resample(x: Tensor, mode: str) -> Tensor:
    """2x nearest upsampling ("up"), 2x2 average pooling ("down"), or nothing ("none")."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(nn.Module):
    """ADM residual block with scale-shift (adaptive group) norm from the embedding, optionally resampling.

    h = conv(act(norm(x))) [resampled before the conv]; h = norm(h) * (1 + scale) + shift; h = conv(drop(act(h)));
    out = skip(x) + h, where skip is the (resampled) input, through a 1x1 conv when the width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, resample: str = "none") -> None:
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"ResBlock: resample must be 'none', 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(resample(h, self.resample))
        scale, shift = self.emb(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), scale + 1)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(resample(x, self.resample)) + h


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when x is channels-last."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def from_tokens(t: Tensor, h: int, w: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) laid out channels-last (a view, no copy)."""
    b, _, c = t.shape
    return t.reshape(b, h, w, c).permute(0, 3, 1, 2)


def split_heads(t: Tensor, head_channels: int) -> Tensor:
    """(B, N, C) -> (B, heads, N, head_channels)."""
    b, n, c = t.shape
    return t.reshape(b, n, c // head_channels, head_channels).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


def num_heads(channels: int, head_channels: int) -> int:
    """Heads for a width: channels // head_channels, at least one head (then of the full width)."""
    return max(1, channels // head_channels)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels, residual, with fused scaled-dot-product attention."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.head_channels = channels // num_heads(channels, head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = self.qkv(to_tokens(self.norm(x))).chunk(3, dim=-1)
        d = self.head_channels
        a = F.scaled_dot_product_attention(split_heads(q, d), split_heads(k, d), split_heads(v, d))
        return x + from_tokens(self.proj(merge_heads(a)), h, w)


class CrossAttention(nn.Module):
    """Attention from pixels to text tokens, plus a learned null key/value that every query can attend to.

    The null token keeps the softmax defined when every text token is masked (dropped caption, unconditional
    sampling), so a dropped condition gives a finite, learned output instead of NaN.
    """

    def __init__(self, channels: int, text_dim: int, head_channels: int) -> None:
        super().__init__()
        self.head_channels = channels // num_heads(channels, head_channels)
        self.norm = group_norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_dim, 2 * channels)
        self.null_kv = nn.Parameter(torch.randn(1, 1, 2 * channels) * channels**-0.5)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        b, _, h, w = x.shape
        null = self.null_kv.to(x.dtype).expand(b, 1, -1)
        if tokens is None:
            kv, attn_mask = null, None
        else:
            kv = torch.cat([null, self.kv(tokens).to(null.dtype)], dim=1)
            attn_mask = None
            if mask is not None:
                keep_null = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
                attn_mask = torch.cat([keep_null, mask.bool()], dim=1)[:, None, None, :]
        q = self.q(to_tokens(self.norm(x)))
        k, v = kv.to(q.dtype).chunk(2, dim=-1)  # under autocast q may be bf16 while the tokens are not
        d = self.head_channels
        a = F.scaled_dot_product_attention(split_heads(q, d), split_heads(k, d), split_heads(v, d), attn_mask=attn_mask)
        return x + from_tokens(self.proj(merge_heads(a)), h, w)


class UNetBlock(nn.Module):
    """One encoder/decoder/middle unit: a residual block, then optional self-attention and text cross-attention."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        resample: str = "none",
        attention: bool = False,
        head_channels: int = 32,
        text_dim: int = 0,
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, resample)
        self.attn = SelfAttention(out_ch, head_channels) if attention else None
        self.xattn = CrossAttention(out_ch, text_dim, head_channels) if attention and text_dim else None

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.xattn is not None:
            x = self.xattn(x, tokens, mask)
        return x


class OutputHead(nn.Module):
    """norm -> SiLU -> 3x3 conv to image channels; zero-initialised so a new network starts at output 0."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.conv = zero_(nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(x)))

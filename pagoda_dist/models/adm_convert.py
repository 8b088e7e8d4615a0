"""ADM-layout state dicts (EDM's ImageNet-64 teacher `edm_imagenet64_ema.pt`) as weights of our UNet.

The layout is the UNetModel of OpenAI's consistency models, which sony/pagoda loads its teacher into:

    time_embed.{0,2}        noise-embedding MLP             -> emb_map.{0,2}
    label_emb               class table (num_classes rows)  -> emb_class, plus a zero "no class" row
    input_blocks.0.0        input conv                      -> enc.0
    input_blocks.i.{0,1}    residual block, attention       -> enc.i.res, enc.i.attn
    middle_block.{0,1,2}    residual, attention, residual   -> mid.0.res, mid.0.attn, mid.1.res
    output_blocks.j.*       residual, [attention], [upsampling residual]
                                                            -> dec.* in order (the upsampler is its own dec entry)
    out.{0,2}               output norm and conv            -> out.norm, out.conv

Inside a residual block in_layers.{0,2} / emb_layers.1 / out_layers.{0,3} / skip_connection are our norm1 / conv1 /
emb / norm2 / conv2 / skip; inside attention norm / qkv / proj_out are ours too, the 1x1 convolutions becoming
linear layers. qkv's output rows are (q, k, v) x heads x head width, the layout of the reference's flash attention,
which the checkpoint is used with, and ours.

What happens around the network matches EDM's preconditioning as the reference applies it: D = c_skip x + c_out F(
c_in x, ...) with the same c_skip, c_out, c_in (diffusion.edm.EDMPrecond), and ADM feeds 1000 * log(sigma) / 4 to
its sinusoidal embedding where we pass c_noise = log(sigma) / 4: `model.adm_compatible` makes the UNet embed
1000 c_noise the ADM way, apply SiLU to the embedding before the blocks and use ADM's GroupNorm eps (models.unet).

The weights fix everything but the attention head width: `model.head_channels` must be the one the network was
trained with (64 for edm_imagenet64_ema.pt). The "no class" row is zero: an ADM teacher was never trained without
a label, so it has no unconditional model to guide with.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pagoda_dist.config import ModelConfig
from pagoda_dist.models.unet import UNet

# Our module path inside a residual block / attention -> ADM's.
_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "skip": "skip_connection"}
_ATTN = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_TOP = {"emb_map.0": "time_embed.0", "emb_map.2": "time_embed.2", "emb_class": "label_emb",
        "enc.0": "input_blocks.0.0", "out.norm": "out.0", "out.conv": "out.2"}
_SIGNATURE = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


class ADMLayoutError(ValueError):
    """An ADM state dict that does not fit the configured UNet; the message names the model.* keys to change."""


def is_adm_state_dict(payload: Any) -> bool:
    """Whether `payload` is a flat ADM-layout state dict (tensors under time_embed.*, input_blocks.*, out.*)."""
    return isinstance(payload, Mapping) and all(isinstance(payload.get(k), Tensor) for k in _SIGNATURE)


def _layers(state: Mapping[str, Tensor], block: str) -> dict[int, str]:
    """The layers of one ADM block ("output_blocks.3") by index: 'attention', 'resblock' or 'other'."""
    names: dict[int, set[str]] = {}
    for key in state:
        if key.startswith(block + "."):
            index, rest = key[len(block) + 1:].split(".", 1)
            names.setdefault(int(index), set()).add(rest.split(".", 1)[0])
    return {i: "attention" if "qkv" in n else "resblock" if "in_layers" in n else "other"
            for i, n in sorted(names.items())}


def adm_hyperparameters(state: Mapping[str, Tensor], resolution: int) -> dict[str, Any]:
    """The model.* values the ADM weights fix, read from their names and shapes (attention resolutions relative to
    the configured base `resolution`, which the weights do not fix)."""
    channels = state["time_embed.0.weight"].shape[1]
    n_out = len({key.split(".")[1] for key in state if key.startswith("output_blocks.")})
    # The first output block that ends in an upsampler closes the coarsest level: it holds num_res_blocks + 1 blocks.
    ups = [j for j in range(n_out)
           if any(i and kind != "attention" for i, kind in _layers(state, f"output_blocks.{j}").items())]
    per_level = ups[0] + 1 if ups else max(n_out, 1)
    mult, attn = [], []
    for level in range(max(1, n_out // per_level)):
        first = 1 + level * per_level  # the input block of the level's first residual block
        conv2 = state.get(f"input_blocks.{first}.0.out_layers.3.weight")
        m = 0 if conv2 is None else conv2.shape[0] / channels
        mult.append(int(m) if float(m).is_integer() else m)
        if any(_layers(state, f"input_blocks.{first + r}").get(1) == "attention" for r in range(per_level - 1)):
            attn.append(resolution >> level)
    return {"channels": channels, "channel_mult": mult, "num_res_blocks": per_level - 1, "attn_resolutions": attn,
            "num_classes": state["label_emb.weight"].shape[0] if "label_emb.weight" in state else 0,
            "in_channels": state["input_blocks.0.0.weight"].shape[1], "text_dim": 0}


def _configured(cfg: ModelConfig) -> dict[str, Any]:
    """The values of `cfg` that `adm_hyperparameters` reads back, attention listed at the levels the UNet has."""
    levels = [cfg.resolution >> level for level in range(len(cfg.channel_mult))]
    return {"channels": cfg.channels, "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
            "attn_resolutions": [r for r in levels if r in cfg.attn_resolutions], "num_classes": cfg.num_classes,
            "in_channels": cfg.in_channels, "text_dim": cfg.text_dim}


def adm_key_map(net: UNet) -> dict[str, str]:
    """Each key of `net.state_dict()` -> the ADM key holding its weights (keys ADM has no counterpart for are
    left out: text conditioning)."""
    modules = dict(_TOP)

    def block(ours: str, res: str, attn: str | None) -> None:
        modules.update({f"{ours}.res.{k}": f"{res}.{v}" for k, v in _RES.items()})
        if attn is not None:
            modules.update({f"{ours}.attn.{k}": f"{attn}.{v}" for k, v in _ATTN.items()})

    for i, unit in enumerate(net.enc):
        if i:
            block(f"enc.{i}", f"input_blocks.{i}.0", f"input_blocks.{i}.1" if unit.attn is not None else None)
    block("mid.0", "middle_block.0", "middle_block.1")
    block("mid.1", "middle_block.2", None)
    j, layers = -1, 0
    for i, unit in enumerate(net.dec):
        if unit.res.resample == "up":  # ADM: the last layer of the output block that closes the level below
            block(f"dec.{i}", f"output_blocks.{j}.{layers}", None)
            continue
        j, layers = j + 1, 1 + (unit.attn is not None)
        block(f"dec.{i}", f"output_blocks.{j}.0", f"output_blocks.{j}.1" if unit.attn is not None else None)
    mapping = {}
    for key in net.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            mapping[key] = f"{modules[module]}.{leaf}"
    return mapping


def _fit(value: Tensor, shape: torch.Size) -> Tensor | None:
    """`value` shaped as `shape`: as is, or a 1x1 convolution's kernel as a linear layer's matrix; None if neither."""
    if value.shape == shape:
        return value
    if value.shape[:len(shape)] == shape and all(d == 1 for d in value.shape[len(shape):]):
        return value.reshape(shape)
    return None


def adm_to_unet_state(state: Mapping[str, Tensor], cfg: ModelConfig, where: str = "state dict") -> dict[str, Tensor]:
    """Our UNet's float32 state dict for `cfg` from ADM weights; ADMLayoutError naming what differs."""
    if not is_adm_state_dict(state):
        raise ADMLayoutError(f"{where}: not an ADM-layout state dict (no {', '.join(_SIGNATURE)})")
    if not cfg.adm_compatible:
        raise ADMLayoutError(f"{where} is an ADM-layout network: set model.adm_compatible=true so the UNet computes "
                             "as ADM does (its noise embedding, SiLU and GroupNorm)")
    found, configured = adm_hyperparameters(state, cfg.resolution), _configured(cfg)
    differ = [f"model.{key}: {where} has {found[key]}, the config {configured[key]}"
              for key in found if found[key] != configured[key]]
    if differ:
        raise ADMLayoutError(f"{where} does not fit the configured UNet; set these in the model section:\n  "
                             + "\n  ".join(differ))
    with torch.device("meta"):  # names and shapes only, no memory
        net = UNet(cfg)
    target, mapping = net.state_dict(), adm_key_map(net)
    out, problems = {}, []
    for key, like in target.items():
        source = mapping.get(key)
        if source is None or source not in state:
            problems.append(f"{key}: no ADM weights for it" + (f" (expected {source})" if source else ""))
            continue
        value = state[source].float()
        if key == "emb_class.weight":  # ADM has no "no class" row: a zero one (never trained, see the docstring)
            value = torch.cat([value, value.new_zeros(1, value.shape[1])])
        fitted = _fit(value, like.shape)
        if fitted is None:
            problems.append(f"{source}: shape {tuple(value.shape)} does not fit {key} {tuple(like.shape)}")
            continue
        out[key] = fitted.clone()
    unused = sorted(set(state) - set(mapping.values()))
    if unused:
        problems.append(f"ADM weights with no counterpart in the UNet: {', '.join(unused[:6])}"
                        + (f" and {len(unused) - 6} more" if len(unused) > 6 else ""))
    if problems:
        raise ADMLayoutError(f"{where} does not map onto the configured UNet:\n  " + "\n  ".join(problems[:12]))
    return out


__all__ = ["ADMLayoutError", "adm_hyperparameters", "adm_key_map", "adm_to_unet_state", "is_adm_state_dict"]

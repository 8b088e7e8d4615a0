"""Checkpoints that know which network they hold, so a mismatched load says what differs.

A payload is `{"architecture": net.architecture(), "state_dict": net.state_dict()}`. Loading compares the stored
architecture with the model's before touching weights and raises `ArchitectureMismatchError` naming the stage,
resolution and every differing config field, instead of torch's list of missing and unexpected keys.
"""
from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from pagoda_dist.config import ModelConfig
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet


# Config fields that change how a network runs or trains, not which weights it has: a checkpoint loads across them.
RUNTIME_FIELDS = frozenset({"model.dropout", "model.cond_drop_prob", "model.channels_last"})
# Fields a record may lack (written before they existed, or left out at their default): absent means this value.
RECORD_DEFAULTS = {"guidance_input": False, "model.adm_compatible": False}


class ArchitectureMismatchError(ValueError):
    """A checkpoint was written for a different network than the one it is being loaded into."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def describe(arch: dict[str, Any]) -> str:
    """E.g. 'stage grow-32 (resolution 32)'."""
    return f"stage {arch.get('stage', '?')} (resolution {arch.get('resolution', '?')})"


def check_architecture(expected: dict[str, Any], found: dict[str, Any], *, source: str = "checkpoint") -> None:
    """Raises ArchitectureMismatchError if `found` (from `source`) differs from `expected` (the model's).

    The message leads with the stage and resolution, then lists each differing field as
    "model.channels: checkpoint 64 vs model 32". Fields in RUNTIME_FIELDS (dropout, ...) may differ.
    """
    want, got = {**RECORD_DEFAULTS, **_flatten(expected)}, {**RECORD_DEFAULTS, **_flatten(found)}
    diffs = [f"{key}: {source} {got.get(key, '<absent>')!r} vs model {want.get(key, '<absent>')!r}"
             for key in sorted(want.keys() | got.keys())
             if key not in RUNTIME_FIELDS and want.get(key) != got.get(key)]
    if not diffs:
        return
    head = f"{source} was saved at {describe(found)}, model is {describe(expected)}"
    if (found.get("stage"), found.get("resolution")) == (expected.get("stage"), expected.get("resolution")):
        head = f"{source} and model are both {describe(expected)} but their networks differ"
    raise ArchitectureMismatchError(head + ":\n  " + "\n  ".join(diffs))


def _architecture_of(module: nn.Module) -> dict[str, Any]:
    if not callable(getattr(module, "architecture", None)):
        raise TypeError(f"{type(module).__name__} has no architecture() method; checkpoint the UNet or "
                        "OneStepGenerator itself, not a wrapper around it")
    return module.architecture()  # type: ignore[operator]


def checkpoint_payload(module: nn.Module) -> dict[str, Any]:
    """What to save: the architecture record next to the weights."""
    return {"architecture": _architecture_of(module), "state_dict": module.state_dict()}


def load_checked(module: nn.Module, payload: dict[str, Any], *, source: str = "checkpoint") -> None:
    """Checks `payload["architecture"]` against `module.architecture()`, then loads the weights strictly."""
    arch = payload.get("architecture") if isinstance(payload, dict) else None
    if arch is None or "state_dict" not in payload:
        raise ArchitectureMismatchError(
            f"{source} has no architecture record (keys: {sorted(payload) if isinstance(payload, dict) else '?'}): "
            "it was not written with checkpoint_payload(); rebuild it or load the weights by hand")
    check_architecture(_architecture_of(module), arch, source=source)
    state: dict[str, Tensor] = payload["state_dict"]
    module.load_state_dict(state, strict=True)


def model_from_architecture(arch: dict[str, Any]) -> nn.Module:
    """Builds the (untrained) network an architecture record describes: a UNet or a OneStepGenerator."""
    kind = arch.get("kind")
    if kind == "unet":
        return UNet(ModelConfig(**arch["model"]))
    if kind == "one_step_generator":
        return OneStepGenerator.from_architecture(arch)
    raise ArchitectureMismatchError(f"unknown network kind {kind!r} in architecture record; "
                                    "expected 'unet' or 'one_step_generator'")


def network_from_export(export: dict[str, Any], *, source: str = "export",
                        weights: Literal["ema", "net"] = "ema") -> UNet | OneStepGenerator:
    """The network a checkpoint's export describes, its architecture checked against the weights: the EMA network,
    or (weights "net") the live one the optimiser was stepping."""
    if weights not in export:
        raise ValueError(f"{source} holds no {weights!r} weights (it has {', '.join(sorted(export))}); the live "
                         "weights are in a checkpoint's full export, not its safetensors copy")
    net = model_from_architecture(export["architecture"])
    load_checked(net, {"architecture": export["architecture"], "state_dict": export[weights]}, source=source)
    return net

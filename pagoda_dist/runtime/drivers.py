"""The optimisation side of a stage step (`StepDriver`): plain torch optimizers, or one DeepSpeed engine per net.

A stage calls `driver.module(name)` in its forward pass, `driver.backward(name, loss)` and `driver.step(name)`.
Both drivers scale losses for gradient accumulation, step only at accumulation boundaries, clip gradients and
apply the learning-rate warm-up (`begin_step(nimg)` before each optimizer step).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pagoda_dist.config import OptimizerConfig, RuntimeConfig, TrainConfig

from .schedule import lr_factor

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "radam": torch.optim.RAdam,
}


def build_optimizer(net: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The torch optimizer named by `cfg` over `net`'s trainable parameters (frozen ones are left out)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"network {type(net).__name__} has no trainable parameters; drop it from Stage.trainable()")
    # foreach: one multi-tensor kernel per update instead of a Python loop over parameters (CPU too).
    return _OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 foreach=True)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, nimg: int) -> None:
    lr = cfg.lr * lr_factor(nimg, cfg.warmup_kimg)
    for group in optimizer.param_groups:
        group["lr"] = lr


class PlainDriver:
    """Single-process driver over plain modules and torch optimizers."""

    def __init__(self, nets: dict[str, nn.Module], optimizers: dict[str, OptimizerConfig], *,
                 grad_accum: int = 1, grad_clip: float = 0.0) -> None:
        self.nets = nets
        self.configs = optimizers
        self.optimizers = {name: build_optimizer(net, optimizers[name]) for name, net in nets.items()}
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self._micro = dict.fromkeys(nets, 0)

    def begin_step(self, nimg: int) -> None:
        for name, opt in self.optimizers.items():
            _set_lr(opt, self.configs[name], nimg)

    def module(self, name: str) -> nn.Module:
        return self.nets[name]

    def backward(self, name: str, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, name: str) -> None:
        self._micro[name] += 1
        if self._micro[name] % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.nets[name].parameters(), self.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def live(self, name: str) -> nn.Module:
        """The network itself (for the EMA and exports)."""
        return self.nets[name]

    @staticmethod
    def gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def deepspeed_config(train: TrainConfig, runtime: RuntimeConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine: batch geometry, ZeRO stage, precision and clipping."""
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ValueError(f"batch_size {train.batch_size} is not divisible by world size {world_size} x grad_accum "
                         f"{train.grad_accum}; choose a batch size that is a multiple of {per_step}")
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // per_step,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": runtime.zero_stage},
        "bf16": {"enabled": runtime.precision == "bf16"},
        # torch Adam/AdamW/RAdam under ZeRO: DeepSpeed only vouches for its own optimizers by default.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


class DeepSpeedDriver:
    """One DeepSpeed engine per trainable network (a GAN stage gets two), built from torch optimizers."""

    def __init__(self, nets: dict[str, nn.Module], optimizers: dict[str, OptimizerConfig],
                 ds_config: dict[str, Any]) -> None:
        import deepspeed

        self.configs = optimizers
        self.engines: dict[str, Any] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else None
        self._zero3 = ds_config["zero_optimization"]["stage"] == 3
        for name, net in nets.items():
            # DeepSpeed broadcasts and flattens parameters through byte views, which need dense row-major storage;
            # channels-last convolution weights are not. Activations keep their channels-last layout regardless.
            for p in net.parameters():
                p.data = p.data.clone(memory_format=torch.contiguous_format)
            # The torch optimizer we build stays the one that steps inside DeepSpeed's ZeRO wrapper, so setting
            # its learning rate is how the warm-up reaches every ZeRO stage.
            opt = build_optimizer(net, optimizers[name])
            engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config,
                                                   dist_init_required=False)
            self.engines[name] = engine
            self.optimizers[name] = opt
        self._modules = {name: engine if self._dtype is None else _Casting(engine, self._dtype)
                         for name, engine in self.engines.items()}

    def begin_step(self, nimg: int) -> None:
        for name, opt in self.optimizers.items():
            _set_lr(opt, self.configs[name], nimg)

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def backward(self, name: str, loss: Tensor) -> None:
        self.engines[name].backward(loss)  # scales by 1/grad_accum itself

    def step(self, name: str) -> None:
        self.engines[name].step()  # a no-op between accumulation boundaries

    def live(self, name: str) -> nn.Module:
        return self.engines[name].module

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        if not self._zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save_state(self, directory: Path) -> None:
        """Every rank writes its part of every engine (model, ZeRO optimizer shards) below `directory`."""
        for name, engine in self.engines.items():
            # DeepSpeed makes the folder on rank 0 only; each rank here writes into its own local folder.
            (directory / name / "state").mkdir(parents=True, exist_ok=True)
            engine.save_checkpoint(str(directory / name), tag="state", client_state={}, save_latest=False)

    def load_state(self, directory: Path) -> None:
        """Loads what `save_state` wrote (with every rank's files present below `directory`)."""
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory / name), tag="state", load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed state for network {name!r} under {directory / name}")


class _Casting(nn.Module):
    """Runs a bf16 engine on fp32 inputs: floating inputs are cast down and floating outputs back to fp32.

    DeepSpeed's bf16 mode holds bf16 weights but leaves inputs alone; casting here keeps each stage's math (noise,
    losses, preconditioning) in fp32 and only the networks in bf16.
    """

    def __init__(self, engine: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.engine = engine
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.engine(*_cast(args, self.dtype), **_cast(kwargs, self.dtype))
        return _cast(out, torch.float32)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["engine"], name)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating tensor inside (tuples, lists, dicts, dataclasses) cast to `dtype`."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _cast(getattr(value, f.name), dtype)
                                             for f in dataclasses.fields(value) if f.init})
    return value

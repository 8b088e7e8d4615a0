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

from .divergence import NonFiniteGuard
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
    accum = train.accumulation(world_size)
    per_step = world_size * accum
    if accum < 1 or train.batch_size % per_step:
        raise ValueError(f"batch_size {train.batch_size} is not divisible by world size {world_size} x "
                         f"{f'micro_batch {train.micro_batch}' if train.micro_batch else f'grad_accum {accum}'}; "
                         "choose a batch size that is a multiple of their product")
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // per_step,
        "gradient_accumulation_steps": accum,
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
                 ds_config: dict[str, Any], guard: NonFiniteGuard | None = None) -> None:
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
            if guard is not None:
                guard.watch(opt)
        self.guard = guard  # skips updates with a non-finite loss or gradient, on every rank together
        self._modules = {name: engine if self._dtype is None else _Casting(engine, self._dtype)
                         for name, engine in self.engines.items()}

    def begin_step(self, nimg: int) -> None:
        for name, opt in self.optimizers.items():
            _set_lr(opt, self.configs[name], nimg)

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def backward(self, name: str, loss: Tensor) -> None:
        if self.guard is not None:
            self.guard.note_loss(loss)
        self.engines[name].backward(loss)  # scales by 1/grad_accum itself

    def step(self, name: str) -> None:
        engine = self.engines[name]
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()  # a no-op between accumulation boundaries
        if boundary and self.guard is not None:
            self.guard.after_update(applied=engine.was_step_applied())

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
        """Loads what `save_state` wrote (with every rank's files present below `directory`). ZeRO-1/2 state saved by
        another number of ranks is re-partitioned for this one (`_repartition`): DeepSpeed itself refuses it."""
        for name, engine in self.engines.items():
            shards = sorted((directory / name / "state").glob("*zero_pp_rank_*_optim_states.pt"),
                            key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
            elastic = bool(shards) and len(shards) != engine.seq_dp_world_size
            path, _ = engine.load_checkpoint(str(directory / name), tag="state", load_module_strict=True,
                                             load_optimizer_states=not elastic, load_lr_scheduler_states=False,
                                             load_module_only=elastic)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed state for network {name!r} under {directory / name}")
            if elastic:
                # DeepSpeed's own files, read by its own checkpoint engine (see checkpoint.py on trusting them).
                _repartition(engine, [engine.checkpoint_engine.load(str(p), map_location="cpu") for p in shards])


def _repartition(engine: Any, saved: list[dict[str, Any]]) -> None:
    """Sets a ZeRO-1/2 engine's fp32 master partitions and optimizer state from the per-rank files of a checkpoint
    saved by another number of ranks. Each parameter group is one flat fp32 vector cut into equal partitions, padded
    at the end only: the saved partitions laid end to end, cut at the group's length, are that vector, which is then
    cut anew for this world (what DeepSpeed's universal checkpoint does through a conversion step)."""
    from deepspeed.checkpoint import constants as ds

    zero = engine.optimizer
    states = [sd[ds.OPTIMIZER_STATE_DICT] for sd in saved]  # BASE_OPTIMIZER_STATE: the torch optimizer's state

    def cut(pieces: list[Tensor], length: int, mine: Tensor, group: Any) -> Tensor:
        flat = torch.cat([p.reshape(-1).float() for p in pieces])[:length]
        part, world = mine.numel(), torch.distributed.get_world_size(group=group)
        padded = torch.zeros(part * world, dtype=mine.dtype)
        padded[:length] = flat
        rank = torch.distributed.get_rank(group=group)
        return padded[rank * part:(rank + 1) * part].to(mine.device)

    for i, fp32 in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.real_dp_process_group[i]
        length = sum(st[ds.SINGLE_PARTITION_OF_FP32_GROUPS][i].numel() for st in states)  # saved without end padding
        fp32.data.copy_(cut([st[ds.SINGLE_PARTITION_OF_FP32_GROUPS][i] for st in states], length, fp32, group))
        saved_state = [st[ds.BASE_OPTIMIZER_STATE]["state"].get(i, {}) for st in states]
        zero.optimizer.state[fp32] = {
            key: cut([s[key] for s in saved_state], length, fp32, group) if torch.is_tensor(value) and value.dim()
            else (value.clone() if torch.is_tensor(value) else value)  # the step count: the same on every rank
            for key, value in saved_state[0].items()}
    zero._link_all_hp_params()  # as DeepSpeed's own load does: parameters see their new optimizer state


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
    """`value` with every floating tensor inside (tuples, lists, dicts, dataclasses) cast to `dtype`, except in
    dataclass fields whose metadata sets keep_dtype (values that must stay exact, e.g. a guidance scale)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields marked keep_dtype stay as they are
        return dataclasses.replace(value, **{f.name: _cast(getattr(value, f.name), dtype)
                                             for f in dataclasses.fields(value)
                                             if f.init and not f.metadata.get("keep_dtype")})
    return value

"""Peak GPU memory per rank of each stage, estimated before any GPU is touched (what `--dry-run` prints).

Two parts, counted on torch's meta device (shapes only, so a 300M-parameter UNet costs nothing to count):
- model states under the configured ZeRO stage, DeepSpeed's mixed-precision accounting: per trainable parameter
  2 + 2 bytes of bf16 weight and gradient plus 12 of fp32 master weight and Adam's two moments (fp32 training:
  4 + 4 + 8), ZeRO-1 partitioning the optimizer states over the ranks, ZeRO-2 the gradients too, ZeRO-3 the
  weights too; frozen parameters hold their weights only; rank 0 also keeps the fp32 EMA of the first network;
- activations: the bytes every forward pass of one optimizer step saves for backward at the per-rank
  micro-batch, counted with autograd's saved-tensor hooks (halved under bf16 autocast). The adversarial stages'
  generator step holds the most at once: the generator on the latents and on fresh noise, and each discriminator
  on its output.
A fixed margin covers the CUDA context, cuDNN workspaces and allocator fragmentation. It is an estimate: good for
"fits in 80 GB or not", not for the last gigabyte.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pagoda_dist.chain import StageSpec
from pagoda_dist.config import Config
from pagoda_dist.eval.report import meta_networks, shape_condition

GIB = 2**30
CUDA_MARGIN = int(1.5 * GIB)  # context (~0.5 GiB on an H100), cuDNN workspaces, fragmentation: a margin, not measured


@dataclass(frozen=True)
class StageMemory:
    """Bytes per rank (rank 0, which also holds the EMA) of one stage."""

    name: str
    model_states: int
    activations: int
    ema: int

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.ema + CUDA_MARGIN


def model_state_bytes(trainable: int, frozen: int, *, zero_stage: int, ranks: int, bf16: bool) -> int:
    """Weights, gradients and Adam states of `trainable` parameters and weights of `frozen` ones, per rank."""
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    share = [1, 1, 1]  # weight, gradient, optimizer state: the fraction of each a rank holds
    for stage in range(1, zero_stage + 1):
        share[3 - stage] = 1 / ranks  # ZeRO-1: optimizer states, ZeRO-2: + gradients, ZeRO-3: + weights
    per_trainable = weight * share[0] + grad * share[1] + optim * share[2]
    return int(trainable * per_trainable + frozen * weight * share[0])


def saved_bytes(model: nn.Module, x: Tensor, forward: Callable[[nn.Module, Tensor], Tensor]) -> int:
    """Bytes of the tensors one forward of `model` on `x` saves for backward (parameters excluded: they are model
    states)."""
    params = {id(p) for p in model.parameters()}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if id(t) not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(model, x)
    return total


def stage_memory(cfg: Config, spec: StageSpec) -> StageMemory:
    rt = cfg.runtime
    micro = spec.train.batch_size // (rt.num_workers * spec.train.accumulation(rt.num_workers))
    bf16 = rt.precision == "bf16"
    nets = meta_networks(cfg, spec)
    states = sum(model_state_bytes(sum(p.numel() for p in n.parameters() if p.requires_grad),
                                   sum(p.numel() for p in n.parameters() if not p.requires_grad),
                                   zero_stage=rt.zero_stage, ranks=rt.num_workers, bf16=bf16) for n in nets)
    ema = 4 * sum(p.numel() for p in nets[0].parameters())
    c, base = cfg.model.in_channels, cfg.model.resolution

    def cond(x: Tensor) -> object:
        return shape_condition(cfg, len(x), x.device)

    with torch.device("meta"):
        base_input = torch.randn(micro, c, base, base)
        if spec.kind == "teacher":
            activations = saved_bytes(nets[0], base_input, lambda m, x: m(x, torch.ones(len(x)), cond(x)))
        else:
            adv = spec.adversarial(cfg)
            g, *discriminators = nets
            activations = (2 if adv.uses_noise_half else 1) * saved_bytes(g, base_input, lambda m, x: m(x, cond(x)))
            for d in discriminators if adv.uses_gan else ():
                fake = torch.randn(micro, c, spec.resolution, spec.resolution, requires_grad=True)
                activations += saved_bytes(d, fake, lambda m, x: torch.stack(m(x, cond(x))).sum(0))
    return StageMemory(spec.name, states, activations // 2 if bf16 else activations, ema)

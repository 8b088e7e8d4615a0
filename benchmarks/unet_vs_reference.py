"""Training throughput of our teacher UNet next to the reference implementation's UNet of the same configuration.

The reference is sony/pagoda (built on sony/ctm), whose teacher network is the ADM/guided-diffusion `UNetModel` in
`cm/unet.py`. Point `--reference-path` at a checkout of it (outside this repository), e.g.

    git --git-dir=<mirror of github.com/sony/pagoda> archive HEAD | tar -x -C /tmp/ref_pagoda
    python benchmarks/unet_vs_reference.py --reference-path /tmp/ref_pagoda --threads 1 2
    python benchmarks/unet_vs_reference.py --reference-path /tmp/ref_pagoda --device cuda --resolutions 32 64

Configuration (issue 7): 64 channels, multipliers (1, 2, 2), 2 residual blocks per level, attention at res/8 (with
three levels the coarsest feature map is res/4, so both networks attend only in the middle block), scale-shift norm,
residual up/down-sampling, 10 classes, 64 channels per head. Measured: images/s of a training step (forward, MSE
loss, backward, AdamW step) at batch 32, fp32 and bf16 autocast, with the networks interleaved in one process:
after untimed warm-up steps, timing windows rotate over the variants (ours, reference, ...) and the order of each
round is reversed every other round (ABBA), so slow drifts of the shared machine's load hit every variant alike.
Reported: the median over windows of images/s (wall) and of images per CPU-second (process CPU time, all threads;
robust to other load), and our ratio to each reference variant.

How the reference is loaded: only `cm/unet.py` and the modules it imports from its own package (`cm/nn.py`,
`cm/fp16_util.py` -> `cm/logger.py`, `cm/dist_util.py`) are loaded, under the private package name `ref_cm`, from
the checkout. Two things stand in the way and are handled here, without touching the checkout:
  * `cm/dist_util.py` imports `blobfile` at module level (used only for file I/O the UNet never does): when it is
    not installed, an empty stub module is registered under that name for this process.
  * `cm/unet.py` ends in an `if __name__ == "__main__":` block with a stray `return` (a pasted function body), a
    SyntaxError: the file's source is compiled up to that line, which holds only that block.
The reference's CPU-capable attention is `attention_type="legacy"` (QKVAttentionLegacy: einsum + softmax); its
default "flash" needs flash-attn on CUDA. In legacy mode the reference wraps the attention op in its own
gradient checkpoint (recomputed in backward) - that is how it runs, variant `ref`. Variants `ref-cl` (channels-last
weights and input), `ref-nockpt` (attention checkpoint off) and `ref-cl-nockpt` give it the same help ours gets.
The reference's `use_fp16` casts the torso to float16 for CUDA with its own loss scaling; on the CPU both networks
use bf16 autocast instead.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package
from pagoda_dist.config import ModelConfig  # noqa: E402
from pagoda_dist.interfaces import Condition  # noqa: E402
from pagoda_dist.models.unet import UNet  # noqa: E402

CHANNELS, MULT, RES_BLOCKS, HEAD_CHANNELS, CLASSES = 64, (1, 2, 2), 2, 64, 10
REF_VARIANTS = ("ref", "ref-cl", "ref-nockpt", "ref-cl-nockpt")


# ------------------------------------------------------------------------------------------- the reference network
def load_reference_unet(reference_path: Path) -> type[nn.Module]:
    """The reference's `UNetModel` class, loaded from `reference_path/cm` under the package name `ref_cm`."""
    cm_dir = reference_path / "cm"
    if not (cm_dir / "unet.py").is_file():
        raise SystemExit(f"{cm_dir / 'unet.py'} not found: --reference-path must be a checkout of sony/pagoda")
    try:
        import blobfile  # noqa: F401
    except ImportError:  # imported at module level by cm/dist_util.py, used only for checkpoint I/O
        sys.modules["blobfile"] = types.ModuleType("blobfile")
    spec = importlib.util.spec_from_file_location("ref_cm", cm_dir / "__init__.py",
                                                  submodule_search_locations=[str(cm_dir)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["ref_cm"] = package
    spec.loader.exec_module(package)
    # cm/unet.py cannot be imported as-is (a `return` in its __main__ block is a SyntaxError): compile the source
    # up to that block, which is all the file's definitions.
    source = (cm_dir / "unet.py").read_text()
    cut = source.find('\nif __name__ == "__main__":')
    module = types.ModuleType("ref_cm.unet")
    module.__file__, module.__package__ = str(cm_dir / "unet.py"), "ref_cm"
    sys.modules["ref_cm.unet"] = module
    exec(compile(source[:cut] if cut >= 0 else source, module.__file__, "exec"), module.__dict__)
    return module.UNetModel


def build_reference(unet_cls: type[nn.Module], resolution: int, variant: str) -> nn.Module:
    """The reference UNet in issue 7's configuration, as its `create_model` would build it (no extra levels)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints each decoder level
        net = unet_cls(
            input_size=resolution, output_size=resolution,          # no progressive-growing levels
            model_channels_high=CHANNELS, use_scale_shift_norm_high=True, num_res_blocks_high=RES_BLOCKS,
            encoder_channel_mult=MULT, decoder_channel_mult=MULT,
            attention_resolutions=(8,),                              # downsampling factor 8, i.e. res/8
            in_channels=3, model_channels=CHANNELS, out_channels=3, num_res_blocks=RES_BLOCKS, dropout=0.0,
            num_classes=CLASSES, use_fp16=False, num_head_channels=HEAD_CHANNELS,
            use_scale_shift_norm=True, resblock_updown=True,
            training_mode="edm",                                     # teacher: no CTM second embedding
            attention_type="legacy",                                 # the only CPU-capable attention there
        )
    if "nockpt" in variant:
        for m in net.modules():
            if hasattr(m, "use_attention_checkpoint"):
                m.use_attention_checkpoint = False
    if "-cl" in variant:
        net.to(memory_format=torch.channels_last)
    return net


def build_ours(resolution: int, device: torch.device) -> UNet:
    """Ours as a run config would build it for `device`: channels-last on the CPU only (on CUDA, GroupNorm copies
    channels-last tensors; `model.channels_last` left unset resolves the same way)."""
    return UNet(ModelConfig(resolution=resolution, channels=CHANNELS, channel_mult=list(MULT),
                            num_res_blocks=RES_BLOCKS, attn_resolutions=[max(1, resolution // 8)],
                            head_channels=HEAD_CHANNELS, num_classes=CLASSES,
                            channels_last=device.type == "cpu")).to(device)


# ------------------------------------------------------------------------------------------------------ timing
@dataclass
class Inputs:
    x: torch.Tensor
    sigma: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor


def make_inputs(batch: int, resolution: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(0)
    sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()  # EDM's log-normal training sigmas
    inp = Inputs(torch.randn(batch, 3, resolution, resolution, generator=g), sigma,
                 torch.randint(0, CLASSES, (batch,), generator=g),
                 torch.randn(batch, 3, resolution, resolution, generator=g))
    return Inputs(*(t.to(device) for t in (inp.x, inp.sigma, inp.labels, inp.target)))


def forward_fn(variant: str, net: nn.Module, inp: Inputs) -> Callable[[], torch.Tensor]:
    """The network call on this variant's preferred input layout, in its own conditioning convention."""
    x = inp.x.contiguous(memory_format=torch.channels_last) if "-cl" in variant else inp.x  # ours converts itself
    if variant == "ours":
        cond = Condition(class_labels=inp.labels)
        c_noise = inp.sigma.log() / 4  # EDM's c_noise
        return lambda: net(x, c_noise, cond)
    return lambda: net(x, inp.sigma, inp.labels)  # the reference takes sigma and computes 250 log(sigma) itself


def train_step_fn(variant: str, net: nn.Module, inp: Inputs, precision: str) -> Callable[[], None]:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    fwd = forward_fn(variant, net, inp)

    def step() -> None:
        with torch.autocast(inp.x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = fwd()
        loss = (out.float() - inp.target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(steps: dict[str, Callable[[], None]], batch: int, warmup: int, rounds: int,
                window_steps: int, sync: Callable[[], None]) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant: images/s and images per CPU-second of each timing window, windows rotating ABBA."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    names = list(steps)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(window_steps):
                steps[name]()
            sync()  # a GPU window ends when its kernels do, not when they are queued
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[name][0].append(window_steps * batch / wall)
            out[name][1].append(window_steps * batch / cpu)
    return out


@dataclass
class Row:
    threads: int
    resolution: int
    precision: str
    variant: str
    img_per_s: float
    img_per_cpu_s: float
    cpu_share: float  # CPU time / (wall x threads): well below 1 means other load took the cores
    ours_over_this: float  # our median img/s / this variant's (1.0 for ours)
    ours_over_this_cpu: float  # the same for images per CPU-second
    windows: int
    load_before: float
    load_after: float


def train_gflop_per_image(net: nn.Module, fwd: Callable[[], torch.Tensor], batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fwd().float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch / 1e9


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-path", type=Path, required=True, help="checkout of github.com/sony/pagoda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU thread counts, run in turn")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reference-variants", nargs="+", choices=REF_VARIANTS, default=["ref", "ref-cl-nockpt"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--rounds", type=int, default=6, help="timing windows per variant")
    parser.add_argument("--window-images", type=int, default=64, help="images per timing window (>= 1 step)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    unet_cls = load_reference_unet(args.reference_path.resolve())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    for res in args.resolutions:  # parameter and FLOP counts: identical work is the premise of the comparison
        ours, ref = build_ours(res, torch.device("cpu")), build_reference(unet_cls, res, "ref")
        inp = make_inputs(2, res, torch.device("cpu"))
        n_ours, n_ref = (sum(p.numel() for p in n.parameters()) for n in (ours, ref))
        f_ours = train_gflop_per_image(ours, forward_fn("ours", ours, inp), 2)
        f_ref = train_gflop_per_image(ref, forward_fn("ref", ref, inp), 2)
        print(f"{res} px: parameters ours {n_ours:,} / reference {n_ref:,} (difference {n_ours - n_ref:+,}: our "
              f"class table has one more row of {4 * CHANNELS}, the 'no class' used for guidance); training "
              f"GFLOP/image ours {f_ours:.3f} / reference {f_ref:.3f}")

    rows: list[Row] = []
    print("\n| threads | res | precision | variant | img/s | img/CPU-s | CPU share | ours/this (wall) "
          "| ours/this (CPU) | windows | load 1-min before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for res in args.resolutions:
            for precision in args.precisions:
                inp = make_inputs(args.batch, res, device)
                variants = ["ours", *args.reference_variants]
                steps = {}
                for v in variants:
                    torch.manual_seed(0)
                    net = build_ours(res, device) if v == "ours" else build_reference(unet_cls, res, v).to(device)
                    steps[v] = train_step_fn(v, net, inp, precision)
                before = load1()
                window_steps = max(1, args.window_images // args.batch)
                res_times = interleaved(steps, args.batch, args.warmup, args.rounds, window_steps, sync)
                after = load1()
                med = {v: (statistics.median(w), statistics.median(c)) for v, (w, c) in res_times.items()}
                for v in variants:
                    wall, cpu = med[v]
                    rows.append(Row(threads, res, precision, v, wall, cpu, min(1.0, wall / cpu / threads),
                                    med["ours"][0] / wall, med["ours"][1] / cpu, args.rounds, before, after))
                    r = rows[-1]
                    print(f"| {threads} | {res} | {precision} | {v} | {r.img_per_s:.2f} | {r.img_per_cpu_s:.2f} "
                          f"| {r.cpu_share:.2f} | {r.ours_over_this:.2f} | {r.ours_over_this_cpu:.2f} "
                          f"| {r.windows} | {before:.2f}/{after:.2f} |", flush=True)
    print(f"\n{args.device}, torch {torch.__version__}; batch {args.batch}; {window_steps} step(s) per window after {args.warmup} "
          "warm-up steps; medians over windows. 'ours/this' > 1 means ours is faster.")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()

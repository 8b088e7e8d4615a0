"""Training throughput of the teacher UNet: images/s for forward + backward + AdamW step.

Config: 64 channels, channel_mult (1, 2, 2), 2 residual blocks per level, self-attention at resolution/8 (and in
the middle block), scale-shift norm, residual up/down-sampling. For each device, resolution, precision (fp32, bf16
autocast) and memory format (channels-last or not), prints the median images/s over timed iterations after
warm-up, next to the parameter count and the FLOPs per image (torch.utils.flop_counter, forward and training).
On a shared CPU, wall-clock figures drop with other load: the "CPU share" column says how much of the requested
threads' time the benchmark actually got, and "img/CPU-s" (images per CPU-second) is the load-robust comparison.

    python benchmarks/unet_throughput.py                     # CPU (and CUDA if present), 16/32/64 px, ~3 min on 2 cores
    python benchmarks/unet_throughput.py --compile           # also torch.compile'd variants
    python benchmarks/unet_throughput.py --device cuda --iters 20 --json out.json
    python benchmarks/unet_throughput.py --device cuda --resolutions 64 --memory-formats channels_last --compile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package
from pagoda_dist.config import ModelConfig  # noqa: E402
from pagoda_dist.interfaces import Condition  # noqa: E402
from pagoda_dist.models.unet import UNet  # noqa: E402


@dataclass
class Row:
    device: str
    resolution: int
    precision: str
    channels_last: bool
    compiled: bool
    batch: int
    img_per_s: float
    ms_per_step: float
    params_m: float
    fwd_gflop_per_img: float
    train_gflop_per_img: float
    achieved_tflops: float
    img_per_cpu_s: float  # images per second of process CPU time (all threads): robust to a shared machine
    cpu_share: float  # process CPU time / (wall time x threads): well below 1 means the CPU was shared


def model_config(resolution: int, channels_last: bool) -> ModelConfig:
    return ModelConfig(resolution=resolution, channels=64, channel_mult=[1, 2, 2], num_res_blocks=2,
                       attn_resolutions=[max(1, resolution // 8)], head_channels=32, num_classes=10,
                       channels_last=channels_last)


def flops_per_image(resolution: int, device: str) -> tuple[float, float]:
    """Forward and forward+backward FLOPs for one image (counted, not estimated), in GFLOP."""
    net = UNet(model_config(resolution, channels_last=False)).to(device)
    x = torch.randn(1, 3, resolution, resolution, device=device)
    cond = Condition(class_labels=torch.zeros(1, dtype=torch.long, device=device))
    c_noise = torch.zeros(1, device=device)
    with FlopCounterMode(display=False) as fwd:
        net(x, c_noise, cond)
    with FlopCounterMode(display=False) as train:
        net(x, c_noise, cond).square().mean().backward()
    return fwd.get_total_flops() / 1e9, train.get_total_flops() / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def print_profile(step: Callable[[], None], device: str, steps: int = 3, rows: int = 15) -> None:
    """torch.profiler's table of the ops that took the most device time over `steps` steps (where it goes: on an
    H100 this showed layout copies and GroupNorm, not convolutions, and device time ~ wall time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    print(prof.key_averages().table(sort_by=f"{'cuda' if device == 'cuda' else 'cpu'}_time_total", row_limit=rows,
                                    max_name_column_width=60), flush=True)


def time_training(resolution: int, device: str, precision: str, channels_last: bool, compiled: bool,
                  batch: int, warmup: int, iters: int, profile: bool = False) -> tuple[float, int, float, float]:
    """Median seconds per optimizer step over `iters` timed steps, the parameter count, the median CPU seconds
    per step, and the CPU share over the timed steps; with `profile`, then prints where a step's time goes."""
    torch.manual_seed(0)
    net = UNet(model_config(resolution, channels_last)).to(device)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(batch, 3, resolution, resolution, device=device)
    c_noise = torch.randn(batch, device=device) * 1.2 / 4 - 0.3
    cond = Condition(class_labels=torch.randint(0, 10, (batch,), device=device))
    step_net = torch.compile(net) if compiled else net
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = (step_net(x, c_noise, cond).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    share = sum(cpu_times) / (sum(times) * torch.get_num_threads())
    if profile:
        print_profile(step, device)
    return statistics.median(times), params, statistics.median(cpu_times), share


def run(args: argparse.Namespace) -> list[Row]:
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        for res in args.resolutions:
            fwd_gflop, train_gflop = flops_per_image(res, device)
            # Fewer timed steps at high resolution on the CPU keep the default run short; GPUs take many.
            iters = args.iters if device == "cuda" else max(2, args.iters * 16 // res)
            for compiled in ([False, True] if args.compile else [False]):
                for precision in args.precisions:
                    for cl in args.memory_formats:
                        sec, params, cpu_sec, share = time_training(res, device, precision, cl, compiled, args.batch,
                                                    args.warmup, iters, args.profile)
                        ips = args.batch / sec
                        rows.append(Row(device, res, precision, cl, compiled, args.batch, ips, 1e3 * sec,
                                        params / 1e6, fwd_gflop, train_gflop, ips * train_gflop / 1e3,
                                        args.batch / cpu_sec, share))
                        print_row(rows[-1], header=len(rows) == 1, flush=True)
    return rows


def print_row(r: Row, header: bool = False, flush: bool = False) -> None:
    if header:
        print("| device | res | precision | channels_last | compiled | batch | img/s | ms/step | params (M) "
              "| fwd GFLOP/img | train GFLOP/img | achieved TFLOP/s | img/CPU-s | CPU share |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r.device} | {r.resolution} | {r.precision} | {r.channels_last} | {r.compiled} | {r.batch} "
          f"| {r.img_per_s:.1f} | {r.ms_per_step:.0f} | {r.params_m:.2f} | {r.fwd_gflop_per_img:.3f} "
          f"| {r.train_gflop_per_img:.3f} | {r.achieved_tflops:.3f} | {r.img_per_cpu_s:.2f} | {r.cpu_share:.2f} |",
          flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--memory-formats", nargs="+", choices=["channels_last", "contiguous"],
                        default=["channels_last", "contiguous"], help="activation/weight layouts to time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (more with --compile)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps at 16 px; scaled down as 16/res on CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--profile", action="store_true", help="after each configuration, print torch.profiler's "
                        "table of the ops that took the most (device) time")
    args = parser.parse_args()
    args.memory_formats = [f == "channels_last" for f in args.memory_formats]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        args.warmup = max(args.warmup, 3)  # compilation and recompiles happen in the first steps
    t0 = time.perf_counter()
    rows = run(args)
    print(f"\n{len(rows)} configurations in {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    if device_rows := [r for r in rows if r.device == "cpu" and r.cpu_share < 0.7]:
        print(f"warning: {len(device_rows)} CPU rows got < 70% of {torch.get_num_threads()} threads' time (other load): "
              "with more threads than free cores, OpenMP threads wait on each other; try --threads 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()

"""One-GPU check of every PaGoDA stage under a single-process DeepSpeed engine: images/s and MFU.

Run by `benchmarks/gpu_check.sh` (one part per process, each under its own timeout) on a lent GPU machine; also
runnable on the CPU with `--device cpu --smoke` (tiny sizes) to prove the code path works before GPU time is spent.

    python benchmarks/gpu_check.py info                                   # torch, CUDA, DeepSpeed, GPU, peaks
    python benchmarks/gpu_check.py stage teacher --resolution 64 --batch 128
    python benchmarks/gpu_check.py stage precompute|distill|grow ...
    python benchmarks/gpu_check.py stage teacher --device cpu --smoke     # a few tiny steps on the CPU

Each stage is the repository's own stage object (`pagoda_dist.stages`) driven by its `DeepSpeedDriver` (ZeRO
stage 2, bf16 by default) on synthetic data at a realistic size: the issue-7 UNet (64 channels, multipliers
(1, 2, 2), 2 residual blocks, attention at res/8 and in the middle, 64 channels per head, 10 classes) as teacher
at 64 px; distil at 64 px (generator + discriminator, GAN term on); one growth step 64 -> 128 px; precompute =
Heun PF-ODE inversion on the reference's 40-point grid (78 network evaluations per image) with the teacher.

MFU = counted FLOPs of one step (torch's FlopCounterMode, as `runtime.telemetry` counts them: matmuls,
convolutions, attention; 2 FLOPs per multiply-add) / measured seconds per step / peak. Two peaks are reported:
the datasheet dense peak of the GPU for the precision (H100 SXM / H200: 989 TFLOP/s bf16) and the measured dense
matmul peak (`runtime.flops.estimate_peak_flops`, what `runtime.worker` divides by).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, by a substring of the device name;
# the first match wins, so the more specific names come first.
DATASHEET_PEAK = {
    "bf16": [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12)],
    "fp32": [("H100 PCIe", 378e12), ("H100", 495e12), ("H200", 495e12), ("GH200", 495e12), ("A100", 156e12)],
}  # fp32 rows are the TF32 tensor-core peaks (what cuDNN convolutions use by default)


def datasheet_peak(device_name: str, precision: str) -> float | None:
    for key, peak in DATASHEET_PEAK[precision]:
        if key in device_name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ set-up
def init_single_process(device: torch.device) -> None:
    """A one-rank torch.distributed group, as DeepSpeed needs one even for a single GPU."""
    with socket.socket() as s:  # a free port on loopback: nothing else on the machine must be disturbed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def make_config(args: argparse.Namespace) -> Any:
    """The run config: with --config, that config's networks (e.g. the paper's 296M ADM teacher and its growth to
    512 px) on one rank at batch --batch; else the 64-channel UNet at --resolution with one growth octave. ZeRO and
    precision from args."""
    from pagoda_dist.config import load_config

    if args.config:
        batch = args.batch
        overrides = {"runtime.num_workers": 1, "runtime.use_gpu": str(args.device == "cuda").lower(),
                     "runtime.zero_stage": args.zero_stage, "runtime.precision": args.precision,
                     "teacher.train.grad_accum": 1, "teacher.train.batch_size": batch,
                     "distill.train.batch_size": batch, "grow.train.batch_size": batch, "grow.batch_sizes": "[]",
                     "precompute.steps": args.inversion_points, "model.dropout": 0.0}
        return load_config(args.config, [f"{k}={v}" for k, v in overrides.items()])
    r = args.resolution
    overrides = {
        "model.resolution": r, "model.channels": args.channels, "model.channel_mult": "[1, 2, 2]",
        "model.num_res_blocks": 2, "model.attn_resolutions": f"[{max(1, r // 8)}]", "model.head_channels": 64,
        "model.num_classes": 10, "data.resolution": 2 * r, "grow.resolutions": f"[{2 * r}]",
        "teacher.train.batch_size": args.batch, "distill.train.batch_size": args.batch,
        "grow.train.batch_size": args.batch, "runtime.zero_stage": args.zero_stage,
        "runtime.precision": args.precision, "runtime.use_gpu": str(args.device == "cuda").lower(),
        "precompute.steps": args.inversion_points,
    }
    if args.channels_last is not None:  # else the run config's choice for the device (contiguous on CUDA)
        overrides["model.channels_last"] = str(args.channels_last).lower()
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def synthetic_batch(cfg: Any, resolution: int, batch: int, latents: bool, device: torch.device) -> Any:
    """Images in [-1, 1], class labels, and (for the adversarial stages) latents at the base resolution."""
    from pagoda_dist.interfaces import Condition
    from pagoda_dist.interfaces import Batch

    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    base = cfg.model.resolution
    latent = torch.randn(batch, 3, base, base, generator=g) * cfg.diffusion.sigma_max if latents else None
    return Batch(image, Condition(class_labels=labels), latent).to(device)


def export_of(net: torch.nn.Module) -> dict[str, Any]:
    """The minimal stage export (`architecture` + EMA weights) the next stage is built from."""
    return {"architecture": net.architecture(), "ema": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def build_stage(cfg: Any, kind: str, grow_to: int | None = None) -> tuple[Any, Any]:
    """The stage object of the chain's first stage of `kind` (teacher, distill, grow), or of the growth stage at
    `grow_to` px (built through the stages below it, as a run starts each from the one before), and its spec."""
    from pagoda_dist.chain import chain
    from pagoda_dist.models.unet import UNet
    from pagoda_dist.stages import build_distill, build_grow, build_teacher

    specs = [s for s in chain(cfg) if s.kind == kind and (grow_to is None or s.resolution == grow_to)]
    if not specs:
        raise SystemExit(f"gpu_check: the config has no {kind} stage" + (f" at {grow_to}px" if grow_to else ""))
    if kind == "teacher":
        return build_teacher(cfg), specs[0]
    stage = build_distill(cfg, export_of(UNet(cfg.model)))  # an untrained teacher: speed does not need weights
    for spec in chain(cfg):
        if spec.kind == "grow" and (spec.resolution <= specs[0].resolution) and kind == "grow":
            stage = build_grow(cfg, spec, export_of(stage.generator))
    return stage, specs[0]


# ------------------------------------------------------------------------------------------------ measuring
def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of `steps` calls after `warmup` untimed ones (CPU seconds say what a
    step costs on a shared CPU, where wall time mostly measures the other load)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(steps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def counted_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peaks(device: torch.device, precision: str) -> dict[str, float | None]:
    from pagoda_dist.runtime.flops import estimate_peak_flops

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # 1024^2 matmuls on the CPU keep the smoke run short; 8192^2 on a GPU (the function's default).
    measured = estimate_peak_flops(device, dtype, size=None if device.type == "cuda" else 512, trials=2)
    return {"datasheet": datasheet_peak(name, precision), "measured_matmul": measured}


def result_row(part: str, device: torch.device, precision: str, batch: int, resolution: int,
               timings: tuple[list[float], list[float]], flops_per_step: float, pk: dict[str, float | None],
               **extra: Any) -> dict[str, Any]:
    times, cpu = timings
    sec = statistics.median(times)
    achieved = flops_per_step / sec
    row = {"part": part, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "precision": precision, "batch": batch, "resolution": resolution, "steps_timed": len(times),
           "sec_per_step": sec, "img_per_s": batch / sec,
           "cpu_sec_per_step": statistics.median(cpu), "tflop_per_step": flops_per_step / 1e12,
           "achieved_tflops": achieved / 1e12,
           "peak_datasheet_tflops": pk["datasheet"] / 1e12 if pk["datasheet"] else None,
           "peak_measured_tflops": pk["measured_matmul"] / 1e12 if pk["measured_matmul"] else None,
           "mfu_datasheet": achieved / pk["datasheet"] if pk["datasheet"] else None,
           "mfu_measured": achieved / pk["measured_matmul"] if pk["measured_matmul"] else None, **extra}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run_training_stage(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """A few DeepSpeed optimizer steps of teacher / distill / grow: warm-up, one counted step, timed steps."""
    from pagoda_dist.runtime.drivers import DeepSpeedDriver, deepspeed_config

    cfg = make_config(args)
    init_single_process(device)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    stage, spec = build_stage(cfg, args.stage, args.grow_to)
    train, resolution, latents = spec.train, spec.resolution, spec.kind != "teacher"
    driver = DeepSpeedDriver(stage.trainable(), stage.optimizers(), deepspeed_config(train, cfg.runtime, 1))
    build_s = time.perf_counter() - t_build
    batch = synthetic_batch(cfg, resolution, train.batch_size, latents, device)
    nimg = 10**9  # far past any GAN start: the adversarial stages run their full (D + G) step

    def step() -> dict[str, float]:
        driver.begin_step(nimg)
        return stage.train_step(batch, driver, nimg)

    losses = step()  # first step: allocation, cuDNN autotuning
    flops = counted_flops(step)  # counted untimed (the counting mode slows it down)
    timings = timed(step, device, args.warmup, args.steps)
    trainable = sum(p.numel() for net in stage.trainable().values() for p in net.parameters() if p.requires_grad)
    return [result_row(spec.name, device, args.precision, train.batch_size, resolution, timings, flops,
                       peaks(device, args.precision), zero_stage=args.zero_stage, build_s=build_s,
                       trainable_params_m=trainable / 1e6, last_losses={k: float(v) for k, v in losses.items()},
                       **memory(cfg, spec, device))]


def memory(cfg: Any, spec: Any, device: torch.device) -> dict[str, float]:
    """The peak GPU memory the steps allocated beside the dry run's estimate for the same stage and batch (the
    estimate's margin for the CUDA context excluded: the allocator does not see it)."""
    from pagoda_dist.memory import CUDA_MARGIN, GIB, stage_memory

    estimate = (stage_memory(cfg, spec).total - CUDA_MARGIN) / GIB
    measured = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"estimated_gib": estimate, "measured_peak_gib": measured}


def run_precompute(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Heun PF-ODE inversion of a batch with the teacher (inference mode): fp32 as precompute runs it today,
    and bf16 autocast as the candidate speed-up. No DeepSpeed: precompute actors hold plain modules."""
    from pagoda_dist.diffusion import EDMPrecond, invert
    from pagoda_dist.models.unet import UNet

    cfg = make_config(args)
    torch.manual_seed(0)
    net = UNet(cfg.model).to(device).eval()
    denoiser = EDMPrecond(net, cfg.diffusion.sigma_data)
    b = synthetic_batch(cfg, cfg.model.resolution, args.batch, False, device)
    d, p = cfg.diffusion, cfg.precompute
    rows = []
    for precision in ["fp32", "bf16"] if args.precision == "bf16" else ["fp32"]:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        evals = 0

        def run() -> None:
            nonlocal evals
            with torch.inference_mode(), autocast:
                res = invert(denoiser, b.image, b.condition, solver=p.solver, steps=p.steps, sigma_min=d.sigma_min,
                             sigma_max=d.sigma_max, rho=d.rho, clamp=p.clamp)
            evals = res.network_evals

        run()
        # FLOPs: one network evaluation counted, times the evaluations per image (counting 78 would be slow).
        with torch.inference_mode(), autocast:
            sigma = torch.full((args.batch,), 1.0, device=device)
            flops_eval = counted_flops(lambda: denoiser(b.image, sigma, b.condition))
        timings = timed(run, device, 0, args.steps)
        rows.append(result_row("precompute", device, precision, args.batch, cfg.model.resolution, timings,
                               flops_eval * evals, peaks(device, precision), network_evals_per_image=evals,
                               inversion_points=p.steps))
    return rows


def info(device: torch.device) -> list[dict[str, Any]]:
    row: dict[str, Any] = {"part": "info", "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    try:
        import deepspeed

        row["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001 - report, do not stop: the other parts may still run
        row["deepspeed"] = f"import failed: {exc}"
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        row.update(device=prop.name, capability=f"{prop.major}.{prop.minor}", memory_gib=prop.total_memory / 2**30,
                   sms=prop.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported(),
                   tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    for precision in ("bf16", "fp32"):
        pk = peaks(device, precision)
        row[f"peak_{precision}_datasheet_tflops"] = pk["datasheet"] / 1e12 if pk["datasheet"] else None
        row[f"peak_{precision}_measured_tflops"] = pk["measured_matmul"] / 1e12
    return [row]


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["part"] == "info":
            print("\n".join(f"  {k}: {v}" for k, v in row.items()), flush=True)
            continue
        mfu = "  ".join(f"MFU({k}) {row[f'mfu_{k}'] * 100:.1f}%" for k in ("datasheet", "measured")
                        if row.get(f"mfu_{k}") is not None)
        extra = f"  evals/img {row['network_evals_per_image']}" if "network_evals_per_image" in row else ""
        if row.get("estimated_gib") is not None:
            measured = row.get("measured_peak_gib")
            extra += f"  memory {measured:.1f} GiB (estimated {row['estimated_gib']:.1f})" if measured is not None \
                else f"  memory estimated {row['estimated_gib']:.1f} GiB"
        print(f"[{row['part']}] {row['device']} {row['precision']} {row['resolution']}px batch {row['batch']}: "
              f"{row['img_per_s']:.1f} img/s  {row['sec_per_step'] * 1e3:.1f} ms/step "
              f"({row['cpu_sec_per_step'] * 1e3:.0f} ms host CPU)  "
              f"{row['achieved_tflops']:.2f} TFLOP/s  {mfu}{extra}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["info", "stage"])
    parser.add_argument("stage", nargs="?", choices=["teacher", "precompute", "distill", "grow"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (a CPU check of the code)")
    parser.add_argument("--resolution", type=int, default=64, help="base (teacher) resolution")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--channels-last", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                        help="model.channels_last true/false (default: the config's choice for the device)")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--config", default=None,
                        help="measure this config's networks (e.g. configs/imagenet-512.yaml: the 296M ADM teacher)")
    parser.add_argument("--grow-to", type=int, default=None, help="with stage grow: the growth stage at this px")
    parser.add_argument("--inversion-points", type=int, default=40, help="Karras points of the inversion grid")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first and the counted one")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    args = parser.parse_args()
    if args.part == "stage" and args.stage is None:
        parser.error("stage: name one of teacher, precompute, distill, grow")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False); this check needs a GPU "
              "machine. For a CPU check of the code path: --device cpu --smoke", file=sys.stderr)
        return 2
    if args.smoke:  # small enough for a few seconds per stage on 2 CPU cores
        args.resolution, args.batch, args.channels = 16, 4, 32
        args.inversion_points, args.warmup, args.steps = 4, 0, 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    # DeepSpeed picks its accelerator when first imported (pagoda_dist.runtime may import it): say which first.
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    t0 = time.perf_counter()
    rows = info(device) if args.part == "info" else (
        run_precompute(args, device) if args.stage == "precompute" else run_training_stage(args, device))
    for row in rows:
        row["wall_s"] = time.perf_counter() - t0
        row["smoke"] = args.smoke
    print_rows(rows)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Steady-state images/s of the teacher step through Ray Train + DeepSpeed + S3 streaming vs. a bare PyTorch loop.

    python benchmarks/runtime_overhead.py                    # tiny.yaml's teacher, 2 workers, ZeRO 1, 2 and 3
    python benchmarks/runtime_overhead.py --short            # a quick look: ZeRO-2 only, one round, short windows
    python benchmarks/runtime_overhead.py --batch 64 --zero 2 model.channels=64

Both sides train the same network (the teacher UNet of --config, unconditional since photo tiles carry no labels)
with the same loss and the same per-worker batch on this machine, in one run:

- bare: one process, one thread, `TeacherStage.train_step` with plain torch optimizers on real tiles held in memory;
- bare x N: --workers copies of that bare loop in separate processes at the same time, one per core. This is the
  control that isolates the runtime: the runtime keeps every core busy at once, and a machine whose cores share
  caches, memory bandwidth or a physical core (SMT) runs each busy core slower than a lone one;
- runtime: `train_stage` with --workers Ray Train workers (one CPU each), one DeepSpeed engine each, the tiles
  streamed from WebDataset shards in a fresh bucket of an embedded S3 server (decoded and downsampled on the fly
  by one DataLoader worker per rank, at the configured `data.loader_priority`: pass `data.loader_priority=normal`
  to see what the idle class saves), EMA, telemetry; no checkpoint or sample grid inside the timed windows.

Rates are medians over timing windows of --window-steps optimizer steps after --warmup-steps; the runtime's come
from its own per-window log records. "per core" divides the runtime's rate by the workers (each holds one core),
so the ratio runtime-per-core / bare is the overhead figure the goal names (>= 0.9); runtime-per-core / bare-x-N
(per process) is the same figure with the machine's own multi-core slowdown taken out: what Ray Train, DeepSpeed
and streaming cost.

The two sides are interleaved, bare - runtime - bare - runtime - ... - bare, --rounds runtime measurements per ZeRO
stage: each runtime rate is divided by the mean of the bare rates measured just before and just after it, so a
machine that drifts (other tenants, thermal state) moves both sides of each ratio. The bare drift across each
bracket is printed beside it; the figure per ZeRO stage is the median ratio over its rounds. Peak memory is the
largest rank's peak RSS (and the GPU allocator's peak with --gpu), as logged by the runtime; the bare loop's own
peak RSS is printed for reference.

Where the rest goes: "CPU/rank" is the cores each rank's process kept busy over the timed windows (the runtime's
`cpu_per_rank`; a bare loop keeps ~1.0). Below 1, a rank waited on its peer at a collective or was crowded off its
core by the other processes on the machine (its DataLoader worker, the S3 server, Ray's daemons). "per CPU-s" divides
that out: a rank's images per CPU-second vs a concurrent bare loop's, i.e. the cost of the work the runtime adds on
the rank itself (DeepSpeed's bucketing and collectives, EMA, batch hand-off). "steal" is the share of this VM's CPU
time the hypervisor gave to other guests during the runtime run (start-up included); a round in which other guests
took a fifth of the machine measures them, not the runtime, so the summary also gives the medians of the rounds
under --max-steal.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import embedded_s3


class Rate(NamedTuple):
    """A bare loop's median images/s and the median cores its process kept busy."""

    images_per_s: float
    cpu: float


class Round(NamedTuple):
    """One runtime measurement: per core vs one bare loop alone and vs the concurrent bare loops, per CPU-second,
    and the share of the machine's time the hypervisor stole meanwhile."""

    alone: float
    together: float
    per_cpu: float
    steal: float


def medians(rounds: list[Round]) -> str:
    return " / ".join(f"{statistics.median(getattr(r, k) for r in rounds):.2f}x"
                      for k in ("alone", "together", "per_cpu"))


def midpoint(a: Rate, b: Rate) -> Rate:
    """The mean of the bare measurements before and after a runtime run."""
    return Rate((a.images_per_s + b.images_per_s) / 2, (a.cpu + b.cpu) / 2)


def bare_rate(cfg, images, *, batch: int, warmup: int, windows: int, window_steps: int) -> Rate:
    """A single-threaded loop: the teacher step on in-memory tensors, plain optimizers."""
    import torch

    from pagoda_dist.interfaces import Batch
    from pagoda_dist.runtime import PlainDriver
    from pagoda_dist.stages import build_teacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as each Ray worker gets
    try:
        torch.manual_seed(0)
        stage = build_teacher(cfg)
        stage.net.to(images.device)
        driver = PlainDriver(stage.trainable(), stage.optimizers(), grad_clip=cfg.teacher.train.grad_clip)
        g = torch.Generator().manual_seed(0)

        def step() -> None:
            driver.begin_step(0)
            stage.train_step(Batch(images[torch.randint(len(images), (batch,), generator=g)]), driver, 0)

        for _ in range(warmup):
            step()
        rates, cpu = [], []
        for _ in range(windows):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(window_steps):
                step()
            seconds = time.perf_counter() - start
            rates.append(window_steps * batch / seconds)
            cpu.append((time.process_time() - start_cpu) / seconds)
        return Rate(statistics.median(rates), statistics.median(cpu))
    finally:
        torch.set_num_threads(threads)


def _bare_rate_at(start_at: float, cfg, images, kwargs: dict) -> Rate:
    """bare_rate in a child process, its timed windows starting at wall time `start_at` (so the copies overlap)."""
    import torch

    torch.manual_seed(0)
    delay = start_at - time.time()
    if delay < 0:
        raise RuntimeError(f"a bare copy was ready {-delay:.1f} s after the common start; raise the start delay")
    time.sleep(delay)
    return bare_rate(cfg, images, **kwargs)


def concurrent_bare_rate(cfg, images, copies: int, start_delay_s: float = 20.0, **kwargs) -> Rate:
    """Per-process medians of `copies` bare loops running at the same time, one process (one thread) each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start_at = time.time() + start_delay_s  # covers spawning the processes and importing torch in each
    with ProcessPoolExecutor(copies, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_bare_rate_at, start_at, cfg, images.cpu(), kwargs) for _ in range(copies)]
        results = [f.result() for f in futures]
        return Rate(statistics.median(r.images_per_s for r in results), statistics.median(r.cpu for r in results))


def steal_share() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of this machine so far from /proc/stat (None off Linux): the time a hypervisor gave
    this VM's cores to other guests. A difference of two readings is the share stolen in between."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return ticks[7], sum(ticks[:8])


def runtime_rate(cfg, *, warmup_windows: int) -> tuple[float, float, dict[str, float]]:
    """Median images/s (all workers) and median cores each rank kept busy over the log windows after the warm-up
    ones, and the last record's peaks."""
    from pagoda_dist.pipeline import reader_source, teacher_stage
    from pagoda_dist.runtime import train_stage

    with tempfile.TemporaryDirectory(prefix="pagoda-bench-local-") as local:
        result = train_stage(cfg, teacher_stage, reader_source, stage_name="teacher", local_dir=local)
    timed = result.history[warmup_windows:]
    peaks = {k: v for k, v in result.history[-1].items() if k.startswith("peak_")}
    return (statistics.median(r["images_per_s"] for r in timed), statistics.median(r["cpu_per_rank"] for r in timed),
            peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (e.g. model.channels=64)")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers, one CPU each")
    parser.add_argument("--batch", type=int, default=32, help="images per worker and step (both sides)")
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3], help="ZeRO stages to run")
    parser.add_argument("--windows", type=int, default=6, help="timing windows per measurement")
    parser.add_argument("--window-steps", type=int, default=8, help="optimizer steps per timing window")
    parser.add_argument("--warmup-steps", type=int, default=8, help="steps before timing (runtime: whole windows)")
    parser.add_argument("--rounds", type=int, default=2, help="runtime measurements per ZeRO stage, each bracketed "
                        "by bare ones")
    parser.add_argument("--max-steal", type=float, default=0.05, help="the summary also gives the medians of the "
                        "rounds in which the hypervisor stole less than this share of the machine's time")
    parser.add_argument("--tiles", type=int, default=2048, help="photo tiles in the dataset")
    parser.add_argument("--gpu", action="store_true", help="workers on GPUs (bare loop on the first one)")
    parser.add_argument("--short", action="store_true", help="ZeRO-2 only, 3 windows of 4 steps, 4 warm-up steps")
    args = parser.parse_args()
    if args.short:
        args.zero, args.rounds, args.windows, args.window_steps, args.warmup_steps = [2], 1, 3, 4, 4
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    import torch

    from pagoda_dist import storage
    from pagoda_dist.config import load_config
    from pagoda_dist.data.prepare import prepare
    from pagoda_dist.data.reader import load_images
    from pagoda_dist.models.unet import UNet

    base = load_config(args.config, ["model.num_classes=0", "data.loader_workers=1", *args.overrides])
    res, step_images = base.model.resolution, args.workers * args.batch
    window_kimg = args.window_steps * step_images / 1000
    warmup_windows = max(1, -(-args.warmup_steps // args.window_steps))
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as tmp:
        local = str(Path(tmp) / "tiles")
        report = prepare("builtin:photo-tiles", local, resolution=base.data.resolution, shard_size=500, workers=2,
                         limit=args.tiles, progress=False)
        images = load_images(local, count=min(1024, report.counts["train"]), split="train", resolution=res)
        device = "cuda" if args.gpu else "cpu"
        images = images.to(device)
        server, bucket = embedded_s3(Path(tmp) / "s3")
        try:
            shards = storage.join(bucket, "tiles")
            storage.upload_dir(local, shards)
            params = sum(p.numel() for p in UNet(base.model).parameters())
            print(f"teacher UNet {params / 1e6:.2f}M parameters at {res} px; {report.counts['train']} tiles stored "
                  f"at {base.data.resolution} px; {args.workers} workers x {args.batch} images/step; "
                  f"{args.windows} windows x {args.window_steps} steps after {args.warmup_steps} warm-up steps; "
                  f"load average {os.getloadavg()[0]:.1f}\n", flush=True)
            total_kimg = (warmup_windows + args.windows) * window_kimg

            def runtime_config(zero: int):
                """The benchmark's stage config: fresh run name, streaming from the bench bucket, no checkpoint,
                sample grid or wandb inside the timed windows."""
                return load_config(args.config, [
                    "model.num_classes=0", "data.loader_workers=1", *args.overrides,
                    f"run.root={bucket.rstrip('/')}/runs", f"run.name=zero{zero}-{time.time_ns()}",
                    f"data.shards={shards}", f"storage.endpoint_url={server.endpoint}", "storage.embedded_s3=false",
                    f"runtime.num_workers={args.workers}", "runtime.cpus_per_worker=1", f"runtime.zero_stage={zero}",
                    f"runtime.use_gpu={str(args.gpu).lower()}", "teacher.train.grad_accum=1",
                    f"teacher.train.batch_size={step_images}", f"teacher.train.total_kimg={total_kimg}",
                    f"logging.log_every_kimg={window_kimg}", f"logging.checkpoint_every_kimg={10 * total_kimg}",
                    f"logging.sample_every_kimg={10 * total_kimg}", "logging.wandb_mode=disabled"])

            n = args.workers
            print(f"{'ZeRO':>4} {'round':>5} {'runtime img/s':>13} {'per core':>9} {'bare before/after':>17} "
                  f"{'drift':>6} {'ratio':>6} {f'bare x{n} before/after':>20} {f'ratio x{n}':>8} "
                  f"{'CPU/rank':>8} {f'bare x{n} CPU':>11} {'per CPU-s':>9} {'steal':>6} "
                  f"{'peak RSS/rank MiB':>17}" + (f" {'peak GPU/rank MiB':>17}" if args.gpu else ""), flush=True)
            timing = dict(batch=args.batch, warmup=args.warmup_steps, windows=args.windows,
                          window_steps=args.window_steps)

            def measure_bare() -> tuple[Rate, Rate]:
                """(one bare loop alone, per-process medians of --workers bare loops at once); the latter is only
                measured on the CPU, where the workers share this machine's cores."""
                alone = bare_rate(base, images, **timing)
                together = concurrent_bare_rate(base, images, n, **timing) if not args.gpu and n > 1 else alone
                return alone, together

            summary: dict[int, list[Round]] = {}
            before = measure_bare()
            for zero in args.zero:
                rounds = summary.setdefault(zero, [])
                for round_index in range(args.rounds):
                    steal_start = steal_share()
                    rate, cpu, peaks = runtime_rate(runtime_config(zero), warmup_windows=warmup_windows)
                    steal_end = steal_share()
                    after = measure_bare()
                    per_core = rate / n
                    alone, together = midpoint(before[0], after[0]), midpoint(before[1], after[1])
                    steal = ((steal_end[0] - steal_start[0]) / max(steal_end[1] - steal_start[1], 1)
                             if steal_start and steal_end else float("nan"))
                    # Images per CPU-second of a rank vs of a concurrent bare loop: what a rank does with the core
                    # time it gets, apart from how much of its core it gets.
                    per_cpu = (per_core / cpu) / (together.images_per_s / together.cpu) if cpu > 0 else float("nan")
                    r = Round(per_core / alone.images_per_s, per_core / together.images_per_s, per_cpu, steal)
                    rounds.append(r)
                    line = (f"{zero:>4} {round_index + 1:>5} {rate:>13.1f} {per_core:>9.1f} "
                            f"{f'{before[0].images_per_s:.1f}/{after[0].images_per_s:.1f}':>17} "
                            f"{after[0].images_per_s / before[0].images_per_s - 1:>+6.0%} {r.alone:>6.2f} "
                            f"{f'{before[1].images_per_s:.1f}/{after[1].images_per_s:.1f}':>20} {r.together:>8.2f} "
                            f"{cpu:>8.2f} {together.cpu:>11.2f} {r.per_cpu:>9.2f} {steal:>6.1%} "
                            f"{peaks.get('peak_rss_mb', float('nan')):>17.0f}")
                    if args.gpu:
                        line += f" {peaks.get('peak_gpu_mb', float('nan')):>17.0f}"
                    print(line, flush=True)
                    before = after
            print(f"\nmedian over {args.rounds} round(s), runtime per core vs one bare loop alone / vs {n} bare loops "
                  "at once (goal >= 0.90x) / per CPU-second a rank got vs a concurrent bare loop's:")
            for zero, rounds in summary.items():
                calm = [r for r in rounds if r.steal < args.max_steal]
                line = f"  ZeRO-{zero}: {medians(rounds)}"
                if len(calm) < len(rounds):
                    line += (f"; the {len(calm)} round(s) with < {args.max_steal:.0%} steal: {medians(calm)}" if calm
                             else f"; every round had >= {args.max_steal:.0%} steal")
                print(line)
            bare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"\nbare loop process peak RSS {bare_rss:.0f} MiB (includes the benchmark's own set-up); "
                  f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
        finally:
            storage.configure()
            server.stop()


if __name__ == "__main__":
    main()

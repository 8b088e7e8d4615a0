"""Progress lines, throughput, MFU and wandb for the training loop (rank 0 prints and logs; all ranks reduce).

Losses are summed per rank between log points and averaged over steps and ranks at each log point (one
all-reduce per log, none per step); each record also holds the largest rank's peak memory (RSS, and the GPU
allocator's peak on a GPU) and `cpu_per_rank`, the cores each rank's process kept busy over the window (mean
over ranks): below `runtime.cpus_per_worker` on a CPU run, the ranks waited (on each other, on data) or were
crowded off their cores by other processes.

MFU divides the FLOPs of one counted training step by the time per step and the machine's measured matmul peak
(`runtime.flops.estimate_peak_flops`, measured on every rank at once so each sees its share of a shared machine). A
peak measured while other jobs load the machine reads low and would make MFU read high, so a short measurement is
repeated at every log point and the best one kept. The count runs only on the first step of a fresh run and
travels in the checkpoint: under a counting dispatch mode bf16 kernels round differently, so counting a step after
a resume would break the exact continuation.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pagoda_dist.config import SECRET_WORDS

from .comm import Comm, SoloComm


def redact_secrets(value: Any) -> Any:
    """A copy of nested config data without keys that look like secrets (config holds none by construction)."""
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items()
                if not any(word in str(k).lower() for word in SECRET_WORDS)}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


class Telemetry:
    """Accumulates per-step losses; at log points prints a progress line and logs to wandb (rank 0)."""

    def __init__(self, comm: Comm | SoloComm, *, stage: str, start_nimg: int, total_nimg: int,
                 peak_flops: Callable[..., float] | None = None, flops_per_step: float | None = None,
                 count_flops: bool = False, remeasure_peak_s: float = 60.0,
                 wandb_run: Any = None, jsonl: Path | None = None) -> None:
        self.comm = comm
        self.stage = stage
        self.total_nimg = total_nimg
        self._measure_peak = peak_flops  # measure_peak(quick=...) -> FLOP/s
        self.peak_flops = peak_flops() if peak_flops is not None else None
        self._remeasure_peak_s = remeasure_peak_s  # at most this often: each measurement takes the core ~0.1 s
        self._peak_measured = time.perf_counter()
        self.wandb_run = wandb_run
        self.jsonl = jsonl  # rank 0 appends every record here (a restart's replayed steps appear again)
        self.flops_per_step = flops_per_step  # per rank and optimizer step; counted once, then carried along
        self._count = count_flops and flops_per_step is None
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._last_nimg = start_nimg
        self._last_time = time.perf_counter()
        self._last_cpu = time.process_time()

    def counting(self) -> AbstractContextManager:
        """Wrap every optimizer step in this: the first one of a fresh run is counted (forward, backward, all
        micro-batches); the others run untouched."""
        if not self._count:
            return nullcontext()
        self._count = False
        return _Counter(self)

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._steps += 1

    def log(self, nimg: int, corrupt_samples: int = 0) -> dict[str, float]:
        """Collective: averages the losses since the last log over steps and ranks; rank 0 prints and logs.
        `corrupt_samples`: this rank's count of corrupt samples skipped so far (summed over ranks)."""
        losses = self.comm.mean({k: v / max(self._steps, 1) for k, v in self._sums.items()})
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        images = nimg - self._last_nimg
        record: dict[str, float] = {"nimg": nimg, "kimg": nimg / 1000.0, **losses,
                                    "images_per_s": images / seconds,
                                    "sec_per_kimg": seconds / max(images, 1) * 1000.0}
        cpu = time.process_time()
        ranks = self.comm.gather({**_peak_memory_mb(), "corrupt_samples": corrupt_samples,
                                  "cpu_per_rank": (cpu - self._last_cpu) / seconds})
        # Peaks: the largest rank's (what each worker's machine must hold); corrupt samples: all ranks'; CPU: the
        # mean over ranks of the cores each rank's process kept busy (all its threads; its loader processes not).
        record.update({key: max(r[key] for r in ranks) for key in ranks[0] if key.startswith("peak_")})
        record["corrupt_samples"] = sum(r["corrupt_samples"] for r in ranks)
        record["cpu_per_rank"] = sum(r["cpu_per_rank"] for r in ranks) / len(ranks)
        if self.flops_per_step is not None and self.peak_flops and self._steps:
            per_rank = self.flops_per_step * self._steps / seconds
            record["tflops_per_rank"] = per_rank / 1e12
            record["mfu"] = per_rank / self.peak_flops
        self.history.append(record)
        if self.comm.rank == 0:
            print(self._line(record), flush=True)
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=nimg)
            if self.jsonl is not None:
                self.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with self.jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        self._sums, self._steps = {}, 0
        self._last_nimg, self._last_time, self._last_cpu = nimg, now, cpu
        self._maybe_remeasure_peak()
        return record

    def _maybe_remeasure_peak(self) -> None:
        """Measures the peak again (keeping the best: a busy machine reads low) and leaves the measurement out of
        the next window's time, so the instrument does not lower the throughput it reports."""
        if self._measure_peak is None or time.perf_counter() - self._peak_measured < self._remeasure_peak_s:
            return
        self.peak_flops = max(self.peak_flops or 0.0, self._measure_peak(quick=True))
        self._peak_measured = self._last_time = time.perf_counter()
        self._last_cpu = time.process_time()

    def _line(self, r: dict[str, float]) -> str:
        rate = r["images_per_s"]
        eta = datetime.timedelta(seconds=max(0, int((self.total_nimg - r["nimg"]) / rate))) if rate > 0 else "?"
        losses = "  ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in _NOT_LOSSES)
        mfu = f"  mfu {r['mfu'] * 100:.1f}%" if "mfu" in r else ""
        corrupt = f"  corrupt samples skipped {r['corrupt_samples']:.0f}" if r.get("corrupt_samples") else ""
        return (f"[{self.stage}] kimg {r['kimg']:.3f}/{self.total_nimg / 1000:.3f}  {rate:.1f} img/s  "
                f"eta {eta}{mfu}  {losses}{corrupt}")

    def finish(self) -> None:
        if self.wandb_run is not None and self.comm.rank == 0:
            self.wandb_run.finish()


_NOT_LOSSES = {"nimg", "kimg", "images_per_s", "sec_per_kimg", "tflops_per_rank", "mfu", "peak_rss_mb",
               "peak_gpu_mb", "corrupt_samples", "cpu_per_rank"}


def _peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory and, on a GPU, the torch allocator's peak, in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class _Counter:
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.mode = FlopCounterMode(display=False)

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        self.telemetry.flops_per_step = float(self.mode.get_total_flops())


def start_wandb(mode: str, project: str, name: str, directory: Path, config: dict[str, Any]) -> Any:
    """An offline/online wandb run writing under `directory` (None when mode is 'disabled')."""
    if mode == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(directory)  # wandb's service reads it; the run's files land here
    return wandb.init(project=project, name=name, mode=mode, dir=str(directory), config=redact_secrets(config),
                      reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

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

wandb: one run per stage (`start_wandb`), whose id is kept under the run's URL (`stage_wandb_id`) so every attempt
of the stage, after a kill or a preemption, continues the same run; every value is plotted against `nimg`, the
stage's images seen, so a replayed stretch after a resume lands where it belongs instead of being dropped.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import resource
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pagoda_dist import storage
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
        self._untimed = 0  # steps of the window taken before a resume (their time is not in this process's clock)
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

    def window(self) -> dict[str, Any]:
        """The open log window (loss sums and steps since the last log): a checkpoint keeps it, so a run resumed
        between two log points averages its first log over the same steps as a run that was never stopped."""
        return {"sums": dict(self._sums), "steps": self._steps}

    def resume_window(self, window: dict[str, Any]) -> None:
        """Continues the window `window()` returned when the checkpoint being resumed was saved."""
        self._sums, self._steps = {k: float(v) for k, v in window["sums"].items()}, int(window["steps"])
        self._untimed = self._steps

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
        timed = self._steps - self._untimed
        if self.flops_per_step is not None and self.peak_flops and timed:
            per_rank = self.flops_per_step * timed / seconds
            record["tflops_per_rank"] = per_rank / 1e12
            record["mfu"] = per_rank / self.peak_flops
        self.history.append(record)
        if self.comm.rank == 0:
            print(self._line(record), flush=True)
            if self.wandb_run is not None:
                self.wandb_run.log(record)  # x-axis: its "nimg" (see start_wandb)
            if self.jsonl is not None:
                self.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with self.jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        self._sums, self._steps, self._untimed = {}, 0, 0
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
        losses = "  ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in NOT_LOSSES)
        mfu = f"  mfu {r['mfu'] * 100:.1f}%" if "mfu" in r else ""
        corrupt = f"  corrupt samples skipped {r['corrupt_samples']:.0f}" if r.get("corrupt_samples") else ""
        return (f"[{self.stage}] kimg {r['kimg']:.3f}/{self.total_nimg / 1000:.3f}  {rate:.1f} img/s  "
                f"eta {eta}{mfu}  {losses}{corrupt}")

    def image(self, key: str, png: bytes, nimg: int) -> None:
        """Logs a PNG (a sample grid) to wandb at `nimg` images seen (rank 0; nothing without a wandb run)."""
        if self.wandb_run is not None and self.comm.rank == 0:
            self.wandb_run.log({"nimg": nimg, key: wandb_image(png)})

    def finish(self) -> None:
        if self.wandb_run is not None and self.comm.rank == 0:
            finish_wandb(self.wandb_run)


# The keys of a record that are not losses (what the report's loss curves leave out).
NOT_LOSSES = {"nimg", "kimg", "images_per_s", "sec_per_kimg", "tflops_per_rank", "mfu", "peak_rss_mb",
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


# wandb.init arguments and the environment variables that set the same thing: a variable that is set wins (the
# launchers forward WANDB_MODE, WANDB_PROJECT, ...). The run id is always ours: one run per stage needs it.
_WANDB_ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "group": "WANDB_RUN_GROUP", "dir": "WANDB_DIR",
              "name": "WANDB_NAME"}
WANDB_ID_FILE = "wandb.json"  # under RUN_URL/STAGE/: the stage's wandb run id


def stage_wandb_id(stage_url: str) -> str:
    """The wandb run id of the stage at `stage_url`: read from its WANDB_ID_FILE, or made and written there on the
    first start, so every later attempt (another pod, another cluster) resumes the same run."""
    url = storage.join(stage_url, WANDB_ID_FILE)
    if storage.exists(url):
        return str(json.loads(storage.read_bytes(url))["id"])
    run_id = secrets.token_hex(8)  # random, not derived from names: two runs of one name never share a wandb run
    storage.write_bytes(url, json.dumps({"id": run_id}).encode())
    return run_id


def start_wandb(mode: str, project: str, *, run_id: str, name: str, group: str, directory: Path,
                config: dict[str, Any] | None = None) -> Any:
    """The wandb run `run_id`, started or resumed (resume="allow"), writing under `directory` (None when `mode` is
    'disabled'). `mode`, `project`, `name`, `group` and `directory` apply only where the WANDB_* environment does
    not set them. An offline run resumed keeps its id: each attempt writes a folder of its own with that id."""
    if mode == "disabled":
        return None
    import wandb

    wanted = {"mode": mode, "project": project, "name": name, "group": group, "dir": str(directory)}
    args = {key: value for key, value in wanted.items() if not os.environ.get(_WANDB_ENV[key])}
    if "dir" in args:
        directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(id=run_id, resume="allow", config=redact_secrets(config or {}), reinit="create_new",
                     settings=wandb.Settings(silent=True, console="off"), **args)
    if run is not None and not run.disabled:
        run.define_metric("nimg")
        run.define_metric("*", step_metric="nimg")  # every chart against images seen (wandb's own _step aside)
    return run


def finish_wandb(run: Any) -> None:
    """Ends a wandb run with all its records on disk: the first run of a process has its last records written by
    wandb's service after `finish()` returns (measured: a 7-byte file, 1.5 kB a second later), and a copy made
    then would lose them; shutting the service down waits for it."""
    import wandb

    run.finish()
    wandb.teardown()


def wandb_image(png: bytes) -> Any:
    """A wandb.Image of PNG bytes."""
    import wandb
    from PIL import Image

    return wandb.Image(Image.open(io.BytesIO(png)))

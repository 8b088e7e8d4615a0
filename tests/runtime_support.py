"""Helpers for the distributed runtime tests: faults injected into a real stage, a stand-in for precomputed latent
pairs, and a driver process to send SIGTERM to.

- `Fault` makes one rank die, receive SIGTERM, hold until a stop is requested, or backpropagate NaN ("nan": one
  step; "nan-on": every step from then on, a run that diverged), at a given image count; `faulty(factory, fault,
  cfg)` wraps any stage factory with it.
- `inverted_tiles` streams real image shards with each image's PF-ODE inversion latent under a fixed teacher,
  computed as the batch streams (what precompute writes to latent-pair shards, without the actor pool).
- `recorded_source` is the pipeline's data source, writing down which samples each step read.
- `python -m tests.runtime_support LOCAL_DIR FAULT_JSON [CONFIG.yaml] KEY=VALUE...` trains the teacher stage with
  the fault and exits with `preemption.EXIT_CODE` when the run was preempted (1 when it diverged): the driver of
  the driver-SIGTERM test and of benchmarks/faults.py's NaN rows.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pagoda_dist.config import Config
from pagoda_dist.interfaces import Batch, Stage, StageInputs, StepDriver
from pagoda_dist.runtime import preemption
from pagoda_dist.runtime.source import DataRequest

HOLD_LIMIT_S = 120.0  # a held rank gives up (and fails the test) if no stop request arrives by then


@dataclass(frozen=True)
class Fault:
    """On `rank`, once `nimg` images were seen, before the step: "kill" the process, send it "sigterm", or "hold"
    until a stop is requested (a preemption arriving at a known step). `marker` is written first and makes it
    fire once per test (a restarted worker group passes the same image count again)."""

    kind: str
    nimg: int
    rank: int
    marker: str

    def poisons(self, nimg: int) -> bool:
        """True for a step whose losses this fault turns into NaN."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.kind == "nan-on":
            return rank == self.rank and nimg >= self.nimg
        if self.kind != "nan" or rank != self.rank or nimg < self.nimg or os.path.exists(self.marker):
            return False
        Path(self.marker).write_text(f"nan at {nimg} on pid {os.getpid()}\n")
        return True

    def maybe_fire(self, nimg: int) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.kind.startswith("nan") or rank != self.rank or nimg < self.nimg or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"{self.kind} at {nimg} on pid {os.getpid()}\n")
        if self.kind == "kill":
            os._exit(1)
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not preemption.stop_requested():
            if time.monotonic() > deadline:
                raise TimeoutError(f"held at {nimg} images for {HOLD_LIMIT_S} s and no stop was requested")
            time.sleep(0.05)


class PoisonedDriver:
    """A stage's driver, with every loss it backpropagates turned into NaN."""

    def __init__(self, driver: StepDriver) -> None:
        self.driver = driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.driver.backward(name, loss * float("nan"))


class FaultyStage:
    """`stage` with `fault` checked before every step; everything else is the stage's own."""

    def __init__(self, stage: Stage, fault: Fault) -> None:
        self.stage, self.fault = stage, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)

    def train_step(self, batch: Batch, driver: StepDriver, nimg: int) -> dict[str, float]:
        self.fault.maybe_fire(nimg)
        return self.stage.train_step(batch, PoisonedDriver(driver) if self.fault.poisons(nimg) else driver, nimg)


def faulty(factory: Callable[[Config], Stage], fault: Fault, cfg: Config) -> FaultyStage:
    return FaultyStage(factory(cfg), fault)


class InvertedTiles:
    """Image-shard batches plus their inversion latents (Euler PF-ODE under the teacher export at `teacher_url`)."""

    def __init__(self, teacher_url: str, cfg: Config, request: DataRequest) -> None:
        from pagoda_dist.data.reader import reader_for
        from pagoda_dist.models.checkpoint_safety import network_from_export
        from pagoda_dist.runtime import load_export

        images = StageInputs(request.inputs.resolution, needs_latents=False)
        self.reader = reader_for(cfg, images, batch_size=request.batch_size, rank=request.rank,
                                 world_size=request.world_size)
        if request.state is not None:
            self.reader.load_state_dict(request.state)
        self.teacher = network_from_export(load_export(teacher_url)).eval()
        self.sigma_max = cfg.diffusion.sigma_max

    def __iter__(self) -> Iterator[Batch]:
        from pagoda_dist.diffusion import EDMPrecond, invert

        denoiser = EDMPrecond(self.teacher)
        for batch in self.reader:
            with torch.no_grad():
                latent = invert(denoiser, batch.image, batch.condition, solver="euler", steps=4,
                                sigma_max=self.sigma_max).x
            yield Batch(batch.image, batch.condition, latent)

    def state(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def corrupt_count(self) -> int:
        return self.reader.corrupt_count


def inverted_tiles(teacher_url: str, cfg: Config, request: DataRequest) -> InvertedTiles:
    return InvertedTiles(teacher_url, cfg, request)


class RecordedSource:
    """The pipeline's data source, appending to FOLDER/rank-R.jsonl each batch's [global step, sample keys] (the step
    from the rank's stream position and its share of the global batch): what every step of a run read."""

    def __init__(self, folder: str, cfg: Config, request: DataRequest) -> None:
        from pagoda_dist.pipeline import reader_source

        self.source = reader_source(cfg, request)
        self.share = (request.global_batch or request.batch_size * request.world_size) // request.world_size
        # The grid writer's one-off request (no global batch) is not part of the training stream.
        self.path = Path(folder) / f"rank-{request.rank}.jsonl" if request.global_batch else None

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.source:
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps([(batch.position - 1) // self.share, batch.keys]) + "\n")
            yield batch

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def corrupt_count(self) -> int:
        return self.source.corrupt_count()


def recorded_source(folder: str, cfg: Config, request: DataRequest) -> RecordedSource:
    return RecordedSource(folder, cfg, request)


def main(argv: list[str]) -> int:
    from pagoda_dist.config import load_config
    from pagoda_dist.pipeline import reader_source, teacher_stage
    from pagoda_dist.runtime import train_stage

    local_dir, fault, overrides = argv[0], Fault(**json.loads(argv[1])), argv[2:]
    config = overrides.pop(0) if overrides and overrides[0].endswith(".yaml") else None
    cfg = load_config(config, overrides)
    result = train_stage(cfg, functools.partial(faulty, teacher_stage, fault), reader_source, stage_name="teacher",
                         local_dir=local_dir)
    print("RESULT " + json.dumps({k: v for k, v in asdict(result).items() if k != "history"}), flush=True)
    return preemption.EXIT_CODE if result.preempted else 1 if result.diverged else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

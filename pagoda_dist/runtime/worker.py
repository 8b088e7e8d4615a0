"""The per-worker training loop over any stage: engines, EMA, data, time in images, checkpoints, grids, logs.

`run_worker` is what each Ray Train worker runs (see `trainer.train_stage`). It knows nothing of the stage's
math: it builds one DeepSpeed engine per `stage.trainable()` network, resumes from the latest committed
checkpoint if there is one, and calls `stage.train_step` once per micro-batch until `total_kimg` is reached or a
SIGTERM (to this worker, or to the driver and passed on) asks it to save and stop.
"""
from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagoda_dist import storage
from pagoda_dist.config import Config, TrainConfig, to_dict
from pagoda_dist.data.grid import save_grid
from pagoda_dist.storage.lease import LeaseToken
from pagoda_dist.interfaces import Batch, Stage

from . import preemption
from .checkpoint import (CheckpointRef, CheckpointStore, SavePayload, capture_rng, check_resumable, restore_rng,
                         resume_layout)
from .comm import Comm
from .divergence import NonFiniteGuard
from .flops import estimate_peak_flops
from .drivers import DeepSpeedDriver, deepspeed_config
from .ema import Ema, full_state_dict
from .jit_ops import use_environment_ninja
from .ray_session import WorkerEnv
from .results import METRICS_FILE, ResultsSync, stage_results
from .schedule import crossed, ema_beta
from .source import DataFactory, DataRequest
from .telemetry import Telemetry

EXPORT_FORMAT = 1


@dataclass
class WorkerJob:
    """Everything a worker needs, shipped once through Ray (all fields picklable)."""

    cfg: Config
    stage_name: str
    train: TrainConfig  # the stage's train section (`chain.StageSpec.train`)
    stage_factory: Callable[[Config], Stage]
    data_factory: DataFactory
    run_url: str     # absolute local path or object-store URL
    local_dir: str   # absolute local folder for scratch files and wandb
    env: WorkerEnv
    stop_relay: Any = None  # ray_backend.StopRelay handle: the driver's SIGTERM, passed on (None: not followed)
    from_scratch: bool = False  # start from zero when every committed checkpoint is damaged (else refuse)
    lease: LeaseToken | None = None  # the run's lease, checked before each commit (None: not fenced)


def ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The function handed to Ray Train's TorchTrainer."""
    job: WorkerJob = config["job"]
    job.env.apply()  # before deepspeed is imported: DS_ACCELERATOR picks its accelerator at import
    import ray
    import ray.train
    import ray.train.torch

    if job.stop_relay is not None:
        preemption.follow(lambda: ray.get(job.stop_relay.wait.remote()), job.cfg.runtime.sigterm_grace_s)
    ctx = ray.train.get_context()
    return run_worker(job, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def seed_all(seed: int, rank: int | None = None) -> None:
    """Seeds torch, numpy and python; with `rank`, a stream of its own for that rank."""
    value = seed if rank is None else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leaves every RNG as it was (sampling grids must not change what training draws next)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def export_payload(stage: Stage, stage_name: str, nimg: int, network: str, ema: dict[str, torch.Tensor],
                   live: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A checkpoint's export (`checkpoint.write_export` writes its files): the fp32 EMA and live weights of the
    stage's first network, its architecture, and the stage's optional `export_metadata()` (see interfaces.Stage)."""
    describe = getattr(stage, "export_metadata", None)
    return {"format": EXPORT_FORMAT, "stage": stage_name, "nimg": nimg, "network": network,
            "architecture": stage.architecture(), "metadata": describe() if describe is not None else {},
            "ema": ema, "net": live}


def run_worker(job: WorkerJob, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = job.cfg
    train = job.train
    s = cfg.storage
    storage.configure(s.endpoint_url, s.region, retry_budget_s=s.retry_budget_s)
    if device.type == "cpu":
        # torch starts one thread per core of the machine, not of the worker's share: two 1-CPU workers on a
        # 2-core node would run four spinning OpenMP threads on two cores (several times slower under load).
        torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_worker)))
    use_environment_ninja()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # reuses Ray's group
    comm = Comm(device)
    accum = train.accumulation(world_size)  # micro-batches per optimizer step on this many ranks
    micro_batch = train.batch_size // (world_size * accum)

    seed_all(cfg.run.seed)  # identical initial weights on every rank
    stage = job.stage_factory(cfg)
    nets = stage.trainable()
    first = next(iter(nets))
    ema = Ema(nets[first], keep=rank == 0)
    if ema.net is not None:
        ema.net.to(device)
    guard = NonFiniteGuard(comm)
    driver = DeepSpeedDriver(nets, stage.optimizers(), deepspeed_config(train, cfg.runtime, world_size), guard)
    store = CheckpointStore(job.run_url, job.stage_name, scratch=Path(job.local_dir) / "tmp", lease=job.lease)
    meta = {**resume_layout(cfg, world_size), "engines": list(nets), "architecture": stage.architecture(),
            "config": to_dict(cfg), "batch_size": train.batch_size}

    ready = {"engines": time.perf_counter() - started}
    nimg, data_state, rng_state, window = 0, None, None, None
    # The newest checkpoint that verifies and loads; damaged ones are reported and set aside.
    loaded = store.load_latest(driver, comm, lambda saved: check_resumable(meta, saved, store.step_url(saved["nimg"])),
                               from_scratch=job.from_scratch)
    latest = loaded.ref if loaded is not None else None
    if loaded is not None:
        nimg, data_state, rng_state, window = latest.nimg, loaded.data_state, loaded.rng, loaded.window
        meta["flops_per_step"] = loaded.meta.get("flops_per_step")
        if loaded.ema is not None:
            ema.load_state_dict(loaded.ema)
        if rank == 0:
            print(f"[{job.stage_name}] resumed from {latest.url} ({nimg} images seen)", flush=True)

    ready["resume"] = time.perf_counter() - started - ready["engines"]
    source = job.data_factory(cfg, DataRequest(rank, world_size, micro_batch, cfg.run.seed, stage.inputs,
                                               data_state, global_batch=train.batch_size))
    batches = iter(source)
    total_nimg = int(round(train.total_kimg * 1000))
    log = cfg.logging
    wandb_run, results = _results(job, meta, store) if rank == 0 else (None, None)  # rank 0: wandb, results copy
    telemetry = Telemetry(comm, stage=job.stage_name, start_nimg=nimg, total_nimg=total_nimg,
                          peak_flops=functools.partial(_peak_flops, device, cfg.runtime.precision),
                          flops_per_step=meta.get("flops_per_step"), count_flops=latest is None,
                          wandb_run=wandb_run, jsonl=Path(job.local_dir) / job.stage_name / METRICS_FILE)
    if window is not None:
        telemetry.resume_window(window)
    grid = _GridWriter(job, stage, store, device, telemetry) if rank == 0 else None
    if rank == 0:
        print(f"[{job.stage_name}] ready in {time.perf_counter() - started:.1f} s (engines {ready['engines']:.1f} s, "
              f"resume {ready['resume']:.1f} s), {world_size} ranks x {micro_batch} images x {accum} "
              f"accumulation steps", flush=True)
    # Last thing before the loop, so no set-up step above can shift what the first step draws.
    if rng_state is not None:
        restore_rng(rng_state)
    else:
        seed_all(cfg.run.seed, rank)  # per-rank streams for noise and dropout

    def save() -> CheckpointRef:
        live = full_state_dict(driver.live(first), driver.gathered, keep=rank == 0)
        ema_state = export = None
        if rank == 0:
            ema_state = ema.state_dict()
            export = export_payload(stage, job.stage_name, nimg, first, ema_state, live)
        ref = store.save(SavePayload(nimg, driver, source.state(), meta, ema_state, export, telemetry.window()), comm)
        if results is not None:  # rank 0
            store.prune(log.keep_checkpoints)
            results.sync()  # the results so far outlive this machine from now on, like the checkpoint
        return ref

    saved = latest
    preempted = diverged = save_due = False
    loop_start = time.perf_counter()
    # The ranks agree on stopping (SIGTERM) through a vote started one step before it is read: read at once, it
    # would be one more point per step where every rank waits for the slowest. A stop therefore lands one step
    # later, on the same step on every rank.
    stop_vote = comm.start_any(preemption.stop_requested())
    while nimg < total_nimg:
        if stop_vote.result():
            preempted = True
            break
        stop_vote = comm.start_any(preemption.stop_requested())
        driver.begin_step(nimg)
        sums: dict[str, float] = {}
        with telemetry.counting():
            for _ in range(accum):
                for key, value in stage.train_step(next(batches).to(device), driver, nimg).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        before, nimg = nimg, nimg + train.batch_size
        meta["flops_per_step"] = telemetry.flops_per_step
        if not guard.step_skipped():
            ema.update(driver.live(first), ema_beta(nimg, train.batch_size, train.ema_halflife_kimg,
                                                    train.ema_rampup), driver.gathered)
            telemetry.add({key: value / accum for key, value in sums.items()})
        elif rank == 0:  # a skipped step's losses are not finite: they stay out of the log window's means
            print(f"[{job.stage_name}] non-finite loss or gradient at {nimg} images: step skipped on every rank "
                  f"({guard.in_a_row} in a row, {guard.total} in all)", flush=True)
        if guard.in_a_row >= cfg.runtime.max_nonfinite_steps:
            diverged = True
            break
        done = nimg >= total_nimg
        if crossed(before, nimg, log.log_every_kimg) or done:
            telemetry.log(nimg, corrupt_samples=source.corrupt_count())
        if grid is not None and (crossed(before, nimg, log.sample_every_kimg) or done):
            grid.write(ema.net, nimg)
        # No checkpoint while steps are being skipped (it would replace a healthy one with the state that
        # diverges), except the last one; a due checkpoint is written at the next step that updates.
        save_due = save_due or crossed(before, nimg, log.checkpoint_every_kimg) or done
        if save_due and (guard.in_a_row == 0 or done):
            saved, save_due = save(), False
    if preempted:
        if saved is None or saved.nimg != nimg:
            saved = save()
        if rank == 0:
            print(f"[{job.stage_name}] stopped on SIGTERM after saving {saved.url}", flush=True)
    else:
        stop_vote.result()  # every rank started it: finish the collective before any other
    if diverged and rank == 0:
        print(f"[{job.stage_name}] stopped: {guard.in_a_row} steps in a row with a non-finite loss or gradient at "
              f"{nimg} images; nothing was committed since they began, the last checkpoint "
              f"({saved.url if saved else 'none'}) is intact. Lower the learning rate or raise grad_clip, then run "
              "again", flush=True)
    # Saved either way (a stop request that came after the last step found the final checkpoint written).
    preemption.stopped_cleanly()
    telemetry.finish()
    if results is not None:
        results.sync()  # what wandb wrote while finishing
    if rank == 0:
        print(f"[{job.stage_name}] {nimg} images seen; loop {time.perf_counter() - loop_start:.1f} s", flush=True)
    return {"stage": job.stage_name, "nimg": nimg, "preempted": preempted,
            "checkpoint_url": saved.url if saved else None,
            "export_url": store.export_url(saved) if saved else None,
            "metrics": telemetry.history[-1] if telemetry.history else {},
            "history": telemetry.history, "resumed_from": latest.nimg if latest else None,
            "diverged": diverged, "nonfinite_steps": guard.total}


def _peak_flops(device: torch.device, precision: str, quick: bool = False) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # Measured on every rank at once: on a shared machine each rank's share is what its steps can use.
    return estimate_peak_flops(device, dtype, repeats=2 if quick else 8, trials=1 if quick else 2)


def _results(job: WorkerJob, meta: dict[str, Any], store: CheckpointStore) -> tuple[Any, ResultsSync]:
    """Rank 0's wandb run of the stage (resumed by id) and the sync of its results under RUN_URL/STAGE/."""
    log = job.cfg.logging
    return stage_results(store.url, Path(job.local_dir), wandb_mode=log.wandb_mode, wandb_project=log.wandb_project,
                         run_name=job.cfg.run.name, stage=job.stage_name,
                         config={"config": meta["config"], "stage": job.stage_name, "world_size": meta["world_size"]})


class _GridWriter:
    """PNG grids from the EMA network on the stage's fixed noise and conditions, written to RUN_URL/STAGE/samples/
    (rank 0 only)."""

    def __init__(self, job: WorkerJob, stage: Stage, store: CheckpointStore, device: torch.device,
                 telemetry: Telemetry) -> None:
        cfg = job.cfg
        self.stage, self.store, self.nrow, self.telemetry = stage, store, cfg.logging.grid_size, telemetry

        def first_batch(n: int) -> Batch:
            with preserved_rng():  # the grid's samples must not change what training draws
                return next(iter(job.data_factory(cfg, DataRequest(0, 1, n, cfg.run.seed, stage.inputs, None))))

        noise, condition = stage.grid_inputs(self.nrow ** 2, cfg.run.seed, first_batch)
        self.noise, self.condition = noise.to(device), condition.to(device)

    def write(self, net: torch.nn.Module, nimg: int) -> str:
        with preserved_rng(), torch.no_grad():
            images = self.stage.sample(net, self.noise, self.condition)
        url = storage.join(self.store.url, "samples", f"grid-{nimg:09d}.png")
        png = save_grid(images.detach().float().cpu(), nrow=self.nrow)
        storage.write_bytes(url, png)
        self.telemetry.image("samples", png, nimg)
        return url

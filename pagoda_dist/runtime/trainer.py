"""`train_stage`: run one stage on a Ray Train worker group (starting or joining Ray) and report how it ended.

Validation happens here, before Ray or any worker starts: the config's batch geometry against the world size,
the ZeRO stage, picklability of the factories, and whether the latest committed checkpoint can be resumed with
this world size / ZeRO stage / precision.
"""
from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda_dist import storage
from pagoda_dist.config import Config, ConfigError, TrainConfig
from pagoda_dist.ray_session import ensure_ray
from pagoda_dist.stages.base import Stage

from . import preemption
from .checkpoint import CheckpointMismatch, CheckpointStore
from .source import DataFactory
from .worker import WorkerEnv, WorkerJob, ray_train_loop

# Credentials travel to workers inside the job (never through a runtime_env, which Ray shows in its dashboard),
# so a remote cluster sees the same identity as the driver. Values are masked in every repr.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY")
PLAIN_ENV = ("TORCH_EXTENSIONS_DIR", "AWS_CA_BUNDLE")


@dataclass
class TrainResult:
    """How a `train_stage` call ended."""

    stage: str
    nimg: int                       # images seen at the end
    checkpoint_url: str | None      # the last committed checkpoint
    export_url: str | None          # its export.pt (EMA + live weights, fp32, weights_only-loadable)
    preempted: bool                 # True: stopped on SIGTERM after saving; run the same command to continue
    resumed_from: int | None        # images seen in the checkpoint this attempt started from (None: fresh)
    metrics: dict[str, float] = field(default_factory=dict)        # the last log record
    history: list[dict[str, float]] = field(default_factory=list)  # every log record of the last attempt


def validate(cfg: Config, stage_name: str) -> TrainConfig:
    """Checks what a run needs before any work starts; raises ConfigError naming the key."""
    train = cfg.train_config(stage_name)
    rt = cfg.runtime
    if rt.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"runtime.zero_stage: must be 0, 1, 2 or 3, got {rt.zero_stage!r}")
    if rt.num_workers < 1:
        raise ConfigError(f"runtime.num_workers: must be >= 1, got {rt.num_workers}")
    per_step = rt.num_workers * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(f"{_section(stage_name)}.train.batch_size: {train.batch_size} is not divisible by "
                          f"runtime.num_workers x grad_accum = {rt.num_workers} x {train.grad_accum}; use a multiple "
                          f"of {per_step}")
    if rt.precision == "bf16" and rt.zero_stage == 0 and rt.num_workers > 1:
        raise ConfigError("runtime.precision: bf16 with several workers needs runtime.zero_stage >= 1")
    return train


def _section(stage_name: str) -> str:
    return "grow" if stage_name.startswith("grow") else stage_name


def _check_picklable(name: str, fn: Any) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing to the caller
        raise TypeError(f"{name} must be picklable to reach the Ray workers (a module-level function or a "
                        f"functools.partial of one), got {fn!r}: {exc}") from None


def _absolute(url: str) -> str:
    return url if storage.is_remote(url) else str(Path(url.removeprefix("file://")).expanduser().absolute())


def default_local_dir(cfg: Config) -> Path:
    """Local scratch/wandb folder of a run: the run folder itself when it is local, else ./work/runs/NAME."""
    if not storage.is_remote(cfg.run_url):
        return Path(_absolute(cfg.run_url))
    return Path("work", "runs", cfg.run.name).absolute()


def worker_env(cfg: Config) -> WorkerEnv:
    plain = {name: os.environ[name] for name in PLAIN_ENV if os.environ.get(name)}
    plain.update(storage.env_for_workers())
    if not cfg.runtime.use_gpu:
        plain["DS_ACCELERATOR"] = "cpu"
    secret = {name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    return WorkerEnv(plain, secret)


def check_resumable(cfg: Config, stage_name: str, run_url: str) -> None:
    """Refuses, before any worker starts, a latest checkpoint saved with another world size/ZeRO stage/precision."""
    store = CheckpointStore(run_url, stage_name)
    latest = store.latest_committed()
    if latest is None:
        return
    saved = store.read_meta(latest)
    now = {"world_size": cfg.runtime.num_workers, "zero_stage": cfg.runtime.zero_stage,
           "precision": cfg.runtime.precision}
    for key, value in now.items():
        if saved.get(key) != value:
            raise CheckpointMismatch(
                f"{latest.url} was saved with {key}={saved.get(key)!r} but this run has {key}={value!r}; resuming "
                f"would not continue the run exactly. Set runtime.{'num_workers' if key == 'world_size' else key}="
                f"{saved.get(key)!r} to resume, or start a new run (another run.name).")


def train_stage(cfg: Config, stage_factory: Callable[[Config], Stage], data_factory: DataFactory, *,
                stage_name: str, local_dir: str | Path | None = None) -> TrainResult:
    """Trains (or resumes) stage `stage_name` of run `cfg` on `cfg.runtime.num_workers` Ray Train workers.

    The same call starts a run and resumes it from its latest committed checkpoint in `cfg.run_url/stage_name/`.
    A SIGTERM to the calling process (when it calls from its main thread) or to any worker makes every rank save
    and stop within `runtime.sigterm_grace_s`; the result then says `preempted` and the same call continues.
    `stage_factory(cfg)` builds the stage on each worker (same seed on every rank); `data_factory(cfg, request)`
    opens each rank's data stream. Both must be picklable. Uses the Ray the caller initialised, else connects to
    `cfg.runtime.ray_address`, else starts a local one (left running for later stages).
    """
    validate(cfg, stage_name)
    _check_picklable("stage_factory", stage_factory)
    _check_picklable("data_factory", data_factory)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    run_url = _absolute(cfg.run_url)
    check_resumable(cfg, stage_name, run_url)
    local = Path(local_dir).absolute() if local_dir is not None else default_local_dir(cfg)

    ensure_ray(cfg, cfg.runtime.num_workers * cfg.runtime.cpus_per_worker)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_backend import PreemptibleTorchConfig, start_stop_relay

    # Ray Train re-routes a worker's print() into its logger and, when anything has wrapped sys.stdout, also prints
    # it: every progress line then reached the driver twice. Plain prints still land in each worker's log file.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    rt = cfg.runtime
    relay = start_stop_relay()
    job = WorkerJob(cfg, stage_name, stage_factory, data_factory, run_url, str(local), worker_env(cfg), relay)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=rt.num_workers, use_gpu=rt.use_gpu,
                                     resources_per_worker={"CPU": rt.cpus_per_worker}),
        torch_config=PreemptibleTorchConfig(backend="nccl" if rt.use_gpu else "gloo",
                                            sigterm_grace_s=rt.sigterm_grace_s),
        # Ray's own run state only; checkpoints live in our store (Ray's registry can miss a late report).
        run_config=RunConfig(name=f"{cfg.run.name}-{stage_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(local / "ray"),
                             failure_config=FailureConfig(max_failures=rt.max_failures)),
    )
    try:
        # A SIGTERM sent to this process alone reaches every worker as a save-and-stop request.
        with preemption.forwarding_sigterm(lambda: ray.get(relay.request.remote()), rt.sigterm_grace_s):
            out = trainer.fit().return_value
    finally:
        ray.kill(relay)
    return TrainResult(**out)

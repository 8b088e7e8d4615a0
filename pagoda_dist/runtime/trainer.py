"""`train_stage`: run one stage on a Ray Train worker group (starting or joining Ray) and report how it ended.

Checks happen here, before Ray or any worker starts: the config (validated again, by the config itself, since a
caller may have changed it after loading), picklability of the factories, and whether the latest committed
checkpoint can be resumed with this world size / ZeRO stage / precision.
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
from pagoda_dist.chain import stage_spec
from pagoda_dist.config import Config, from_dict, to_dict
from pagoda_dist.interfaces import Stage
from pagoda_dist.storage.lease import LeaseToken

from . import preemption
from .checkpoint import CheckpointStore, check_resumable, resume_layout
from .source import DataFactory
from .ray_session import ensure_ray, worker_env
from .worker import WorkerJob, ray_train_loop

@dataclass
class TrainResult:
    """How a `train_stage` call ended."""

    stage: str
    nimg: int                       # images seen at the end
    checkpoint_url: str | None      # the last committed checkpoint
    export_url: str | None          # its export (EMA + live weights, fp32, weights_only-loadable)
    preempted: bool                 # True: stopped on SIGTERM after saving; run the same command to continue
    resumed_from: int | None        # images seen in the checkpoint this attempt started from (None: fresh)
    metrics: dict[str, float] = field(default_factory=dict)        # the last log record
    diverged: bool = False          # True: stopped after runtime.max_nonfinite_steps skipped steps in a row
    nonfinite_steps: int = 0        # steps skipped for a non-finite loss or gradient in the last attempt
    history: list[dict[str, float]] = field(default_factory=list)  # every log record of the last attempt


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


def check_latest_resumable(cfg: Config, stage_name: str, run_url: str) -> None:
    """Refuses, before any worker starts, a latest checkpoint saved with another ZeRO stage or precision, or with
    another world size that `checkpoint.elastic_refusal` refuses."""
    store = CheckpointStore(run_url, stage_name)
    latest = store.latest_committed()
    if latest is not None:
        try:
            saved = store.read_meta(latest)
        except ValueError:  # damaged in place: the workers report it and fall back to an older checkpoint
            return
        batch = stage_spec(cfg, stage_name).train.batch_size
        check_resumable({**resume_layout(cfg, cfg.runtime.num_workers), "batch_size": batch}, saved, latest.url)


def train_stage(cfg: Config, stage_factory: Callable[[Config], Stage], data_factory: DataFactory, *,
                stage_name: str, local_dir: str | Path | None = None, from_scratch: bool = False,
                lease: LeaseToken | None = None) -> TrainResult:
    """Trains (or resumes) stage `stage_name` of run `cfg` on `cfg.runtime.num_workers` Ray Train workers.

    The same call starts a run and resumes it from its latest committed checkpoint in `cfg.run_url/stage_name/`.
    A SIGTERM to the calling process (when it calls from its main thread) or to any worker makes every rank save
    and stop within `runtime.sigterm_grace_s`; the result then says `preempted` and the same call continues.
    `stage_factory(cfg)` builds the stage on each worker (same seed on every rank); `data_factory(cfg, request)`
    opens each rank's data stream. Both must be picklable. Uses the Ray the caller initialised, else connects to
    `cfg.runtime.ray_address`, else starts a local one (left running for later stages). When the stage's committed
    checkpoints are all damaged it refuses to start from zero (`CheckpointDamaged`) unless `from_scratch`; with
    `lease` (the run's, see `storage.lease`) no checkpoint is committed once another driver holds the run.
    """
    cfg = from_dict(to_dict(cfg))  # validated again, in the one place: a caller may have changed it since
    train = stage_spec(cfg, stage_name).train
    _check_picklable("stage_factory", stage_factory)
    _check_picklable("data_factory", data_factory)
    s = cfg.storage
    storage.configure(s.endpoint_url, s.region, retry_budget_s=s.retry_budget_s)
    run_url = _absolute(cfg.run_url)
    check_latest_resumable(cfg, stage_name, run_url)
    store = CheckpointStore(run_url, stage_name)
    if not from_scratch and store.latest_committed() is None:
        store.refuse_fresh_start()  # damaged checkpoints set aside by an earlier attempt: say so before Ray starts
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
    job = WorkerJob(cfg, stage_name, train, stage_factory, data_factory, run_url, str(local), worker_env(cfg), relay,
                    from_scratch, lease)
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
    except Exception:
        if not from_scratch and store.latest_committed() is None:
            store.refuse_fresh_start()  # the workers found every checkpoint damaged: say that, in one line
        raise
    finally:
        ray.kill(relay)
    return TrainResult(**out)

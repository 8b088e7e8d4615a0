"""Joining the configured Ray cluster, or starting a small local one (the one place that calls `ray.init`), and the
environment the driver hands to its Ray workers."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pagoda_dist import storage
from pagoda_dist.config import Config

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # training and precompute pass little through Ray's object store
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_train_logs() -> None:
    """Ray worker start-up hook. Ray Train's placement-group watchdog polls the state API every second and, when a
    busy machine makes one poll time out, logs a warning and polls again: nothing is wrong, but on a loaded node it
    buries the progress lines. Its errors still show."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def ensure_ray(cfg: Config, cpus_needed: float = 0.0) -> bool:
    """Connects to `runtime.ray_address`, or starts a local Ray with at least `cpus_needed` logical CPUs (more
    logical CPUs than cores only oversubscribes, it never deadlocks a placement). True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.runtime.ray_address:
        ray.init(address=cfg.runtime.ray_address, logging_level="WARNING")
    else:
        # A cluster's job keeps the runtime environment its submitter gave it; only a local Ray gets the hook.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_ray_train_logs"})
    return True


# Credentials travel to workers inside the job (never through a runtime_env, which Ray shows in its dashboard),
# so a remote cluster sees the same identity as the driver. Values are masked in every repr.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY")
PLAIN_ENV = ("TORCH_EXTENSIONS_DIR", "AWS_CA_BUNDLE")


@dataclass
class WorkerEnv:
    """Environment for the workers; secret values never appear in a repr, log line or error message."""

    plain: dict[str, str] = field(default_factory=dict)
    secret: dict[str, str] = field(default_factory=dict)

    def apply(self) -> None:
        os.environ.update(self.plain)
        os.environ.update(self.secret)

    def __repr__(self) -> str:
        return f"WorkerEnv(plain={self.plain!r}, secret={sorted(self.secret)} (values hidden))"


def worker_env(cfg: Config) -> WorkerEnv:
    """What the workers need from the driver's environment: storage endpoint and settings, the JIT cache, the
    DeepSpeed accelerator, wandb's settings, and credentials (as secrets)."""
    plain = {name: os.environ[name] for name in PLAIN_ENV if os.environ.get(name)}
    # wandb's settings (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, ...) reach rank 0 wherever it runs; its key: secret
    plain.update({name: value for name, value in os.environ.items()
                  if name.startswith("WANDB_") and name not in SECRET_ENV and value})
    plain.update(storage.env_for_workers())
    if not cfg.runtime.use_gpu:
        plain["DS_ACCELERATOR"] = "cpu"
    secret = {name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    return WorkerEnv(plain, secret)

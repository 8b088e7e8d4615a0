"""Joining the configured Ray cluster, or starting a small local one: the one place that calls `ray.init`."""
from __future__ import annotations

import logging
import os

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

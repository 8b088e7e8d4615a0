"""Joining the configured Ray cluster, or starting a small local one: the one place that calls `ray.init`."""
from __future__ import annotations

import os

from pagoda_dist.config import Config

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # training and precompute pass little through Ray's object store


def ensure_ray(cfg: Config, cpus_needed: float = 0.0) -> bool:
    """Connects to `runtime.ray_address`, or starts a local Ray with at least `cpus_needed` logical CPUs (more
    logical CPUs than cores only oversubscribes, it never deadlocks a placement). True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.runtime.ray_address:
        ray.init(address=cfg.runtime.ray_address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level="WARNING")
    return True

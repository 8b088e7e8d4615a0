"""Shared pytest set-up: the embedded S3 fixtures, and an environment that never reaches the network."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["tests.conftest_s3"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run leaves out the tests marked slow (multi-minute rehearsals): `-m slow` runs them, `-m "slow or
    not slow"` everything, and a test named by its node id (FILE::NAME) runs whatever its mark."""
    if config.option.markexpr or any("::" in arg for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 logical CPUs (2 shard tasks, or actors of 0.5 CPU, at once)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    # Ray's workers import pagoda_dist from the checkout, as the test process does.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), old) if p)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="WARNING",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old

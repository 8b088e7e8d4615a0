"""pagoda-dist: distributed training of PaGoDA one-step generators.

`load_generator`, `ExportedModel`, `GeneratorError` and `save_grid` (see `pagoda_dist.api`) are imported on first
use, so `import pagoda_dist` stays light (no torch until then).
"""
from __future__ import annotations

from typing import Any

_API = ("ExportedModel", "GeneratorError", "load_generator", "save_grid")


def __getattr__(name: str) -> Any:
    if name in _API:
        from pagoda_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'pagoda_dist' has no attribute {name!r}")


__all__ = list(_API)

"""Compiles DeepSpeed's JIT C++ ops once into $TORCH_EXTENSIONS_DIR, so later processes load them in seconds.

DeepSpeed builds a shared-memory communication op the first time a process initialises its distributed backend
(~40-55 s on 2 cores) and the fused/CPU Adam ops on first use, into torch's extensions folder. Without a warm folder
the first training run on a fresh machine, container or CI job pays that inside its timeouts, with every rank
racing to build the same op. Run this once per machine or image with TORCH_EXTENSIONS_DIR set to a folder that
persists, and export the same variable for the jobs; `pagoda_dist.runtime` forwards it to its Ray workers.

    TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions python scripts/warm_deepspeed.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# What every CPU run builds at start-up (DeepSpeed's shared-memory collectives); add CPUAdamBuilder or
# FusedAdamBuilder when a config uses those optimizers.
DEFAULT_OPS = ("ShareMemCommBuilder",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default=os.environ.get("DS_ACCELERATOR", "cpu"),
                        help="DeepSpeed accelerator whose ops to build (default: $DS_ACCELERATOR or cpu)")
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS),
                        help="op builder class names, e.g. ShareMemCommBuilder CPUAdamBuilder FusedAdamBuilder")
    args = parser.parse_args(argv)

    os.environ["DS_ACCELERATOR"] = args.accelerator
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pagoda_dist.runtime.jit_ops import use_environment_ninja  # noqa: PLC0415

    use_environment_ninja()  # the same ninja the workers will use, or they would rebuild what this builds
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - needs DS_ACCELERATOR set first

    where = os.environ.get("TORCH_EXTENSIONS_DIR") or "torch's default (~/.cache/torch_extensions)"
    accelerator = get_accelerator()
    for name in args.ops:
        builder = accelerator.create_op_builder(name)
        start = time.perf_counter()
        try:
            if builder is None:
                raise ValueError("no such op builder")
            builder.load(verbose=False)
        except ValueError as exc:  # DeepSpeed's CPU accelerator hands out a placeholder that raises on load
            print(f"warm_deepspeed: {name} is not available for accelerator {args.accelerator!r}: {exc}",
                  file=sys.stderr)
            return 2
        print(f"warm_deepspeed: {name} ready in {time.perf_counter() - start:.1f} s under {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

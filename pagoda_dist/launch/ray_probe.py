"""Reads a Ray cluster's nodes from outside it, and waits for a cluster to have N alive nodes.

Each read runs `ray.nodes()` in a short-lived subprocess, so the caller never joins the cluster itself (a process
can only be connected to one cluster, and a pytest or launcher process should not hold a Ray driver).

    python -m pagoda_dist.launch.ray_probe --address 10.0.0.5:6379 --nodes 4 --timeout 300
(used by launchers/slurm/pagoda.sbatch to wait until every node's Ray worker has joined)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

_KEEP = ("NodeID", "Alive", "NodeManagerAddress", "NodeManagerPort", "Resources")
_PREFIX = "NODES="


class ProbeError(RuntimeError):
    """The cluster could not be read, or did not reach the expected shape in time."""


def read_nodes(address: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`ray.nodes()` of the cluster at `address` (host:port of the GCS), trimmed to a few fields."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False, configure_logging=False)\n"
        f"print({_PREFIX!r} + json.dumps([{{k: n.get(k) for k in {_KEEP!r}}} for n in ray.nodes()]))\n"
        "ray.shutdown()\n"
    )
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)  # the explicit address decides
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=full_env, check=False)
    except subprocess.TimeoutExpired as err:
        raise ProbeError(f"reading ray.nodes() from {address} took over {timeout} s") from err
    for line in done.stdout.splitlines():
        if line.startswith(_PREFIX):
            return list(json.loads(line[len(_PREFIX):]))
    raise ProbeError(f"could not read ray.nodes() from {address} (exit {done.returncode}): "
                     f"{done.stderr.strip()[-2000:]}")


def wait_for_nodes(address: str, alive: int, timeout: float, dead: int | None = None,
                   env: dict[str, str] | None = None, should_stop: Any = None) -> list[dict[str, Any]]:
    """Polls until exactly `alive` nodes are alive (and `dead` dead, if given); returns the last ray.nodes().
    `should_stop()`, if given, is checked between polls and may raise to abort early (e.g. a node crashed)."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] = []
    while True:
        if should_stop is not None:
            should_stop()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            last = read_nodes(address, timeout=max(5.0, min(30.0, remaining)), env=env)
        except ProbeError:
            last = []  # the GCS may not accept drivers yet right after start
        n_alive = sum(bool(n["Alive"]) for n in last)
        if n_alive == alive and (dead is None or len(last) - n_alive == dead):
            return last
        time.sleep(0.5)
    raise ProbeError(f"{address}: expected {alive} alive node(s){'' if dead is None else f' and {dead} dead'} "
                     f"within {timeout:.0f} s, saw alive={[bool(n['Alive']) for n in last]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda_dist.launch.ray_probe",
                                     description="wait until a Ray cluster has N alive nodes")
    parser.add_argument("--address", required=True, help="GCS address host:port")
    parser.add_argument("--nodes", type=int, required=True, help="alive nodes to wait for")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        nodes = wait_for_nodes(args.address, args.nodes, args.timeout)
    except ProbeError as err:
        print(f"ray_probe: {err}", file=sys.stderr)
        return 1
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes if n["Alive"])
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes if n["Alive"])
    print(f"ray_probe: {len(nodes)} node(s) alive at {args.address}: {cpus:g} CPU, {gpus:g} GPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

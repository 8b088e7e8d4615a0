"""One Ray node bound to 127.0.0.1, run in this process until SIGTERM: `ray start --block` for loopback clusters.

Why not `ray start`: Ray 2.60 rewrites `--node-ip-address=127.0.0.1` (and `--address=127.0.0.1:P`) into the
machine's outward IP and then binds its servers to all interfaces. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it
keeps 127.0.0.1 (and binds loopback only), but `ray start` then refuses to start non-head nodes. Starting the node
through `ray._private.node.Node`, as Ray's own DeveloperAPI `ray.cluster_utils.Cluster` does, has neither problem,
so several nodes share one machine on loopback only. Pinned to the Ray version in constraints.txt.

    python -m pagoda_dist.launch.ray_node --head --port 6380 --num-cpus 1 --object-store-mb 80 --temp-dir /tmp/x
    python -m pagoda_dist.launch.ray_node --address 127.0.0.1:6380 --num-cpus 1 --object-store-mb 80 --temp-dir ...
"""
from __future__ import annotations

import argparse
import os
import sys
import time

LOOPBACK = "127.0.0.1"
READY_MARKER = "RAY_NODE_READY"  # printed once every process of the node runs; LocalCluster waits for it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pagoda_dist.launch.ray_node", description=__doc__.split("\n")[0])
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head (GCS) of a new cluster")
    role.add_argument("--address", help="GCS address of the head to join, 127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=6379, help="GCS port (head only)")
    parser.add_argument("--num-cpus", type=float, required=True)
    parser.add_argument("--object-store-mb", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--dashboard-port", type=int, default=None, help="head only; omitted: no dashboard")
    parser.add_argument("--ray-client-server-port", type=int, default=None, help="head only")
    parser.add_argument("--dashboard-agent-port", type=int, required=True)
    parser.add_argument("--metrics-export-port", type=int, required=True)
    parser.add_argument("--runtime-env-agent-port", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Read by ray_constants at import time: keep 127.0.0.1 as the node IP (see the module docstring).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.node
    import ray._private.parameter
    import ray._private.utils
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    # Nodes sharing a temp dir would pick their socket names by "first free name" (raylet, raylet.1, ...), a race
    # when they start together (both take the same name and one raylet never registers): name them per node.
    sockets = os.path.join(args.temp_dir, "sockets", str(os.getpid()))
    params = ray._private.parameter.RayParams(
        node_ip_address=LOOPBACK,
        gcs_address=None if args.head else args.address,
        gcs_server_port=args.port if args.head else None,
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=args.object_store_mb * 1024 * 1024,
        temp_dir=args.temp_dir,
        include_dashboard=args.dashboard_port is not None,
        dashboard_host=LOOPBACK,
        dashboard_port=args.dashboard_port,
        ray_client_server_port=args.ray_client_server_port,
        dashboard_agent_listen_port=args.dashboard_agent_port,
        metrics_export_port=args.metrics_export_port,
        runtime_env_agent_port=args.runtime_env_agent_port,
        # Worker processes pick any free port, not Ray's fixed 10002-19999 range other Ray instances share.
        min_worker_port=0,
        max_worker_port=0,
        # One log monitor per machine is enough: the head's.
        include_log_monitor=bool(args.head),
        raylet_socket_name=os.path.join(sockets, "raylet"),
        plasma_store_socket_name=os.path.join(sockets, "plasma_store"),
        # Per node too: a job's working_dir is unpacked into this folder by every node that runs its tasks, and a
        # node that has not unpacked it yet deletes and rewrites it, under the feet of a driver running from it.
        runtime_env_dir_name=os.path.join("runtime_resources", str(os.getpid())),
    )
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    # shutdown_at_exit: SIGTERM (or our exit) stops every process of this node; spawn_reaper: the kernel kills
    # them if this process dies (SIGKILL), so killing this process's group is a clean "machine died".
    node = ray._private.node.Node(params, head=bool(args.head), shutdown_at_exit=True, spawn_reaper=True)
    if args.head:
        # As `ray start --head` does: a job's driver finds its cluster ("auto") through this file in the temp dir;
        # without it Ray picks any GCS process it sees on the machine, maybe another user's cluster.
        ray._private.utils.write_ray_address(node.gcs_address, args.temp_dir)
    print(f"{READY_MARKER} node_id={node.node_id} gcs={node.gcs_address}", flush=True)
    while True:
        time.sleep(1)
        dead = [name for name, proc in node.dead_processes() if proc.returncode not in (0, -15, 15, 143)]
        if dead:
            print(f"RAY_NODE_FAILED: {', '.join(dead)} exited; stopping this node", file=sys.stderr, flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return 1


if __name__ == "__main__":
    sys.exit(main())

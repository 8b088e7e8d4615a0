"""A multi-node Ray cluster on one machine: a head and K worker "nodes", each its own process (ray_node.py, the
loopback-only equivalent of `ray start --block`).

Used by the tests (job submission, node failure) and by `cluster/local.sh`. Every node binds 127.0.0.1, gets its
own ports (so several clusters, and other Ray instances on the machine, coexist), a small object store, and runs
in its own session, so one node can be killed alone (SIGKILL to its process group, and to the Ray workers its
raylet started in groups of their own: like a machine going away) and everything is stopped by PID at the end.
Never `ray stop`: that kills every Ray process of the user on the machine, not only ours.

    with LocalCluster(workers=1, cpus_per_node=1) as cluster:
        cluster.wait_for_nodes(alive=2)
        cluster.kill_node(1)

From the shell: `python -m pagoda_dist.launch.local_cluster up|down|status [--workers K ...]` (state in a JSON
file, so `down` stops exactly what `up` started) and `kill NODE` (one node, for failure drills).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pagoda_dist.launch.ray_node import LOOPBACK, READY_MARKER
from pagoda_dist.launch.ray_probe import ProbeError, read_nodes, wait_for_nodes

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN_WORKER = "ray::RayTrainWorker"  # how a Ray Train worker process shows in its command line


class ClusterError(RuntimeError):
    """A local Ray node did not start, did not join, or the cluster is not in the expected state."""


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; a race with other processes is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Proc:
    """One live process, as Linux /proc shows it."""

    pid: int
    ppid: int
    pgrp: int
    started: int  # clock ticks after boot: tells this process from a later one that reuses its PID


def _read_proc(pid: int | str) -> Proc | None:
    """The process `pid`, or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # state; then ppid, pgrp, ...; starttime is field 22 of the whole line
        return None
    return Proc(int(pid), int(fields[1]), int(fields[2]), int(fields[19]))


def signal_processes(procs: list[Proc], sig: int) -> None:
    """Sends `sig` to each of `procs` that still runs (the same process: a reused PID is left alone)."""
    for proc in procs:
        if _read_proc(proc.pid) == proc:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass


def any_alive(procs: list[Proc]) -> bool:
    return any(_read_proc(proc.pid) == proc for proc in procs)


@dataclass
class NodeProcess:
    """One Ray node: its ray_node.py process (a session leader, so its PID is also its process group)."""

    name: str
    pid: int
    log: str
    killed: bool = False
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal_group(self, sig: int) -> None:
        """Sends `sig` to the node's process group (runner, raylet, GCS, agents; Ray workers have groups of their
        own), ignoring one that is gone."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signals every process of the node, its Ray workers included: SIGKILL is the machine going away."""
        procs = self.processes()
        self.signal_group(sig)
        signal_processes(procs, sig)

    def wait(self, timeout: float) -> bool:
        """True once the node process has exited (reaped when we are its parent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.1)
        return not self.running()

    def processes(self) -> list[Proc]:
        """The node's live processes: its process group (node runner, raylet, GCS, agents) and their descendants,
        since Ray starts every worker in a process group of its own (Linux /proc)."""
        table = [proc for proc in map(_read_proc, (d.name for d in Path("/proc").glob("[0-9]*"))) if proc]
        children: dict[int, list[Proc]] = {}
        for proc in table:
            children.setdefault(proc.ppid, []).append(proc)
        found: dict[int, Proc] = {}
        todo = [proc for proc in table if proc.pgrp == self.pid]
        while todo:
            proc = todo.pop()
            if proc.pid not in found:
                found[proc.pid] = proc
                todo.extend(children.get(proc.pid, []))
        return sorted(found.values(), key=lambda proc: proc.pid)

    def group_alive(self) -> bool:
        """True while a process of the node (or a worker it started) runs."""
        return bool(self.processes())

    def runs(self, text: str) -> bool:
        """True while a process of this node has `text` in its command line; Ray workers show their actor class
        there (e.g. `ray::RayTrainWorker`), so this tells which node hosts which actor."""
        for proc in self.processes():
            try:
                if text in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace"):
                    return True
            except OSError:
                continue
        return False


class LocalCluster:
    """A Ray head plus `workers` worker nodes on 127.0.0.1, started and stopped by PID."""

    def __init__(
        self,
        workers: int = 1,
        cpus_per_node: float = 1,
        head_cpus: float | None = None,
        object_store_mb: int = 80,
        dashboard: bool = False,
        temp_dir: str | Path | None = None,
        health_check_ms: int | None = 500,
        env: dict[str, str] | None = None,
    ) -> None:
        """`health_check_ms`: how often the GCS pings raylets (3 misses = dead); small values make a killed node
        show up as dead within seconds instead of Ray's default ~30 s. `env` is added to every node's environment
        (the head's is what `ray job submit` entrypoints inherit)."""
        if workers < 0:
            raise ClusterError(f"workers must be >= 0, got {workers}")
        if object_store_mb < 75:  # Ray's floor for the plasma store
            raise ClusterError(f"object_store_mb must be >= 75, got {object_store_mb}")
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self._own_temp = temp_dir is None
        # Ray puts Unix sockets under the temp dir: keep the path short (108-byte socket path limit).
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="pgray-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.env = {**self.client_env(), **(env or {})}
        # Quick SIGTERM teardown: Ray otherwise drains a node for up to 30 s before stopping its processes.
        self.env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")
        if health_check_ms is not None:
            self.env.update({
                "RAY_health_check_period_ms": str(health_check_ms),
                "RAY_health_check_timeout_ms": str(health_check_ms),
                "RAY_health_check_failure_threshold": "3",
            })
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        self.nodes_started: list[NodeProcess] = []

    # ------------------------------------------------------------------------------------------- addresses
    def client_env(self) -> dict[str, str]:
        """Environment a process needs to talk to this cluster (drivers, `ray job submit`, JobSubmissionClient).

        - Ray 2.60 rewrites a 127.0.0.1 address into the machine's outward IP unless
          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see ray_node.py): drivers need it to reach a loopback cluster.
        - Token authentication with a token private to this cluster, rather than ~/.ray/auth_token, so clusters
          of other users/tests on the machine neither share nor clobber it.
        """
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)` (with client_env() set)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """HTTP address of the job API (`ray job submit --address`), when the dashboard is on."""
        if self.dashboard_port is None:
            raise ClusterError("this cluster was started without a dashboard (LocalCluster(dashboard=True))")
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    # ---------------------------------------------------------------------------------------------- start
    def start(self, timeout: float = 90.0) -> LocalCluster:
        """Starts the head, waits for it, then starts the workers together and waits until all have joined."""
        try:
            deadline = time.monotonic() + timeout
            self._wait_ready(self._launch("head", self._head_args()), deadline)
            workers = [self._launch(f"worker-{i + 1}", self._worker_args()) for i in range(self.workers)]
            for node in workers:
                self._wait_ready(node, deadline)
            self.wait_for_nodes(alive=1 + self.workers, timeout=max(10.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, timeout: float = 60.0) -> NodeProcess:
        """Starts one more worker node (e.g. to replace a killed one) and waits until it is alive in the cluster."""
        node = self._launch(f"worker-{len(self.nodes_started)}", self._worker_args())
        self._wait_ready(node, time.monotonic() + timeout)
        self.wait_for_nodes(alive=sum(n.running() for n in self.nodes_started), timeout=timeout)
        return node

    def _wait_ready(self, node: NodeProcess, deadline: float) -> None:
        """Waits for the node process to report that all its Ray processes are up (cheap: reads its log)."""
        while time.monotonic() < deadline:
            if READY_MARKER in _tail(node.log, 100_000):
                return
            if not node.running():
                raise ClusterError(f"Ray node {node.name} exited while starting; see {node.log}:\n{_tail(node.log)}")
            time.sleep(0.2)
        raise ClusterError(f"Ray node {node.name} did not start in time; see {node.log}:\n{_tail(node.log)}")

    def _node_args(self, cpus: float) -> list[str]:
        # Every port with a fixed default gets a free one, so nodes and other Ray instances on the machine coexist.
        return [f"--num-cpus={cpus:g}", f"--object-store-mb={self.object_store_bytes // (1024 * 1024)}",
                f"--temp-dir={self.temp_dir}", f"--dashboard-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def _head_args(self) -> list[str]:
        args = ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                *self._node_args(self.head_cpus)]
        if self.dashboard_port is not None:
            args.append(f"--dashboard-port={self.dashboard_port}")
        return args

    def _worker_args(self) -> list[str]:
        return [f"--address={self.address}", *self._node_args(self.cpus_per_node)]

    def _launch(self, name: str, args: list[str]) -> NodeProcess:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            self.token_path.touch(mode=0o600)
            self.token_path.write_text(secrets.token_hex(32))
        log_path = self.temp_dir / f"{name}.log"
        env = {**os.environ, **self.env}
        # This cluster's own address, never an inherited one: Ray's processes that look their cluster up without
        # an address (Ray Train's placement-group watchdog, say) would otherwise pick any Ray on the machine, or
        # fail when there are several.
        env["RAY_ADDRESS"] = self.address
        # Job entrypoints (`python ...`) and workers resolve tools beside the Python that runs the node.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The node runner is part of this package; make it importable from a source checkout too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([sys.executable, "-m", "pagoda_dist.launch.ray_node", *args], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        node = NodeProcess(name=name, pid=popen.pid, log=str(log_path), popen=popen)
        self.nodes_started.append(node)
        return node

    # ------------------------------------------------------------------------------------------ observe
    def nodes(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """`ray.nodes()` of this cluster (NodeID, Alive, NodeManagerPort, Resources), read from a subprocess."""
        return read_nodes(self.address, timeout=timeout, env=self.env)

    def wait_for_nodes(self, alive: int, dead: int | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Waits until exactly `alive` nodes are alive (and, if given, `dead` are dead); returns ray.nodes().
        Fails at once, with the node's log, if a node we did not kill has exited."""

        def check_crashed() -> None:
            crashed = [n for n in self.nodes_started if not n.killed and not n.running()]
            if crashed:
                raise ClusterError(f"Ray node {crashed[0].name} exited unexpectedly; see {crashed[0].log}:\n"
                                   f"{_tail(crashed[0].log)}")

        try:
            return wait_for_nodes(self.address, alive, timeout, dead=dead, env=self.env, should_stop=check_crashed)
        except ProbeError as err:
            logs = "\n".join(f"--- {n.name} ({n.log}):\n{_tail(n.log)}" for n in self.nodes_started)
            raise ClusterError(f"{err}\n{logs}") from None

    # --------------------------------------------------------------------------------------- kill / stop
    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> NodeProcess:
        """Kills node `index` (0 is the head) with all its processes, Ray workers included, as if the machine had
        died."""
        node = self.nodes_started[index]
        node.killed = True
        node.kill(sig)
        node.wait(10.0)
        return node

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops every node this object started (see `stop_nodes`) and removes its temp dir if it made it."""
        for node in self.nodes_started:
            node.killed = True
        stop_nodes(self.nodes_started, grace_s)
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:  # noqa: PYI034 - not meant to be subclassed
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- state files
    def state(self) -> dict[str, Any]:
        return {"address": self.address, "dashboard_port": self.dashboard_port, "temp_dir": str(self.temp_dir),
                "client_env": self.client_env(), "own_temp_dir": self._own_temp,
                "nodes": [{k: v for k, v in asdict(n).items() if k not in ("popen", "killed")}
                          for n in self.nodes_started]}


def stop_nodes(nodes: list[NodeProcess], grace_s: float = 15.0) -> None:
    """SIGTERM to every node, workers first and the head last (so workers do not log a lost GCS): Ray then stops
    each node's processes cleanly. After `grace_s`, SIGKILL to whatever of theirs still runs, Ray workers included
    (they are listed first: once their raylet is gone they are no longer its descendants)."""
    procs = [proc for node in nodes for proc in node.processes()]
    for node in reversed(nodes):
        node.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any_alive(procs):
        time.sleep(0.2)
    for node in nodes:
        node.signal_group(signal.SIGKILL)
    signal_processes(procs, signal.SIGKILL)
    for node in nodes:
        node.wait(5.0)  # reaps the node runners we started


def _tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------- CLI
def _cmd_up(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if state_file.exists():
        print(f"local cluster: {state_file} exists (already up?); run `down` first", file=sys.stderr)
        return 1
    cluster = LocalCluster(workers=args.workers, cpus_per_node=args.cpus,
                           head_cpus=args.head_cpus if args.head_cpus is not None else float(os.cpu_count() or 1),
                           object_store_mb=args.object_store_mb, dashboard=True, health_check_ms=None,
                           temp_dir=args.temp_dir)
    cluster.start(timeout=args.timeout)
    # Leave the nodes running after this command exits: they are session leaders, not tied to our terminal.
    for node in cluster.nodes_started:
        node.popen = None
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(cluster.state(), indent=2))
    print(f"local cluster: {1 + args.workers} Ray node(s) on 127.0.0.1, job API {cluster.dashboard_url}, "
          f"state {state_file}", file=sys.stderr)
    # stdout: shell exports, so `eval "$(... up)"` points ray/pagoda commands at this cluster.
    exports = {**cluster.client_env(), "RAY_ADDRESS": cluster.address, "RAY_API_SERVER_ADDRESS": cluster.dashboard_url}
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        print(f"local cluster: no state file {state_file}; nothing to stop")
        return 0
    state = json.loads(state_file.read_text())
    nodes = [NodeProcess(**n) for n in state["nodes"]]
    stop_nodes(nodes)
    if state.get("own_temp_dir"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_file.unlink()
    print(f"stopped {len(nodes)} node(s)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        print("local cluster: down")
        return 1
    state = json.loads(state_file.read_text())
    for node in (NodeProcess(**n) for n in state["nodes"]):
        status = "gone" if not node.group_alive() else (
            "running, hosts a training worker" if node.runs(TRAIN_WORKER) else "running")
        print(f"{node.name:<10} pid {node.pid:<8} {status:<34} log {node.log}")
    print(f"RAY_ADDRESS={state['address']}")
    return 0


def _cmd_kill(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    nodes = [NodeProcess(**n) for n in json.loads(state_file.read_text())["nodes"]] if state_file.exists() else []
    node = next((n for n in nodes if n.name == args.node), None)
    if node is None:
        print(f"local cluster: no node {args.node!r}; nodes: {', '.join(n.name for n in nodes) or 'none (down)'}",
              file=sys.stderr)
        return 1
    node.kill()
    print(f"killed {node.name} (pid {node.pid}) with all its processes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda_dist.launch.local_cluster",
                                     description="a multi-node Ray cluster on this machine (127.0.0.1)")
    parser.add_argument("action", choices=["up", "down", "status", "kill"])
    parser.add_argument("node", nargs="?", help="kill: the node to take down, as `status` names it (e.g. worker-1)")
    parser.add_argument("--state", default="work/local-cluster.json", help="where `up` records the node PIDs")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker nodes besides the head (several nodes on one machine: for failure drills)")
    parser.add_argument("--cpus", type=float, default=1, help="logical CPUs per worker node")
    parser.add_argument("--head-cpus", type=float, default=None, help="logical CPUs of the head (default: all)")
    parser.add_argument("--object-store-mb", type=int, default=512, help="object store per node, MiB")
    parser.add_argument("--temp-dir", default=None, help="Ray temp/log folder (default: a new /tmp/pgray-*)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the nodes to join")
    args = parser.parse_intermixed_args(argv)  # `kill --state FILE worker-1`: the node name may follow options
    try:
        if (args.action == "kill") != (args.node is not None):
            parser.error("give a node name with `kill`, and only there")
        return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "kill": _cmd_kill}[args.action](args)
    except ClusterError as err:
        print(f"local cluster: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

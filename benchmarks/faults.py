"""Fault matrix: real `pagoda run` runs with one fault each, against the same run uninterrupted.

    python benchmarks/faults.py                          # every fault (~40 min on a 2-core CPU)
    python benchmarks/faults.py --only worker-sigkill s3-pause-30
    python benchmarks/faults.py --list

Set-up, as a cluster user has it: an embedded S3 server (SeaweedFS on loopback) holding the data and the run, a
local Ray cluster of three 1-CPU nodes (head + 2 workers, separate processes: `launch.local_cluster`), and
`python -m pagoda_dist.cli run configs/tiny.yaml --only teacher` as the driver, a client of that cluster. The
model, data and loader are the demo's (class labels, one loader worker); the budget is smaller and the log and
checkpoint intervals do not divide each other (see RUN below).

Each fault strikes once the run has logged `STRIKE_AT` images (or, for the checkpoint faults, after a SIGTERM
stop), and the same command is run again where a user would. A row says:
- survived: the run finished, or was refused with a clear message while its last good checkpoint stayed intact;
- images redone: where the fault struck minus where the run resumed (0: nothing lost);
- losses: whether every loss logged after the fault equals the uninterrupted run's at the same image count
  (`equal`), or the largest relative difference where they may not be equal by design (another world size).
The table is printed at the end; docs/results.md carries it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; tests.damage garbles a sample

from pagoda_dist import storage
from pagoda_dist.launch.local_cluster import TRAIN_WORKER, LocalCluster
from pagoda_dist.storage import LocalS3Server, free_port_block

BUCKET = "faults"
BATCH = 64
TOTAL_KIMG = 1.92              # 30 steps of the demo's batch
LOG_EVERY_KIMG = 0.192         # every 3 steps
CHECKPOINT_EVERY_KIMG = 0.448  # every 7 steps: not a multiple of the log interval
STRIKE_AT = 960                # images logged before a fault strikes: two checkpoints are committed by then
RUN = ["model.channels=32", f"teacher.train.batch_size={BATCH}", f"teacher.train.total_kimg={TOTAL_KIMG}",
       f"logging.log_every_kimg={LOG_EVERY_KIMG}", f"logging.checkpoint_every_kimg={CHECKPOINT_EVERY_KIMG}",
       "logging.sample_every_kimg=100", "logging.wandb_mode=disabled", "runtime.cpus_per_worker=1",
       "runtime.sigterm_grace_s=60"]


@dataclass
class Row:
    fault: str
    survived: bool = False
    redone: int | None = None
    losses: str = "-"
    note: str = ""


@dataclass
class Attempt:
    code: int
    output: str
    resumed_from: int | None = field(default=None)


class Bench:
    """The server, the cluster, the prepared data and the drivers of one matrix."""

    def __init__(self, work: Path, cluster: LocalCluster, server: LocalS3Server) -> None:
        self.work, self.cluster, self.server = work, cluster, server
        self.env = {**os.environ, **server.env(include_secret=False), **cluster.client_env(),
                    "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
        self.shards = f"s3://{BUCKET}/data-32"
        self.baselines: dict[int, dict[int, float]] = {}

    # ------------------------------------------------------------------------------------------- drivers
    def overrides(self, name: str, workers: int = 1, shards: str | None = None) -> list[str]:
        return [*RUN, f"run.name={name}", f"run.root=s3://{BUCKET}/root", "storage.embedded_s3=false",
                "data.source=null", f"data.shards={shards or self.shards}", f"runtime.num_workers={workers}",
                f"runtime.ray_address={self.cluster.address}"]

    def start(self, name: str, *extra: str, workers: int = 1, shards: str | None = None, only: str = "teacher",
              log_name: str | None = None) -> subprocess.Popen:
        log = (self.work / "logs" / f"{log_name or name}.log").open("a")
        cmd = [sys.executable, "-m", "pagoda_dist.cli", "run", str(ROOT / "configs" / "tiny.yaml"),
               *self.overrides(name, workers, shards), *extra, "--only", only]
        return subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def finish(self, proc: subprocess.Popen, log_name: str, timeout: float = 900) -> Attempt:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        output = (self.work / "logs" / f"{log_name}.log").read_text(errors="replace")
        resumed = [int(line.rsplit("(", 1)[1].split()[0]) for line in output.splitlines()
                   if "] resumed from " in line]
        return Attempt(code, output, resumed[-1] if resumed else None)

    def run(self, name: str, *extra: str, workers: int = 1, **kwargs) -> Attempt:
        return self.finish(self.start(name, *extra, workers=workers, **kwargs), name)

    # ---------------------------------------------------------------------------------------------- state
    def metrics(self, name: str) -> dict[int, float]:
        """The last loss logged at each image count (a resumed run logs replayed counts again)."""
        path = self.work / "work" / "runs" / name / "teacher" / "metrics.jsonl"
        if not path.exists():
            return {}
        out = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "loss" in record:
                    out[int(record["nimg"])] = record["loss"]
        return out

    def wait_logged(self, name: str, proc: subprocess.Popen, nimg: int = STRIKE_AT, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = max(self.metrics(name), default=0)
            if seen >= nimg:
                return seen
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: the driver exited ({proc.returncode}) before {nimg} images")
            time.sleep(0.1)
        raise TimeoutError(f"{name}: {nimg} images not logged within {timeout} s")

    def step_url(self, name: str, nimg: int) -> str:
        return storage.join(f"s3://{BUCKET}/root", "runs", name, "teacher", f"step-{nimg:09d}")

    def committed(self, name: str) -> list[int]:
        from pagoda_dist.runtime.checkpoint import CheckpointStore

        return [ref.nimg for ref in CheckpointStore(f"s3://{BUCKET}/root/runs/{name}", "teacher").committed()]

    def train_worker_pids(self) -> list[int]:
        pids = []
        for node in self.cluster.nodes_started:
            for proc in node.processes():
                try:
                    if TRAIN_WORKER in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace"):
                        pids.append(proc.pid)
                except OSError:
                    continue
        return pids

    def weed_pid(self) -> int:
        pid = self.server.status().pid
        if pid is None:
            raise RuntimeError("the S3 server is not running")
        return pid

    # ------------------------------------------------------------------------------------------ judging
    def judge(self, row: Row, name: str, attempt: Attempt, struck: int | None, workers: int = 1,
              exact: bool = True) -> Row:
        got, ref = self.metrics(name), self.baselines[workers]
        row.survived = attempt.code == 0 and max(got, default=0) == int(TOTAL_KIMG * 1000)
        if struck is not None:
            # A stop that lands after the fault point resumes past it: nothing redone.
            row.redone = max(0, struck - (attempt.resumed_from if attempt.resumed_from is not None else struck))
        after = {n: v for n, v in got.items() if struck is None or n > (attempt.resumed_from or 0)}
        if not after or not row.survived:
            row.losses = "-"
        elif exact:
            same = all(ref.get(n) == v for n, v in after.items())
            row.losses = "equal" if same else f"differ at {sum(ref.get(n) != v for n, v in after.items())}/{len(after)}"
        else:
            worst = max(abs(v - ref[n]) / abs(ref[n]) for n, v in after.items() if n in ref)
            row.losses = f"max rel. diff {worst:.1e}"
        if not row.survived:
            row.note = row.note or _last_line(attempt.output)
        return row


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


# ---------------------------------------------------------------------------------------------- faults
def signal_driver(b: Bench, name: str, sig: int, **kwargs) -> tuple[Attempt, int]:
    proc = b.start(name, **kwargs)
    struck = b.wait_logged(name, proc)
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    return b.finish(proc, name), struck


def worker_sigkill(b: Bench) -> Row:
    name = "worker-sigkill"
    proc = b.start(name)
    struck = b.wait_logged(name, proc)
    for pid in b.train_worker_pids():
        os.kill(pid, signal.SIGKILL)
    return b.judge(Row("Ray Train worker SIGKILL"), name, b.finish(proc, name), struck)


def driver_sigkill(b: Bench) -> Row:
    name = "driver-sigkill"
    _, struck = signal_driver(b, name, signal.SIGKILL)
    return b.judge(Row("driver SIGKILL, same command again"), name, b.run(name), struck)


def driver_sigterm(b: Bench) -> Row:
    name = "driver-sigterm"
    first, struck = signal_driver(b, name, signal.SIGTERM)
    row = b.judge(Row("driver SIGTERM, same command again"), name, b.run(name), struck)
    row.note = f"first attempt exit {first.code}"
    if first.code != 143:
        row.survived = False
    return row


def s3_pause(seconds: float) -> Callable[[Bench], Row]:
    def fault(b: Bench) -> Row:
        name = f"s3-pause-{int(seconds)}"
        proc = b.start(name)
        struck = b.wait_logged(name, proc)
        pid = b.weed_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return b.judge(Row(f"S3 server paused {int(seconds)} s (SIGSTOP)"), name, b.finish(proc, name), struck)
    fault.__name__ = f"s3_pause_{int(seconds)}"
    return fault


def s3_restart(b: Bench) -> Row:
    name = "s3-restart"
    proc = b.start(name)
    struck = b.wait_logged(name, proc)
    os.kill(b.weed_pid(), signal.SIGKILL)
    time.sleep(20)
    b.server.start()
    return b.judge(Row("S3 server SIGKILLed, restarted 20 s later"), name, b.finish(proc, name), struck)


def _flip_byte(url: str) -> None:
    data = bytearray(storage.read_bytes(url))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(data))


def _truncate(url: str) -> None:
    storage.write_bytes(url, storage.read_bytes(url)[: storage.size(url) // 2])


def _delete_commit(url: str) -> None:
    storage.remove(url, recursive=False)


def checkpoint_damage(label: str, damage: Callable[[str], None], target: str) -> Callable[[Bench], Row]:
    """Stop the run with SIGTERM, damage the newest committed checkpoint (its largest file, or its COMMIT marker),
    run the same command again."""
    def fault(b: Bench) -> Row:
        name = f"ckpt-{target}"
        signal_driver(b, name, signal.SIGTERM)
        newest = b.committed(name)[-1]
        folder = b.step_url(name, newest)
        files = storage.list_files(folder)
        victim = "COMMIT" if target == "commit" else max((f for f in files if f != "COMMIT"), key=files.get)
        damage(storage.join(folder, victim))
        again = b.run(name)
        row = b.judge(Row(label), name, again, newest)
        row.note = f"damaged step-{newest} {victim}"
        return row
    fault.__name__ = f"checkpoint_{target}"
    return fault


def corrupt_sample(b: Bench) -> Row:
    from tests.damage import garble_image

    name = "corrupt-sample"
    damaged = f"s3://{BUCKET}/data-32-damaged"
    local = b.work / "damaged"
    storage.download_dir(b.shards, local)
    shard = min(local.glob("train-*.tar"))
    garble_image(shard, 3)
    storage.upload_dir(local, damaged)
    attempt = b.run(name, shards=damaged)
    row = Row("corrupt input sample", survived=attempt.code == 0, losses="n/a (another stream)")
    counted = [json.loads(line).get("corrupt_samples") for line in
               (b.work / "work" / "runs" / name / "teacher" / "metrics.jsonl").read_text().splitlines()]
    # Counted each time the stream meets it: once per epoch that passes over it.
    row.note = f"corrupt_samples logged: {counted[-1]} (one garbled image, counted each time it is met)"
    row.survived = row.survived and counted[-1] >= 1
    return row


def second_driver(b: Bench) -> Row:
    name = "second-driver"
    first = b.start(name)
    b.wait_logged(name, first, nimg=1)
    second = b.finish(b.start(name, log_name="second-driver-2"), "second-driver-2")  # while the first trains
    row = b.judge(Row("second driver on the same run"), name, b.finish(first, name), None)
    row.note = f"second driver exit {second.code}: {_last_line(second.output)}"
    row.survived = row.survived and second.code != 0
    return row


def other_world_size(b: Bench) -> Row:
    name = "other-world-size"
    _, struck = signal_driver(b, name, signal.SIGTERM, workers=2)
    again = b.run(name, workers=1)
    return b.judge(Row("resume on another world size (2 -> 1)"), name, again, struck, workers=2, exact=False)


def node_loss(b: Bench) -> Row:
    name = "node-loss"
    proc = b.start(name, workers=2)
    struck = b.wait_logged(name, proc)
    victim = next(i for i, node in enumerate(b.cluster.nodes_started) if i > 0 and node.runs(TRAIN_WORKER))
    b.cluster.kill_node(victim)
    row = b.judge(Row("node lost (SIGKILL of a worker node)"), name, b.finish(proc, name), struck, workers=2)
    try:  # a replacement node for the faults after this one; the row stands either way
        b.cluster.add_worker()
    except Exception as exc:  # noqa: BLE001 - reported in the row's note
        row.note = f"replacement node: {type(exc).__name__}"
    return row


def precompute_actor_kill(b: Bench) -> Row:
    """Latent pairs of the uninterrupted teacher, once plain and once with an inversion actor SIGKILLed."""
    shards = {}
    for name, kill in (("pairs-ref", False), ("pairs-kill", True)):
        out = f"s3://{BUCKET}/root/runs/baseline-1/{name}"
        proc = b.start("baseline-1", f"precompute.output={out}", only="precompute")
        if kill:
            deadline = time.monotonic() + 600
            while not _actor_pids(b, "InverterActor") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(5)  # into its first shard
            for pid in _actor_pids(b, "InverterActor")[:1]:
                os.kill(pid, signal.SIGKILL)
        attempt = b.finish(proc, "baseline-1")
        if attempt.code != 0:
            return Row("precompute actor SIGKILL", note=_last_line(attempt.output))
        shards[name] = {rel: storage.read_bytes(storage.join(out, rel)) for rel in storage.list_files(out)
                        if rel.endswith(".tar")}
    same = shards["pairs-ref"] == shards["pairs-kill"]
    return Row("precompute actor SIGKILL", survived=True, losses="shards identical" if same else "shards differ")


def nan_fault(kind: str) -> Callable[[Bench], Row]:
    """NaN backpropagated on one step ("nan"), or on every step from STRIKE_AT on ("nan-on": a diverged run),
    through the test-suite's fault-wrapped teacher (`python -m tests.runtime_support`)."""
    def fault(b: Bench) -> Row:
        name = f"{kind}-loss"
        spec = {"kind": kind, "nimg": STRIKE_AT, "rank": 0, "marker": str(b.work / f"{name}.fired")}
        cmd = [sys.executable, "-m", "tests.runtime_support", str(b.work / "work" / "runs" / name), json.dumps(spec),
               str(ROOT / "configs" / "tiny.yaml"), *b.overrides(name), "runtime.max_nonfinite_steps=3",
               "runtime.max_failures=0"]
        with (b.work / "logs" / f"{name}.log").open("w") as log:
            code = subprocess.run(cmd, cwd=b.work, env=b.env, stdout=log, stderr=subprocess.STDOUT,
                                  check=False).returncode
        output = (b.work / "logs" / f"{name}.log").read_text(errors="replace")
        result = next((json.loads(line.split("RESULT ", 1)[1]) for line in output.splitlines()
                       if line.startswith("RESULT ")), {})
        skipped = result.get("nonfinite_steps")
        if kind == "nan":
            return Row("NaN loss on one step", survived=code == 0 and result.get("nimg") == int(TOTAL_KIMG * 1000),
                       losses="n/a (one update skipped)", note=f"skipped and counted: {skipped}")
        kept = b.committed(name)
        intact = bool(kept) and max(kept) <= STRIKE_AT
        return Row("NaN loss on every step from then on (diverged)", survived=code == 1 and intact,
                   losses="-", note=f"exit {code}, {skipped} skipped in a row, checkpoints kept {kept}")
    fault.__name__ = kind.replace("-", "_")
    return fault


def _actor_pids(b: Bench, actor: str) -> list[int]:
    pids = []
    for node in b.cluster.nodes_started:
        for proc in node.processes():
            try:
                if f"ray::{actor}" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace"):
                    pids.append(proc.pid)
            except OSError:
                continue
    return pids


FAULTS: dict[str, Callable[[Bench], Row]] = {
    "worker-sigkill": worker_sigkill,
    "driver-sigkill": driver_sigkill,
    "driver-sigterm": driver_sigterm,
    "node-loss": node_loss,
    "precompute-actor-kill": precompute_actor_kill,
    "s3-pause-30": s3_pause(30),
    "s3-pause-120": s3_pause(120),
    "s3-restart": s3_restart,
    "ckpt-corrupt": checkpoint_damage("same-size corruption of the newest checkpoint", _flip_byte, "corrupt"),
    "ckpt-truncated": checkpoint_damage("truncated newest checkpoint", _truncate, "truncated"),
    "commit-deleted": checkpoint_damage("deleted COMMIT of the newest checkpoint", _delete_commit, "commit"),
    "corrupt-sample": corrupt_sample,
    "nan-once": nan_fault("nan"),
    "nan-diverged": nan_fault("nan-on"),
    "second-driver": second_driver,
    "other-world-size": other_world_size,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="run these faults only")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--work", type=Path, help="work folder (default: a fresh temporary one)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(FAULTS))
        return
    chosen = args.only or list(FAULTS)
    work = args.work or Path(tempfile.mkdtemp(prefix="pagoda-faults-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    server = LocalS3Server(work / "s3", port=free_port_block())
    started = time.monotonic()
    with server.session():
        server.activate()
        server.ensure_bucket(BUCKET)
        with LocalCluster(workers=2, cpus_per_node=1, temp_dir=None) as cluster:
            cluster.start()
            b = Bench(work, cluster, server)
            prep = subprocess.run(
                [sys.executable, "-m", "pagoda_dist.cli", "prepare", "builtin:fashion-mnist", b.shards,
                 "data.resolution=32", "data.channels=3", "data.image_format=png", "data.limit=1200",
                 "data.shard_size=300"], check=False, cwd=work, env=b.env, capture_output=True, text=True)
            if prep.returncode != 0:
                raise SystemExit(f"prepare failed: {prep.stdout[-2000:]}{prep.stderr[-2000:]}")
            for workers in sorted({1, *([2] if {"other-world-size", "node-loss"} & set(chosen) else [])}):
                attempt = b.run(f"baseline-{workers}", workers=workers)
                if attempt.code != 0:
                    raise SystemExit(f"the uninterrupted run failed:\n{attempt.output[-3000:]}")
                b.baselines[workers] = b.metrics(f"baseline-{workers}")
            rows = []
            for key in chosen:
                t0 = time.monotonic()
                try:
                    row = FAULTS[key](b)
                except Exception as exc:  # noqa: BLE001 - a harness failure is a row, the matrix goes on
                    row = Row(key, note=f"harness: {type(exc).__name__}: {exc}"[:160])
                print(f"{key}: {row} ({time.monotonic() - t0:.0f} s)", flush=True)
                rows.append(row)
    print(f"\nFault matrix: configs/tiny.yaml teacher, {TOTAL_KIMG} kimg at batch {BATCH}, log every "
          f"{LOG_EVERY_KIMG} kimg, checkpoints every {CHECKPOINT_EVERY_KIMG} kimg, faults at >= {STRIKE_AT} images; "
          f"embedded S3, local 3-node Ray cluster; {time.monotonic() - started:.0f} s in all; logs in {work}/logs\n")
    print("| fault | survived | images redone | losses after the fault vs uninterrupted | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.fault} | {'yes' if r.survived else 'NO'} | {'-' if r.redone is None else r.redone} | "
              f"{r.losses} | {r.note} |")


if __name__ == "__main__":
    main()

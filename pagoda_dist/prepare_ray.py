"""`pagoda prepare` on Ray: one task per shard, spread over the cluster's nodes (a `data.prepare.ShardRunner`).

Each task builds one shard with `data.prepare.build_shard` (object-store reads run ahead in threads, decoding in
the task's process) and writes the shard and its completion record straight to OUT, so the driver moves no
pixels: it hands out shards, `workers` (data.prepare_workers) at a time, and reads the tasks' progress from a
small actor for the bar. The bytes are those of a local prepare: each shard's inputs and keys are fixed before
any task starts.

Tasks are spread over the nodes (for their network bandwidth) since their inputs, on an object store or carried
as pixels (builtins), can be read anywhere. Local files can be read only on this machine: a local SRC is built
here by `data.prepare.local_shards`, with `workers` local processes, as `pagoda prepare SRC OUT` does.
Ray reruns a task whose worker or node died; a task that fails by itself (an input store refusing access, an
outage outlasting the storage retries) stops the prepare and the other tasks are cancelled. Finished shards stay
committed, so the same command builds only the rest. A stop request (SIGTERM, through `runtime.preemption`) hands
out no further shard and lets the tasks under way finish theirs.

Ray lives here, outside data/, so that data/ stays importable and testable without it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import RayTaskError

from pagoda_dist import storage
from pagoda_dist.data.prepare import Progress, ShardJob, ShardRecord, ShardWork, build_shard, local_shards
from pagoda_dist.runtime.ray_session import WorkerEnv

POLL_S = 0.5           # how often the driver refreshes the progress bar while shards are being built
REPORT_EVERY_S = 0.5   # how often a task reports its progress
TASK_RETRIES = 3       # reruns of a task whose worker process or node died


class ProgressBoard:
    """Inputs done (and skipped) per shard as its task last reported them: a rerun task overwrites its entry."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[int, int]] = {}

    def report(self, name: str, done: int, skipped: int) -> None:
        self.done[name] = (done, skipped)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return self.done


def build_shard_task(job: ShardJob, work: ShardWork, env: WorkerEnv, board: Any) -> ShardRecord:
    """What one Ray task runs: the driver's storage settings and credentials, then `build_shard`."""
    env.apply()
    storage.configure()  # take the endpoint and retry budget just applied (a reused worker may hold older ones)
    done = skipped = 0
    last = time.monotonic()

    def progress(n: int, n_skipped: int) -> None:
        nonlocal done, skipped, last
        done, skipped = done + n, skipped + n_skipped
        if time.monotonic() - last >= REPORT_EVERY_S:
            board.report.remote(job.name, done, skipped)
            last = time.monotonic()

    return build_shard(job, work, progress)


class RayShards:
    """A ShardRunner on the Ray this process has joined: `workers` shard tasks in flight, one CPU each (local
    files: `local_shards`, see the module docstring)."""

    def __init__(self, env: WorkerEnv) -> None:
        self.env = env

    def __call__(self, jobs: list[ShardJob], work: ShardWork, workers: int, progress: Progress,
                 stop: Callable[[], bool]) -> Iterator[ShardRecord]:
        if any(item.path is not None and not storage.is_remote(item.path) for job in jobs for item in job.items):
            yield from local_shards(jobs, work, workers, progress, stop)
            return
        if not jobs:
            return
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(build_shard_task)
        queue, pending = deque(jobs), {}
        finished = [0, 0]   # inputs done / skipped in shards whose record came back (exact)
        shown = [0, 0]      # what the bar shows
        try:
            while queue or pending:
                if queue and stop():
                    queue.clear()  # the tasks in flight finish their shards
                while queue and len(pending) < workers:
                    job = queue.popleft()
                    pending[task.remote(job, work, self.env, board)] = job
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                records = []
                for ref in ready:
                    job = pending.pop(ref)
                    records.append(_result(ref))
                    finished[0] += len(job.items)
                    finished[1] += len(records[-1].skipped)
                in_flight = ray.get(board.snapshot.remote())
                now = [finished[i] + sum(in_flight.get(job.name, (0, 0))[i] for job in pending.values())
                       for i in (0, 1)]
                progress(now[0] - shown[0], now[1] - shown[1])
                shown = now
                yield from records
        finally:
            for ref in pending:  # a failure or an interrupt: stop the rest (their shards are rebuilt next time)
                ray.cancel(ref)
            ray.kill(board)


def _result(ref: ray.ObjectRef) -> ShardRecord:
    """The task's record; its own exception (e.g. a StorageError naming the URL) is raised as is."""
    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = err.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise

"""The Ray actor pool: one `ShardInverter` per actor, one shard per task, autoscaling, retries, progress.

Scheduling: start `min_actors`; while shards are waiting and no actor is still starting up, add one more (up to
`max_actors`) whenever the cluster has the CPUs/GPUs for it free (`ray.available_resources()`). An actor gets a
shard once it is up (teacher loaded), one at a time, so an actor Ray cannot place never holds work back. A shard whose actor died, or whose task raised, goes back to the end of the queue until it has
failed `max_retries + 1` times; then it is reported and the others go on. A shard the quality gate rejected
(`ShardRejected`) is reported at once: the same inputs would give the same latents. A dead actor is replaced while
fewer than `min_actors` remain. If actors keep dying while loading (before any became ready), the run stops with
that error instead of retrying every shard against it.

A stop request (`stop()`, by default SIGTERM through `runtime.preemption`) hands out no further shard; the shards
in flight are committed, and the outcome says `stopped`.

Actors are threaded (two calls at once) only so the driver can read a busy actor's progress; the work itself
runs in one thread with a fixed torch thread count.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm import tqdm

from pagoda_dist.runtime import preemption
from pagoda_dist.runtime.worker import WorkerEnv

from .job import PrecomputeJob, ShardTask
from .scratch import private_scratch
from .worker import ShardInverter, ShardRejected, ShardResult

POLL_S = 0.5
INIT_FAILURES_TO_GIVE_UP = 3


class PoolError(RuntimeError):
    """The pool cannot make progress (actors cannot start)."""


class InverterActor:
    """A Ray actor around ShardInverter (made remote, with its resources, by ActorPool)."""

    def __init__(self, job: PrecomputeJob, env: WorkerEnv, crash_once_marker: str | None = None) -> None:
        env.apply()  # storage endpoint and credentials, before anything touches storage
        private_scratch()  # this process's temporary shard copies, in a folder swept once the process is gone
        torch.set_num_threads(job.torch_threads)
        self.device = "cuda" if job.use_gpu and torch.cuda.is_available() else "cpu"
        self.inverter = ShardInverter(job, self.device)
        self.crash_once_marker = crash_once_marker
        self.done = 0

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "device": self.device}

    def process(self, task: ShardTask) -> ShardResult:
        self.done = 0
        return self.inverter.process(task, progress=self._progress)

    def progress(self) -> int:
        return self.done

    def _progress(self, done: int) -> None:
        self.done = done
        if self.crash_once_marker is not None:
            self._crash_once(self.crash_once_marker)

    @staticmethod
    def _crash_once(marker: str) -> None:
        """TEST HOOK (crash_once_marker): the first actor to finish a batch exits hard, once, mid-shard."""
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


@dataclass
class _Slot:
    handle: Any
    ready_ref: Any
    ready: bool = False
    task: ShardTask | None = None
    attempt: int = 0
    ref: Any = None
    progress_ref: Any = None
    progress: int = 0


@dataclass
class PoolOutcome:
    """What the pool did."""

    results: list[ShardResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # input shard name -> last error
    actors_started: int = 0
    actor_deaths: int = 0
    retries: int = 0
    peak_actors: int = 0
    stopped: bool = False    # a stop request ended the run with shards left undone


@dataclass(frozen=True)
class PoolSpec:
    """How many actors, of what size."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    max_retries: int
    env: WorkerEnv = field(default_factory=WorkerEnv)  # credentials travel inside the call, not a runtime_env


def _short(err: BaseException) -> str:
    """The useful last line of a Ray error (the remote traceback's final line)."""
    text = str(err).strip().splitlines()
    tail = [line for line in text if line.strip()]
    return tail[-1][:500] if tail else type(err).__name__


class ActorPool:
    """Runs shard tasks on autoscaled InverterActors; `run` returns when every task succeeded or gave up."""

    def __init__(self, job: PrecomputeJob, spec: PoolSpec, *, crash_once_marker: str | None = None,
                 stop: Callable[[], bool] = preemption.stop_requested) -> None:
        self.job, self.spec = job, spec
        self.crash_once_marker = crash_once_marker
        self.stop = stop
        options: dict[str, Any] = {"num_cpus": spec.cpus_per_actor, "num_gpus": spec.gpus_per_actor,
                                   "max_concurrency": 2, "max_restarts": 0}
        self._actor_cls = ray.remote(InverterActor).options(**options)
        self.slots: list[_Slot] = []
        self.outcome = PoolOutcome()
        self._init_failures: list[str] = []
        self._any_ready = False

    # ------------------------------------------------------------------------------------------- actors
    def _fits(self) -> bool:
        free = ray.available_resources()
        return (free.get("CPU", 0.0) + 1e-9 >= self.spec.cpus_per_actor
                and free.get("GPU", 0.0) + 1e-9 >= self.spec.gpus_per_actor)

    def _start_actor(self) -> None:
        handle = self._actor_cls.remote(self.job, self.spec.env, self.crash_once_marker)
        self.slots.append(_Slot(handle=handle, ready_ref=handle.ready.remote()))
        self.outcome.actors_started += 1
        self.outcome.peak_actors = max(self.outcome.peak_actors, len(self.slots))

    def _retire(self, slot: _Slot) -> None:
        if slot not in self.slots:
            return
        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001, S110 - it is gone already; nothing else to free
            pass

    def _scale(self, pending: deque) -> None:
        while pending and len(self.slots) < self.spec.min_actors:
            self._start_actor()
        starting = any(not s.ready for s in self.slots)
        idle = sum(1 for s in self.slots if s.task is None)
        if pending and idle == 0 and not starting and len(self.slots) < self.spec.max_actors and self._fits():
            self._start_actor()

    # -------------------------------------------------------------------------------------------- tasks
    def _fail(self, slot: _Slot, error: str, pending: deque, *, retry: bool = True) -> None:
        task, attempt = slot.task, slot.attempt
        assert task is not None
        slot.task, slot.ref, slot.progress_ref, slot.progress = None, None, None, 0
        if retry and attempt < self.spec.max_retries:
            pending.append((task, attempt + 1))
            self.outcome.retries += 1
        else:
            self.outcome.failed[task.name] = error

    def _handle_done(self, slot: _Slot, pending: deque) -> None:
        """Collects a finished process() call: a result, a task error (retry) or a dead actor (retry, replace)."""
        try:
            result = ray.get(slot.ref)
        except RayActorError as err:
            self.outcome.actor_deaths += 1
            self._fail(slot, f"actor died: {_short(err)}", pending)
            self._retire(slot)
            return
        except RayTaskError as err:
            self._fail(slot, _short(err), pending, retry=not isinstance(err.cause, ShardRejected))
            return
        slot.task, slot.ref, slot.progress_ref, slot.progress = None, None, None, 0
        self.outcome.results.append(result)

    def _handle_ready(self, slot: _Slot) -> None:
        """Collects an actor's ready() call: it has loaded the teacher, or its constructor failed."""
        try:
            ray.get(slot.ready_ref)
            slot.ready = self._any_ready = True
        except RayActorError as err:
            self.outcome.actor_deaths += 1
            self._init_failures.append(f"actor died while starting: {_short(err)}")
            self._retire(slot)

    def _assign(self, pending: deque) -> None:
        # Only to actors that are up: one Ray could not place (yet) must not sit on a shard others could do.
        for slot in self.slots:
            if slot.ready and slot.task is None and pending:
                slot.task, slot.attempt = pending.popleft()
                slot.ref = slot.handle.process.remote(slot.task)

    def _wait_and_collect(self, pending: deque) -> int:
        """Waits up to POLL_S for calls to finish and collects all that did; returns images finished."""
        busy = {s.ref: s for s in self.slots if s.ref is not None}
        starting = {s.ready_ref: s for s in self.slots if not s.ready}
        waiting = [*busy, *starting]
        if not waiting:
            return 0
        done, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
        if done and len(waiting) > 1:  # everything finished by now, not just the first
            done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        finished = 0
        for ref in done:
            if ref in starting:
                self._handle_ready(starting[ref])
                continue
            slot = busy[ref]
            count = slot.task.count if slot.task is not None else 0
            before = len(self.outcome.results)
            self._handle_done(slot, pending)
            finished += count if len(self.outcome.results) > before else 0
        if len(self._init_failures) >= INIT_FAILURES_TO_GIVE_UP and not self._any_ready:
            raise PoolError(f"{len(self._init_failures)} precompute actors died while starting, none became "
                            f"ready; last error: {self._init_failures[-1]}")
        return finished

    def run(self, tasks: list[ShardTask], bar: tqdm | None = None) -> PoolOutcome:
        """Processes every task (retrying failures); kills its actors before returning, whatever happens."""
        pending: deque[tuple[ShardTask, int]] = deque((t, 0) for t in tasks)
        finished = shown = 0
        try:
            while pending or any(s.task is not None for s in self.slots):
                if pending and self.stop():  # the shards in flight still commit
                    pending.clear()
                    self.outcome.stopped = True
                self._scale(pending)
                self._assign(pending)
                finished += self._wait_and_collect(pending)
                if bar is not None:
                    now = finished + self._poll_progress()  # never above the total: in-flight shards are unfinished
                    if now > shown:
                        bar.update(now - shown)
                        shown = now
                    bar.set_postfix(actors=sum(s.ready for s in self.slots), shards=f"{len(self.outcome.results)}/{len(tasks)}",
                                    failed=len(self.outcome.failed), refresh=False)
        finally:
            for slot in list(self.slots):
                self._retire(slot)
        return self.outcome

    def _poll_progress(self) -> int:
        """Images done in the shards now in flight (from each busy actor's last answer; never blocks)."""
        asked = {s.progress_ref: s for s in self.slots if s.progress_ref is not None}
        if asked:
            ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=0)
            for ref in ready:
                slot = asked[ref]
                try:
                    slot.progress = int(ray.get(ref, timeout=0))
                except (RayActorError, RayTaskError, GetTimeoutError):
                    pass
                slot.progress_ref = None
        for slot in self.slots:
            if slot.task is not None and slot.progress_ref is None and slot.ready:
                slot.progress_ref = slot.handle.progress.remote()
        return sum(s.progress for s in self.slots if s.task is not None)


__all__ = ["ActorPool", "InverterActor", "PoolError", "PoolOutcome", "PoolSpec"]

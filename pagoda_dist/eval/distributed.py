"""Evaluation on a Ray cluster: slices scored by a pool of actors, features reduced by Ray tasks.

`eval.workers` actors, each with runtime.cpus_per_worker CPUs and (runtime.use_gpu) one GPU, load the feature networks
and the stages' networks once and score slices (`slices.SliceScorer`): each reads its held-out images from storage,
generates, and returns features, one Ray object per set. A slice goes to whichever actor is free, so a slow or
late actor holds back no more than the slice it is on; an actor Ray cannot place is never given one. Then the actors
go, and one-CPU tasks reduce each set's features to statistics and metrics next to the objects; the driver (on
KubeRay a small head pod) receives only metric values and the sample-grid images. Each actor commits the slices it
scores to storage (`SliceScorer`), or loads those an earlier evaluation of the plan committed.
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
import torch

from pagoda_dist.eval.slices import Key, Plan, SliceScorer, stop_if_requested
from pagoda_dist.runtime import preemption
from pagoda_dist.runtime.ray_session import WorkerEnv, worker_env

POLL_S = 1.0
START_TIMEOUT_S = 1800.0  # an autoscaling cluster may take minutes to bring up a GPU node; longer means it never will
RESTARTS = 2  # an actor that dies (a lost node, an OOM kill) is restarted and its slice retried this many times


class SliceActor:
    """A Ray actor around `SliceScorer` (made remote, with its resources, by `RayPool`)."""

    def __init__(self, plan: Plan, env: WorkerEnv, threads: int) -> None:
        env.apply()  # storage endpoint and credentials, before anything touches storage
        torch.set_num_threads(threads)
        device = "cuda" if plan.cfg.runtime.use_gpu else "cpu"
        self.scorer = SliceScorer(plan, device)

    def ready(self) -> int:
        return os.getpid()

    def score(self, index: int) -> tuple[Any, ...]:
        out = self.scorer(index)
        return tuple(out[key] for key in self.scorer.plan.keys())


class RayPool:
    """Scores a plan's slices on `workers` actors; `call` runs reductions as one-CPU Ray tasks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._remote: dict[Callable[..., Any], Any] = {}

    def score_slices(self, plan: Plan) -> dict[Key, list[Any]]:
        rt = plan.cfg.runtime
        keys = plan.keys()
        actor = ray.remote(SliceActor).options(num_cpus=rt.cpus_per_worker, num_gpus=1 if rt.use_gpu else 0,
                                               max_restarts=RESTARTS, max_task_retries=RESTARTS)
        env, threads = worker_env(plan.cfg), max(1, int(rt.cpus_per_worker))
        actors = [actor.remote(plan, env, threads) for _ in range(self.workers)]
        starting = {a.ready.remote(): a for a in actors}
        idle: list[Any] = []
        todo = deque(range(len(plan.slices)))
        running: dict[Any, tuple[Any, int]] = {}  # first output of a slice -> (actor, slice)
        outputs: dict[int, list[Any]] = {}
        last_work, finished = time.monotonic(), 0
        try:
            while todo or running:
                if preemption.stop_requested():
                    todo.clear()  # a stop hands out no new slice; those in flight commit, then it stops
                while idle and todo:
                    a, index = idle.pop(), todo.popleft()
                    refs = a.score.options(num_returns=len(keys)).remote(index)
                    outputs[index] = refs
                    running[refs[0]] = (a, index)
                if running:
                    last_work = time.monotonic()
                elif time.monotonic() - last_work > START_TIMEOUT_S:
                    raise RuntimeError(
                        f"no evaluation worker started in {START_TIMEOUT_S:.0f} s: the cluster cannot place an actor "
                        f"with runtime.cpus_per_worker={rt.cpus_per_worker} CPUs"
                        + (" and a GPU (runtime.use_gpu)" if rt.use_gpu else "")
                        + "; add nodes, lower runtime.cpus_per_worker, or set eval.workers=0")
                # Only the first output (the seconds, a few bytes) is ever fetched here: the features stay where
                # they were made until a reduction needs them.
                done, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_S, fetch_local=False)
                for ref in done:
                    if ref in starting:
                        ray.get(ref)  # raises the actor's start-up error (missing weights, ...)
                        idle.append(starting.pop(ref))
                    else:
                        ray.get(ref)  # raises the slice's error
                        idle.append(running.pop(ref)[0])
                        finished += 1
            if finished < len(plan.slices):
                stop_if_requested(finished, len(plan.slices))
        finally:
            for a in actors:  # frees their CPUs and GPUs for the reductions; their outputs stay in the object store
                ray.kill(a)
        return {key: [outputs[i][k] for i in range(len(plan.slices))] for k, key in enumerate(keys)}

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1)(fn)
        return self._remote[fn].remote(*args, **kwargs)

    def get(self, handles: dict[Any, Any]) -> dict[Any, Any]:
        values = ray.get(list(handles.values()))
        return dict(zip(handles, values))

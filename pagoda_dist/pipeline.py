"""`pagoda run`: the whole PaGoDA chain as one resumable job.

    prepare -> teacher -> precompute -> distill -> grow-2r -> grow-4r ... -> evaluate -> report

Each step is skipped when its output is committed, and a training stage that stopped midway resumes from its
latest committed checkpoint, so the same command starts, resumes and finishes a run. With no cluster address it
starts a local Ray (and, for an s3:// root with `storage.embedded_s3`, the embedded S3 server) and stops what it
started.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda_dist import storage
from pagoda_dist.chain import StageSpec, chain
from pagoda_dist.config import Config, ConfigError, DataConfig, StorageConfig, to_dict
from pagoda_dist.interfaces import Condition, Stage
from pagoda_dist.runtime import CheckpointStore, load_export, preemption, train_stage
from pagoda_dist.runtime.source import BatchSource, DataRequest
from pagoda_dist.storage.lease import LeaseToken, RunLease
from pagoda_dist.stages import build_distill, build_grow, build_teacher


# ------------------------------------------------------------------------------------ factories for workers
def teacher_stage(cfg: Config) -> Stage:
    return build_teacher(cfg)


def distill_stage(teacher_export_url: str, cfg: Config) -> Stage:
    return build_distill(cfg, load_export(teacher_export_url))


def grow_stage(previous_export_url: str, spec: StageSpec, cfg: Config) -> Stage:
    return build_grow(cfg, spec, load_export(previous_export_url))


def reader_source(cfg: Config, request: DataRequest) -> BatchSource:
    """Each rank's data: the stage's shards through the streaming reader; captions embedded on the fly for a
    text-conditioned stage that reads image shards (latent pairs carry their embeddings)."""
    from pagoda_dist.data.source import ReaderSource

    embed = None
    if cfg.model.text_dim and not request.inputs.needs_latents:
        from pagoda_dist.models.text_encoder import TextEncoder

        pre = cfg.precompute
        text = TextEncoder(pre.clip_model, pre.clip_weights, random_init=pre.clip_random_init)

        def embed(captions: list[str]) -> Condition:
            return text(captions).stored_condition()

    return ReaderSource(cfg, request.inputs, batch_size=request.batch_size, rank=request.rank,
                        world_size=request.world_size, state=request.state, embed=embed,
                        global_batch=request.global_batch)


# --------------------------------------------------------------------------------------------- the steps
@dataclass
class StepRecord:
    name: str
    status: str                      # "done" (ran now), "skipped" (already committed)
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    is_done: Callable[[], bool]
    run: Callable[[], dict[str, Any]]


def stage_store(cfg: Config, name: str) -> CheckpointStore:
    """The committed checkpoints of stage `name` of this run."""
    return CheckpointStore(cfg.run_url, name)


def stage_finished(cfg: Config, spec: StageSpec) -> bool:
    latest = stage_store(cfg, spec.name).latest_committed()
    return latest is not None and latest.nimg >= int(round(spec.train.total_kimg * 1000))


def _train(cfg: Config, spec: StageSpec, from_scratch: bool = False, lease: LeaseToken | None = None
           ) -> dict[str, Any]:
    factory: Callable[[Config], Stage] = teacher_stage
    if spec.start_from is not None:
        start, _ = stage_store(cfg, spec.start_from).latest_export()
        factory = functools.partial(distill_stage, start) if spec.kind == "distill" else \
            functools.partial(grow_stage, start, spec)
    result = train_stage(cfg, factory, reader_source, stage_name=spec.name, from_scratch=from_scratch, lease=lease)
    if result.preempted:
        raise Preempted(f"{spec.name} stopped on SIGTERM at {result.nimg} images; run the same command to resume")
    if result.diverged:
        raise Diverged(f"{spec.name} stopped at {result.nimg} images after runtime.max_nonfinite_steps="
                       f"{cfg.runtime.max_nonfinite_steps} steps in a row with a non-finite loss or gradient; its last "
                       f"checkpoint ({result.checkpoint_url}) is intact. Lower the learning rate or raise grad_clip, "
                       "then run the same command")
    return {"nimg": result.nimg, "checkpoint": result.checkpoint_url, "metrics": result.metrics}


def teacher_imported(cfg: Config, spec: StageSpec) -> bool:
    """Whether this run's teacher is committed; ConfigError when it is not the one teacher.init_from names (the
    later stages were built from the teacher the run has)."""
    store = stage_store(cfg, spec.name)
    latest = store.latest_committed()
    if latest is None:
        return False
    origin = store.read_meta(latest).get("origin", {})
    if origin.get("url") != cfg.teacher.init_from:
        held = f"the teacher imported from {origin['url']}" if origin else "a teacher trained in this run"
        raise ConfigError(f"teacher.init_from: {store.url} already holds {held}; use another run.name to start from "
                          f"{cfg.teacher.init_from}")
    return True


def _import_teacher(cfg: Config) -> dict[str, Any]:
    from pagoda_dist.precompute.teacher import TeacherError, import_teacher

    try:
        ref = import_teacher(cfg)
    except TeacherError as err:
        raise ConfigError(f"teacher.init_from: {err}") from None
    return {"init_from": cfg.teacher.init_from, "checkpoint": ref.url}


class Preempted(preemption.Stopped):
    """A stage saved and stopped on SIGTERM: the run is incomplete but resumable."""


class Diverged(RuntimeError):
    """A stage stopped after too many steps in a row with a non-finite loss or gradient; nothing bad was committed."""


def plan(cfg: Config, *, from_scratch: bool = False, lease: LeaseToken | None = None) -> list[Step]:
    """The steps of the run in order, each with its completion test: prepare (when there is a source), the chain's
    stages with precompute before the first stage that reads latent pairs, then evaluate. A teacher imported from
    teacher.init_from needs no data: its step comes first, so one that does not fit stops the run before any work.
    `from_scratch` and `lease` go to each training stage (see `train_stage`)."""
    from pagoda_dist.data.manifest import read_manifest

    def committed(url: str) -> Callable[[], bool]:
        def check() -> bool:
            try:
                read_manifest(url)
            except (FileNotFoundError, ValueError, storage.StorageError):
                return False
            return True
        return check

    steps = []
    if cfg.data.source:
        steps.append(Step("prepare", committed(cfg.shards_url), lambda: prepare_step(cfg)))
    for spec in chain(cfg):
        if spec.kind == "distill":  # the first stage that reads latent pairs
            steps.append(Step("precompute", committed(cfg.pairs_url), lambda: precompute_step(cfg)))
        if spec.kind == "teacher" and cfg.teacher.init_from:
            steps.insert(0, Step(spec.name, functools.partial(teacher_imported, cfg, spec),
                                 functools.partial(_import_teacher, cfg)))
        else:
            steps.append(Step(spec.name, functools.partial(stage_finished, cfg, spec),
                              functools.partial(_train, cfg, spec, from_scratch, lease)))
    steps.append(Step("evaluate", lambda: storage.exists(storage.join(cfg.run_url, "eval", "metrics.json")),
                      lambda: evaluate_step(cfg)))
    return steps


def prepare_from_config(cfg: Config, src: str | None = None, out: str | None = None, *, on_ray: bool = False) -> Any:
    """`pagoda prepare` with the data.* settings of `cfg` (SRC and OUT default to data.source and the shards URL).
    on_ray: build the shards as Ray tasks (data.prepare_workers at a time) on the Ray this process has joined."""
    src = src or cfg.data.source
    if not src:
        raise ConfigError("data.source: nothing to prepare; set data.source or pass --src")
    runner = None
    if on_ray:
        from pagoda_dist.prepare_ray import RayShards
        from pagoda_dist.runtime.ray_session import worker_env

        runner = RayShards(worker_env(cfg))
    return prepare_data(cfg.data, src, out or cfg.shards_url, seed=cfg.run.seed, runner=runner)


def prepare_data(d: DataConfig, src: str, out: str, seed: int = 0, runner: Any = None) -> Any:
    """Shards of SRC at OUT with the data.* settings `d` (the split order follows `seed`); `runner` builds them
    (default: this process with data.prepare_workers local processes). Existing WebDataset shards
    (data.source_kind=webdataset) are indexed in place instead: OUT receives their index, not a copy."""
    from pagoda_dist.data.prepare import PrepareStopped, prepare

    if d.source_kind == "webdataset":
        from pagoda_dist.data.wds_source import index_webdataset

        report = index_webdataset(src, out, channels=d.channels, val_fraction=d.val_fraction,
                                  min_resolution=d.resolution)
        print(report.summary(), flush=True)
        return report
    try:
        return prepare(src, out, kind=d.source_kind, resolution=d.resolution, channels=d.channels,
                       image_format=d.image_format, jpeg_quality=d.jpeg_quality, shard_size=d.shard_size,
                       val_fraction=d.val_fraction, workers=d.prepare_workers, seed=seed, limit=d.limit,
                       runner=runner, stop=preemption.stop_requested)
    except PrepareStopped as err:  # data/ knows nothing of preemption; the one exception the CLI maps to 143
        raise preemption.Stopped(str(err)) from None


def prepare_step(cfg: Config) -> dict[str, Any]:
    prepare_from_config(cfg, on_ray=True)  # `pagoda run` has joined (or started) Ray for the whole chain
    return {"shards": cfg.shards_url}


def precompute_step(cfg: Config) -> dict[str, Any]:
    from pagoda_dist.precompute import run_precompute

    report = run_precompute(cfg)
    print(report.summary(), flush=True)
    return {"pairs": cfg.pairs_url}


def evaluate_step(cfg: Config) -> dict[str, Any]:
    from pagoda_dist.eval.evaluate import evaluate_run
    from pagoda_dist.eval.report import publish_evaluation

    results = evaluate_run(cfg)
    publish_evaluation(cfg, results)  # into each stage's wandb run, copied under the run's URL
    return results


# ------------------------------------------------------------------------------------------ local services
@contextlib.contextmanager
def local_storage(cfg: Config) -> Iterator[None]:
    """Points storage at the configured S3 endpoint, or at the embedded server (started here, stopped after)."""
    with storage_session(cfg.storage, s3_buckets(cfg.run.root, cfg.shards_url, cfg.pairs_url)):
        yield


@contextlib.contextmanager
def storage_session(s: StorageConfig, buckets: set[str]) -> Iterator[None]:
    """Storage pointed at `s`'s endpoint; with `s.embedded_s3` and no endpoint, at the embedded server holding
    `buckets` (started here when it is not running, and then stopped after)."""
    storage.configure(endpoint_url=s.endpoint_url, region=s.region, retry_budget_s=s.retry_budget_s)
    if s.embedded_s3 and buckets and s.endpoint_url is None:
        with _embedded_s3(s, buckets):
            yield
    else:
        yield


@contextlib.contextmanager
def run_lease(cfg: Config) -> Iterator[LeaseToken | None]:
    """Holds the run's lease (none when storage.lease_ttl_s is 0). Should another driver take it over (this one's
    lease expired), this process gets SIGTERM: it stops as on preemption, and commits nothing more."""
    if not cfg.storage.lease_ttl_s:
        yield None
        return

    def lost(message: str) -> None:
        print(f"pagoda: {message}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    with RunLease(cfg.run_url, cfg.storage.lease_ttl_s, on_lost=lost) as token:
        yield token


@contextlib.contextmanager
def local_services(cfg: Config) -> Iterator[None]:
    """Storage as in `local_storage`, and a local Ray unless one is running or an address is configured."""
    with local_storage(cfg), local_ray(cfg):
        yield


def s3_buckets(*urls: str) -> set[str]:
    return {u.removeprefix("s3://").split("/")[0] for u in urls if u.startswith("s3://")}


@contextlib.contextmanager
def _embedded_s3(s: StorageConfig, buckets: set[str]) -> Iterator[None]:
    from pagoda_dist.storage.local_s3 import LocalS3Server

    server = LocalS3Server(Path(s.embedded_s3_dir), s.embedded_s3_port)
    # A session: the server runs while this process (or any other process with its own session) uses it, and
    # stops by itself after the last one leaves, even one that is SIGKILLed.
    with server.session():
        for bucket in sorted(buckets):
            server.ensure_bucket(bucket)
        server.activate()
        print(f"[pagoda] embedded S3 at {server.endpoint} (data in {s.embedded_s3_dir})", flush=True)
        yield


@contextlib.contextmanager
def local_ray(cfg: Config) -> Iterator[None]:
    import ray

    from pagoda_dist.runtime.ray_session import ensure_ray

    started = ensure_ray(cfg, cfg.runtime.num_workers * cfg.runtime.cpus_per_worker + cfg.precompute.cpus_per_actor)
    if not started:
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- the driver
def run_pipeline(cfg: Config, *, only: list[str] | None = None, report_dir: Path | None = None,
                 from_scratch: bool = False) -> list[StepRecord]:
    """Walks the chain, skipping committed steps; `only` restricts it to the named steps (e.g. ["teacher"]).

    A complete run ends with its report, written beside the run and into `report_dir` (default
    work/reports/NAME), which holds the sample grids too. The run's lease (storage.lease_ttl_s) is held throughout:
    a second driver of the same run is refused before any work. `from_scratch`: a stage whose committed
    checkpoints are all damaged starts again from zero instead of refusing (the damaged ones are kept).
    """
    records: list[StepRecord] = []
    # SIGTERM (outside training, which forwards it to its workers) lets the step under way commit its current unit
    # of work (a shard, an evaluation slice) and raises preemption.Stopped; the same command resumes. The handler
    # goes in after Ray has started: ray.init installs its own. The lease comes before Ray: a refused driver
    # starts nothing.
    with local_storage(cfg), run_lease(cfg) as lease, local_ray(cfg), \
            preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s):
        # Every refusal before any work: missing data or weights, a held-out split too small for the evaluation,
        # workers the cluster cannot place, checkpoints of another layout (`pagoda run --dry-run` lists the same).
        from pagoda_dist.preflight import cluster_nodes, preflight, recheck_after, refuse_on_problems

        steps = [s for s in plan(cfg, from_scratch=from_scratch, lease=lease) if not only or s.name in only]
        findings = preflight(cfg, cluster_nodes(),
                             reads_unprepared=bool(only) and _reads_unprepared_shards(cfg, steps))
        if only and "evaluate" not in only:  # a partial run may leave the evaluation's needs for later
            findings = [f for f in findings if f.check != "held-out images"]
        refuse_on_problems(findings)
        _save_config(cfg)
        for step in steps:
            if preemption.stop_requested():  # SIGTERM between steps: start nothing new
                raise preemption.Stopped(f"stopped on SIGTERM before {step.name}; run the same command to resume")
            start = time.time()
            if step.is_done():
                print(f"[pagoda] {step.name}: already committed, skipped", flush=True)
                records.append(StepRecord(step.name, "skipped", 0.0))
                continue
            print(f"[pagoda] {step.name}: starting", flush=True)
            detail = step.run()
            records.append(StepRecord(step.name, "done", time.time() - start, detail))
            _append_timing(cfg, records[-1])
            print(f"[pagoda] {step.name}: done in {records[-1].seconds:.0f} s", flush=True)
            refuse_on_problems(recheck_after(cfg, findings, step.name))  # e.g. held-out tars counted by the index
        if not only:
            from pagoda_dist.eval.report import build_report

            path = build_report(cfg, report_dir or Path("work") / "reports" / cfg.run.name)
            print(f"[pagoda] report and sample grids: {path.parent}/ (report.html); "
                  f"checkpoints and grids per stage under {cfg.run_url}/", flush=True)
    return records


def _reads_unprepared_shards(cfg: Config, steps: list[Step]) -> bool:
    """Whether `steps` (a `--only` selection) leave out prepare but will read the image shards: a teacher trained
    here, or precompute, not yet committed. The stages after them read the latent pairs."""
    if any(s.name == "prepare" for s in steps):
        return False
    readers = {"precompute"} | (set() if cfg.teacher.init_from else {"teacher"})
    return any(s.name in readers and not s.is_done() for s in steps)


def _save_config(cfg: Config) -> None:
    """The resolved config beside the run (it holds no secrets by construction)."""
    storage.write_bytes(storage.join(cfg.run_url, "config.json"), json.dumps(to_dict(cfg), indent=1).encode())


def _append_timing(cfg: Config, record: StepRecord) -> None:
    """Wall time per step, accumulated across resumed attempts (read by `pagoda report`)."""
    url = storage.join(cfg.run_url, "timings.json")
    timings = json.loads(storage.read_bytes(url)) if storage.exists(url) else {}
    timings[record.name] = timings.get(record.name, 0.0) + record.seconds
    storage.write_bytes(url, json.dumps(timings, indent=1).encode())

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pagoda_dist import storage
from pagoda_dist.config import Config, ConfigError, DataConfig, StorageConfig, to_dict
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.runtime.source import BatchSource, DataRequest
from pagoda_dist.stages import Stage, build_distill, build_grow, build_teacher, grow_stage_name


# ------------------------------------------------------------------------------------ factories for workers
def teacher_stage(cfg: Config) -> Stage:
    return build_teacher(cfg)


def distill_stage(teacher_export_url: str, cfg: Config) -> Stage:
    from pagoda_dist.runtime import load_export

    return build_distill(cfg, load_export(teacher_export_url))


def grow_stage(previous_export_url: str, resolution: int, cfg: Config) -> Stage:
    from pagoda_dist.runtime import load_export

    return build_grow(cfg, load_export(previous_export_url), resolution)


class ReaderSource:
    """The runtime's `BatchSource` over the streaming reader (image shards, or latent pairs when needed)."""

    def __init__(self, cfg: Config, request: DataRequest) -> None:
        from pagoda_dist.data.reader import reader_for

        self.reader = reader_for(cfg, request.inputs, batch_size=request.batch_size, rank=request.rank,
                                 world_size=request.world_size)
        if request.state is not None:
            self.reader.load_state_dict(request.state)
        self.text = None
        if cfg.model.text_dim and not request.inputs.needs_latents:
            # Image shards carry captions only; the teacher needs their embeddings, from the same text tower
            # (and float16 rounding) that precompute uses, so training and inversion see the same condition.
            from pagoda_dist.models.text_encoder import TextEncoder

            pre = cfg.precompute
            self.text = TextEncoder(pre.clip_model, pre.clip_weights, random_init=pre.clip_random_init)

    def __iter__(self) -> Iterator:
        for batch in self.reader:
            if self.text is not None:
                batch.condition = self._embed(batch.captions)
            yield batch

    def _embed(self, captions: list[str] | None) -> Condition:
        if not captions:
            raise ValueError(f"model.text_dim={self.text.dim} needs captions, but {self.reader.url} has none")
        with torch.no_grad():
            emb = self.text(captions)
        return Condition(text_pooled=emb.pooled.half().float(), text_tokens=emb.tokens.half().float(),
                         text_mask=emb.mask)

    def state(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def corrupt_count(self) -> int:
        return self.reader.corrupt_count


def reader_source(cfg: Config, request: DataRequest) -> BatchSource:
    return ReaderSource(cfg, request)


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


def stage_finished(cfg: Config, stage_name: str, total_kimg: float) -> bool:
    from pagoda_dist.runtime import CheckpointStore

    latest = CheckpointStore(cfg.run_url, stage_name).latest_committed()
    return latest is not None and latest.nimg >= int(round(total_kimg * 1000))


def stage_export_url(cfg: Config, stage_name: str) -> str:
    from pagoda_dist.runtime import CheckpointStore

    latest = CheckpointStore(cfg.run_url, stage_name).latest_committed()
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint of stage {stage_name} under {cfg.run_url}")
    return storage.join(latest.url, "export.pt")


def _train(cfg: Config, stage_name: str, factory: Callable[[Config], Stage]) -> dict[str, Any]:
    from pagoda_dist.runtime import train_stage

    result = train_stage(cfg, factory, reader_source, stage_name=stage_name)
    if result.preempted:
        raise Preempted(f"{stage_name} stopped on SIGTERM at {result.nimg} images; run the same command to resume")
    return {"nimg": result.nimg, "checkpoint": result.checkpoint_url, "metrics": result.metrics}


class Preempted(RuntimeError):
    """A stage saved and stopped on SIGTERM: the run is incomplete but resumable."""


def plan(cfg: Config) -> list[Step]:
    """The steps of the chain in order, each with its completion test."""
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
    steps.append(Step("teacher", lambda: stage_finished(cfg, "teacher", cfg.teacher.train.total_kimg),
                      lambda: _train(cfg, "teacher", teacher_stage)))
    steps.append(Step("precompute", committed(cfg.pairs_url), lambda: precompute_step(cfg)))
    steps.append(Step("distill", lambda: stage_finished(cfg, "distill", cfg.distill.train.total_kimg),
                      lambda: _train(cfg, "distill", functools.partial(
                          distill_stage, stage_export_url(cfg, "teacher")))))
    previous = "distill"
    for res in cfg.grow.resolutions:
        name = grow_stage_name(res)
        steps.append(Step(name, functools.partial(stage_finished, cfg, name, cfg.grow.train.total_kimg),
                          functools.partial(_grow_step, cfg, previous, res)))
        previous = name
    steps.append(Step("evaluate", lambda: storage.exists(storage.join(cfg.run_url, "eval", "metrics.json")),
                      lambda: evaluate_step(cfg)))
    return steps


def _grow_step(cfg: Config, previous: str, resolution: int) -> dict[str, Any]:
    factory = functools.partial(grow_stage, stage_export_url(cfg, previous), resolution)
    return _train(cfg, grow_stage_name(resolution), factory)


def prepare_from_config(cfg: Config, src: str | None = None, out: str | None = None) -> Any:
    """`pagoda prepare` with the data.* settings of `cfg` (SRC and OUT default to data.source and the shards URL)."""
    src = src or cfg.data.source
    if not src:
        raise ConfigError("data.source: nothing to prepare; set data.source or pass --src")
    return prepare_data(cfg.data, src, out or cfg.shards_url, seed=cfg.run.seed)


def prepare_data(d: DataConfig, src: str, out: str, seed: int = 0) -> Any:
    """Shards of SRC at OUT with the data.* settings `d` (the split order follows `seed`)."""
    from pagoda_dist.data.prepare import prepare

    return prepare(src, out, kind=d.source_kind, resolution=d.resolution, channels=d.channels,
                   image_format=d.image_format, jpeg_quality=d.jpeg_quality, shard_size=d.shard_size,
                   val_fraction=d.val_fraction, workers=d.prepare_workers, seed=seed, limit=d.limit)


def prepare_step(cfg: Config) -> dict[str, Any]:
    prepare_from_config(cfg)
    return {"shards": cfg.shards_url}


def precompute_step(cfg: Config) -> dict[str, Any]:
    from pagoda_dist.precompute import run_precompute

    report = run_precompute(cfg)
    print(report.summary(), flush=True)
    return {"pairs": cfg.pairs_url}


def evaluate_step(cfg: Config) -> dict[str, Any]:
    from pagoda_dist.eval.evaluate import evaluate_run

    return evaluate_run(cfg)


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
    storage.configure(endpoint_url=s.endpoint_url, region=s.region)
    if s.embedded_s3 and buckets and s.endpoint_url is None:
        with _embedded_s3(s, buckets):
            yield
    else:
        yield


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
    started = not server.status().running
    server.start()
    for bucket in sorted(buckets):
        server.ensure_bucket(bucket)
    server.activate()
    print(f"[pagoda] embedded S3 at {server.endpoint} (data in {s.embedded_s3_dir})", flush=True)
    try:
        yield
    finally:
        if started:
            server.stop()


@contextlib.contextmanager
def local_ray(cfg: Config) -> Iterator[None]:
    import ray

    from pagoda_dist.ray_session import ensure_ray

    started = ensure_ray(cfg, cfg.runtime.num_workers * cfg.runtime.cpus_per_worker + cfg.precompute.cpus_per_actor)
    if not started:
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- the driver
def run_pipeline(cfg: Config, *, only: list[str] | None = None, report_dir: Path | None = None) -> list[StepRecord]:
    """Walks the chain, skipping committed steps; `only` restricts it to the named steps (e.g. ["teacher"]).

    A complete run ends with its report, written beside the run and into `report_dir` (default
    work/reports/NAME), which holds the sample grids too.
    """
    records: list[StepRecord] = []
    with local_services(cfg):
        _save_config(cfg)
        for step in plan(cfg):
            if only and step.name not in only:
                continue
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
        if not only:
            from pagoda_dist.eval.report import build_report

            path = build_report(cfg, report_dir or Path("work") / "reports" / cfg.run.name)
            print(f"[pagoda] report and sample grids: {path.parent}/ (report.html); "
                  f"checkpoints and grids per stage under {cfg.run_url}/", flush=True)
    return records


def _save_config(cfg: Config) -> None:
    """The resolved config beside the run (it holds no secrets by construction)."""
    storage.write_bytes(storage.join(cfg.run_url, "config.json"), json.dumps(to_dict(cfg), indent=1).encode())


def _append_timing(cfg: Config, record: StepRecord) -> None:
    """Wall time per step, accumulated across resumed attempts (read by `pagoda report`)."""
    url = storage.join(cfg.run_url, "timings.json")
    timings = json.loads(storage.read_bytes(url)) if storage.exists(url) else {}
    timings[record.name] = timings.get(record.name, 0.0) + record.seconds
    storage.write_bytes(url, json.dumps(timings, indent=1).encode())

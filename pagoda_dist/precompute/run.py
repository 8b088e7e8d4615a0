"""`pagoda precompute CONFIG`: image shards + committed teacher -> committed latent-pair shards (see `job.py`).

Order of events: validate everything that can be checked cheaply (input manifest, teacher checkpoint and its
architecture against the data, CLIP weights path) -> find shards already committed by an earlier run -> start
Ray (unless the caller did) and the actor pool for the rest -> commit the set's manifest only when every shard
is committed. Nothing runs on an actor before validation has passed. SIGTERM (inside
`runtime.preemption.stopping_on_sigterm`) lets the shards in flight commit and raises `Stopped`; the same call then
computes only the rest.
"""
from __future__ import annotations

import os
import time
from typing import Any

from tqdm import tqdm

from pagoda_dist import storage
from pagoda_dist.config import Config
from pagoda_dist.data.manifest import Manifest, ManifestError, commit_manifest, read_manifest
from pagoda_dist.data.shards import ShardInfo
from pagoda_dist.data.sources import Skipped
from pagoda_dist.runtime import preemption
from pagoda_dist.runtime.ray_session import ensure_ray
from pagoda_dist.runtime.trainer import worker_env  # the same worker environment as training

from .job import PrecomputeJob, ShardTask, TextSpec, make_settings, make_tasks, torch_threads
from .pool import ActorPool, PoolOutcome, PoolSpec
from .report import PrecomputeError, PrecomputeFailed, PrecomputeReport, Quality
from .teacher import TeacherError, TeacherRef, resolve_teacher
from .worker import ShardResult


# ------------------------------------------------------------------------------------------------ validation
def _inputs(cfg: Config) -> Manifest:
    try:
        inputs = read_manifest(cfg.shards_url)
    except ManifestError as err:
        raise PrecomputeError(f"precompute input (data.shards): {err}") from None
    if inputs.kind != "images":
        raise PrecomputeError(f"precompute input {cfg.shards_url} holds {inputs.kind!r} shards; point data.shards "
                              "at image shards from `pagoda prepare`")
    return inputs


def _teacher(cfg: Config) -> TeacherRef:
    try:
        return resolve_teacher(cfg.run_url)
    except TeacherError as err:
        raise PrecomputeError(str(err)) from None


def _check_teacher_fits(cfg: Config, teacher: TeacherRef, inputs: Manifest) -> dict[str, Any]:
    model = teacher.architecture["model"]
    where = teacher.export_url
    if model["resolution"] != cfg.model.resolution:
        raise PrecomputeError(f"{where}: the teacher is {model['resolution']}px but model.resolution is "
                              f"{cfg.model.resolution}; use the config the teacher was trained with")
    if model["resolution"] > inputs.resolution:
        raise PrecomputeError(f"{where}: the teacher's {model['resolution']}px exceeds the {inputs.resolution}px "
                              f"images in {cfg.shards_url}")
    if model["in_channels"] != inputs.channels:
        raise PrecomputeError(f"{where}: the teacher takes {model['in_channels']} channels, {cfg.shards_url} "
                              f"holds {inputs.channels}")
    if model["num_classes"] and not inputs.class_names:
        raise PrecomputeError(f"{where}: the teacher is class-conditional but {cfg.shards_url} has no class labels")
    if model["text_dim"] and not inputs.has_captions:
        raise PrecomputeError(f"{where}: the teacher is text-conditional but {cfg.shards_url} has no captions")
    return model


def _text_spec(cfg: Config, text_dim: int) -> TextSpec | None:
    """The text tower for a text-conditioned teacher, checked without building it."""
    if not text_dim:
        return None
    import open_clip

    from pagoda_dist.models.text_encoder import TextEncoderError, check_weights_path, register_tiny_archs

    pre = cfg.precompute
    try:
        check_weights_path(pre.clip_weights, pre.clip_random_init, key="precompute.clip_weights")
    except TextEncoderError as err:
        raise PrecomputeError(str(err)) from None
    register_tiny_archs()
    arch_cfg = open_clip.get_model_config(pre.clip_model)
    if arch_cfg is None:
        raise PrecomputeError(f"precompute.clip_model: unknown open_clip architecture {pre.clip_model!r}")
    if int(arch_cfg["embed_dim"]) != text_dim:
        raise PrecomputeError(f"precompute.clip_model {pre.clip_model!r} embeds to {arch_cfg['embed_dim']} dims but "
                              f"the teacher's text_dim is {text_dim}; use the text tower the teacher was trained with")
    weights = None if pre.clip_weights is None else os.path.abspath(os.path.expanduser(pre.clip_weights))
    return TextSpec(arch=pre.clip_model, weights=weights, random_init=weights is None)


def build_job(cfg: Config) -> tuple[PrecomputeJob, Manifest, TeacherRef]:
    """Validates the run (no actor, no Ray) and returns the job every actor will share."""
    inputs = _inputs(cfg)
    teacher = _teacher(cfg)
    model = _check_teacher_fits(cfg, teacher, inputs)
    text = _text_spec(cfg, int(model["text_dim"]))
    pre, diff = cfg.precompute, cfg.diffusion
    job = PrecomputeJob(
        teacher_url=teacher.export_url, teacher_arch=teacher.architecture, base_resolution=model["resolution"],
        channels=inputs.channels, sigma_data=diff.sigma_data, solver=pre.solver, steps=pre.steps,
        sigma_min=diff.sigma_min, sigma_max=diff.sigma_max, rho=diff.rho, clamp=pre.clamp, flip=pre.flip,
        batch_size=pre.batch_size, psnr_samples=pre.psnr_samples, min_psnr_db=pre.min_psnr_db, text=text,
        class_conditional=bool(model["num_classes"]), torch_threads=torch_threads(pre.cpus_per_actor),
        use_gpu=pre.gpus_per_actor > 0, settings=make_settings(cfg, inputs, teacher.export_url, text))
    return job, inputs, teacher


# ------------------------------------------------------------------------------------------ existing output
def _existing_shards(pairs_url: str, job: PrecomputeJob, tasks: list[ShardTask]) -> dict[str, ShardResult]:
    """Pair shards committed by an earlier run with the same settings, by input shard name; refuses others."""
    ours = {t.output_prefix.rstrip("/"): t for t in tasks}
    found: dict[str, ShardResult] = {}
    for url in storage.committed_children(pairs_url):
        task = ours.get(url.rstrip("/"))
        if task is None:
            continue
        meta = storage.read_commit(url).meta
        if meta.get("settings_fingerprint") != job.fingerprint:
            raise PrecomputeError(f"{url} holds pairs made with other settings (fingerprint "
                                  f"{meta.get('settings_fingerprint')} vs {job.fingerprint}: another teacher "
                                  "checkpoint, ODE, flip or text encoder); set precompute.output to a new URL, or "
                                  "delete the old pairs first")
        found[task.name] = ShardResult.from_meta(meta, reused=True)
    return found


def _reused_report(pairs_url: str, manifest: Manifest, started: float) -> PrecomputeReport:
    extra = manifest.extra
    q = extra.get("psnr", {})
    quality = Quality(float(q.get("mean_db") or float("nan")), float(q.get("min_db") or float("nan")),
                      int(q.get("images", 0)))
    total = sum(manifest.count(split) for split in manifest.splits)
    return PrecomputeReport(
        pairs_url=pairs_url, reused=True, shards_total=sum(len(s) for s in manifest.splits.values()),
        shards_computed=0, shards_skipped=sum(len(s) for s in manifest.splits.values()), images_total=total,
        images_computed=0, latents_per_image=int(extra.get("latents_per_image", 1)),
        network_evals_per_latent=int(extra.get("network_evals_per_latent", 0)), quality=quality,
        elapsed_s=time.monotonic() - started, text_encoder=extra.get("text_encoder"),
        teacher_url=str(extra.get("teacher", "")), committed=True)


# ----------------------------------------------------------------------------------------------------- Ray
def _check_cluster(cfg: Config) -> None:
    import ray

    total = ray.cluster_resources()
    pre = cfg.precompute
    cpus, gpus = pre.min_actors * pre.cpus_per_actor, pre.min_actors * pre.gpus_per_actor
    # Actors that can never be placed would hold their shards forever: refuse instead of hanging.
    if total.get("CPU", 0.0) + 1e-9 < cpus or total.get("GPU", 0.0) + 1e-9 < gpus:
        raise PrecomputeError(f"precompute.min_actors={pre.min_actors} x (cpus_per_actor={pre.cpus_per_actor}, "
                              f"gpus_per_actor={pre.gpus_per_actor}) needs {cpus} CPUs and {gpus} GPUs, but the Ray "
                              f"cluster has {total.get('CPU', 0)} CPUs and {total.get('GPU', 0)} GPUs; lower them "
                              "or add nodes")


# ----------------------------------------------------------------------------------------------------- run
def run_precompute(cfg: Config, *, progress: bool = True, crash_once_marker: str | None = None) -> PrecomputeReport:
    """Produces the latent-pair set at `cfg.pairs_url` (see the module docstring) and returns its report; the
    caller prints `report.summary()` (counts, PSNR of the round trip, failures). `progress`: a tqdm bar.

    Raises PrecomputeError before any work when the run cannot start, PrecomputeFailed (carrying the report,
    naming the failed shards) when shards still fail after `precompute.max_retries` retries or fail the quality
    gate, and `preemption.Stopped` when a stop was requested before every shard was committed.
    crash_once_marker: TEST HOOK only: a local file path; the first actor to finish a batch while it does not
    exist creates it and exits hard (to show that a lost actor's shard is redone).
    """
    started = time.monotonic()
    pairs_url = cfg.pairs_url
    job, inputs, _ = build_job(cfg)
    if storage.is_committed(pairs_url):
        try:
            done = read_manifest(pairs_url)
        except ManifestError as err:
            raise PrecomputeError(f"{pairs_url} is committed but unreadable ({err}); delete it to recompute") from None
        if done.settings != job.settings:
            changed = sorted(k for k in job.settings if done.settings.get(k) != job.settings[k])
            raise PrecomputeError(f"{pairs_url} already holds a latent-pair set made with other settings "
                                  f"({', '.join(changed)}); set precompute.output to a new URL or delete it")
        return _reused_report(pairs_url, done, started)

    tasks = make_tasks(inputs, cfg.shards_url, pairs_url)
    existing = _existing_shards(pairs_url, job, tasks)
    todo = [t for t in tasks if t.name not in existing]
    outcome = PoolOutcome()
    if todo and preemption.stop_requested():
        outcome.stopped = True
    elif todo:
        outcome = _run_pool(cfg, job, todo, progress, crash_once_marker)
    input_of = {t.output_name: t.name for t in todo}
    results = {**existing, **{input_of[r.name]: r for r in outcome.results}}
    report = _report(cfg, job, tasks, results, outcome, started, len(existing))
    if outcome.stopped:
        print(report.summary(), flush=True)
        raise preemption.Stopped(f"precompute stopped on SIGTERM with {len(results)} of {len(tasks)} shards "
                                 "committed; run the same command to compute the rest")
    if outcome.failed:
        raise PrecomputeFailed(report)
    _commit_set(pairs_url, job, inputs, tasks, results, report)
    report.committed = True
    return report


def _run_pool(cfg: Config, job: PrecomputeJob, todo: list[ShardTask], progress: bool,
              crash_once_marker: str | None) -> PoolOutcome:
    import ray

    started_ray = ensure_ray(cfg)
    try:
        _check_cluster(cfg)
        pre = cfg.precompute
        spec = PoolSpec(min_actors=pre.min_actors, max_actors=pre.max_actors, cpus_per_actor=pre.cpus_per_actor,
                        gpus_per_actor=pre.gpus_per_actor, max_retries=pre.max_retries,
                        env=worker_env(cfg))
        pool = ActorPool(job, spec, crash_once_marker=crash_once_marker)
        total = sum(t.count for t in todo)
        # After ray.init, which installs its own SIGTERM handler: SIGTERM lets the shards in flight commit.
        with preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s), \
                tqdm(total=total, unit="img", desc="precompute", disable=not progress, smoothing=0.05) as bar:
            return pool.run(todo, bar)
    finally:
        if started_ray:
            ray.shutdown()


def _report(cfg: Config, job: PrecomputeJob, tasks: list[ShardTask], results: dict[str, ShardResult],
            outcome: PoolOutcome, started: float, skipped: int) -> PrecomputeReport:
    values = list(results.values())
    evals = max((r.network_evals for r in values), default=0)
    return PrecomputeReport(
        pairs_url=cfg.pairs_url, reused=False, shards_total=len(tasks), shards_computed=len(outcome.results),
        shards_skipped=skipped, images_total=sum(t.count for t in tasks),
        images_computed=sum(r.count for r in outcome.results), latents_per_image=2 if job.flip else 1,
        shards=sorted(values, key=lambda r: r.name),
        network_evals_per_latent=evals, quality=Quality.of(values), elapsed_s=time.monotonic() - started,
        failed=dict(outcome.failed), actors_started=outcome.actors_started, actor_deaths=outcome.actor_deaths,
        retries=outcome.retries, peak_actors=outcome.peak_actors,
        text_encoder=job.text.describe() if job.text else None, teacher_url=job.teacher_url)


def _commit_set(pairs_url: str, job: PrecomputeJob, inputs: Manifest, tasks: list[ShardTask],
                results: dict[str, ShardResult], report: PrecomputeReport) -> None:
    """The set's manifest (data.manifest format, kind latent-pairs), then its COMMIT marker."""
    splits: dict[str, list[ShardInfo]] = {}
    for task in tasks:
        r = results[task.name]
        splits.setdefault(task.split, []).append(ShardInfo(name=r.name, count=r.count, bytes=r.bytes))
    c, res = job.channels, job.base_resolution
    extra = {
        "input": job.settings["input"], "teacher": job.teacher_url, "teacher_architecture": job.teacher_arch,
        "latent_shape": [c, res, res], "latent_dtype": job.settings["latent_dtype"],
        "latents_per_image": report.latents_per_image, "latent_flip": job.flip, "sigma_max": job.sigma_max,
        "inversion": {k: job.settings[k] for k in ("solver", "steps", "sigma_min", "sigma_max", "rho", "clamp")},
        "network_evals_per_latent": report.network_evals_per_latent,
        "text_encoder": job.text.describe() if job.text else None,
        "embed_dtype": job.settings["embed_dtype"],
        "psnr": {**report.quality.to_dict(),
                 "per_shard": {r.name: {"mean_db": r.to_meta()["psnr_mean"], "images": r.psnr_n}
                               for r in results.values()}},
        "latent_std_over_sigma_max": {r.name: r.to_meta()["latent_std"] for r in results.values()},
        "batch_size": job.batch_size, "torch_threads": job.torch_threads,
    }
    skipped = []  # corrupt input samples left out, as "pair shard#key" and the reason
    for r in results.values():
        for entry in r.skipped_samples:
            key, _, reason = entry.partition(": ")
            skipped.append(Skipped(f"{r.name}#{key}", reason))
    notes = list(inputs.notes)
    if job.text is not None and job.text.random_init:
        notes.append("text embeddings come from a RANDOMLY INITIALISED text tower (precompute.clip_random_init)")
    manifest = Manifest(kind="latent-pairs", resolution=inputs.resolution, channels=inputs.channels,
                        image_format=inputs.image_format, splits=splits, class_names=inputs.class_names,
                        has_captions=inputs.has_captions, settings=job.settings, inputs=inputs.inputs,
                        skipped=skipped, skipped_count=report.images_skipped, notes=notes, extra=extra)
    commit_manifest(pairs_url, manifest)


__all__ = ["build_job", "run_precompute"]

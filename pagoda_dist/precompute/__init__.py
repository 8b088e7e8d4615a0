"""Latent pairs for distillation: invert every real image with the teacher's PF-ODE on a Ray actor pool.

`run_precompute(cfg)` is `pagoda precompute CONFIG`. Layout of the output and the reuse rules: `job.py`; the
per-shard work (no Ray): `worker.py`; the actor pool: `pool.py`; the teacher checkpoint: `teacher.py`.
"""
from .job import PrecomputeJob, ShardTask, TextSpec
from .pool import ActorPool, PoolError, PoolSpec
from .report import PrecomputeError, PrecomputeFailed, PrecomputeReport, Quality
from .run import build_job, run_precompute
from .teacher import TeacherError, TeacherRef, commit_teacher, find_teacher_export, load_teacher, resolve_teacher
from .worker import ShardInverter, ShardResult, psnr

__all__ = [
    "ActorPool", "PoolError", "PoolSpec", "PrecomputeError", "PrecomputeFailed", "PrecomputeJob",
    "PrecomputeReport", "Quality", "ShardInverter", "ShardResult", "ShardTask", "TeacherError", "TeacherRef",
    "TextSpec", "build_job", "commit_teacher", "find_teacher_export", "load_teacher", "psnr", "resolve_teacher", "run_precompute",
]

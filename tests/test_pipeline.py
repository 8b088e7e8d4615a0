"""The whole chain in miniature with real components: local Ray, DeepSpeed, the embedded S3 server, precompute
actors, real Fashion-MNIST images. A few steps per stage; what is checked is that every artefact exists and is
committed, that a killed driver resumes with the same command, that distil and grow resume exactly, and that
config errors stop everything early. These are the default run's end-to-end rehearsals (a few minutes); the longer
ones (paper configs on three nodes, node loss, the documents' commands, Slurm) are marked slow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pagoda_dist import storage
from pagoda_dist.config import load_config
from pagoda_dist.pipeline import plan, run_pipeline
from pagoda_dist.runtime import CheckpointStore

pytestmark = pytest.mark.timeout(1200)

MINI = [
    "data.source=builtin:fashion-mnist", "data.limit=240", "data.shard_size=64", "data.loader_workers=1",
    "model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "model.num_classes=10",
    "teacher.train.batch_size=16", "teacher.train.total_kimg=0.192", "teacher.sampler.steps=4",
    "precompute.steps=4", "precompute.batch_size=32", "precompute.psnr_samples=4",
    "precompute.min_psnr_db=0",  # 4 solver points do not invert faithfully: only a NaN round trip fails a shard
    "precompute.max_actors=2",
    "precompute.cpus_per_actor=0.5",
    "distill.train.batch_size=16", "distill.train.total_kimg=0.064",
    "distill.adversarial.discriminator.channels=16", "distill.adversarial.discriminator.num_scales=1",
    "grow.resolutions=[32]", "grow.train.batch_size=16", "grow.train.total_kimg=0.064",
    "grow.adversarial.discriminator.channels=16", "grow.adversarial.discriminator.num_scales=1",
    "runtime.num_workers=2", "runtime.cpus_per_worker=0.5", "runtime.zero_stage=2",
    # Checkpoints (every 3 steps) inside log windows (every 2): a resume at 48 cuts the window 32-64.
    "logging.log_every_kimg=0.032", "logging.sample_every_kimg=0.064", "logging.checkpoint_every_kimg=0.048",
    "logging.grid_size=4", "logging.wandb_mode=disabled", "eval.num_images=16",
    "storage.embedded_s3=false",
]


def mini_overrides(bucket: str, tmp_path, name: str) -> list[str]:
    return [*MINI, f"run.root={bucket.rstrip('/')}/runs-root", f"run.name={name}",
            f"storage.embedded_s3_dir={tmp_path / 's3'}"]


def test_pipeline_end_to_end_resumes_after_kill(s3_env: str, tmp_path) -> None:
    overrides = mini_overrides(s3_env, tmp_path, "mini")
    cfg = load_config("configs/tiny.yaml", overrides)

    # 1. Start the driver as users do, and kill it (SIGKILL: no chance to clean up) once the teacher committed
    #    its first checkpoint.
    driver = subprocess.Popen([sys.executable, "-m", "pagoda_dist.cli", "run", "configs/tiny.yaml", *overrides],
                              env=os.environ.copy(), start_new_session=True)
    teacher_dir = storage.join(cfg.run_url, "teacher")
    deadline = time.time() + 600
    try:
        while not storage.committed_children(teacher_dir):
            assert driver.poll() is None, f"driver exited early with {driver.returncode}"
            assert time.time() < deadline, "the teacher never committed a checkpoint"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    # 2. The same command (here in-process) resumes and finishes.
    records = run_pipeline(cfg)
    by_name = {r.name: r.status for r in records}
    assert by_name["prepare"] == "skipped"
    assert by_name["teacher"] == "done"
    assert all(by_name[s] == "done" for s in ("precompute", "distill", "grow-32", "evaluate"))

    # Every artefact exists and is committed.
    assert storage.is_committed(cfg.shards_url) and storage.is_committed(cfg.pairs_url)
    for stage in ("teacher", "distill", "grow-32"):
        export_url, _ = CheckpointStore(cfg.run_url, stage).latest_export()  # NoExport when nothing is committed
        assert storage.exists(export_url)
        assert storage.glob(storage.join(cfg.run_url, stage, "samples", "*.png")), f"{stage} wrote no sample grid"
    assert storage.exists(storage.join(cfg.run_url, "eval", "metrics.json"))
    assert storage.exists(storage.join(cfg.run_url, "report.html"))

    # 3. A third run finds everything committed and does nothing.
    assert all(step.is_done() for step in plan(cfg))

    # 4. Distil and grow resume exactly, as the demo runs them (class labels, one loader worker, a log window cut
    #    by the resume): with their final checkpoint gone, each resumes from 48 images and logs at 64 the losses
    #    the uninterrupted stage logged there.
    for stage in ("distill", "grow-32"):
        store = CheckpointStore(cfg.run_url, stage)
        before = stage_losses(cfg.run_url, stage)
        assert [r.nimg for r in store.committed()] == [48, 64] and max(before) == 64
        storage.remove(store.step_url(64))
        [record] = run_pipeline(cfg, only=[stage])
        assert record.status == "done" and [r.nimg for r in store.committed()] == [48, 64]
        assert stage_losses(cfg.run_url, stage) == before, stage


def stage_losses(run_url: str, stage: str) -> dict[int, dict[str, float]]:
    """The losses a stage logged at each image count (the last record of each: a resume logs replayed counts
    again), from the metrics.jsonl kept under the run's URL."""
    records = [json.loads(line) for line in
               storage.read_bytes(storage.join(run_url, stage, "metrics.jsonl")).decode().splitlines() if line]
    return {int(r["nimg"]): {k: v for k, v in r.items() if "loss" in k or k in ("rec", "gan")} for r in records}


def test_config_error_stops_before_anything_starts(tmp_path) -> None:
    root = tmp_path / "root"
    result = subprocess.run([sys.executable, "-m", "pagoda_dist.cli", "run", "configs/tiny.yaml",
                             f"run.root={root}", "runtime.num_workers=3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "teacher.train.batch_size" in result.stderr and "not divisible" in result.stderr
    assert not root.exists()


def test_text_to_image_chain_scores_clip(tmp_path) -> None:
    """configs/tiny-text.yaml in miniature on local files: captions -> CLIP text embeddings -> a text-conditioned
    teacher, inversion pairs carrying the embeddings, a one-step student, and CLIP score in the evaluation."""
    text = ["model.num_classes=0", "model.text_dim=64", "grow.resolutions=[]", "runtime.num_workers=1",
            "runtime.cpus_per_worker=1", "precompute.max_actors=1", "precompute.cpus_per_actor=1",
            "eval.clip_model=pagoda-tiny-text", "eval.clip_random_init=true"]
    cfg = load_config("configs/tiny-text.yaml", [*MINI, *text, f"run.root={tmp_path / 'root'}", "run.name=text"])
    records = run_pipeline(cfg, report_dir=tmp_path / "report")
    assert [r.status for r in records] == ["done"] * 5, records

    from pagoda_dist.runtime import load_export

    teacher = load_export(CheckpointStore(cfg.run_url, "teacher").latest_export()[0])
    assert teacher["architecture"]["model"]["text_dim"] == 64 and teacher["architecture"]["model"]["num_classes"] == 0
    metrics = json.loads(storage.read_bytes(storage.join(cfg.run_url, "eval", "metrics.json")))
    for stage in ("teacher", "distill"):
        score = metrics["stages"][stage]["metrics"]["CLIP score"]
        assert 0.0 <= score <= 100.0, (stage, score)
    assert "CLIP score" in metrics["floor"]["16"]

"""The training runtime: schedules, drivers, checkpoint store, validation, and Ray Train + DeepSpeed end to end.

The end-to-end tests run 2 CPU workers on one local Ray (started once for this module) with the toy stages of
tests/toy_stage.py; they are marked slow. DeepSpeed's CPU comm op is built on first use (~40-55 s once per
machine; `scripts/warm_deepspeed.py` does it ahead).
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pagoda_dist import storage
from pagoda_dist.config import Config, ConfigError, load_config
from pagoda_dist.models.conditioning import Condition
from pagoda_dist.runtime import (CheckpointMismatch, CheckpointStore, DataRequest, PlainDriver, load_export,
                                 train_single_process, train_stage)
from pagoda_dist.runtime.checkpoint import SavePayload, capture_rng, restore_rng
from pagoda_dist.runtime.drivers import _cast
from pagoda_dist.runtime.schedule import crossed, ema_beta, lr_factor, steps_for
from pagoda_dist.runtime.trainer import check_resumable
from tests.toy_stage import Fault, make_denoiser, make_gan, toy_data

BASE = ["model.resolution=8", "data.resolution=8", "logging.grid_size=2", "logging.wandb_mode=disabled",
        "teacher.train.optimizer.lr=0.001", "distill.train.optimizer.lr=0.001"]


def toy_config(*overrides: str) -> Config:
    return load_config(None, [*BASE, *overrides])


# ------------------------------------------------------------------------------------------------ schedules
def test_schedules_count_images() -> None:
    assert lr_factor(0, 1.0) == 0.0 and lr_factor(500, 1.0) == 0.5 and lr_factor(5000, 1.0) == 1.0
    assert lr_factor(0, 0.0) == 1.0
    assert ema_beta(1000, 100, halflife_kimg=0.1, rampup=0.0) == pytest.approx(0.5)
    assert ema_beta(0, 100, halflife_kimg=10.0, rampup=0.05) == 0.0  # ramp-up: no averaging at the start
    assert crossed(90, 110, 0.1) and not crossed(100, 190, 0.1) and crossed(0, 16, 0.016)
    assert steps_for(0.1, 16) == 7


# --------------------------------------------------------------------------------------- single process
def test_single_process_loss_falls_and_keeps_ema() -> None:
    cfg = toy_config("teacher.train.batch_size=16", "teacher.train.grad_accum=2")
    stage = make_denoiser(cfg)
    source = toy_data(cfg, DataRequest(0, 1, 8, 0, stage.inputs, None))
    result = train_single_process(stage, iter(source), 20, cfg.teacher.train)
    losses = [h["loss"] for h in result.history]
    assert result.nimg == 20 * 16
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result.ema is not None and not result.ema.training
    assert not any(p.requires_grad for p in result.ema.parameters())


def test_plain_driver_accumulation_matches_one_big_batch() -> None:
    """Two accumulated half-batches step exactly like one full batch (loss scaling and boundary stepping)."""
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    nets = [torch.nn.Linear(4, 1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = toy_config().teacher.train.optimizer
    for net, accum in zip(nets, (1, 2)):
        driver = PlainDriver({"n": net}, {"n": cfg}, grad_accum=accum, grad_clip=0.5)
        driver.begin_step(0)
        for chunk in x.chunk(accum):
            driver.backward("n", net(chunk).square().mean())
            driver.step("n")
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)


def test_bf16_cast_reaches_tensors_inside_conditions() -> None:
    cond = Condition(class_labels=torch.tensor([1, 2]), text_pooled=torch.ones(2, 3))
    out = _cast((torch.ones(2), {"c": cond}, 3), torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and out[2] == 3
    assert out[1]["c"].text_pooled.dtype == torch.bfloat16 and out[1]["c"].class_labels.dtype == torch.int64


# ----------------------------------------------------------------------------------------- checkpoint store
class FakeEngines:
    """Stands in for DeepSpeed engines: one file of state, restored by load_state."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.json").write_text(json.dumps({"value": self.value}))

    def load_state(self, directory: Path) -> None:
        self.value = json.loads((directory / "state.json").read_text())["value"]


def _payload(nimg: int, value: float) -> SavePayload:
    meta = {"world_size": 1, "zero_stage": 2, "precision": "fp32"}
    return SavePayload(nimg, FakeEngines(value), {"next_index": nimg}, meta, ema={"w": torch.full((2,), value)},
                       export={"ema": {"w": torch.full((2,), value)}, "architecture": {"kind": "fake"}})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_store_commits_prunes_and_skips_partial(where: str, tmp_path: Path,
                                                           request: pytest.FixtureRequest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run_url = str(tmp_path / "run") if where == "local" else storage.join(request.getfixturevalue("s3_env"), "run")
    store = CheckpointStore(run_url, "teacher", scratch=tmp_path / "scratch")
    assert store.latest_committed() is None
    for nimg in (100, 200, 300):
        store.save(_payload(nimg, nimg / 100))
    assert store.prune(2) == [store.step_url(100)]
    assert [r.nimg for r in store.committed()] == [200, 300]

    # A newer folder without its COMMIT marker (a writer died mid-save) is not a checkpoint.
    storage.write_bytes(storage.join(store.step_url(400), "meta.json"), b"{}")
    assert store.latest_committed().nimg == 300

    # A failed upload (storage down after its retries) raises and commits nothing.
    def broken_upload(local: object, url: str) -> dict:
        raise storage.StorageUnavailable(f"upload {url}: injected failure", url=url)

    with monkeypatch.context() as patch:
        patch.setattr(storage, "upload_dir", broken_upload)
        with pytest.raises(RuntimeError, match="not committed"):
            store.save(_payload(500, 5.0))
    assert store.latest_committed().nimg == 300

    engines = FakeEngines(0.0)
    loaded = store.load(store.latest_committed(), engines)
    assert engines.value == 3.0 and loaded.data_state == {"next_index": 300}
    assert torch.equal(loaded.ema["w"], torch.full((2,), 3.0))
    export = load_export(storage.join(store.step_url(300), "export.pt"))
    assert export["architecture"] == {"kind": "fake"}

    # The next commit prunes the older commit and the partial folder below it.
    store.save(_payload(600, 6.0))
    store.prune(2)
    assert [r.nimg for r in store.committed()] == [300, 600]
    assert storage.list_files(store.step_url(400)) == {}


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


# ------------------------------------------------------------------------------------ validation up front
def test_bad_configs_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zero_stage"):
        toy_config("runtime.zero_stage=4")
    with pytest.raises(ConfigError, match="batch_size"):
        toy_config("runtime.num_workers=3", "teacher.train.batch_size=16")
    # A config changed after validation is checked again by train_stage, before Ray is touched.
    cfg = toy_config(f"run.root={tmp_path}", "runtime.num_workers=2", "teacher.train.batch_size=16")
    cfg.runtime.num_workers = 3
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not divisible by runtime.num_workers"):
        train_stage(cfg, make_denoiser, toy_data, stage_name="teacher")
    cfg.runtime.num_workers, cfg.runtime.zero_stage = 2, 5
    with pytest.raises(ConfigError, match="zero_stage"):
        train_stage(cfg, make_denoiser, toy_data, stage_name="teacher")
    cfg.runtime.zero_stage = 2
    with pytest.raises(TypeError, match="picklable"):
        train_stage(cfg, lambda c: make_denoiser(c), toy_data, stage_name="teacher")
    with pytest.raises(ConfigError, match="unknown stage"):
        train_stage(cfg, make_denoiser, toy_data, stage_name="bogus")
    assert time.perf_counter() - start < 5.0
    assert not (tmp_path / "runs").exists()


def test_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    cfg = toy_config(f"run.root={tmp_path}", "runtime.num_workers=1")
    CheckpointStore(cfg.run_url, "teacher").save(_payload(100, 1.0))  # saved by world_size 1
    check_resumable(cfg, "teacher", cfg.run_url)
    cfg.runtime.num_workers = 2
    with pytest.raises(CheckpointMismatch, match="world_size=1 but this run has world_size=2"):
        check_resumable(cfg, "teacher", cfg.run_url)


@pytest.mark.timeout(60)
def test_sigterm_sets_the_stop_flag_and_the_watchdog_is_called_off() -> None:
    # The module is loaded from its file so the child process starts in a fraction of a second (no torch import).
    path = Path(__file__).parents[1] / "pagoda_dist" / "runtime" / "preemption.py"
    code = ("import importlib.util, os, signal, time\n"
            f"spec = importlib.util.spec_from_file_location('preemption', {str(path)!r})\n"
            "p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p)\n"
            "p.install_sigterm_handler(0.5)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.05)\n"
            "assert p.stop_requested()\n"
            "p.stopped_cleanly()\n"
            "time.sleep(1.0)\n"  # outlives the grace: the watchdog was called off
            "print('alive')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and "alive" in out.stdout, out.stderr
    # Without the call-off, the watchdog ends the process with 128 + SIGTERM after the grace period.
    out = subprocess.run([sys.executable, "-c", code.replace("p.stopped_cleanly()\n", "")], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 128 + signal.SIGTERM and "alive" not in out.stdout


# ------------------------------------------------------------------------------ Ray Train + DeepSpeed, 2 CPUs
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


def _losses(history: list[dict]) -> dict[int, dict[str, float]]:
    return {int(r["nimg"]): {k: v for k, v in r.items() if "loss" in k} for r in history}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_on_s3_sigterm_saves_and_resume_is_exact(local_ray: object, s3_env: str, tmp_path: Path) -> None:
    """Reference run; a run stopped by SIGTERM on one rank, resumed by the same command, matches it exactly."""
    common = [f"run.root={s3_env}", f"storage.endpoint_url={storage.settings.current().endpoint_url}",
              "runtime.num_workers=2", "runtime.zero_stage=2", "runtime.sigterm_grace_s=30",
              "teacher.train.batch_size=16", "teacher.train.total_kimg=0.16", "teacher.train.grad_accum=2",
              "logging.log_every_kimg=0.016", "logging.checkpoint_every_kimg=0.048",
              "logging.sample_every_kimg=0.08"]
    start = time.perf_counter()
    ref_cfg = toy_config(*common, "run.name=ref", "logging.wandb_mode=offline")
    ref = train_stage(ref_cfg, make_denoiser, toy_data, stage_name="teacher", local_dir=tmp_path / "ref")
    ref_s = time.perf_counter() - start
    losses = [r["loss"] for r in ref.history]
    assert ref.nimg == 160 and not ref.preempted and ref.resumed_from is None
    assert losses[-1] < 0.5 * losses[0]
    store = CheckpointStore(ref_cfg.run_url, "teacher")
    assert [r.nimg for r in store.committed()] == [144, 160]  # keep_checkpoints=2 pruned 48 and 96
    assert ref.checkpoint_url == store.step_url(160)
    export = load_export(ref.export_url)
    assert export["architecture"]["kind"] == "toy-denoiser" and export["ema"]["0.weight"].shape == (640, 192)
    assert storage.exists(storage.join(store.url, "samples", "grid-000000160.png"))
    assert list((tmp_path / "ref" / "wandb").rglob("*.wandb"))  # offline wandb run under the local dir
    assert "mfu" in ref.metrics and ref.metrics["images_per_s"] > 0

    fault = Fault("sigterm", nimg=64, rank=1, marker=str(tmp_path / "sigterm-fired"))
    cfg = toy_config(*common, "run.name=preempted")
    factory = functools.partial(make_denoiser, fault=fault)
    start = time.perf_counter()
    stopped = train_stage(cfg, factory, toy_data, stage_name="teacher", local_dir=tmp_path / "run")
    stop_s = time.perf_counter() - start
    assert stopped.preempted and 64 < stopped.nimg < 160
    store = CheckpointStore(cfg.run_url, "teacher")
    assert store.latest_committed().nimg == stopped.nimg
    commit_time = json.loads(storage.read_bytes(storage.join(stopped.checkpoint_url, "COMMIT")))["created_unix"]
    assert commit_time - os.path.getmtime(fault.marker) < cfg.runtime.sigterm_grace_s

    # A later, uncommitted folder (a save cut short) must be ignored by the resume.
    storage.write_bytes(storage.join(store.step_url(999_000), "rank-00000.pt"), b"partial")
    start = time.perf_counter()
    resumed = train_stage(cfg, factory, toy_data, stage_name="teacher", local_dir=tmp_path / "run")
    resume_s = time.perf_counter() - start
    assert resumed.resumed_from == stopped.nimg and resumed.nimg == 160 and not resumed.preempted
    expected = _losses(ref.history)
    got = _losses(resumed.history)
    assert got and all(got[n] == expected[n] for n in got), (got, expected)
    print(f"\ntimings: reference {ref_s:.1f} s, sigterm run {stop_s:.1f} s, resume {resume_s:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_gan_two_engines_survive_a_killed_worker_exactly(local_ray: object, tmp_path: Path) -> None:
    """ZeRO-3, bf16, two engines: a worker dies after a commit; Ray restarts the group from it and the replayed
    steps reproduce the losses logged before the crash."""
    cfg = toy_config(f"run.root={tmp_path}", "run.name=gan", "runtime.num_workers=2", "runtime.zero_stage=3",
                     "runtime.precision=bf16", "runtime.max_failures=1", "distill.train.batch_size=16",
                     "distill.train.total_kimg=0.16", "logging.log_every_kimg=0.016",
                     "logging.checkpoint_every_kimg=0.048", "logging.sample_every_kimg=1")
    fault = Fault("kill", nimg=128, rank=1, marker=str(tmp_path / "kill-fired"))
    start = time.perf_counter()
    result = train_stage(cfg, functools.partial(make_gan, fault=fault), toy_data, stage_name="distill")
    elapsed = time.perf_counter() - start
    assert Path(fault.marker).exists()
    assert result.resumed_from == 96 and result.nimg == 160 and not result.preempted
    records = [json.loads(line) for line in (tmp_path / "runs" / "gan" / "distill" / "metrics.jsonl").open()]
    nimgs = [int(r["nimg"]) for r in records]
    assert nimgs == [16, 32, 48, 64, 80, 96, 112, 128, 112, 128, 144, 160]
    assert _losses(records[6:8]) == _losses(records[8:10])  # replayed after the restart: identical
    export = load_export(result.export_url)
    assert export["network"] == "gen" and export["net"]["0.weight"].shape == (640, 192)  # whole, not a ZeRO-3 shard
    assert torch.isfinite(export["ema"]["0.weight"]).all()
    print(f"\ntimings: ZeRO-3 GAN with one restart {elapsed:.1f} s")


def test_factories_in_toy_stage_pickle() -> None:
    fault = Fault("kill", 1, 0, "/nonexistent")
    pickle.dumps(functools.partial(make_gan, fault=fault))
    pickle.dumps(toy_data)

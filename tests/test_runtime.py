"""The training runtime: schedules, drivers, checkpoint store, validation, and Ray Train + DeepSpeed end to end.

The end-to-end tests (marked slow) run 2 CPU workers on one local Ray (started once for this module) with the
real stages on real photo tiles at 8 px, streamed from WebDataset shards: the teacher against the embedded S3
server, the distil stage (two engines, ZeRO-3, bf16) on latents inverted as the tiles stream. DeepSpeed's CPU comm
op is built on first use (~40-55 s once per machine; `scripts/warm_deepspeed.py` does it ahead).
"""
from __future__ import annotations

import contextlib
import functools
import io
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
from pagoda_dist.data.reader import reader_for
from pagoda_dist.interfaces import Condition
from pagoda_dist.pipeline import distill_stage, reader_source, teacher_stage
from pagoda_dist.runtime import (CheckpointMismatch, CheckpointStore, PlainDriver, load_export, preemption,
                                 train_single_process, train_stage)
from pagoda_dist.runtime.checkpoint import NoExport, SavePayload, capture_rng, restore_rng
from pagoda_dist.runtime.comm import Comm, SoloComm
from pagoda_dist.runtime.drivers import _cast
from pagoda_dist.runtime.ema import Ema
from pagoda_dist.runtime.schedule import crossed, ema_beta, lr_factor, steps_for
from pagoda_dist.runtime.trainer import TrainResult, check_latest_resumable
from pagoda_dist.stages import build_teacher
from tests.damage import garble_image
from tests.runtime_support import Fault, faulty, inverted_tiles

REPO = Path(__file__).parents[1]
# A 0.2M-parameter teacher UNet at 8 px: a few tens of milliseconds per step on one core.
TILES = ["model.resolution=8", "data.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
         "model.attn_resolutions=[]", "model.num_res_blocks=1", "data.loader_workers=0", "teacher.sampler.steps=4",
         "teacher.train.optimizer.lr=0.005", "logging.grid_size=2", "logging.wandb_mode=disabled"]


def tiles_config(*overrides: str) -> Config:
    return load_config(None, [*TILES, *overrides])


# ------------------------------------------------------------------------------------------------ schedules
def test_schedules_count_images() -> None:
    assert lr_factor(0, 1.0) == 0.0 and lr_factor(500, 1.0) == 0.5 and lr_factor(5000, 1.0) == 1.0
    assert lr_factor(0, 0.0) == 1.0
    assert ema_beta(1000, 100, halflife_kimg=0.1, rampup=0.0) == pytest.approx(0.5)
    assert ema_beta(0, 100, halflife_kimg=10.0, rampup=0.05) == 0.0  # ramp-up: no averaging at the start
    assert crossed(90, 110, 0.1) and not crossed(100, 190, 0.1) and crossed(0, 16, 0.016)
    assert steps_for(0.1, 16) == 7


# --------------------------------------------------------------------------------------- single process
@pytest.fixture(scope="module")
def tile_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """384 real photo tiles at 8 px as committed WebDataset shards (349 train in 3 shards, 35 val) in a folder."""
    from pagoda_dist.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiles") / "shards"
    prepare("builtin:photo-tiles", str(out), resolution=8, shard_size=128, workers=1, limit=384, val_fraction=35 / 384,
            progress=False)
    return out


def test_single_process_loss_falls_and_keeps_ema(tile_shards: Path) -> None:
    cfg = tiles_config(f"data.shards={tile_shards}", "teacher.train.batch_size=16", "teacher.train.grad_accum=2")
    torch.manual_seed(0)
    stage = build_teacher(cfg)
    reader = reader_for(cfg, stage.inputs, batch_size=8)
    result = train_single_process(stage, reader, 30, cfg.teacher.train)
    losses = [h["loss"] for h in result.history]
    assert result.nimg == 30 * 16
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert result.ema is not None and not result.ema.training
    assert not any(p.requires_grad for p in result.ema.parameters())


def test_plain_driver_accumulation_matches_one_big_batch() -> None:
    """Two accumulated half-batches step exactly like one full batch (loss scaling and boundary stepping)."""
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    nets = [torch.nn.Linear(4, 1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = tiles_config().teacher.train.optimizer
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


def test_ema_follows_the_live_network_through_rebound_tensors_and_buffers() -> None:
    """The average matches beta * ema + (1 - beta) * live per step, also after the live parameters' storage is
    swapped behind the same Parameter objects (as DeepSpeed's flattening does); buffers are copied."""
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema, idle = Ema(live, keep=True), Ema(live, keep=False)
    params = {name for name, _ in live.named_parameters()}
    expected = {k: v.clone() for k, v in live.state_dict().items()}
    no_gather = lambda _: contextlib.nullcontext()  # noqa: E731 - what a non-ZeRO-3 driver passes
    for beta in (0.5, 0.9, 0.0):
        for p in live.parameters():
            p.data = torch.randn_like(p)
        live.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics
        for k, v in live.state_dict().items():
            expected[k] = beta * expected[k] + (1 - beta) * v if k in params else v.clone()
        ema.update(live, beta, no_gather)
        idle.update(live, beta, no_gather)  # takes part, keeps nothing
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, expected[k].to(v.dtype), msg=k)
    assert idle.net is None


def _vote_while_reducing(rank: int, init_method: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    comm = Comm()
    votes = [comm.start_any(rank == 1), comm.start_any(False)]
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # another collective while both votes may still be in flight
    Path(out, f"{rank}.json").write_text(json.dumps([v.result() for v in votes] + [total.item()]))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_started_votes_agree_across_ranks_and_other_collectives_still_match(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_vote_while_reducing, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [True, False, 3.0]
    assert SoloComm().start_any(True).result() and not SoloComm().start_any(False).result()


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
    assert store.latest_export() == (store.export_url(store.latest_committed()), 300)
    # An earlier checkpoint by images seen (the first committed at or after them), skipping the uncommitted 400.
    assert store.export_from(150) == (store.export_url(store.committed()[0]), 200)
    assert store.export_from(300)[1] == 300
    with pytest.raises(NoExport, match="at or after 301 images.*committed: 200, 300 images"):
        store.export_from(301)
    export = load_export(store.latest_export()[0])
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
        tiles_config("runtime.zero_stage=4")
    with pytest.raises(ConfigError, match="batch_size"):
        tiles_config("runtime.num_workers=3", "teacher.train.batch_size=16")
    # A config changed after validation is checked again by train_stage, before Ray is touched.
    cfg = tiles_config(f"run.root={tmp_path}", "runtime.num_workers=2", "teacher.train.batch_size=16")
    cfg.runtime.num_workers = 3
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not divisible by runtime.num_workers"):
        train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    cfg.runtime.num_workers, cfg.runtime.zero_stage = 2, 5
    with pytest.raises(ConfigError, match="zero_stage"):
        train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    cfg.runtime.zero_stage = 2
    with pytest.raises(TypeError, match="picklable"):
        train_stage(cfg, lambda c: teacher_stage(c), reader_source, stage_name="teacher")
    with pytest.raises(ValueError, match="'bogus': not a stage of this run"):
        train_stage(cfg, teacher_stage, reader_source, stage_name="bogus")
    assert time.perf_counter() - start < 5.0
    assert not (tmp_path / "runs").exists()


def test_resume_with_another_world_size_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """train_stage refuses, before any worker starts, a checkpoint saved under another layout, and says how to
    resume it or how to start afresh."""
    cfg = tiles_config(f"run.root={tmp_path}", "runtime.num_workers=1")
    store = CheckpointStore(cfg.run_url, "teacher")
    store.save(_payload(100, 1.0))  # saved by world_size 1, ZeRO-2, fp32
    check_latest_resumable(cfg, "teacher", cfg.run_url)
    start = time.perf_counter()
    cfg.runtime.num_workers = 2
    with pytest.raises(CheckpointMismatch) as refused:
        train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    message = str(refused.value)
    assert store.step_url(100) in message and "world_size=1 but this run has world_size=2" in message
    assert "Set runtime.num_workers=1 to resume" in message and "another run.name" in message
    cfg.runtime.num_workers, cfg.runtime.zero_stage = 1, 3
    with pytest.raises(CheckpointMismatch, match="Set runtime.zero_stage=2 to resume"):
        train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    assert time.perf_counter() - start < 5.0
    assert [r.nimg for r in store.committed()] == [100]  # nothing was written


# A child process that loads preemption.py from its file: it starts in a fraction of a second (no torch import).
PREEMPTION_CHILD = ("import importlib.util, os, signal, threading, time\n"
                    "spec = importlib.util.spec_from_file_location('preemption', "
                    f"{str(Path(__file__).parents[1] / 'pagoda_dist' / 'runtime' / 'preemption.py')!r})\n"
                    "p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p)\n")


@pytest.mark.timeout(60)
def test_sigterm_sets_the_stop_flag_and_the_watchdog_is_called_off() -> None:
    code = (PREEMPTION_CHILD +
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


@pytest.mark.timeout(60)
def test_driver_sigterm_is_forwarded_and_bounded_by_the_grace() -> None:
    code = (PREEMPTION_CHILD +
            "forwarded = threading.Event()\n"
            "with p.forwarding_sigterm(forwarded.set, 0.5):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert forwarded.wait(5)\n"
            "    print('forwarded', flush=True)\n"
            "    time.sleep(BODY_S)\n"
            "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"  # the caller's handler is back
            "time.sleep(1.0)\n"  # outlives the grace: the watchdog went with the body
            "print('alive')\n")
    out = subprocess.run([sys.executable, "-c", code.replace("BODY_S", "0.0")], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0 and out.stdout.split() == ["forwarded", "alive"], out.stderr
    # A body that overstays the grace period (workers that cannot finish their save) is ended with 128 + SIGTERM.
    out = subprocess.run([sys.executable, "-c", code.replace("BODY_S", "5.0")], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == preemption.EXIT_CODE and out.stdout.split() == ["forwarded"], out.stderr


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
    return {int(r["nimg"]): {k: v for k, v in r.items() if "loss" in k or k in ("rec", "gan")} for r in history}


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"driver exited early with {process.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_teacher_on_s3_tiles_driver_sigterm_killed_worker_and_resume_are_exact(
        local_ray, s3_env: str, tile_shards: Path, tmp_path: Path) -> None:
    """The teacher on real tiles streamed from S3, checkpoints on S3. A reference run; a driver process that gets
    SIGTERM (and only it) while its workers train; the same run resumed, with a worker killed midway. Every loss
    logged after the resume, replayed ones included, equals the reference's at the same image count. As in the demo,
    each rank reads through one DataLoader worker, and checkpoints (every 3 steps) fall inside log windows (every 2
    steps): the kill resumes mid-window, and that window's mean must still be the reference's."""
    damaged = tmp_path / "damaged"  # two images garbled: the run skips them and reports how many it skipped
    storage.upload_dir(str(tile_shards), str(damaged))
    garbled = {garble_image(damaged / "train-000000.tar", 5), garble_image(damaged / "train-000001.tar", 7)}
    shards = storage.join(s3_env, "tiles-8")
    storage.upload_dir(damaged, shards)
    common = [*TILES, f"data.shards={shards}", f"run.root={s3_env}",
              f"storage.endpoint_url={storage.settings.current().endpoint_url}",
              "runtime.num_workers=2", "runtime.zero_stage=2", "runtime.sigterm_grace_s=30", "runtime.max_failures=1",
              "teacher.train.batch_size=16", "teacher.train.grad_accum=2", "teacher.train.total_kimg=0.32",
              "data.loader_workers=1", "logging.log_every_kimg=0.032", "logging.checkpoint_every_kimg=0.048",
              "logging.sample_every_kimg=0.16"]
    timings = {}

    start = time.perf_counter()
    ref_cfg = load_config(None, [*common, "run.name=ref", "logging.wandb_mode=offline"])
    ref = train_stage(ref_cfg, teacher_stage, reader_source, stage_name="teacher", local_dir=tmp_path / "ref")
    timings["reference"] = time.perf_counter() - start
    losses = [r["loss"] for r in ref.history]
    assert ref.nimg == 320 and not ref.preempted and ref.resumed_from is None and len(losses) == 10
    assert sum(losses[-2:]) < 0.85 * sum(losses[:2]), losses  # the EDM loss falls on real tiles
    store = CheckpointStore(ref_cfg.run_url, "teacher")
    assert [r.nimg for r in store.committed()] == [288, 320]  # keep_checkpoints=2 pruned 48 ... 240
    assert ref.checkpoint_url == store.step_url(320)
    export = load_export(ref.export_url)
    net = teacher_stage(ref_cfg).net
    assert export["network"] == "net" and export["architecture"] == net.architecture()
    net.load_state_dict(export["ema"])  # whole fp32 weights of the real UNet
    assert storage.exists(storage.join(store.url, "samples", "grid-000000320.png"))
    assert list((tmp_path / "ref" / "teacher" / "wandb").rglob("*.wandb"))  # offline wandb run under the local dir
    assert [f for f in storage.list_files(storage.join(store.url, "wandb")) if f.endswith(".wandb")]  # and on S3
    assert "mfu" in ref.metrics and ref.metrics["images_per_s"] > 0
    assert ref.metrics["corrupt_samples"] == len(garbled), (garbled, ref.metrics)  # 320 of 349: both were met

    # The driver, in a process of its own, holds rank 0 at 128 images until a stop arrives; SIGTERM goes to the
    # driver only. The held step ends at 144, the ranks' stop vote travels during the next step, every rank saves
    # at 160 and the driver exits with 128 + SIGTERM.
    hold = Fault("hold", nimg=128, rank=0, marker=str(tmp_path / "held"))
    run = [*common, "run.name=preempted"]
    log = tmp_path / "driver.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads while the driver runs
        driver = subprocess.Popen(
            [sys.executable, "-m", "tests.runtime_support", str(tmp_path / "driver"), json.dumps(hold.__dict__),
             *run, f"runtime.ray_address={local_ray.get_runtime_context().gcs_address}"],
            cwd=REPO, env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(Path(hold.marker), driver, timeout_s=300)
            signalled = time.time()
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=60)
        finally:
            driver.kill()
    exited = time.time()
    output = log.read_text()
    assert driver.returncode == preemption.EXIT_CODE, output[-3000:]
    assert exited - signalled < 30, output[-3000:]  # runtime.sigterm_grace_s
    cfg = load_config(None, run)
    store = CheckpointStore(cfg.run_url, "teacher")
    assert [r.nimg for r in store.committed()] == [144, 160]
    saved = store.step_url(160)
    assert {f"rank-0000{r}.pt" for r in (0, 1)} <= set(storage.list_files(saved))  # every rank saved its part
    assert json.loads(storage.read_bytes(storage.join(saved, "COMMIT")))["created_unix"] - signalled < 30
    assert '"preempted": true' in output and '"nimg": 160' in output

    # A later folder without its commit marker (a save cut short) is not a checkpoint.
    storage.write_bytes(storage.join(store.step_url(999_000), "rank-00000.pt"), b"partial")
    kill = Fault("kill", nimg=240, rank=1, marker=str(tmp_path / "killed"))
    start = time.perf_counter()
    resumed = train_stage(cfg, functools.partial(faulty, teacher_stage, kill), reader_source, stage_name="teacher",
                          local_dir=tmp_path / "run")
    timings["resume with a killed worker"] = time.perf_counter() - start
    assert Path(kill.marker).exists()
    # Ray Train restarted the group from the commit at 240, half way through the log window 224-256 (the first
    # attempt had resumed from 160).
    assert resumed.resumed_from == 240 and resumed.nimg == 320 and not resumed.preempted
    records = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").open()]
    assert [int(r["nimg"]) for r in records] == [192, 224, 256, 288, 320]
    expected = _losses(ref.history)
    assert all(_losses([r])[int(r["nimg"])] == expected[int(r["nimg"])] for r in records), (records, expected)
    print(f"\ntimings: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_distill_two_engines_save_on_sigterm_and_skip_an_uncommitted_checkpoint(
        local_ray, tile_shards: Path, tmp_path: Path) -> None:
    """The distil stage (generator and discriminator: two engines) under ZeRO-3 and bf16 on real tiles with their
    inversion latents. A worker gets SIGTERM: every rank saves. That checkpoint then loses its commit marker, so
    the next run resumes from the one before, half way through a log window, and replays the steps between them
    with identical losses (one DataLoader worker per rank, as in the demo)."""
    from pagoda_dist.models.unet import UNet

    cfg = tiles_config(f"data.shards={tile_shards}", f"run.root={tmp_path}", "run.name=gan",
                       "model.channels=64",  # 128x128x3x3 convolutions: above ZeRO-3's persistence threshold
                       "runtime.num_workers=2", "runtime.zero_stage=3", "runtime.precision=bf16",
                       "runtime.max_failures=0",
                       "distill.train.batch_size=16", "distill.train.total_kimg=0.16",
                       "distill.train.optimizer.lr=0.0005", "distill.adversarial.discriminator.channels=16",
                       "distill.adversarial.discriminator.num_scales=1", "logging.log_every_kimg=0.064",
                       "logging.checkpoint_every_kimg=0.048", "logging.sample_every_kimg=1",
                       "data.loader_workers=1")
    torch.manual_seed(0)
    teacher = UNet(cfg.model)
    for p in teacher.parameters():  # trained-like weights: zero-initialised heads would block the gradients
        p.data.normal_(0, 0.05)
    assert max(p.numel() for p in teacher.parameters()) > 100_000  # DeepSpeed's stage3_param_persistence_threshold
    teacher_url = storage.join(cfg.run_url, "teacher-export.pt")  # what a teacher stage exports, minus its live copy
    buffer = io.BytesIO()
    torch.save({"architecture": teacher.architecture(), "ema": teacher.state_dict()}, buffer)
    storage.write_bytes(teacher_url, buffer.getvalue())
    sigterm = Fault("sigterm", nimg=112, rank=1, marker=str(tmp_path / "sigterm-sent"))
    stage = functools.partial(faulty, functools.partial(distill_stage, teacher_url), sigterm)
    data = functools.partial(inverted_tiles, teacher_url)

    start = time.perf_counter()
    stopped = train_stage(cfg, stage, data, stage_name="distill")
    stop_s = time.perf_counter() - start
    # The step under way when the signal came (to 128), one more while the ranks' stop vote travels, then a save.
    assert stopped.preempted and stopped.nimg == 144
    store = CheckpointStore(cfg.run_url, "distill")
    assert [r.nimg for r in store.committed()] == [96, 144]
    files = storage.list_files(store.step_url(144))
    for engine in ("generator", "discriminator"):  # each rank wrote its ZeRO-3 shard of both engines
        assert sum(f.startswith(f"engines/{engine}/") and "zero_pp_rank_1" in f for f in files) >= 1

    storage.remove(storage.join(store.step_url(144), storage.COMMIT_MARKER), recursive=False)
    start = time.perf_counter()
    resumed = train_stage(cfg, stage, data, stage_name="distill")
    resume_s = time.perf_counter() - start
    assert resumed.resumed_from == 96 and resumed.nimg == 160 and not resumed.preempted
    before, after = _losses(stopped.history), _losses(resumed.history)
    assert sorted(before) == [64, 128] and sorted(after) == [128, 160]
    assert set(after[128]) == {"loss", "d_loss", "rec", "gan"}
    # ZeRO-3 state of both engines restored exactly; the window 64-128 is averaged over all four of its steps.
    assert after[128] == before[128]

    export = load_export(resumed.export_url)
    generator = distill_stage(teacher_url, cfg).generator
    assert export["network"] == "generator"
    generator.load_state_dict(export["net"])  # whole tensors gathered from the ZeRO-3 partitions
    generator.load_state_dict(export["ema"])
    assert all(torch.isfinite(v).all() for v in export["ema"].values())
    print(f"\ntimings: ZeRO-3 distil stopped by SIGTERM {stop_s:.1f} s, resumed {resume_s:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_elastic_resume_on_three_then_one_worker_keeps_the_global_batches(
        local_ray, tile_shards: Path, tmp_path: Path) -> None:
    """The teacher (ZeRO-2, one DataLoader worker per rank) saved by 2 workers resumes on 3, then on 1: global batch
    24 from micro-batches of 4 (accumulation 3, 2, 6). Every step reads the same 24 samples as an uninterrupted
    2-worker run, Adam's state is re-partitioned (its step count goes on), the losses stay on the reference's curve,
    and a changed global batch is refused before any worker starts."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from tests.runtime_support import recorded_source

    common = [f"data.shards={tile_shards}", f"run.root={tmp_path}", "data.loader_workers=1", "runtime.zero_stage=2",
              "runtime.max_failures=0", "teacher.train.batch_size=24", "teacher.train.micro_batch=4",
              "distill.train.batch_size=24", "grow.train.batch_size=24",  # valid on 3 workers too
              "logging.log_every_kimg=0.048", "logging.checkpoint_every_kimg=0.048", "logging.sample_every_kimg=1"]

    def run(name: str, workers: int, kimg: float) -> TrainResult:
        cfg = tiles_config(*common, f"run.name={name}", f"runtime.num_workers={workers}",
                           f"teacher.train.total_kimg={kimg}")
        data = functools.partial(recorded_source, str(tmp_path / f"steps-{name}"))
        (tmp_path / f"steps-{name}").mkdir(exist_ok=True)
        return train_stage(cfg, teacher_stage, data, stage_name="teacher", local_dir=tmp_path / name)

    def steps(name: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path in (tmp_path / f"steps-{name}").glob("rank-*.jsonl"):
            for step, keys in map(json.loads, path.read_text().splitlines()):
                out.setdefault(step, []).extend(keys)
        return {step: sorted(keys) for step, keys in out.items()}

    ref = run("ref", 2, 0.288)
    parts = [run("elastic", workers, kimg) for workers, kimg in ((2, 0.096), (3, 0.192), (1, 0.288))]
    assert [(p.resumed_from, p.nimg) for p in parts] == [(None, 96), (96, 192), (192, 288)]
    expected = steps("ref")
    assert sorted(expected) == list(range(12)) and all(len(set(k)) == 24 for k in expected.values())
    assert steps("elastic") == expected  # no sample repeated or skipped by the changes

    cfg = tiles_config(*common, "run.name=elastic", "runtime.num_workers=3")
    optim = (Path(CheckpointStore(cfg.run_url, "teacher").step_url(288)) / "engines" / "net" / "state"
             / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    adam = TorchCheckpointEngine().load(str(optim), map_location="cpu")["optimizer_state_dict"]
    assert float(adam["base_optimizer_state"]["state"][0]["step"]) == 12  # 4 steps on 2 workers, 4 on 3, 4 on 1

    reference, elastic = _losses(ref.history), {**_losses(parts[1].history), **_losses(parts[2].history)}
    assert sorted(elastic) == [144, 192, 240, 288]
    gap = sum(abs(elastic[n]["loss"] - reference[n]["loss"]) for n in elastic) / len(elastic)
    assert gap < 0.2 * sum(reference[n]["loss"] for n in elastic) / len(elastic), (elastic, reference)

    cfg.teacher.train.batch_size = 48
    with pytest.raises(CheckpointMismatch, match="the global batch changed from 24 to 48; keep it"):
        check_latest_resumable(cfg, "teacher", cfg.run_url)


def test_fault_wrapped_factories_pickle() -> None:
    fault = Fault("kill", 1, 0, "/nonexistent")
    pickle.dumps(functools.partial(faulty, functools.partial(distill_stage, "s3://b/export.pt"), fault))
    pickle.dumps(functools.partial(inverted_tiles, "s3://b/export.pt"))


def test_jit_builds_use_the_environments_ninja(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ninja versions hash build commands differently and rebuild each other's DeepSpeed ops; every process
    that loads ops must find this environment's ninja (pip installs it with DeepSpeed) first on PATH."""
    from pagoda_dist.runtime.jit_ops import use_environment_ninja

    bin_dir = str(Path(sys.executable).parent)
    assert (Path(bin_dir) / "ninja").exists(), "the environment has no ninja: DeepSpeed's JIT ops cannot build"
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bin_dir, "/bin"]))
    use_environment_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    use_environment_ninja()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]


def test_mfu_divides_by_the_best_peak_measured_so_far() -> None:
    """A peak measured while the machine is busy reads low; each log point measures again and keeps the best, so
    MFU falls back to a true reading once the load goes (it would otherwise stay inflated for the whole run)."""
    from pagoda_dist.runtime.telemetry import Telemetry

    readings = iter([1e9, 4e9, 2e9])
    telemetry = Telemetry(SoloComm(), stage="teacher", start_nimg=0, total_nimg=100,
                          peak_flops=lambda quick=False: next(readings), flops_per_step=1e8, remeasure_peak_s=0)
    assert telemetry.peak_flops == 1e9
    for nimg in (10, 20):
        telemetry.add({"loss": 1.0})
        record = telemetry.log(nimg)
    assert telemetry.peak_flops == 4e9  # the 2e9 reading of the second log did not lower it
    assert record["mfu"] == pytest.approx(record["tflops_per_rank"] * 1e12 / 4e9)


def test_cpu_per_rank_tells_a_busy_window_from_a_waiting_one() -> None:
    """`cpu_per_rank` is the cores a rank's process kept busy over the log window: a rank that computes the whole
    window reads about one core, a rank that waits (here: sleeps, as when blocked on a peer or on data) about none."""
    import time

    from pagoda_dist.runtime.telemetry import Telemetry

    telemetry = Telemetry(SoloComm(), stage="teacher", start_nimg=0, total_nimg=100)
    end = time.perf_counter() + 0.5
    x = torch.randn(256, 256)
    while time.perf_counter() < end:
        x = torch.tanh(x @ x.T / 256)
    telemetry.add({"loss": 1.0})
    busy = telemetry.log(10)["cpu_per_rank"]
    time.sleep(0.5)
    telemetry.add({"loss": 1.0})
    waiting = telemetry.log(20)["cpu_per_rank"]
    assert busy > 0.3 and waiting < 0.1, (busy, waiting)
    assert "cpu_per_rank" not in telemetry._line(telemetry.history[-1])  # not printed as if it were a loss

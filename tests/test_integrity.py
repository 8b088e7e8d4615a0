"""Verified checkpoints, the divergence guard and the run lease: each protection with a test that fails without it.

- Commits record a SHA-256 per part, checked on the downloaded copy: a same-size corruption is caught; a damaged
  checkpoint is reported by name, set aside under STAGE/damaged/ and the older one loads; with nothing loadable a
  stage refuses to start from zero unless asked to; pruning deletes only what a verified checkpoint supersedes.
- A non-finite loss or gradient skips the update on every rank together (DeepSpeed, two ranks) and after
  runtime.max_nonfinite_steps in a row the stage stops with its last checkpoint intact (slow, Ray).
- One driver owns a run: a second is refused with who holds it, a stale lease expires, and a driver whose lease was
  taken commits nothing.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pagoda_dist import storage
from pagoda_dist.runtime import CheckpointStore, load_export, train_stage
from pagoda_dist.runtime.checkpoint import DAMAGED, CheckpointDamaged, ExportUnreadable
from pagoda_dist.runtime.comm import Comm, SoloComm
from pagoda_dist.runtime.divergence import NonFiniteGuard
from pagoda_dist.storage.lease import LeaseHeld, LeaseLost, RunLease
from tests.runtime_support import Fault, faulty
from tests.test_runtime import FakeEngines, _payload, tile_shards, tiles_config  # noqa: F401 - a fixture

REPO = Path(__file__).parents[1]


def _flip_byte(url: str, at: float = 0.5) -> None:
    """Corrupts one byte of the object in place; its size stays the same."""
    data = bytearray(storage.read_bytes(url))
    data[int(len(data) * at)] ^= 0x55
    storage.write_bytes(url, bytes(data))


# ------------------------------------------------------------------------------------------ commit checksums
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_same_size_corruption_is_caught_where_sizes_are_not(where: str, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_env")
    prefix = storage.join(root, "set")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3000))
    (src / "sub" / "b.bin").write_bytes(os.urandom(5000))
    parts = storage.file_parts(src)
    storage.upload_dir(src, prefix)
    info = storage.commit_existing(prefix, expected=parts)
    assert info.parts == parts and all(p.sha256 for p in storage.read_commit(prefix).parts.values())
    storage.download_committed(prefix, tmp_path / "ok")
    assert (tmp_path / "ok" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()

    _flip_byte(storage.join(prefix, "sub/b.bin"))
    assert storage.verify(prefix) == []  # sizes alone see nothing wrong
    with pytest.raises(storage.CommitDamaged, match="sub/b.bin does not match its SHA-256"):
        storage.download_committed(prefix, tmp_path / "bad")


def test_a_commit_refuses_files_its_writers_did_not_report(tmp_path: Path) -> None:
    """Two writers in one prefix: the files of the other are not committed as if they were this commit's."""
    prefix = str(tmp_path / "set")
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine.bin").write_bytes(b"x" * 100)
    parts = storage.file_parts(src)
    storage.upload_dir(src, prefix)
    storage.write_bytes(storage.join(prefix, "theirs.bin"), b"y" * 100)
    with pytest.raises(storage.StorageError, match="theirs.bin; another process is writing here"):
        storage.commit_existing(prefix, expected=parts)
    assert not storage.is_committed(prefix)


# ----------------------------------------------------------------------------------------- checkpoint store
def _store(tmp_path: Path, lease: Any = None) -> CheckpointStore:
    """A store as a new process sees it (it has verified nothing yet)."""
    return CheckpointStore(str(tmp_path / "run"), "teacher", scratch=tmp_path / "scratch", lease=lease)


def test_a_damaged_checkpoint_is_named_set_aside_and_the_older_one_loads(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    writer = _store(tmp_path)
    for nimg in (100, 200):
        writer.save(_payload(nimg, nimg / 100))
    # Flip a byte of the newest EMA: the tensor still loads, only its checksum tells.
    _flip_byte(storage.join(writer.step_url(200), "ema.pt"), at=0.9)

    store, engines = _store(tmp_path), FakeEngines(0.0)
    loaded = store.load_latest(engines)
    assert loaded is not None and loaded.ref.nimg == 100 and engines.value == 1.0
    assert torch.equal(loaded.ema["w"], torch.full((2,), 1.0))
    out = capsys.readouterr().out
    assert f"cannot resume from {writer.step_url(200)}" in out and "ema.pt does not match its SHA-256" in out
    assert [r.nimg for r in store.committed()] == [100]
    [aside] = store.damaged()
    assert "step-000000200" in aside and "ema.pt" in storage.list_files(aside)  # the evidence is kept

    # The next stage reads a checkpoint's export by URL: it is checked against the commit too.
    export_url = store.export_url(loaded.ref)
    assert load_export(export_url)["architecture"] == {"kind": "fake"}
    _flip_byte(export_url, at=0.9)
    with pytest.raises(ExportUnreadable, match="does not match the SHA-256 its checkpoint's COMMIT records"):
        load_export(export_url)

    # A marker whose part went missing counts as damaged too (sizes tell), and is set aside alike.
    storage.remove(storage.join(writer.step_url(100), "meta.json"), recursive=False)
    with pytest.raises(CheckpointDamaged):
        _store(tmp_path).load_latest(FakeEngines(0.0))
    assert len(store.damaged()) == 2 and store.committed() == []


def test_with_nothing_loadable_a_stage_refuses_to_start_from_zero_unless_asked(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    writer.save(_payload(100, 1.0))
    _flip_byte(storage.join(writer.step_url(100), "engines/state.json"))
    with pytest.raises(CheckpointDamaged) as refused:
        _store(tmp_path).load_latest(FakeEngines(0.0))
    message = str(refused.value)
    assert f"{storage.join(writer.url, DAMAGED)}" in message and "step-000000100" in message
    assert "--from-scratch" in message and "Restore one from a copy" in message
    # Asked again (the damaged one is already aside): still refused, and train_stage says so before Ray starts.
    with pytest.raises(CheckpointDamaged):
        _store(tmp_path).load_latest(FakeEngines(0.0))
    cfg = tiles_config(f"run.root={tmp_path}", "run.name=x")
    CheckpointStore(cfg.run_url, "teacher").save(_payload(100, 1.0))
    _flip_byte(storage.join(cfg.run_url, "teacher", "step-000000100", "engines/state.json"))
    with pytest.raises(CheckpointDamaged):
        CheckpointStore(cfg.run_url, "teacher").load_latest(FakeEngines(0.0))
    from pagoda_dist.pipeline import reader_source, teacher_stage

    start = time.perf_counter()
    with pytest.raises(CheckpointDamaged, match="--from-scratch"):
        train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    assert time.perf_counter() - start < 5.0

    assert _store(tmp_path).load_latest(FakeEngines(0.0), from_scratch=True) is None  # the explicit way
    assert len(_store(tmp_path).damaged()) == 1


def test_prune_deletes_only_what_a_verified_checkpoint_supersedes(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    for nimg in (100, 200, 300):
        writer.save(_payload(nimg, nimg / 100))
    # Another process has verified none of them: it deletes nothing.
    assert _store(tmp_path).prune(2) == []
    assert [r.nimg for r in writer.committed()] == [100, 200, 300]
    # A committed checkpoint whose part vanished is set aside, never deleted as a leftover.
    storage.remove(storage.join(writer.step_url(200), "ema.pt"), recursive=False)
    writer.save(_payload(400, 4.0))
    assert writer.prune(2) == [writer.step_url(100)]
    assert [r.nimg for r in writer.committed()] == [300, 400]
    [aside] = writer.damaged()
    assert "step-000000200" in aside and "meta.json" in storage.list_files(aside)


# -------------------------------------------------------------------------------------------- divergence guard
def _guarded_step(net: nn.Module, opt: torch.optim.Optimizer, guard: NonFiniteGuard, loss: torch.Tensor) -> bool:
    guard.note_loss(loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    guard.after_update()
    return guard.step_skipped()


def test_the_guard_skips_updates_with_a_nonfinite_loss_or_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    guard = NonFiniteGuard(SoloComm())
    guard.watch(opt)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in net.parameters()]

    assert _guarded_step(net, opt, guard, net(x).sum() * float("nan"))
    # A finite loss whose gradient is not: d sqrt(|w - w|) at 0 is 0/0.
    finite_loss = torch.sqrt((net.weight - net.weight.detach()).abs()).sum()
    assert torch.isfinite(finite_loss)
    assert _guarded_step(net, opt, guard, finite_loss)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before)) and not opt.state  # untouched
    assert (guard.in_a_row, guard.total) == (2, 2)

    assert not _guarded_step(net, opt, guard, net(x).pow(2).sum())
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert (guard.in_a_row, guard.total) == (0, 2)


def _weights(driver: Any) -> list[float]:
    return [v for p in driver.live("net").parameters() for v in p.detach().flatten().tolist()]


def _driver_step(driver: Any, guard: NonFiniteGuard, x: torch.Tensor, poison: bool) -> bool:
    loss = driver.module("net")(x).pow(2).mean()
    driver.backward("net", loss * float("nan") if poison else loss)
    driver.step("net")
    return guard.step_skipped()


def _guarded_deepspeed(rank: int, init_method: str, out: str) -> None:
    """Two ranks, ZeRO-0 and ZeRO-2: a NaN loss on rank 1 alone skips the update on both."""
    import torch.distributed as dist

    from pagoda_dist.config import OptimizerConfig, RuntimeConfig, TrainConfig
    from pagoda_dist.runtime.drivers import DeepSpeedDriver, deepspeed_config
    from pagoda_dist.runtime.jit_ops import use_environment_ninja

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # what DeepSpeed's checks read
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    use_environment_ninja()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for zero_stage in (0, 2):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        guard = NonFiniteGuard(Comm())
        ds = deepspeed_config(TrainConfig(batch_size=4, grad_clip=1.0), RuntimeConfig(zero_stage=zero_stage), 2)
        driver = DeepSpeedDriver({"net": net}, {"net": OptimizerConfig(lr=0.01)}, ds, guard)
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank))
        w0 = _weights(driver)
        skipped = _driver_step(driver, guard, x, poison=rank == 1)
        w1 = _weights(driver)
        applied = not _driver_step(driver, guard, x, poison=False)
        results[zero_stage] = {"skipped": skipped, "unchanged": w0 == w1, "applied": applied,
                               "weights": _weights(driver)}
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    # The results are written: leave without C++ static destructors, where a still-joinable native thread of the
    # comm backends aborted a rank at exit once ("terminate called without an active exception").
    os._exit(0)


@pytest.mark.timeout(300)
def test_a_nonfinite_loss_on_one_rank_skips_the_deepspeed_update_on_every_rank(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_guarded_deepspeed, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for zero_stage in ("0", "2"):
        for r in ranks:
            assert r[zero_stage]["skipped"] and r[zero_stage]["unchanged"] and r[zero_stage]["applied"], zero_stage
        weights = [r[zero_stage]["weights"] for r in ranks]
        assert weights[0] == weights[1] and all(math.isfinite(v) for v in weights[0])  # the same finite update on both


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_diverged_stage_stops_with_its_last_checkpoint_intact_and_a_damaged_one_is_skipped(
        local_ray, tile_shards: Path, tmp_path: Path) -> None:  # noqa: F811
    """The teacher on real tiles (Ray Train, DeepSpeed ZeRO-2) diverges at 176 images: three skipped steps, then it
    stops; the checkpoint due at 192 is not written and the ones at 64 and 128 are untouched. Then the one at 128
    is corrupted in place (same size): the next run names it, sets it aside and resumes from 64."""
    from pagoda_dist.pipeline import reader_source, teacher_stage

    cfg = tiles_config(f"data.shards={tile_shards}", f"run.root={tmp_path}", "run.name=nan", "runtime.max_failures=0",
                       "runtime.max_nonfinite_steps=3", "teacher.train.batch_size=16", "teacher.train.total_kimg=0.32",
                       "logging.log_every_kimg=0.016", "logging.checkpoint_every_kimg=0.064",
                       "logging.sample_every_kimg=1")
    store = CheckpointStore(cfg.run_url, "teacher")
    nan = Fault("nan-on", nimg=176, rank=0, marker=str(tmp_path / "nan"))  # rank 0's NaN: the vote skips every rank
    diverged = train_stage(cfg, functools.partial(faulty, teacher_stage, nan), reader_source, stage_name="teacher")
    assert diverged.diverged and diverged.nonfinite_steps == 3 and diverged.nimg == 224 and not diverged.preempted
    assert [r.nimg for r in store.committed()] == [64, 128]
    export = load_export(store.export_url(store.committed()[-1]))
    assert export["nimg"] == 128 and all(torch.isfinite(t).all() for t in export["ema"].values())

    parts = storage.read_commit(store.step_url(128)).parts
    model = next(rel for rel in parts if rel.startswith("engines/") and rel.endswith("model_states.pt"))
    _flip_byte(storage.join(store.step_url(128), model), at=0.95)
    resumed = train_stage(cfg, teacher_stage, reader_source, stage_name="teacher")
    assert resumed.resumed_from == 64 and resumed.nimg == 320 and not resumed.diverged
    [aside] = store.damaged()
    assert "step-000000128" in aside and model in storage.list_files(aside)


# -------------------------------------------------------------------------------------------------- run lease
def test_a_second_driver_is_refused_with_who_holds_the_run(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    first = RunLease(run, ttl_s=60, settle_s=0)
    token = first.acquire()
    with pytest.raises(LeaseHeld, match=f"held by another driver, {socket.gethostname()} pid {os.getpid()}"):
        RunLease(run, ttl_s=60, settle_s=0).acquire()
    token.check()
    first.release()
    RunLease(run, ttl_s=60, settle_s=0).acquire()  # free again


def _write_lease(run: str, **fields: Any) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "acquired_unix": time.time(),
              "renewed_unix": time.time(), "ttl_s": 60.0, **fields}
    storage.write_bytes(storage.join(run, "LEASE"), json.dumps(record).encode())


def test_a_stale_lease_expires(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    _write_lease(run, host="elsewhere", pid=1)  # alive, on another host: held
    with pytest.raises(LeaseHeld, match="elsewhere pid 1"):
        RunLease(run, ttl_s=60, settle_s=0).acquire()
    _write_lease(run, host="elsewhere", pid=1, renewed_unix=time.time() - 61)  # not renewed within its ttl
    RunLease(run, ttl_s=60, settle_s=0).acquire()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    _write_lease(run, pid=int(gone.stdout))  # this host, fresh, but its process has exited
    RunLease(run, ttl_s=60, settle_s=0).acquire()


def test_a_driver_whose_lease_was_taken_commits_nothing_and_is_told(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    lost: list[str] = []
    with RunLease(run, ttl_s=0.3, on_lost=lost.append, settle_s=0) as token:
        store = _store(tmp_path, lease=token)
        store.save(_payload(100, 1.0))
        _write_lease(run, host="elsewhere", pid=1)  # another driver took over (say ours had expired)
        with pytest.raises(RuntimeError, match="no longer holds the run's lease, elsewhere pid 1"):
            store.save(_payload(200, 2.0))
        with pytest.raises(LeaseLost):
            store.prune(2)
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lost and "elsewhere pid 1" in lost[0]
    assert [r.nimg for r in store.committed()] == [100]
    assert json.loads(storage.read_bytes(storage.join(run, "LEASE")))["token"] == "other"  # theirs is left alone


def test_pagoda_run_refuses_a_held_run_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "root"
    args = ["run", str(REPO / "configs" / "tiny.yaml"), f"run.root={root}", "storage.embedded_s3=false"]
    _write_lease(str(root / "runs" / "tiny"), host="elsewhere", pid=1)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pagoda_dist.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "held by another driver, elsewhere pid 1" in done.stderr and "Traceback" not in done.stderr
    assert time.perf_counter() - start < 60
    assert sorted(p.name for p in (root / "runs" / "tiny").iterdir()) == ["LEASE"]  # nothing else was started

"""Clean stops outside training and what a killed process leaves behind.

SIGTERM during prepare, precompute or evaluate makes the step commit the unit of work under way (a shard), start
no other, and end the command with exit code 143; the same command resumes. A SIGKILLed precompute leaves
temporary files that the next run removes. The end-to-end test sends real signals to a real `pagoda` process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pagoda_dist import storage
from pagoda_dist.config import to_dict
from pagoda_dist.data.manifest import read_manifest
from pagoda_dist.data.prepare import RECORDS, PrepareStopped, prepare
from pagoda_dist.data.shards import iter_shard
from pagoda_dist.precompute.scratch import ROOT_NAME, private_scratch
from pagoda_dist.runtime import preemption
from tests.test_precompute import FASHION, make_config, make_data, make_teacher, pair_arrays

needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def test_sigterm_inside_stopping_on_sigterm_requests_a_stop_instead_of_killing() -> None:
    """In a child process: SIGTERM sets the flag and the process lives on; outside the block it kills again."""
    code = """
import os, signal, time
from pagoda_dist.runtime import preemption
with preemption.stopping_on_sigterm(30):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("alive", preemption.stop_requested(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not reached", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         check=False)
    assert out.stdout.split() == ["alive", "True"] and out.returncode == -signal.SIGTERM, out.stderr


def test_a_stopped_step_exits_143_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    from pagoda_dist import cli

    def stopped(args: object) -> int:
        raise preemption.Stopped("precompute stopped on SIGTERM with 2 of 5 shards committed")
    monkeypatch.setattr(cli, "cmd_precompute", stopped)
    assert cli.main(["precompute", "configs/tiny.yaml"]) == preemption.EXIT_CODE == 143
    assert capsys.readouterr().err == "pagoda: precompute stopped on SIGTERM with 2 of 5 shards committed\n"


def test_bad_input_to_precompute_and_evaluate_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import contextlib

    from pagoda_dist import cli, pipeline

    monkeypatch.setattr(pipeline, "local_services", lambda cfg: contextlib.nullcontext())  # no Ray needed here
    root = f"run.root={tmp_path}"
    assert cli.main(["precompute", "configs/tiny.yaml", root, "storage.embedded_s3=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagoda precompute: precompute input (data.shards): ") and err.count("\n") == 1, err
    assert cli.main(["evaluate", "configs/tiny.yaml", root, "storage.embedded_s3=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagoda evaluate: no committed teacher checkpoint under ") and err.count("\n") == 1, err


def test_evaluation_stops_between_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pagoda_dist.eval import slices

    scored: list[int] = []

    class CountingScorer:
        def __init__(self, plan: object) -> None:
            pass

        def __call__(self, index: int) -> dict:
            scored.append(index)
            return {("seconds", None): {}}
    monkeypatch.setattr(slices, "SliceScorer", CountingScorer)
    monkeypatch.setattr(preemption, "stop_requested", lambda: len(scored) >= 2)
    plan = SimpleNamespace(slices=[(i, i + 1) for i in range(5)], keys=lambda: [("seconds", None)])
    with pytest.raises(preemption.Stopped, match="evaluation stopped on SIGTERM after 2 of 5 slices"):
        slices.InProcess().score_slices(plan)
    assert scored == [0, 1]


def test_the_scratch_folders_of_dead_processes_are_swept(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = tmp_path / f"{host}-{int(dead.stdout)}"
    (gone / "x").mkdir(parents=True)
    (gone / "x" / ".train-000001.tar.abc.tmp").write_bytes(b"half a shard")
    live = tmp_path / f"{host}-{os.getppid()}"  # a process that runs: never touched
    live.mkdir()
    other_host = tmp_path / f"not-{host}-{int(dead.stdout)}"
    other_host.mkdir()
    before = tempfile.tempdir
    try:
        own = private_scratch(tmp_path)
        assert tempfile.gettempdir() == str(own) == str(tmp_path / f"{host}-{os.getpid()}")
    finally:
        tempfile.tempdir = before
    assert not gone.exists() and live.is_dir() and other_host.is_dir()


@needs_fashion
def test_prepare_stops_between_shards_and_the_same_call_builds_the_rest(tmp_path: Path) -> None:
    settings = {"resolution": 32, "channels": 1, "shard_size": 10, "limit": 40, "workers": 1, "progress": False}
    whole = str(tmp_path / "whole")
    prepare("builtin:fashion-mnist", whole, **settings)
    out = str(tmp_path / "out")
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2
    with pytest.raises(PrepareStopped, match=r"with 3 of 5 shards left; the finished ones are kept"):
        prepare("builtin:fashion-mnist", out, stop=stop_after_two, **settings)
    assert not storage.is_committed(out)
    assert sorted(storage.list_files(storage.join(out, RECORDS))) == ["train-000000.json", "train-000001.json"]
    report = prepare("builtin:fashion-mnist", out, **settings)
    assert sorted(report.built) == ["train-000002.tar", "train-000003.tar", "val-000000.tar"]
    def shards(url: str) -> dict[str, bytes]:  # all but the commit marker, which holds its time
        return {rel: storage.read_bytes(storage.join(url, rel)) for rel in storage.list_files(url) if rel != "COMMIT"}
    assert shards(out) == shards(whole)


# ---------------------------------------------------------------------------------- a real `pagoda` process
def _pagoda(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`pagoda ARGS` in a process group of its own: with its local Ray and actors, it can be killed as a node is."""
    return subprocess.Popen([sys.executable, "-m", "pagoda_dist.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(condition: object, proc: subprocess.Popen, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"pagoda ended ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} in {timeout_s} s:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_stops_precompute_after_committed_shards_and_sigkill_leftovers_are_cleaned(tmp_path: Path) -> None:
    """`pagoda precompute` gets SIGTERM once a shard is committed: it commits what is in flight, starts nothing else
    and exits 143. A `pagoda precompute` is then SIGKILLed with its Ray, and what a SIGKILL mid-shard leaves is
    planted. The same command then finishes with no temporary file left, and the pairs are those an uninterrupted
    run computes (in this process)."""
    cfg = make_config(str(tmp_path / "root"), **{"precompute.max_actors": 1, "precompute.cpus_per_actor": 1,
                                                  "precompute.steps": 12})
    make_data(cfg, limit=72, shard_size=12)
    make_teacher(cfg)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    pairs = Path(storage.filesystem(cfg.pairs_url)[1])

    def committed() -> list[Path]:
        return sorted(pairs.glob("*/COMMIT"))

    run = _pagoda("precompute", str(config), env=env)
    _wait_for(lambda: len(committed()) >= 1, run, "a committed shard")
    run.send_signal(signal.SIGTERM)
    out = run.communicate(timeout=240)[0]
    assert run.returncode == 143, out[-3000:]
    assert "pagoda: precompute stopped on SIGTERM with" in out, out[-3000:]
    n_shards = sum(len(s) for s in read_manifest(cfg.shards_url).splits.values())
    stopped_at = len(committed())
    assert 1 <= stopped_at < n_shards and not storage.is_committed(cfg.pairs_url)
    assert not list(pairs.rglob("*.tmp"))  # the shard in flight was committed, not abandoned

    kill = _pagoda("precompute", str(config), env=env)
    _wait_for(lambda: len(committed()) > stopped_at, kill, "another committed shard")
    os.killpg(kill.pid, signal.SIGKILL)  # the driver and its local Ray at once, as a lost node
    kill.communicate(timeout=60)
    # What a SIGKILL mid-shard leaves (planted, since these shards take a fraction of a second): ShardWriter's
    # half-written tar beside an uncommitted shard, and a dead actor's scratch folder holding a copy bound for S3.
    time.sleep(3)  # an actor may outlive its raylet by the rest of its shard; the last shard is never reached
    last = [i.name for s in read_manifest(cfg.shards_url).splits.values() for i in s][-1].removesuffix(".tar")
    left = pairs / last
    assert not (left / "COMMIT").exists()
    left.mkdir(exist_ok=True)
    (left / f".{left.name}.tar.k1ll3d.tmp").write_bytes(b"half a shard")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_scratch = Path(tempfile.gettempdir()) / ROOT_NAME / f"{socket.gethostname()}-{int(dead.stdout)}"
    dead_scratch.mkdir(parents=True)
    (dead_scratch / ".train-000002.tar.k1ll3d.tmp").write_bytes(b"half a shard")

    again = _pagoda("precompute", str(config), env=env)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert storage.is_committed(cfg.pairs_url) and not list(pairs.rglob("*.tmp"))
    assert not dead_scratch.exists()  # swept by the next actor
    manifest = read_manifest(cfg.pairs_url)
    assert set(manifest.extra["latent_std_over_sigma_max"]) == {i.name for s in manifest.splits.values() for i in s}
    assert "latent std / sigma_max per shard: train-000000 " in out

    # The same pairs as one uninterrupted computation, shard by shard in this process (one torch thread, as an
    # actor with one CPU has).
    import torch

    from pagoda_dist.precompute import ShardInverter, build_job
    from pagoda_dist.precompute.job import make_tasks

    torch.set_num_threads(1)
    job, inputs, _ = build_job(cfg)
    reference = str(tmp_path / "reference")
    inverter = ShardInverter(job)
    expected = {}
    for task in make_tasks(inputs, cfg.shards_url, reference):
        result = inverter.process(task)
        expected.update({f"{result.name}/{s.key}": s.arrays["latent"]
                         for s in iter_shard(storage.join(reference, result.name))})
    got = pair_arrays(cfg.pairs_url)
    assert got.keys() == expected.keys()
    for name, arrays in got.items():
        assert np.array_equal(arrays["latent"], expected[name]), name

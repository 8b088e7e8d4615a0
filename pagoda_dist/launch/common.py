"""What every launcher shares: the project checkout, the validated config, the driver command, and the rules for
environment variables that may travel to a cluster (settings yes, secrets never)."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from pagoda_dist.config import SECRET_WORDS, Config, load_config

# The launchers ship this checkout (Ray's working_dir, the Slurm job's directory) and read their templates from
# launchers/ and the schemas from launchers/k8s/: they run from a source checkout, as `pip install -e .` keeps it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS_DIR = PROJECT_ROOT / "launchers"

# Non-secret settings worth forwarding to a remote cluster's driver. Deliberately not AWS_PROFILE or the AWS
# config/credentials file paths: those name files on *this* machine; the cluster resolves its own.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")
# Names that must never be sent in plain text, beyond config.SECRET_WORDS (which covers AWS_SECRET_ACCESS_KEY,
# AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, WANDB_API_KEY, ...).
_EXTRA_SECRET_WORDS = ("private_key", "passwd", "auth")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(ValueError):
    """A launcher was given something it cannot use; the message says which option/field and what to do."""


def is_secret_name(name: str) -> bool:
    """True for environment variable names that hold credentials (checked case-insensitively)."""
    lower = name.lower()
    return any(word in lower for word in (*SECRET_WORDS, *_EXTRA_SECRET_WORDS))


def forwarded_env(extra: list[str] | tuple[str, ...] = (), from_environment: bool = True) -> dict[str, str]:
    """The non-secret settings of FORWARDED_ENV set here (if `from_environment`), plus `extra` NAME=VALUE pairs
    (`--env`), checked."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if from_environment and os.environ.get(name)}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(name):
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE with a shell variable name")
        if is_secret_name(name):
            raise LaunchError(f"--env {name}: looks like a credential; secrets never travel with a job. Put it in "
                              "the cluster's own environment or secret store (see launchers/README.md, 'Secrets')")
        env[name] = value
    return env


def load_checked_config(config: str | Path | None, overrides: list[str] | tuple[str, ...],
                        only: list[str] | tuple[str, ...] = ()) -> Config:
    """Validates the config, and the `--only` step names against its chain, here, before anything is submitted,
    so mistakes fail in seconds, not in a queue (an unknown step name would make the driver run nothing)."""
    cfg = load_config(config, list(overrides))
    if only:
        from pagoda_dist.pipeline import plan

        steps = [step.name for step in plan(cfg)]
        unknown = [name for name in only if name not in steps]
        if unknown:
            raise LaunchError(f"--only {unknown[0]}: not a step of this run; its steps are {', '.join(steps)}")
    return cfg


def config_relpath(config: str | Path, root: Path = PROJECT_ROOT) -> str:
    """The config's path inside the project checkout, as the cluster will see it (the checkout is shipped)."""
    path = Path(config).resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise LaunchError(f"config {config}: must live inside the project checkout {root} (it is shipped to the "
                          f"cluster with the code); copy it to {root / 'configs'}/") from None


def driver_command(config_rel: str, overrides: list[str] | tuple[str, ...],
                   only: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`pagoda run [--only STEP ...] CONFIG overrides` as argv, for a driver running inside a Ray cluster.

    `runtime.ray_address=auto` makes the driver join the cluster it runs in: `ray.init(address="auto")` reads
    RAY_ADDRESS, which `ray job submit`, KubeRay and the Slurm script all set. An explicit `runtime.ray_address=`
    override from the user wins. `python -m pagoda_dist.cli` rather than the `pagoda` script: it works from the
    shipped checkout even where the package itself is not installed."""
    # --only before CONFIG: argparse takes no positional after an option once the overrides have been read.
    argv = ["python", "-m", "pagoda_dist.cli", "run", *(a for name in only for a in ("--only", name)), config_rel,
            *overrides]
    if not any(o.startswith("runtime.ray_address=") for o in overrides):
        argv.append("runtime.ray_address=auto")
    return argv


def shell_join(argv: list[str]) -> str:
    return shlex.join(argv)


def storage_warnings(cfg: Config, multi_node: bool) -> list[str]:
    """Settings that work on one machine but not across nodes, explained (printed, not fatal: one-node runs)."""
    notes = []
    if cfg.storage.embedded_s3 and multi_node:
        notes.append("storage.embedded_s3=true: the driver starts or joins an S3 server on its machine's 127.0.0.1, "
                     "which other machines cannot reach (fine for a cluster on one machine, cluster/local.sh); "
                     "else use a shared endpoint: storage.embedded_s3=false storage.endpoint_url=https://...")
    if multi_node and "://" not in cfg.run.root:
        notes.append(f"run.root={cfg.run.root!r} is a local path: every node must see the same files there "
                     "(a shared filesystem), else use an s3:// root")
    return notes

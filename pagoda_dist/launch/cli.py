"""`pagoda launch ...`: the command-line face of the launchers. pagoda_dist.cli calls `register(subparsers)`.

    pagoda launch ray   CONFIG [overrides] --address http://HEAD:8265 [--only STEP] [--no-wait] [--image IMG | --pip]
    pagoda launch slurm CONFIG [overrides] [--nodes N --partition P --time T --only STEP --dry-run]
    pagoda launch k8s   [CONFIG] [overrides] [--image IMG --workers N --cpus C --gpus G --memory M --secret S
                        --namespace NS --cluster-only] > manifests.yaml
    pagoda launch check-k8s FILE...          (validate manifests, e.g. after editing them)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from pagoda_dist.config import ConfigError
from pagoda_dist.launch.common import LaunchError, storage_warnings


def _config_args(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        parser.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    else:
        parser.add_argument("config", help="YAML config inside the project checkout, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.name=try2 runtime.num_workers=8")


def _driver_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", default=None, metavar="CMD",
                        help="run this shell command instead of `pagoda run CONFIG overrides` (the config is still "
                             "validated), e.g. one-off tools or tests")


def _only_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="STEP",
                        help="run only this step of the chain (repeatable), as `pagoda run --only STEP`: prepare, "
                             "teacher, precompute, distill, grow-RES, evaluate")


def _env_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a non-secret setting for the driver/pods (repeatable); credential-like names are "
                             "refused: they come from the cluster's own secret store")


def cmd_ray(args: argparse.Namespace) -> int:
    from pagoda_dist.launch.ray_job import RayJobRequest, launch

    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LaunchError("--address: give the Ray job API of the cluster, e.g. http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    request = RayJobRequest(address=address, config=args.config, overrides=args.overrides, only=args.only,
                            driver=args.driver,
                            image=args.image, pip=args.pip, env=args.env, submission_id=args.submission_id,
                            entrypoint_num_cpus=args.entrypoint_num_cpus)
    return launch(request, wait=not args.no_wait)


def cmd_slurm(args: argparse.Namespace) -> int:
    from pagoda_dist.launch.slurm import SlurmRequest, launch

    request = SlurmRequest(config=args.config, overrides=args.overrides, only=args.only, nodes=args.nodes,
                           partition=args.partition,
                           time=args.time, account=args.account, job_name=args.job_name,
                           cpus_per_node=args.cpus_per_node, gpus_per_node=args.gpus_per_node, output=args.output,
                           driver=args.driver, venv=args.venv, extra_sbatch=args.sbatch_arg)
    return launch(request, dry_run=args.dry_run, script_out=args.script_out)


def cmd_k8s(args: argparse.Namespace) -> int:
    from pagoda_dist.launch.common import load_checked_config
    from pagoda_dist.launch.k8s import GRACE_MARGIN_S, K8sRequest, manifests, project_version, to_yaml
    from pagoda_dist.launch.k8s_validate import validate_manifests

    if args.config is None and not args.cluster_only:
        raise LaunchError("pagoda launch k8s: give a CONFIG (only --cluster-only works from the defaults)")
    request = K8sRequest(config=args.config, overrides=args.overrides, image=args.image, workers=args.workers,
                         cpus=args.cpus, gpus=args.gpus, memory=args.memory, head_cpus=args.head_cpus,
                         head_memory=args.head_memory, secret=args.secret, namespace=args.namespace, name=args.name,
                         cluster_only=args.cluster_only, backoff_limit=args.backoff_limit,
                         deadline_s=args.deadline, ttl_s=args.ttl, env=args.env)
    docs = manifests(request)
    cfg = load_checked_config(args.config, args.overrides)
    for note in storage_warnings(cfg, multi_node=True) if args.config else []:
        print(f"pagoda launch k8s: note: {note}", file=sys.stderr)
    # Catch generator mistakes here rather than in the cluster; the core schemas only if installed.
    try:
        import kubernetes_validate  # noqa: F401
        core = True
    except ImportError:
        core = False
    validate_manifests(docs, min_grace_s=math.ceil(cfg.runtime.sigterm_grace_s) + GRACE_MARGIN_S, core=core)
    text = to_yaml(docs, header=f"# Generated by `pagoda launch k8s` (pagoda-dist {project_version()}): regenerate "
                                "rather than edit;\n# after any edit, check with `pagoda launch check-k8s FILE`.\n")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"pagoda launch k8s: wrote {len(docs)} manifest(s) to {args.output}; apply with "
              f"`kubectl apply -f {args.output}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_check_k8s(args: argparse.Namespace) -> int:
    from pagoda_dist.launch.k8s_validate import validate_files

    count = validate_files(args.files, core=not args.no_core)
    print(f"pagoda launch check-k8s: {count} manifest(s) valid")
    return 0


def register(subparsers: Any) -> None:
    """Adds `pagoda launch {ray,slurm,k8s,check-k8s}` to the `pagoda` parser's subparsers."""
    launch = subparsers.add_parser("launch", help="run `pagoda run` on a Ray cluster, Slurm or Kubernetes",
                                   description="multi-node launchers; see launchers/README.md")
    sub = launch.add_subparsers(dest="launcher", required=True)

    p = sub.add_parser("ray", help="submit the driver to a running Ray cluster (Ray job), stream its logs")
    _config_args(p)
    p.add_argument("--address", default=None, help="Ray job API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--image", default=None, help="container image for the job (runtime_env image_uri)")
    p.add_argument("--pip", action="store_true", help="install the pinned stack (constraints.txt) for the job")
    p.add_argument("--submission-id", default=None, help="job id (default: pagoda-RUN-TIMESTAMP)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver")
    _only_arg(p)
    _driver_arg(p)
    _env_arg(p)
    p.set_defaults(func=_guarded(cmd_ray))

    p = sub.add_parser("slurm", help="fill launchers/slurm/pagoda.sbatch and submit it (Ray on the allocation)")
    _config_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit; the job requeues itself before it")
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None)
    p.add_argument("--cpus-per-node", type=int, default=None, help="default: from runtime.num_workers/cpus_per_worker")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: from runtime.use_gpu/num_workers")
    p.add_argument("--output", default=None, help="Slurm log pattern (default: work/slurm/%%x-%%j.out)")
    p.add_argument("--venv", default=None, help="virtualenv to activate on the nodes (default: the current one)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION[=VALUE]",
                   help="extra #SBATCH option (repeatable), e.g. --sbatch-arg=--exclusive")
    p.add_argument("--script-out", default=None, help="where to write the filled script")
    p.add_argument("--dry-run", action="store_true", help="print the filled script; submit nothing")
    _only_arg(p)
    _driver_arg(p)
    p.set_defaults(func=_guarded(cmd_slurm))

    p = sub.add_parser("k8s", help="print KubeRay manifests: ConfigMap + RayJob, or a RayCluster")
    _config_args(p, optional=True)
    p.add_argument("--image", default=None, help="container image (default: pagoda-dist:VERSION from cluster/Dockerfile)")
    p.add_argument("--workers", type=int, default=None, help="worker pods (default: runtime.num_workers)")
    p.add_argument("--cpus", default=None, help="CPU per worker pod (default: runtime.cpus_per_worker)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per worker pod (default: 1 if runtime.use_gpu)")
    p.add_argument("--memory", default="16Gi", help="memory per worker pod")
    p.add_argument("--head-cpus", default="2")
    p.add_argument("--head-memory", default="8Gi")
    p.add_argument("--secret", default="pagoda-s3", help="Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    p.add_argument("--namespace", default="default")
    p.add_argument("--name", default=None, help="object name (default: pagoda-RUN, or pagoda-cluster)")
    p.add_argument("--cluster-only", action="store_true", help="a long-lived RayCluster instead of a RayJob")
    p.add_argument("--backoff-limit", type=int, default=2, help="RayJob retries (each resumes from storage)")
    p.add_argument("--deadline", type=int, default=7 * 24 * 3600, help="activeDeadlineSeconds of the RayJob")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the finished job's cluster is kept")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    _env_arg(p)
    p.set_defaults(func=_guarded(cmd_k8s))

    p = sub.add_parser("check-k8s", help="validate manifest files (KubeRay's CRD schemas, the core Kubernetes "
                                         "schemas, the secret and grace-period rules)")
    p.add_argument("files", nargs="+")
    p.add_argument("--no-core", action="store_true", help="skip the core Kubernetes schemas")
    p.set_defaults(func=_guarded(cmd_check_k8s))


def _guarded(func: Any) -> Any:
    """Prints launcher and config errors as one clear line (exit 2) instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (LaunchError, ConfigError) as err:
            print(f"pagoda launch {args.launcher}: error: {err}", file=sys.stderr)
            return 2

    run.__doc__ = func.__doc__
    return run


def main(argv: list[str] | None = None) -> int:
    """`python -m pagoda_dist.launch.cli launch ...` = `pagoda launch ...` (pagoda_dist.cli registers the same
    subcommands), for a checkout where the `pagoda` entry point is not installed."""
    parser = argparse.ArgumentParser(prog="pagoda")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

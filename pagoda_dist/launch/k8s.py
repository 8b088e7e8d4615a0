"""`pagoda launch k8s`: KubeRay manifests for a run (RayJob + the ConfigMap holding its resolved config) or for a
long-lived cluster (`--cluster-only`: a RayCluster, to which `pagoda launch ray` then submits runs).

Secrets never appear in a manifest: S3 credentials come from a Kubernetes Secret (`--secret`, keys
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, plus optional AWS_SESSION_TOKEN / WANDB_API_KEY) through envFrom.
The resolved config in the ConfigMap holds no secrets by construction (config.py refuses secret-like keys).
Every manifest produced here passes `k8s_validate.validate_manifests` before it is printed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from pagoda_dist.config import Config, to_dict
from pagoda_dist.launch.common import PROJECT_ROOT, LaunchError, forwarded_env, load_checked_config

RAY_VERSION = "2.60.0"
CONFIG_MOUNT = "/config"
CONFIG_KEY = "run.yaml"
GRACE_MARGIN_S = 30        # beyond runtime.sigterm_grace_s: Ray's own shutdown after the checkpoint is saved
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
MAX_NAME = 40              # KubeRay derives longer names (cluster, head service) from a RayJob's name
APP_LABEL = "pagoda-dist"


def project_version(root: Path = PROJECT_ROOT) -> str:
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


@dataclass
class K8sRequest:
    """What to emit. Unset resources derive from the config's runtime section."""

    config: str | Path | None = None    # None: the defaults (a generic cluster)
    overrides: list[str] = field(default_factory=list)
    image: str | None = None            # default: pagoda-dist:VERSION, built from cluster/Dockerfile
    workers: int | None = None          # worker pods; default runtime.num_workers (one Ray Train worker each)
    cpus: str | None = None             # per worker pod; default ceil(runtime.cpus_per_worker)
    gpus: int | None = None             # per worker pod; default 1 if runtime.use_gpu else 0
    memory: str = "16Gi"                # per worker pod
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    secret: str = "pagoda-s3"           # Secret with the S3 credentials (envFrom)
    namespace: str = "default"
    name: str | None = None             # default: pagoda-RUNNAME (job) or pagoda-cluster (--cluster-only)
    cluster_only: bool = False
    backoff_limit: int = 2              # RayJob retries (each starts a fresh cluster; the driver resumes from S3)
    deadline_s: int = 7 * 24 * 3600     # activeDeadlineSeconds of the RayJob
    ttl_s: int = 3600                   # keep the finished job's cluster this long for logs, then delete it
    env: list[str] = field(default_factory=list)  # extra non-secret NAME=VALUE settings for every container


def dns_name(text: str, limit: int = MAX_NAME) -> str:
    """`text` made into a DNS-1123 label (lowercase letters, digits, '-'), at most `limit` characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not name:
        raise LaunchError(f"cannot make a Kubernetes name from {text!r}: pass --name")
    return name


def _check(req: K8sRequest) -> None:
    for flag, value in (("--cpus", req.cpus), ("--memory", req.memory), ("--head-cpus", req.head_cpus),
                        ("--head-memory", req.head_memory)):
        if value is not None and not QUANTITY.match(str(value)):
            raise LaunchError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    for flag, value in (("--name", req.name), ("--namespace", req.namespace), ("--secret", req.secret)):
        if value is not None and not DNS_LABEL.match(value):
            raise LaunchError(f"{flag} {value!r}: must be a DNS-1123 label (lowercase letters, digits, '-')")
    if req.name is not None and len(req.name) > MAX_NAME:
        raise LaunchError(f"--name {req.name!r}: at most {MAX_NAME} characters (KubeRay appends suffixes)")
    if req.workers is not None and req.workers < 1:
        raise LaunchError(f"--workers must be >= 1, got {req.workers}")
    if req.gpus is not None and req.gpus < 0:
        raise LaunchError(f"--gpus must be >= 0, got {req.gpus}")
    if req.backoff_limit < 0 or req.deadline_s < 1 or req.ttl_s < 0:
        raise LaunchError("--backoff-limit and --ttl must be >= 0, --deadline >= 1")


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpu), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    # requests == limits: the Ray node advertises exactly what the pod is guaranteed.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(role: str, req: K8sRequest, image: str, resources: dict[str, Any], grace_s: int,
                  config_map: str | None, labels: dict[str, str]) -> dict[str, Any]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    # Only what --env names: a manifest must not depend on the shell it was generated in.
    env += [{"name": k, "value": v} for k, v in sorted(forwarded_env(req.env, from_environment=False).items())]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if config_map:
        mounts.append({"name": "run-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
        volumes.append({"name": "run-config", "configMap": {"name": config_map}})
    container = {
        "name": f"ray-{role}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        # Credentials only by reference: every key of the Secret becomes an environment variable.
        "envFrom": [{"secretRef": {"name": req.secret}}],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    return {
        "metadata": {"labels": labels | {"app.kubernetes.io/component": f"ray-{role}"}},
        "spec": {
            # A preempted pod gets SIGTERM, then this long to save a checkpoint before SIGKILL.
            "terminationGracePeriodSeconds": grace_s,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [container],
            "volumes": volumes,
        },
    }


def cluster_spec(cfg: Config, req: K8sRequest, labels: dict[str, str], config_map: str | None) -> dict[str, Any]:
    """The RayCluster spec (also a RayJob's rayClusterSpec): one head pod and a group of worker pods, with the
    ConfigMap `config_map` (if any) mounted at /config."""
    rt = cfg.runtime
    workers = req.workers or rt.num_workers
    cpus = req.cpus or str(max(1, math.ceil(rt.cpus_per_worker)))
    gpus = req.gpus if req.gpus is not None else (1 if rt.use_gpu else 0)
    if workers * _cpu_value(cpus) < rt.num_workers * rt.cpus_per_worker:
        raise LaunchError(f"--workers {workers} x --cpus {cpus} is less than runtime.num_workers x cpus_per_worker "
                          f"= {rt.num_workers} x {rt.cpus_per_worker:g}: the run could never be scheduled")
    if rt.use_gpu and workers * gpus < rt.num_workers:
        raise LaunchError(f"runtime.use_gpu needs {rt.num_workers} GPU(s) but --workers {workers} x --gpus {gpus} "
                          f"gives {workers * gpus}")
    image = req.image or f"pagoda-dist:{project_version()}"
    grace_s = math.ceil(rt.sigterm_grace_s) + GRACE_MARGIN_S
    return {
        "rayVersion": RAY_VERSION,
        # Ray token authentication: KubeRay (>= 1.5.1) generates the token into a Secret and gives it to every
        # Ray container; without it Ray 2.60's head turns token auth on by itself and the workers cannot join.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            # num-cpus 0: no training tasks on the head; it runs GCS, dashboard and the driver only.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod_template("head", req, image, _resources(req.head_cpus, req.head_memory, 0), grace_s,
                                      config_map, labels),
        },
        "workerGroupSpecs": [{
            "groupName": "workers",
            "replicas": workers,
            "minReplicas": workers,
            "maxReplicas": workers,
            "rayStartParams": {},
            "template": _pod_template("worker", req, image, _resources(cpus, req.memory, gpus), grace_s,
                                      config_map, labels),
        }],
    }


def _cpu_value(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def resolved_config_yaml(cfg: Config) -> str:
    """The run's config with every default spelled out and ray_address=auto (the driver joins its cluster)."""
    data = to_dict(cfg)
    data["runtime"]["ray_address"] = "auto"
    return yaml.safe_dump(data, sort_keys=False)


def manifests(req: K8sRequest) -> list[dict[str, Any]]:
    """The manifests for `req`, in apply order: [ConfigMap, RayJob] or [RayCluster]."""
    _check(req)
    cfg = load_checked_config(req.config, req.overrides)
    if req.cluster_only:
        name = req.name or "pagoda-cluster"
        labels = {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/instance": name}
        meta = {"name": name, "namespace": req.namespace, "labels": dict(labels)}
        return [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta,
                 "spec": cluster_spec(cfg, req, labels, config_map=None)}]
    name = req.name or dns_name(f"pagoda-{cfg.run.name}")
    labels = {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/instance": name}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": req.namespace, "labels": dict(labels)},
        "data": {CONFIG_KEY: resolved_config_yaml(cfg)},
    }
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": req.namespace, "labels": dict(labels)},
        "spec": {
            "entrypoint": f"pagoda run {CONFIG_MOUNT}/{CONFIG_KEY}",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": req.ttl_s,
            "activeDeadlineSeconds": req.deadline_s,
            "backoffLimit": req.backoff_limit,
            "rayClusterSpec": cluster_spec(cfg, req, labels, config_map=f"{name}-config"),
        },
    }
    return [config_map, job]


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the config in the ConfigMap) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(docs: list[dict[str, Any]], header: str = "") -> str:
    """Multi-document YAML for `kubectl apply -f -`, optionally after a comment `header`."""
    return header + "---\n".join(yaml.dump(d, Dumper=_BlockDumper, sort_keys=False) for d in docs)

"""Checks KubeRay manifests before they reach a cluster (none can run here, and `kubectl --dry-run` needs one).

Three layers, each naming the offending field:
1. RayJob / RayCluster against the project's JSON Schemas (launchers/k8s/*.schema.json), which also encode the
   secret rules: every container references the S3 credentials Secret, no credential is written inline.
2. The head and worker pod templates, wrapped as Pod objects, and any ConfigMap against the core Kubernetes
   schemas (kubernetes-validate, strict: unknown fields are errors).
3. What a schema cannot see: secrets inside runtimeEnvYAML, a termination grace period shorter than the run's
   SIGTERM budget, a ConfigMap holding credential-like keys.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pagoda_dist.launch.common import LAUNCHERS_DIR, LaunchError, is_secret_name
from pagoda_dist.launch.k8s import CONFIG_KEY, GRACE_MARGIN_S

SCHEMA_DIR = LAUNCHERS_DIR / "k8s"
SCHEMA_FILES = {"RayJob": "rayjob.schema.json", "RayCluster": "raycluster.schema.json"}
K8S_VERSION = "1.31"  # core schema version checked (kubernetes-validate bundles 1.x up to its release)


class ManifestError(LaunchError):
    """A manifest breaks a rule; `problems` lists each as 'DOC.field.path: what is wrong'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid Kubernetes manifest:\n  " + "\n  ".join(problems))


def _path(prefix: str, parts: Iterable[Any]) -> str:
    out = prefix
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@cache
def _validator(kind: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    resources = []
    for name in SCHEMA_FILES.values():
        path = SCHEMA_DIR / name
        if not path.is_file():
            raise LaunchError(f"schema {path} not found: run from a source checkout of pagoda-dist")
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    schema = json.loads((SCHEMA_DIR / SCHEMA_FILES[kind]).read_text())
    return jsonschema.Draft202012Validator(schema, registry=Registry().with_resources(resources))


def _schema_problems(doc: dict[str, Any], where: str) -> list[str]:
    errors = sorted(_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for err in errors:
        message = err.schema.get("errorMessage", err.message) if isinstance(err.schema, dict) else err.message
        out.append(f"{_path(where, err.absolute_path)}: {message}")
    return out


def _core_problems(obj: dict[str, Any], where: str) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        raise LaunchError("core Kubernetes checks need the `kubernetes-validate` package (pip install "
                          "kubernetes-validate; it is in the project's [test] extra)") from None
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{_path(where, err.absolute_path)}: {err.message}"]
    return []


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, pod template) for the head and every worker group of a RayJob or RayCluster."""
    spec = doc.get("spec") or {}
    base = "spec"
    if doc.get("kind") == "RayJob":
        spec, base = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    out = []
    head = (spec.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        out.append((f"{base}.headGroupSpec.template", head))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            out.append((f"{base}.workerGroupSpecs[{i}].template", group["template"]))
    return out


def _as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    meta = dict(template.get("metadata") or {})
    meta.setdefault("name", name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec")}


def _extra_problems(doc: dict[str, Any], where: str, min_grace_s: int | None) -> list[str]:
    out = []
    if doc.get("kind") == "RayJob":
        runtime_env = (doc.get("spec") or {}).get("runtimeEnvYAML")
        if runtime_env:
            env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars") or {}
            out += [f"{where}.spec.runtimeEnvYAML.env_vars.{k}: a credential written inline; give the pods a "
                    "Secret (envFrom.secretRef) instead" for k in env_vars if is_secret_name(str(k))]
    if doc.get("kind") == "ConfigMap":
        out += [f"{where}.data.{k}: a credential-like key in a ConfigMap; credentials go in a Secret"
                for k in (doc.get("data") or {}) if is_secret_name(str(k))]
    if min_grace_s is not None:
        for path, template in _pod_templates(doc):
            grace = (template.get("spec") or {}).get("terminationGracePeriodSeconds")
            if isinstance(grace, int) and grace < min_grace_s:
                out.append(f"{where}.{path}.spec.terminationGracePeriodSeconds: {grace} s is shorter than the run's "
                           f"SIGTERM budget + margin ({min_grace_s} s): a preempted pod would die before saving")
    return out


def _grace_from_config_maps(docs: list[dict[str, Any]]) -> int | None:
    """The shortest grace period the runs in these manifests need, from their ConfigMaps' run.yaml."""
    needs = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and CONFIG_KEY in (doc.get("data") or {}):
            try:
                grace = (yaml.safe_load(doc["data"][CONFIG_KEY]) or {}).get("runtime", {}).get("sigterm_grace_s")
            except (yaml.YAMLError, AttributeError):
                continue
            if isinstance(grace, (int, float)):
                needs.append(math.ceil(grace) + GRACE_MARGIN_S)
    return max(needs) if needs else None


def validate_manifests(docs: list[dict[str, Any]], min_grace_s: int | None = None, core: bool = True) -> None:
    """Raises ManifestError listing every problem in `docs` (ConfigMaps, RayJobs, RayClusters). Without
    `min_grace_s`, the grace periods are checked against the run configs found in the ConfigMaps, if any."""
    problems: list[str] = []
    if min_grace_s is None:
        min_grace_s = _grace_from_config_maps(docs)
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc:
            problems.append(f"document {i}: not a Kubernetes object (no `kind`)")
            continue
        kind = doc["kind"]
        where = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
        if kind in SCHEMA_FILES:
            problems += _schema_problems(doc, where)
            if core:
                for path, template in _pod_templates(doc):
                    problems += _core_problems(_as_pod(template, "pod"), f"{where}.{path}")
        elif kind == "ConfigMap":
            if core:
                problems += _core_problems(doc, where)
        else:
            problems.append(f"{where}: unexpected kind {kind!r} (expected ConfigMap, RayJob or RayCluster)")
        problems += _extra_problems(doc, where, min_grace_s)
    if problems:
        raise ManifestError(problems)


def validate_files(paths: list[str | Path], core: bool = True) -> int:
    """Validates YAML files of manifests; returns how many documents were checked."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        try:
            docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as err:
            raise LaunchError(f"{path}: cannot read YAML: {err}") from None
    validate_manifests(docs, core=core)
    return len(docs)

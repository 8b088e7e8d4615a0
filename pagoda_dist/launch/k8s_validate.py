"""Checks KubeRay manifests before they reach a cluster (none can run here, and `kubectl --dry-run` needs one).

Three layers, each naming the offending field:
1. RayJob / RayCluster against KubeRay's own schema: the openAPIV3Schema of the ray.io/v1 CRDs, kept in
   launchers/k8s/kuberay-*.v1.schema.json (source, commit and license in each file's header). As with
   `kubectl apply` (strict field validation), an unknown field is an error; KubeRay's CEL rules
   (x-kubernetes-validations, mostly about updates and status) are not evaluated.
2. The head and worker pod templates, wrapped as Pod objects, and any ConfigMap against the core Kubernetes
   schemas (kubernetes-validate, strict: unknown fields are errors).
3. The project's rules, which no schema holds: every Ray container references the S3 credentials Secret, no
   credential is written inline (env values, runtimeEnvYAML, ConfigMap keys), a termination grace period long
   enough to checkpoint, object names KubeRay accepts.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pagoda_dist.launch.common import LAUNCHERS_DIR, LaunchError, is_secret_name
from pagoda_dist.launch.k8s import CONFIG_KEY, GRACE_MARGIN_S

SCHEMA_DIR = LAUNCHERS_DIR / "k8s"
SCHEMA_FILES = {"RayJob": "kuberay-rayjob.v1.schema.json", "RayCluster": "kuberay-raycluster.v1.schema.json"}
K8S_VERSION = "1.31"  # core schema version checked (kubernetes-validate bundles 1.x up to its release)
API_VERSION = "ray.io/v1"
# KubeRay's own limits (ray-operator utils: MaxRayClusterNameLength 53, MaxRayJobNameLength 53 - 6): longer names
# are refused by the operator, whose derived names (head service, pods) would not fit in 63 characters.
MAX_NAME = {"RayJob": 47, "RayCluster": 53}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # what KubeRay requires of RayJob/RayCluster names
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # namespaces
MIN_GRACE_S = 30  # Kubernetes' default: anything shorter leaves no time for a checkpoint
# Environment variable names that hold credentials (never with a plain `value` in a pod template).
SECRET_ENV = re.compile(r"(?i)(secret|password|passwd|token|access_key|credential|api_key|private_key)")
SUBMITTER = "spec.submitterPodTemplate"  # a RayJob's submitter pod: no Ray node, no S3 access needed
SECRET_HINT = ("no reference to the S3 credentials Secret: add envFrom: [{secretRef: {name: SECRET}}] (or env "
               "AWS_SECRET_ACCESS_KEY with valueFrom.secretKeyRef)")


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


def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of KubeRay's ray.io/v1 CRD for `kind`, as stored in launchers/k8s/."""
    path = SCHEMA_DIR / SCHEMA_FILES[kind]
    if not path.is_file():
        raise LaunchError(f"schema {path} not found: run from a source checkout of pagoda-dist")
    return json.loads(path.read_text())["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema (OpenAPI v3) as a JSON Schema with the API server's meaning: an object with
    `properties` takes no other field (unless x-kubernetes-preserve-unknown-fields), `nullable` admits null."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    open_object = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def _validator(kind: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(to_json_schema(crd_schema(kind)))


def _schema_problems(doc: dict[str, Any], where: str) -> list[str]:
    kind = doc["kind"]
    if doc.get("apiVersion") != API_VERSION:
        return [f"{where}.apiVersion: {doc.get('apiVersion')!r}: only {API_VERSION} {kind}s are checked"]
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for err in errors:
        at = _path(where, err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False and isinstance(err.instance, dict):
            known = err.schema.get("properties") or {}
            out += [f"{at}.{name}: unknown field: KubeRay's {kind} (ray.io/v1) has no such field"
                    for name in err.instance if name not in known]
            continue
        message = err.message
        if "rayStartParams" in err.absolute_path and err.validator == "type":
            message += " (rayStartParams values must be strings: KubeRay passes them to `ray start`, e.g. " \
                       "num-cpus: \"0\")"
        out.append(f"{at}: {message}")
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


def _pod_templates(doc: dict[str, Any], submitter: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(field path, pod template) for the head and every worker group of a RayJob or RayCluster (the Ray pods),
    and with `submitter` also a RayJob's spec.submitterPodTemplate."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    job_spec, base = spec, "spec"
    if doc.get("kind") == "RayJob":
        spec, base = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
        spec = spec if isinstance(spec, dict) else {}
    out = []
    head = (spec.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        out.append((f"{base}.headGroupSpec.template", head))
    groups = spec.get("workerGroupSpecs")
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            out.append((f"{base}.workerGroupSpecs[{i}].template", group["template"]))
    if submitter and doc.get("kind") == "RayJob" and isinstance(job_spec.get("submitterPodTemplate"), dict):
        out.append((SUBMITTER, job_spec["submitterPodTemplate"]))
    return out


def _as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    meta = dict(template.get("metadata") or {})
    meta.setdefault("name", name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec")}


def _references_secret(container: dict[str, Any]) -> bool:
    """Whether the container takes the S3 credentials from a Secret (envFrom.secretRef, or the secret key by
    valueFrom.secretKeyRef)."""
    for source in container.get("envFrom") or []:
        if isinstance(source, dict) and isinstance(source.get("secretRef"), dict) and source["secretRef"].get("name"):
            return True
    return any(isinstance(e, dict) and e.get("name") == "AWS_SECRET_ACCESS_KEY"
               and isinstance(e.get("valueFrom"), dict) and "secretKeyRef" in e["valueFrom"]
               for e in container.get("env") or [])


def _pod_problems(template: dict[str, Any], at: str, ray_pod: bool, min_grace_s: int | None) -> list[str]:
    """The project's rules for one pod template at field path `at`: credentials only by reference; for the Ray
    pods also a Secret reference in every container and a grace period long enough to checkpoint."""
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return []
    out = []
    for field in ("initContainers", "containers"):
        containers = spec.get(field)
        for i, container in enumerate(containers if isinstance(containers, list) else []):
            if not isinstance(container, dict):
                continue
            env = container.get("env")
            for j, var in enumerate(env if isinstance(env, list) else []):
                if isinstance(var, dict) and "value" in var and SECRET_ENV.search(str(var.get("name", ""))):
                    out.append(f"{at}.spec.{field}[{i}].env[{j}]: a credential written inline ({var['name']}): take "
                               "it from a Secret (valueFrom.secretKeyRef or envFrom.secretRef), never a plain value")
            if ray_pod and field == "containers" and not _references_secret(container):
                out.append(f"{at}.spec.containers[{i}]: {SECRET_HINT}")
    if ray_pod:
        grace = spec.get("terminationGracePeriodSeconds")
        where = f"{at}.spec.terminationGracePeriodSeconds"
        if grace is None:
            out.append(f"{where}: missing: a preempted pod needs time to save a checkpoint (runtime.sigterm_grace_s "
                       f"+ {GRACE_MARGIN_S} s; Kubernetes' default {MIN_GRACE_S} s is the least accepted)")
        elif isinstance(grace, int) and min_grace_s is not None and grace < min_grace_s:
            out.append(f"{where}: {grace} s is shorter than the run's SIGTERM budget + margin ({min_grace_s} s): a "
                       "preempted pod would die before saving")
        elif isinstance(grace, int) and grace < MIN_GRACE_S:
            out.append(f"{where}: {grace} s: must be >= {MIN_GRACE_S}: a preempted pod needs time to save a "
                       "checkpoint (runtime.sigterm_grace_s + a margin)")
    return out


def _metadata_problems(doc: dict[str, Any], where: str) -> list[str]:
    """Names KubeRay accepts (the CRD schema leaves metadata to the API server, which only sees it in a cluster)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return [f"{where}.metadata: missing (it needs at least a name)"]
    kind, name, out = doc["kind"], meta.get("name"), []
    if not isinstance(name, str) or not name:
        out.append(f"{where}.metadata.name: missing")
    elif len(name) > MAX_NAME[kind] or not DNS_1035.match(name):
        out.append(f"{where}.metadata.name: {name!r}: KubeRay needs a DNS-1035 label (lowercase letters, digits and "
                   f"'-', starting with a letter) of at most {MAX_NAME[kind]} characters for a {kind}")
    namespace = meta.get("namespace")
    if namespace is not None and not (isinstance(namespace, str) and len(namespace) <= 63
                                      and DNS_1123.match(namespace)):
        out.append(f"{where}.metadata.namespace: {namespace!r} is not a DNS-1123 label")
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is not None and not (isinstance(values, dict) and all(isinstance(v, str) for v in values.values())):
            out.append(f"{where}.metadata.{field}: must map names to strings (quote numbers and booleans)")
    return out


def _extra_problems(doc: dict[str, Any], where: str, min_grace_s: int | None) -> list[str]:
    out = []
    kind = doc.get("kind")
    if kind == "RayJob":
        runtime_env = (doc.get("spec") or {}).get("runtimeEnvYAML")
        if isinstance(runtime_env, str) and runtime_env.strip():
            try:
                parsed = yaml.safe_load(runtime_env)
            except yaml.YAMLError as err:
                parsed = None
                out.append(f"{where}.spec.runtimeEnvYAML: not valid YAML: {err}")
            env_vars = parsed.get("env_vars") if isinstance(parsed, dict) else None
            out += [f"{where}.spec.runtimeEnvYAML.env_vars.{k}: a credential written inline; give the pods a "
                    "Secret (envFrom.secretRef) instead" for k in (env_vars if isinstance(env_vars, dict) else {})
                    if is_secret_name(str(k))]
    if kind == "ConfigMap":
        out += [f"{where}.data.{k}: a credential-like key in a ConfigMap; credentials go in a Secret"
                for k in (doc.get("data") or {}) if is_secret_name(str(k))]
    if kind in SCHEMA_FILES:
        out += _metadata_problems(doc, where)
        for path, template in _pod_templates(doc, submitter=True):
            out += _pod_problems(template, f"{where}.{path}", path != SUBMITTER, min_grace_s)
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
        meta = doc.get("metadata")
        where = f"{kind}/{meta.get('name', '?') if isinstance(meta, dict) else '?'}"
        if kind in SCHEMA_FILES:
            problems += _schema_problems(doc, where)
            if core:
                for path, template in _pod_templates(doc, submitter=True):
                    problems += _core_problems(_as_pod(template, "pod"), f"{where}.{path}")
        elif kind == "ConfigMap":
            if core:
                problems += _core_problems(doc, where)
        else:
            problems.append(f"{where}: unexpected kind {kind!r} (expected ConfigMap, RayJob or RayCluster)")
        problems += _extra_problems(doc, where, min_grace_s)
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))  # a field both schemas reject is named once


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

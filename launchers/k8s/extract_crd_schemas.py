"""Writes the KubeRay CRD schemas that `pagoda launch check-k8s` validates RayJob/RayCluster manifests against.

Each output file holds the `openAPIV3Schema` of the ray.io/v1 version of one KubeRay CustomResourceDefinition,
unchanged, under a header naming its source, the KubeRay commit and the license. To move to another KubeRay
version, take the CRDs from that commit of https://github.com/ray-project/kuberay and rerun:

    git -C kuberay show COMMIT:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > /tmp/ray.io_rayjobs.yaml
    git -C kuberay show COMMIT:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > /tmp/ray.io_rayclusters.yaml
    python launchers/k8s/extract_crd_schemas.py --commit COMMIT --version "v1.7.0 (...)" \
        /tmp/ray.io_rayjobs.yaml /tmp/ray.io_rayclusters.yaml

then run tests/test_launch.py -k k8s (the generated manifests must still pass).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUTPUT = {"RayJob": "kuberay-rayjob.v1.schema.json", "RayCluster": "kuberay-raycluster.v1.schema.json"}
REPO = "https://github.com/ray-project/kuberay"


def extract(crd_path: Path, commit: str, version: str) -> tuple[str, str]:
    """(kind, file text) for one CRD file."""
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    kind = crd["spec"]["names"]["kind"]
    if crd["spec"]["group"] != "ray.io" or kind not in OUTPUT:
        raise SystemExit(f"{crd_path}: not a ray.io RayJob/RayCluster CRD")
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1"]
    source = f"ray-operator/config/crd/bases/{crd_path.name}"
    header = {
        "$comment": f"The openAPIV3Schema of KubeRay's ray.io/v1 {kind} CustomResourceDefinition, unchanged "
                    f"(only this part of the CRD is kept). Written by launchers/k8s/extract_crd_schemas.py.",
        "source": f"{REPO}/blob/{commit}/{source}",
        "kuberay": f"{version}, commit {commit}",
        "license": "Apache-2.0, Copyright The KubeRay Authors; the license text is LICENSE-kuberay.txt beside "
                   "this file",
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    # The schema on one line keeps the file small (no indentation); it is data, regenerated rather than edited.
    lines.append(f"  \"openAPIV3Schema\": {json.dumps(schema, separators=(',', ':'), sort_keys=True)}")
    return kind, "{\n" + "\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crds", nargs="+", type=Path, help="ray.io_rayjobs.yaml / ray.io_rayclusters.yaml")
    parser.add_argument("--commit", required=True, help="the KubeRay commit the CRDs come from (40 hex digits)")
    parser.add_argument("--version", required=True, help='what that commit is, e.g. "main after v1.7.0-rc.0"')
    args = parser.parse_args()
    for path in args.crds:
        kind, text = extract(path, args.commit, args.version)
        out = HERE / OUTPUT[kind]
        out.write_text(text)
        print(f"{kind}: {out} ({len(text) // 1024} KiB)")


if __name__ == "__main__":
    main()

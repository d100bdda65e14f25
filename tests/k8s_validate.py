"""Render the Kubernetes kit with kustomize and validate every object strictly, offline.

``python -m tests.k8s_validate [DIR ...]`` (``make k8s-validate``) builds each kustomization
(by default the base and every overlay) with the pinned ``kustomize`` that ``make k8s-tools``
installs into .venv/bin, and checks each rendered object against the JSON schema of its
kind and API version:

- core kinds with the strict schemas that the ``kubernetes-validate`` package ships for
  :data:`KUBERNETES_VERSION` (every object ``additionalProperties: false``: a misspelt or
  misplaced field fails, as ``kubeconform -strict`` would fail it);
- the CRD kinds of the optional components (ServiceMonitor, ScaledObject, KafkaTopic) with
  the schemas in deploy/k8s/schemas, made by ``--import-crd`` from the operators' own CRDs
  in the same strict form (deploy/k8s/schemas/SOURCES.md says which release of each),
  their ``metadata`` checked as a core ObjectMeta.

A kind with no schema is an error, never a pass. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
KUSTOMIZATIONS = (
    K8S / "base",
    K8S / "overlays" / "example",
    K8S / "overlays" / "production",
)
# The oldest Kubernetes the kit is written for (topologySpreadConstraints' matchLabelKeys
# and the PDB's unhealthyPodEvictionPolicy are on by default from 1.27 and GA by 1.32).
KUBERNETES_VERSION = "1.32"
DEFINITIONS = "/api/_definitions.json"
OBJECT_META = f"{DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class ToolMissingError(RuntimeError):
    pass


def kustomize() -> str:
    """The pinned kustomize installed by ``make k8s-tools`` (never one from elsewhere)."""
    path = Path(sys.executable).parent / "kustomize"
    if not path.exists():
        raise ToolMissingError(f"{path} is missing: run `make k8s-tools`")
    return str(path)


def render(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build`` of one kustomization: its objects, in order."""
    done = subprocess.run(
        [kustomize(), "build", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def _schema_file_name(kind: str, api_version: str) -> str:
    """kubernetes-validate's naming: ``deployment-apps-v1.json``, ``service-v1.json``."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


@cache
def _core_dir() -> Path:
    try:
        import kubernetes_validate  # noqa: PLC0415
    except ImportError as e:
        raise ToolMissingError("kubernetes-validate is not installed: run `make k8s-tools`") from e
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = sorted(base.glob(f"v{KUBERNETES_VERSION}.*-local-strict"))
    if not found:
        raise ToolMissingError(f"kubernetes-validate has no schemas for {KUBERNETES_VERSION}")
    return found[-1]


@cache
def _registry() -> Registry[Any]:
    definitions = json.loads((_core_dir() / "_definitions.json").read_text("utf-8"))
    return Registry().with_resource(DEFINITIONS, Resource.from_contents(definitions))


@cache
def _validator(kind: str, api_version: str) -> jsonschema.protocols.Validator | None:
    name = _schema_file_name(kind, api_version)
    for directory in (SCHEMAS, _core_dir()):
        path = directory / name
        if path.exists():
            schema = json.loads(path.read_text("utf-8"))
            cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
            return cls(schema, registry=_registry())
    return None


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def problems(doc: dict[str, Any]) -> list[Problem]:
    """Why one rendered object would not pass a strict schema validation (none: it passes)."""
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{kind}/{name} ({api_version})"
    if not isinstance(kind, str) or not isinstance(api_version, str):
        return [Problem(where, "no kind or apiVersion")]
    validator = _validator(kind, api_version)
    if validator is None:
        return [Problem(where, "no schema for this kind and version: cannot be validated")]
    return [
        Problem(where, f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


# -- importing a CRD's schema ------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """openapi2jsonschema's strict form: every object schema that lists its properties
    allows no others (unless it keeps unknown fields on purpose)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def crd_schemas(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name → strict JSON schema, for each served version of a CRD."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out: dict[str, dict[str, Any]] = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        api_version = f"{group}/{version['name']}"
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"type": "string", "enum": [api_version]}
        properties["kind"] = {"type": "string", "enum": [kind]}
        properties["metadata"] = {"$ref": OBJECT_META}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        schema["additionalProperties"] = False
        out[_schema_file_name(kind, api_version)] = schema
    return out


def _import_crd(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text("utf-8")):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            for name, schema in crd_schemas(doc).items():
                (SCHEMAS / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                print(f"wrote {(SCHEMAS / name).relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s_validate", description=__doc__)
    parser.add_argument("dirs", nargs="*", type=Path, help="kustomizations (default: all)")
    parser.add_argument("--import-crd", type=Path, action="append", default=[], metavar="YAML")
    args = parser.parse_args(argv)
    if args.import_crd:
        for path in args.import_crd:
            _import_crd(path)
        return 0
    failed = 0
    for directory in args.dirs or KUSTOMIZATIONS:
        docs = render(directory)
        found = [p for doc in docs for p in problems(doc)]
        for problem in found:
            print(f"{directory}: {problem}")
        status = "FAIL" if found else "ok"
        print(
            f"{status}  {directory}: {len(docs)} objects, strict schemas of Kubernetes "
            f"{KUBERNETES_VERSION}"
        )
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

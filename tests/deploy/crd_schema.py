"""Turn CustomResourceDefinition YAML into kubeconform JSON schemas.

Does what kubeconform's openapi2jsonschema.py does, in a few lines: one file
per (kind, version) named ``<kind>_<version>.json`` (kubeconform's
``{{.ResourceKind}}_{{.ResourceAPIVersion}}`` template), with
``additionalProperties: false`` added to every object schema that lists its
properties and does not preserve unknown fields (strict mode), and Kubernetes'
``x-kubernetes-int-or-string`` turned into a JSON-schema type union.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml


def _strict(node):
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


def convert(crd_files: list[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in crd_files:
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            kind = crd["spec"]["names"]["kind"].lower()
            for ver in crd["spec"]["versions"]:
                schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
                schema = _strict(schema)
                # kubeconform checks apiVersion/kind itself; metadata is free-form here.
                path = out_dir / f"{kind}_{ver['name']}.json"
                path.write_text(json.dumps(schema, indent=1))
                written.append(path)
    return written

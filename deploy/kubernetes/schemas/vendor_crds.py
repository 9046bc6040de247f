"""Vendor the ``openAPIV3Schema`` of a CustomResourceDefinition as JSON.

    python deploy/kubernetes/schemas/vendor_crds.py CRD.yaml VERSION OUT.json --source "REPO TAG PATH"

Keeps what a manifest is checked against (tests/unit/deploy/
test_kubernetes_manifests.py): the schema of one served version without
``status`` (written by the operator, never by a manifest) and without the
descriptions (most of the upstream bytes, and no check reads them). KubeRay
embeds the same PodTemplateSpec schema for the head, each worker group and a
RayJob's submitter; it is kept once, under ``definitions``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def strip_descriptions(schema):
    """``schema`` without its ``description`` annotations; a property that
    happens to be named ``description`` stays."""
    if isinstance(schema, list):
        return [strip_descriptions(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: strip_descriptions(s) for name, s in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def share_pod_templates(schema: dict) -> dict:
    """Replace each copy of the first pod template schema found by a ``$ref``."""
    shared: dict = {}

    def walk(node):
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        props = node.get("properties", {})
        if "containers" in props.get("spec", {}).get("properties", {}) and "metadata" in props:
            if shared.setdefault("PodTemplateSpec", node) == node:
                return {"$ref": "#/definitions/PodTemplateSpec"}
            return node
        return {key: walk(value) for key, value in node.items()}

    out = walk(schema)
    if shared:
        out["definitions"] = shared
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crd", help="the CustomResourceDefinition (YAML)")
    parser.add_argument("version", help="the served version to keep, e.g. v1")
    parser.add_argument("out", help="where to write the JSON schema")
    parser.add_argument("--source", required=True, help="repository, tag and path, recorded in the output")
    args = parser.parse_args()
    crd = yaml.safe_load(Path(args.crd).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    schema = share_pod_templates(schema)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out = {"$comment": f"{group}/{args.version} {kind}: openAPIV3Schema of {args.source}", **schema}
    Path(args.out).write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()

"""Offline checks of Kubernetes manifests: core kinds through kubernetes-validate (the API's bundled
OpenAPI schemas, strict, no cluster), Prometheus Operator kinds through subsets of their CRD schemas,
which kubernetes-validate does not know. Shared by tests/stack/test_deploy.py and test_fleet_deploy.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

K8S_VERSION = "1.30"  # native sidecars (initContainers[].restartPolicy) need 1.28+

LABELS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": LABELS, "matchExpressions": {"type": "array"}},
}


def crd(api_version: str, metadata: dict[str, Any], spec: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A custom resource's schema: apiVersion, metadata and a closed spec (a misspelt field fails)."""
    spec_schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": spec}
    if required:
        spec_schema["required"] = required
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "metadata": metadata, "spec": spec_schema},
    }


def validate(doc: dict[str, Any], where: str, crd_schemas: Mapping[str, dict[str, Any]]) -> None:
    """Raise (naming ``where`` and the object) if ``doc`` is not a valid object of its kind."""
    import kubernetes_validate

    kind = doc["kind"]
    if kind in crd_schemas:
        jsonschema.validate(doc, crd_schemas[kind])
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where} {kind}/{doc['metadata']['name']}: {exc.message}") from None

"""deploy/fleet/: the Kubernetes equivalents of the fleet reference setup validate offline, and say the
same as the files the live fleet test runs (tests/stack/test_fleet.py): the same flags, rule files, shard
relabelling and Alertmanager cluster size.

Core kinds are checked with kubernetes-validate (bundled OpenAPI schemas, strict: a misspelt field
fails); the Prometheus Operator kinds (PrometheusAgent, Alertmanager) against subsets of their CRD
schemas below, for the fields used here. Nothing here ran on a real cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from harness.fleet_stack import FLEET_DIR, agent_config, read_args, shard_of
from harness.k8s_schema import LABELS, SELECTOR, crd, validate
from harness.support import REPO_ROOT

K8S = FLEET_DIR / "kubernetes"
NAMESPACE = "gpu-monitoring"

_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "namespace": {"const": NAMESPACE}, "labels": LABELS},
}
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"requests": LABELS, "limits": LABELS},
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_REMOTE_WRITE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://"},
        "queueConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "capacity": {"type": "integer"},
                "maxShards": {"type": "integer"},
                "minShards": {"type": "integer"},
                "maxSamplesPerSend": {"type": "integer"},
                "batchSendDeadline": _DURATION,
            },
        },
        "metadataConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"send": {"type": "boolean"}, "sendInterval": _DURATION},
        },
    },
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    # monitoring.coreos.com/v1alpha1 PrometheusAgent (prometheus-operator v0.64+), fields used here.
    "PrometheusAgent": crd(
        "monitoring.coreos.com/v1alpha1",
        _META,
        {
            "shards": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1},
            "scrapeInterval": _DURATION,
            "serviceAccountName": {"type": "string"},
            "serviceMonitorSelector": SELECTOR,
            "serviceMonitorNamespaceSelector": SELECTOR,
            "podMonitorSelector": SELECTOR,
            "enforcedSampleLimit": {"type": "integer", "minimum": 1},
            "resources": _RESOURCES,
            "remoteWrite": {"type": "array", "minItems": 1, "items": _REMOTE_WRITE},
        },
        required=["remoteWrite"],
    ),
    # monitoring.coreos.com/v1 Alertmanager, fields used here.
    "Alertmanager": crd(
        "monitoring.coreos.com/v1",
        _META,
        {
            "replicas": {"type": "integer", "minimum": 1},
            "clusterPeerTimeout": _DURATION,
            "retention": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
            "resources": _RESOURCES,
        },
    ),
}


def objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container_args(kind: str, name: str) -> list[str]:
    return list(one(kind, name)["spec"]["template"]["spec"]["containers"][0]["args"])


def test_every_fleet_manifest_validates() -> None:
    kinds = set()
    for fname, doc in objects():
        kinds.add(doc["kind"])
        validate(doc, fname, CRD_SCHEMAS)
    assert {"PrometheusAgent", "Alertmanager", "StatefulSet", "Deployment", "Service"} <= kinds
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_schema_validation_catches_mistakes() -> None:
    agent = yaml.safe_load(yaml.safe_dump(one("PrometheusAgent")))
    agent["spec"]["shard"] = 2  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(agent, CRD_SCHEMAS["PrometheusAgent"])
    am = yaml.safe_load(yaml.safe_dump(one("Alertmanager")))
    am["spec"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(am, CRD_SCHEMAS["Alertmanager"])


def test_kubernetes_flags_are_the_reference_flags() -> None:
    """The StatefulSet and Deployment run exactly deploy/fleet/*.args, with cluster addresses."""
    vm = "http://victoria-metrics.gpu-monitoring.svc:8428"
    assert container_args("StatefulSet", "victoria-metrics") == read_args(
        "victoria-metrics.args", {"DATA_DIR": "/storage", "LISTEN": ":8428"})
    replicas = one("Alertmanager")["spec"]["replicas"]
    members = [f"http://alertmanager-gpu-fleet-{i}.alertmanager-operated.gpu-monitoring.svc:9093"
               for i in range(replicas)]
    reference = read_args("vmalert.args", {
        "LISTEN": ":8880", "VM_URL": vm, "ALERTS_DIR": "/etc/vmalert/rules",
        "EXTERNAL_URL": "http://vmalert.gpu-monitoring.svc:8880",
        "ALERTMANAGER_1": members[0], "ALERTMANAGER_2": members[-1],
    })
    assert container_args("Deployment", "vmalert") == reference
    # Every member is notified directly; the rule files are the shipped ones.
    args = container_args("Deployment", "vmalert")
    assert [a.split("=", 1)[1] for a in args if a.startswith("-notifier.url=")] == members
    for rule in (a.split("=", 1)[1] for a in args if a.startswith("-rule=")):
        assert (REPO_ROOT / "alerts" / Path(rule).name).is_file(), rule
    agent = one("PrometheusAgent")["spec"]
    assert agent["remoteWrite"][0]["url"] == vm + "/api/v1/write"
    assert agent["shards"] >= 2 and replicas == 2


def test_agents_select_the_shipped_service_monitor_and_keep_the_series_budget() -> None:
    agent = one("PrometheusAgent")["spec"]
    monitor = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "servicemonitor.yaml").read_text())
    assert agent["serviceMonitorSelector"]["matchLabels"].items() <= monitor["metadata"]["labels"].items()
    reference = yaml.safe_load(agent_config(0, 2, Path("t.json"), "http://vm/api/v1/write", "a:1", fast=False))
    exporter_job = next(j for j in reference["scrape_configs"] if j["job_name"] == "gpu-exporter")
    assert agent["enforcedSampleLimit"] == exporter_job["sample_limit"]
    queue = reference["remote_write"][0]["queue_config"]
    assert agent["remoteWrite"][0]["queueConfig"] == {
        "capacity": queue["capacity"], "maxShards": queue["max_shards"],
        "maxSamplesPerSend": queue["max_samples_per_send"], "batchSendDeadline": queue["batch_send_deadline"],
    }


def test_reference_agent_config_shards_by_hashmod() -> None:
    """deploy/fleet/agent.yml: every shard keeps its own remainder of the same hashmod, nothing else."""
    for shard in range(3):
        config = yaml.safe_load(agent_config(shard, 3, Path("t.json"), "http://vm/api/v1/write", "a:1", fast=False))
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "gpu-exporter")
        hashmod, keep = job["relabel_configs"]
        assert hashmod == {"source_labels": ["__address__"], "modulus": 3, "target_label": "__tmp_shard",
                           "action": "hashmod"}
        assert keep == {"source_labels": ["__tmp_shard"], "regex": str(shard), "action": "keep"}
        assert job["honor_labels"] is True and "external_labels" not in config["global"]
    # The test helper agrees with Prometheus on a known address (checked live in tests/stack/test_fleet.py).
    assert {shard_of(f"10.0.0.{i}:9835", 3) for i in range(30)} == {0, 1, 2}

"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas, the PrometheusRule is the
shipped rules, the compose file wires what the sidecar needs, and the Dockerfile keeps its promises.

Kubernetes core objects are checked with kubernetes-validate (the API's OpenAPI schemas, bundled, no
cluster needed) in strict mode, so a misspelt field fails. The Prometheus Operator kinds are CRDs that
kubernetes-validate does not know; they are checked against the subset of the CRD schemas below.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from exporter.config import Settings, env_name
from harness.k8s_schema import K8S_VERSION, LABELS, SELECTOR, crd, validate
from harness.support import REPO_ROOT, require_binary

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
EXPORTER_PORT = 9835

_GEN_SPEC = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
assert _GEN_SPEC and _GEN_SPEC.loader
gen_prometheusrule = importlib.util.module_from_spec(_GEN_SPEC)
_GEN_SPEC.loader.exec_module(gen_prometheusrule)

_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": LABELS},
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        k: {"type": "string"}
        for k in ("action", "regex", "replacement", "separator", "targetLabel")
    }
    | {"sourceLabels": {"type": "array", "items": {"type": "string"}}, "modulus": {"type": "integer"}},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scrapeTimeout": {"type": "string"},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
# Subsets of the monitoring.coreos.com/v1 CRD schemas (prometheus-operator), for the fields used here.
_MONITORING_V1 = "monitoring.coreos.com/v1"
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string"},
        "keep_firing_for": {"type": "string"},
        "labels": LABELS,
        "annotations": LABELS,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
_RULE_GROUP = {
    "type": "object",
    "required": ["name", "rules"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "interval": {"type": "string"},
        "limit": {"type": "integer"},
        "rules": {"type": "array", "items": _RULE},
    },
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": crd(
        _MONITORING_V1,
        _META,
        {
            "jobLabel": {"type": "string"},
            "selector": SELECTOR,
            "namespaceSelector": _NS_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
        required=["selector", "endpoints"],
    ),
    "PodMonitor": crd(
        _MONITORING_V1,
        _META,
        {
            "jobLabel": {"type": "string"},
            "selector": SELECTOR,
            "namespaceSelector": _NS_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
        required=["selector", "podMetricsEndpoints"],
    ),
    "PrometheusRule": crd(
        _MONITORING_V1,
        _META,
        {"groups": {"type": "array", "minItems": 1, "items": _RULE_GROUP}},
        required=["groups"],
    ),
}


def manifest_files() -> list[Path]:
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


def all_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def objects_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_objects() if doc["kind"] == kind]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, doc in all_objects():
        if doc["kind"] in ("DaemonSet", "Deployment", "Job", "StatefulSet"):
            yield f"{path.name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def exporter_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for c in pod.get("containers", []) + pod.get("initContainers", [])
        if "gpu-exporter" in c.get("image", "")
    ]


def known_env() -> set[str]:
    import dataclasses

    return {env_name(f.name) for f in dataclasses.fields(Settings)}


# -- Kubernetes --------------------------------------------------------------------------------------


def test_every_manifest_validates() -> None:
    seen = set()
    for path, doc in all_objects():
        seen.add(doc["kind"])
        validate(doc, path.name, CRD_SCHEMAS)
    assert {"DaemonSet", "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule", "Job"} <= seen


def test_schema_validation_catches_mistakes() -> None:
    """The validators must be able to fail: a misspelt field and a bad type are rejected."""
    import kubernetes_validate

    ds = objects_of("DaemonSet")[0]
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    sm = yaml.safe_load(yaml.safe_dump(objects_of("ServiceMonitor")[0]))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, CRD_SCHEMAS["ServiceMonitor"])


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "prometheusrule.yaml" in kust["resources"]


def test_security_contexts_and_resources() -> None:
    pods = list(pod_specs())
    assert pods
    for where, pod in pods:
        if pod.get("hostPID"):
            # The node DaemonSet: root (the kubelet's and Docker's sockets are root's), but with every
            # capability dropped (asserted below), so it cannot override file permissions.
            assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
        else:
            assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (where, c["name"])
            assert "memory" in c["resources"]["limits"], (where, c["name"])
        for c in exporter_containers(pod):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert any(p["containerPort"] == EXPORTER_PORT for p in c["ports"]), where
            for env in c.get("env", []):
                if env["name"].startswith("GPU_EXPORTER_"):
                    assert env["name"] in known_env(), f"{where}: unknown setting {env['name']}"


def test_daemonset_has_what_attribution_needs() -> None:
    (ds,) = objects_of("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (c,) = exporter_containers(pod)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/run/docker.sock"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/run/docker.sock"]["name"]]["hostPath"]["path"] == "/var/run/docker.sock"
    # The kubelet's PodResources socket: its directory, read-only, where GPU_EXPORTER_KUBELET_SOCKET says.
    env = {e["name"]: e.get("value") for e in c["env"]}
    socket = env["GPU_EXPORTER_KUBELET_SOCKET"]
    pod_resources = mounts[str(Path(socket).parent)]
    assert pod_resources["readOnly"] is True
    assert volumes[pod_resources["name"]]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert env["GPU_EXPORTER_KUBELET"] in ("auto", "on")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ds["spec"]["template"]["metadata"]["labels"] == ds["spec"]["selector"]["matchLabels"]


def test_service_and_monitors_select_the_exporter() -> None:
    (ds,) = objects_of("DaemonSet")
    (svc,) = objects_of("Service")
    (sm,) = objects_of("ServiceMonitor")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    # The alert rules select job="gpu-exporter": the ServiceMonitor's job comes from jobLabel.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "gpu-exporter"

    (pm,) = objects_of("PodMonitor")
    (job,) = objects_of("Job")
    pod = job["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (sidecar,) = exporter_containers(pod["spec"])
    assert sidecar in pod["spec"]["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= {p["name"] for p in sidecar["ports"]}
    relabel = pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"targetLabel": "job", "replacement": "gpu-exporter"} in relabel


def test_prometheusrule_is_generated_from_the_shipped_rules() -> None:
    assert gen_prometheusrule.render() == (K8S / "prometheusrule.yaml").read_text(), (
        "deploy/kubernetes/prometheusrule.yaml is out of date: run python deploy/kubernetes/gen_prometheusrule.py"
    )
    (rule,) = objects_of("PrometheusRule")
    shipped: list[dict[str, Any]] = []
    for path in sorted((REPO_ROOT / "alerts").glob("*.rules.yml")):
        shipped += yaml.safe_load(path.read_text())["groups"]
    assert shipped and rule["spec"]["groups"] == shipped
    # The CLI's --check agrees.
    check = subprocess.run(
        [sys.executable, str(K8S / "gen_prometheusrule.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    (rule,) = objects_of("PrometheusRule")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_rejects_duplicate_groups(tmp_path: Path) -> None:
    for name in ("a.rules.yml", "b.rules.yml"):
        (tmp_path / name).write_text("groups:\n  - name: same\n    rules: []\n")
    with pytest.raises(SystemExit, match="also defined"):
        gen_prometheusrule.render(tmp_path)


# -- Docker Compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_services_and_sidecar_needs() -> None:
    doc = compose()
    services = doc["services"]
    assert {"trainer", "exporter", "prometheus", "alertmanager", "grafana"} <= set(services)
    exporter = services["exporter"]
    assert exporter["network_mode"] == "service:trainer"  # sidecar: shares the trainer's localhost
    assert exporter["pid"] == "host"
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in exporter["volumes"]
    assert exporter["read_only"] is True and exporter["cap_drop"] == ["ALL"]
    assert not str(exporter["user"]).startswith("0")
    assert exporter["healthcheck"]["test"] == ["CMD", "python3", "/opt/gpu-exporter/healthcheck.py"]
    for name in exporter["environment"]:
        if name.startswith("GPU_EXPORTER_"):
            assert name in known_env(), f"compose exporter: unknown setting {name}"
    for name in ("trainer", "exporter"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert device.get("count") == "all" or "device_ids" in device, name
    for name, svc in services.items():
        if name != "trainer":
            assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                if source.startswith("."):
                    assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} not declared"
    assert (DEPLOY / "grafana" / "provisioning" / "dashboards").is_dir()
    assert list((REPO_ROOT / "dashboards").glob("*.json")), "no dashboards to provision"


def test_compose_prometheus_config_loads_the_shipped_rules(tmp_path: Path) -> None:
    """promtool checks the compose Prometheus config with the rule glob pointed at alerts/."""
    promtool = require_binary("promtool")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (pattern,) = config["rule_files"]
    mounted = next(v for v in compose()["services"]["prometheus"]["volumes"] if v.startswith("../alerts:"))
    container_dir = mounted.split(":")[1]
    assert pattern.startswith(container_dir + "/")
    local_glob = str((DEPLOY / "../alerts").resolve()) + pattern[len(container_dir):]
    config["rule_files"] = [local_glob]
    assert list(Path("/").glob(local_glob.lstrip("/"))), f"the rule glob matches no shipped file: {local_glob}"
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gpu-exporter"]["static_configs"][0]["targets"] == [f"trainer:{EXPORTER_PORT}"]


# -- Dockerfile --------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [arg for word, arg in final_stage if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    (check,) = [arg for word, arg in final_stage if word == "HEALTHCHECK"]
    script = re.search(r"/opt/gpu-exporter/(\S+\.py)", check)
    assert script and (DEPLOY / script.group(1)).is_file(), check
    assert "/healthz" in (DEPLOY / script.group(1)).read_text()
    assert f"COPY deploy/{script.group(1)} /opt/gpu-exporter/{script.group(1)}" in [
        f"{w} {a}" for w, a in final_stage
    ]
    assert f"!deploy/{script.group(1)}" in (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ("EXPOSE", str(EXPORTER_PORT)) in final_stage
    entrypoint = [arg for word, arg in final_stage if word == "ENTRYPOINT"]
    assert entrypoint == ['["gpu-exporter"]']
    scripts = re.findall(r"^gpu-exporter\s*=", (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert scripts, "the console script the image runs is not declared in pyproject.toml"

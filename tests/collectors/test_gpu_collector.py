"""GpuCollector renders the reader's snapshot exactly as docs/metrics.md promises: names, labels,
absent fields, down GPUs, XIDs, per-process and per-container series; promtool lints the result."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.collectors.gpu import GpuCollector
from exporter.nvml import NvmlReader
from exporter.simulate import install
from exporter.snapshot import ContainerInfo, NodeSnapshot
from harness.clock import FakeClock
from harness.support import documented_metric_names, parse_metrics, require_binary, wait_until

GiB = 2**30
Samples = dict[str, list[tuple[dict[str, str], float]]]


def render(snapshot: NodeSnapshot | None, openmetrics: bool = False) -> str:
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: snapshot))
    return (generate_openmetrics if openmetrics else generate_latest)(registry).decode()


@pytest.fixture(scope="module")
def busy_snapshot() -> Iterator[NodeSnapshot]:
    """The real reader on healthy-8gpu after some faults, then enriched the way containers/ingest do."""
    sim = install("healthy-8gpu")
    reader = NvmlReader("node-c", xid_retry_seconds=0.05)
    try:
        first = reader.read()
        wait_until(lambda: len(reader.xid_listening) == 8, timeout=10, message="XID listener registered")
        sim.apply({"gpu": 0, "add_process": {"pid": 5000, "type": "compute", "used_memory_bytes": "2GiB",
                                             "sm_utilization_ratio": 0.25}})
        sim.apply({"gpu": 0, "set": {"clock_event_reasons": ["sw_thermal_slowdown", "sw_power_cap"]}})
        sim.apply({"gpu": 2, "xid": 13})
        sim.apply({"gpu": 2, "xid": 13})
        sim.apply({"gpu": 3, "xid": 79})
        sim.apply({"gpu": 1, "add_ecc_errors": {"corrected": 7}})
        snap = wait_until(
            lambda: (s := reader.read()).gpus[3].xid_errors and s.gpus[2].xid_errors.get(13, None)
            and s.gpus[2].xid_errors[13].count == 2 and s,
            timeout=10, message="XIDs counted",
        )
        assert first.gpus[0].uuid == snap.gpus[0].uuid
    finally:
        reader.close()
        sim.uninstall()
    web = ContainerInfo(id="c0ffee", name="trainer", image="pytorch:2.13",
                        labels={"com.docker.compose.service": "train", "io.kubernetes.pod.namespace": "ml",
                                "io.kubernetes.pod.name": "trainer-0"})
    g0 = snap.gpus[0]
    procs = tuple(replace(p, container=web, training_job="llama", rank="0") for p in g0.processes)
    yield replace(snap, gpus=(replace(g0, processes=procs), *snap.gpus[1:]))


@pytest.fixture(scope="module")
def samples(busy_snapshot: NodeSnapshot) -> Samples:
    return parse_metrics(render(busy_snapshot))


def by_gpu(samples: Samples, name: str, **match: str) -> dict[str, float]:
    return {labels["gpu"]: v for labels, v in samples.get(name, [])
            if all(labels.get(k) == want for k, want in match.items())}


def test_every_name_is_in_the_contract_and_every_series_has_gpu_identity(samples: Samples) -> None:
    documented = documented_metric_names()
    for name, series in samples.items():
        family = re.sub(r"_total$", "", name)
        assert name in documented or f"{family}_total" in documented, f"{name} is not in docs/metrics.md"
        for labels, _ in series:
            assert labels["host"] == "node-c"
            if name != "gpu_devices":
                assert labels["gpu"].isdigit() and labels["uuid"].startswith("GPU-"), (name, labels)
            if name != "gpu_info":  # identity details only in gpu_info
                assert not {"name", "pci_bus_id", "serial", "driver_version"} & set(labels), name
    assert samples["gpu_devices"] == [({"host": "node-c"}, 8.0)]


def test_values_and_absent_fields(samples: Samples) -> None:
    assert set(by_gpu(samples, "gpu_memory_total_bytes").values()) == {80.0 * GiB}
    assert by_gpu(samples, "gpu_temperature_celsius")["0"] == 62
    assert by_gpu(samples, "gpu_temperature_threshold_celsius", threshold="slowdown")["0"] == 90
    assert by_gpu(samples, "gpu_clock_max_hertz", clock="sm")["0"] == 1980e6
    assert by_gpu(samples, "gpu_power_usage_watts")["5"] == 520
    assert by_gpu(samples, "gpu_energy_consumed_joules_total")["5"] >= 1.5e6
    assert by_gpu(samples, "gpu_gpm_tensor_active_ratio")["0"] == pytest.approx(0.55)
    assert by_gpu(samples, "gpu_ecc_errors_total", error_type="corrected", counter="aggregate")["1"] == 7
    assert by_gpu(samples, "gpu_ecc_errors_total", error_type="corrected", counter="volatile")["0"] == 0
    # Not supported on an H100 SXM: no series at all, not a zero.
    for absent in ("gpu_fan_speed_ratio", "gpu_retired_pages", "gpu_retired_pages_pending"):
        assert absent not in samples
    info = {labels["gpu"]: labels for labels, _ in samples["gpu_info"]}
    assert info["0"]["name"] == "NVIDIA H100 80GB HBM3" and info["0"]["driver_version"] == "550.54.15"
    assert info["0"]["cuda_driver_version"] == "12.4" and info["0"]["mig_mode"] == "disabled"
    assert info["0"]["pci_bus_id"] and info["0"]["serial"] and info["0"]["vbios_version"]


def test_clock_event_reasons_one_series_each(samples: Samples) -> None:
    reasons = {labels["reason"]: v for labels, v in samples["gpu_clock_event_active"] if labels["gpu"] == "0"}
    assert reasons["sw_thermal_slowdown"] == 1 and reasons["sw_power_cap"] == 1
    assert reasons["hw_slowdown"] == 0 and reasons["gpu_idle"] == 0 and len(reasons) == 9
    assert all(v == 0 for labels, v in samples["gpu_clock_event_active"] if labels["gpu"] == "1")


def test_xid_counters_and_lost_gpu(samples: Samples) -> None:
    xids = {(labels["gpu"], labels["xid"]): v for labels, v in samples["gpu_xid_errors_total"]}
    assert xids == {("2", "13"): 2.0, ("3", "79"): 1.0}
    seen = {(labels["gpu"], labels["xid"]): v for labels, v in samples["gpu_xid_last_seen_timestamp_seconds"]}
    assert set(seen) == set(xids) and all(v > 1.7e9 for v in seen.values())
    up = by_gpu(samples, "gpu_up")
    assert up["3"] == 0 and sum(up.values()) == 7
    # The down GPU keeps gpu_up, its XIDs and its identity (so alerts can name it); its other series are
    # gone until it answers again.
    assert "3" not in by_gpu(samples, "gpu_temperature_celsius") and "3" in by_gpu(samples, "gpu_info")


def test_process_and_container_series(samples: Samples) -> None:
    procs = {labels["pid"]: (labels, v) for labels, v in samples["gpu_process_memory_used_bytes"]
             if labels["gpu"] == "0"}
    assert set(procs) == {"4242", "5000"}
    labels, value = procs["5000"]
    assert value == 2 * GiB
    assert labels["process_type"] == "compute" and labels["container_id"] == "c0ffee"
    assert labels["container_name"] == "trainer" and labels["container_image"] == "pytorch:2.13"
    assert (labels["compose_service"], labels["k8s_namespace"], labels["k8s_pod"]) == ("train", "ml", "trainer-0")
    assert (labels["training_job"], labels["rank"]) == ("llama", "0")
    other = next(lab for lab, _ in samples["gpu_process_memory_used_bytes"] if lab["gpu"] == "1")
    assert other["container_id"] == "" and other["training_job"] == ""  # unknown → empty label
    sm = {labels["pid"]: v for labels, v in samples["gpu_process_sm_utilization_ratio"] if labels["gpu"] == "0"}
    assert sm == {"4242": 0.91, "5000": 0.25}
    containers = samples["gpu_container_memory_used_bytes"]
    assert [(lab["gpu"], lab["container_id"], lab["container_name"], v) for lab, v in containers] == [
        ("0", "c0ffee", "trainer", 63.0 * GiB)
    ]


def test_exited_process_series_disappear(busy_snapshot: NodeSnapshot) -> None:
    g0 = busy_snapshot.gpus[0]
    fewer = replace(busy_snapshot, gpus=(replace(g0, processes=g0.processes[:1]), *busy_snapshot.gpus[1:]))
    pids = {lab["pid"] for lab, _ in parse_metrics(render(fewer))["gpu_process_memory_used_bytes"]
            if lab["gpu"] == "0"}
    assert pids == {"4242"}


def test_nothing_before_first_poll_and_only_nvml_state_when_nvml_is_down() -> None:
    assert render(None) == ""
    assert render(NodeSnapshot(host="h", timestamp_seconds=0.0, nvml_up=False)) == ""


def test_openmetrics_render_parses_strictly(busy_snapshot: NodeSnapshot) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    body = render(busy_snapshot, openmetrics=True)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["gpu_xid_errors"].type == "counter" and families["gpu"].type == "info"  # gpu_info
    assert "gpu_energy_consumed_joules_total" in {s.name for s in families["gpu_energy_consumed_joules"].samples}


def test_promtool_lints_a_full_render(busy_snapshot: NodeSnapshot) -> None:
    """Beyond the live scrape test: this render also has XIDs, containers and a down GPU."""
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=render(busy_snapshot), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_shipped_scenario_renders_and_lints() -> None:
    """Older GPUs, faults and timelines (30 s steps of scenario time) must still render lint-clean."""
    from exporter.simulate import load_scenario, shipped_scenarios

    promtool = require_binary("promtool")
    clock = FakeClock(0.0)
    for name in shipped_scenarios():
        sim = install(load_scenario(name), clock=clock)
        reader = NvmlReader("node-s", xid_retry_seconds=0.05)
        try:
            snap = reader.read()
            for _ in range(10):
                clock.advance(30)
                snap = reader.read()
        finally:
            reader.close()
            sim.uninstall()
        body = render(snap)
        assert snap.nvml_up and parse_metrics(body)["gpu_up"], name
        result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and not result.stdout.strip(), (name, result.stdout + result.stderr)

"""Fault to pager, live: the exporter on simulated GPUs (and the sample workload with the hook) →
the real Prometheus with the shipped fast-profile rules → the real Alertmanager with the shipped fast
config → a webhook receiver in the test. For each fault class the test asserts the notification's
receiver, alert name and labels (host, GPU or job/rank), then recovers and waits for the resolved one.

The four classes share one stack (starting Prometheus and Alertmanager is the slow part) and use
different GPUs and job names so they cannot see each other's alerts.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from harness.alert_stack import AlertStack, alert_stack, labels_match, start_workload
from harness.support import http_get, http_post_json, wait_until

pytestmark = pytest.mark.slow

HOST = "e2e-node"
# One torch thread per process: the CI machine has 2 cores.
FIRE_TIMEOUT = 30.0  # generous: the fast profile notifies in a few seconds, CI machines are busy
RESOLVE_TIMEOUT = 45.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    log_dir = tmp_path_factory.mktemp("alerts-e2e")
    exporter_args = [
        "--simulate", "healthy-8gpu", "--interval", "0.5", "--host-label", HOST, "--docker", "off",
        # A finished training process's series go away 3 s after its last push: that is the
        # recovery of the training-side faults.
        "--training-ttl", "3",
    ]  # fmt: skip
    with alert_stack(log_dir, exporter_args) as s:
        yield s


def simulate(stack: AlertStack, event: dict[str, Any]) -> float:
    """Apply a simulator event through the exporter; returns the monotonic time it was applied."""
    t = time.monotonic()
    status, body = http_post_json(stack.exporter_url + "/-/simulate/events", event)
    assert status == 200, body
    return t


def am_alerts(stack: AlertStack, *matchers: str, timeout: float = FIRE_TIMEOUT) -> list[dict[str, Any]]:
    """Alerts Alertmanager holds that match all ``matchers`` (waits until there is at least one)."""
    url = stack.alertmanager_url + "/api/v2/alerts?" + urllib.parse.urlencode([("filter", m) for m in matchers])

    def found() -> list[dict[str, Any]]:
        status, body = http_get(url)
        assert status == 200, body
        return list(json.loads(body))

    return wait_until(found, timeout=timeout, message=f"Alertmanager alerts {matchers}")


def test_gpu_overheating_pages_and_inhibits_its_warning(stack: AlertStack) -> None:
    hook = stack.webhook
    # healthy-8gpu: slowdown 90 °C, shutdown 92 °C; 89 °C is within 5 °C of both.
    t0 = simulate(stack, {"gpu": 3, "set": {"temperature_gpu_celsius": 89,
                                            "clock_event_reasons": ["sw_thermal_slowdown"]}})
    crit = labels_match(alertname="GpuTemperatureHigh", host=HOST, gpu="3", severity="critical")
    note, alert = hook.wait_for_alert(crit, timeout=FIRE_TIMEOUT, since=t0)
    assert note.path == "/page"
    assert alert["labels"]["uuid"].startswith("GPU-")
    assert "89 °C" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("/GpuTemperatureHigh.md")
    throttle = labels_match(alertname="GpuThermalThrottling", host=HOST, gpu="3", severity="warning")
    note, _ = hook.wait_for_alert(throttle, timeout=FIRE_TIMEOUT, since=t0)
    assert note.path == "/ticket"
    # The warning variant of the same alert fired in Prometheus too, but the critical one inhibits it.
    warn = labels_match(alertname="GpuTemperatureHigh", gpu="3", severity="warning")
    assert not [a for n in hook.notifications() for a in n.alerts() if warn(a)]

    t1 = simulate(stack, {"gpu": 3, "set": {"temperature_gpu_celsius": 62, "clock_event_reasons": []}})
    note, _ = hook.wait_for_alert(crit, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)
    assert note.path == "/page" and note.status == "resolved"
    hook.wait_for_alert(throttle, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)


def test_xid_79_gpu_lost_pages(stack: AlertStack) -> None:
    hook = stack.webhook
    t0 = simulate(stack, {"gpu": 5, "xid": 79})  # fell off the bus: the GPU is lost too
    lost = labels_match(alertname="GpuLost", host=HOST, gpu="5", severity="critical")
    xid = labels_match(alertname="GpuXidHardwareError", host=HOST, gpu="5", xid="79", severity="critical")
    note, alert = hook.wait_for_alert(lost, timeout=FIRE_TIMEOUT, since=t0)
    assert note.path == "/page" and alert["labels"]["uuid"].startswith("GPU-")
    note, _ = hook.wait_for_alert(xid, timeout=FIRE_TIMEOUT, since=t0)
    assert note.path == "/page"

    t1 = simulate(stack, {"gpu": 5, "lost": False})  # reset worked: the GPU answers again
    hook.wait_for_alert(lost, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)
    # The XID alert stays for its window (20 s in the fast profile) after the last event, then clears.
    hook.wait_for_alert(xid, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)


def test_training_oom_notifies_with_job_and_rank(stack: AlertStack) -> None:
    hook = stack.webhook
    job = "e2e-oom"
    t0 = time.monotonic()
    train = start_workload(stack, job, "--fault", "oom@20")
    oom = labels_match(alertname="GpuTrainingOutOfMemory", host=HOST, training_job=job, rank="0")
    note, alert = hook.wait_for_alert(oom, timeout=FIRE_TIMEOUT + 30, since=t0)  # + torch import
    assert note.path == "/ticket" and alert["labels"]["severity"] == "warning"
    assert f"of {job} on {HOST}" in alert["annotations"]["description"]

    t1 = time.monotonic()
    assert train.stop(signal.SIGTERM) in (0, -signal.SIGTERM), train.log()
    hook.wait_for_alert(oom, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)


def test_expired_token_pages_with_job_rank_and_service(stack: AlertStack) -> None:
    hook = stack.webhook
    job = "e2e-auth"
    t0 = time.monotonic()
    train = start_workload(stack, job, "--fault", "auth@6")  # the dataset token expires 6 s into the run
    expired = labels_match(alertname="GpuTrainingTokenExpired", host=HOST, training_job=job, rank="0",
                           service="dataset")
    note, alert = hook.wait_for_alert(expired, timeout=FIRE_TIMEOUT + 30, since=t0)
    assert note.path == "/page" and alert["labels"]["severity"] == "critical"
    # Before it expired, the same token was announced as expiring soon (a ticket).
    soon = labels_match(alertname="GpuTrainingTokenExpiringSoon", training_job=job, service="dataset")
    note, _ = hook.wait_for_alert(soon, timeout=5, since=t0)
    assert note.path == "/ticket"
    # The 401s the expired token causes fire GpuTrainingAuthFailures too; Alertmanager holds it back
    # as a symptom of the expired token (inhibited for the same host, job, rank and service).
    refused = am_alerts(stack, 'alertname="GpuTrainingAuthFailures"', f'training_job="{job}"')
    assert refused[0]["labels"]["status_code"] == "401" and refused[0]["labels"]["rank"] == "0"
    assert refused[0]["status"]["state"] == "suppressed" and refused[0]["status"]["inhibitedBy"], refused

    t1 = time.monotonic()
    assert train.stop(signal.SIGTERM) in (0, -signal.SIGTERM), train.log()
    hook.wait_for_alert(expired, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)


def test_pcie_downtrained_under_load_alerts_idle_generation_drop_does_not(stack: AlertStack) -> None:
    hook = stack.webhook
    # GPU 6 idles and lowers its link generation (power saving); GPU 7 is busy and retrains to Gen3 x8.
    simulate(stack, {"gpu": 6, "set": {"utilization_gpu_ratio": 0.0, "pcie_link_generation": 1}})
    t0 = simulate(stack, {"gpu": 7, "set": {"pcie_link_generation": 3, "pcie_link_width_lanes": 8}})
    for degraded in ("width", "generation"):
        match = labels_match(alertname="GpuPcieLinkDegraded", host=HOST, gpu="7", degraded=degraded)
        note, alert = hook.wait_for_alert(match, timeout=FIRE_TIMEOUT, since=t0)
        assert note.path == "/ticket" and alert["labels"]["severity"] == "warning"
    # By now GPU 6's 1 s `for:` has long passed too, had its drop counted: it must not be in Alertmanager.
    status, body = http_get(stack.alertmanager_url + "/api/v2/alerts?filter=" +
                            urllib.parse.quote('alertname="GpuPcieLinkDegraded"'))
    assert status == 200 and {a["labels"]["gpu"] for a in json.loads(body)} == {"7"}, body

    t1 = simulate(stack, {"gpu": 7, "set": {"pcie_link_generation": 5, "pcie_link_width_lanes": 16}})
    simulate(stack, {"gpu": 6, "set": {"utilization_gpu_ratio": 0.93, "pcie_link_generation": 5}})
    hook.wait_for_alert(labels_match(alertname="GpuPcieLinkDegraded", gpu="7", degraded="width"),
                        status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)


def test_recovery_action_pages_naming_it_and_silences_the_gpus_symptoms(stack: AlertStack) -> None:
    hook = stack.webhook
    # GPU 4: the driver asks for a reset; then its symptoms arrive (XID 48, NVLink link 2 down). The
    # order matters only to make the test deterministic: in production both are evaluated together and
    # Alertmanager's 30 s group_wait holds the XID until the inhibiting alert is there.
    t0 = simulate(stack, {"gpu": 4, "set": {"recovery_action": "gpu_reset"}})
    reset = labels_match(alertname="GpuRecoveryActionRequired", host=HOST, gpu="4", action="gpu_reset")
    note, alert = hook.wait_for_alert(reset, timeout=FIRE_TIMEOUT, since=t0)
    assert note.path == "/page" and alert["labels"]["severity"] == "critical"
    assert "gpu_reset" in alert["annotations"]["description"]
    simulate(stack, {"gpu": 4, "set": {"nvlink_links_down": [2]}})
    simulate(stack, {"gpu": 4, "xid": 48})
    for name in ("GpuXidHardwareError", "GpuNvlinkDown"):
        held = am_alerts(stack, f'alertname="{name}"', 'gpu="4"')
        assert held[0]["status"]["state"] == "suppressed" and held[0]["status"]["inhibitedBy"], held
    assert not [a for n in hook.notifications() for a in n.alerts()
                if a["labels"].get("gpu") == "4" and a["labels"]["alertname"] in ("GpuXidHardwareError", "GpuNvlinkDown")]

    t1 = simulate(stack, {"gpu": 4, "set": {"recovery_action": "none", "nvlink_links_down": []}})  # reset done
    hook.wait_for_alert(reset, status="resolved", timeout=RESOLVE_TIMEOUT, since=t1)

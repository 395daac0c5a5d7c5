"""Diagnosis, live (issue 16): real multi-process DDP (gloo on CPU) and sample jobs with the hook →
the exporter on simulated GPUs → the real Prometheus with the shipped fast rules → the real
Alertmanager with the shipped fast config → a webhook receiver here.

Cases: a 2-rank DDP straggler (named, the fast rank never is), a 2-rank DDP hang (the culprit rank and
its cause named, also in the waiting rank's notification), a SIGKILLed process (vanished: pages), and two
jobs sharing a simulated GPU where one grows until the other's allocation fails and it crashes (the OOM
names the GPU and the grower; the crash pages with its exception type). Each case prints its time from
fault to notification (fast profile); ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from harness.alert_stack import AlertStack, alert_stack, labels_match, start_workload
from harness.support import http_get, http_post_json, prom_query, scrape, wait_until

pytestmark = pytest.mark.slow

HOST = "diag-node"
START_TIMEOUT = 90.0  # torch import + DDP init of 2 ranks on a busy 2-core machine
FIRE_TIMEOUT = 60.0
SHARED_GPU = 5  # healthy-8gpu slot the co-tenant case uses (80 GiB, 0.5 GiB reserved)
GiB = 1 << 30
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    log_dir = tmp_path_factory.mktemp("diagnosis-e2e")
    exporter_args = [
        "--simulate", "healthy-8gpu", "--interval", "0.5", "--host-label", HOST, "--docker", "off",
        "--training-ttl", "60",  # ended processes keep their exit series long enough to be seen
    ]  # fmt: skip
    with alert_stack(log_dir, exporter_args) as s:
        yield s
    if TIMINGS:
        print("\nfast profile, fault -> notification:")
        for case, seconds in TIMINGS.items():
            print(f"  {case:<34} {seconds:6.1f} s")


def first_seen(stack: AlertStack, job: str, ranks: int) -> float:
    """Wall time once every rank of ``job`` has completed steps in the exporter's view."""

    def ready() -> bool:
        m = scrape(stack.exporter_url)
        return len([v for lab, v in m.get("training_steps_total", []) if lab.get("training_job") == job and v > 0]) >= ranks

    wait_until(ready, START_TIMEOUT, interval=0.2, message=f"{job}: {ranks} rank(s) stepping")
    return time.time()


def metric(stack: AlertStack, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for lab, v in scrape(stack.exporter_url).get(name, []) if all(lab.get(k) == w for k, w in labels.items())]


def test_ddp_straggler_is_named_and_the_fast_rank_is_not(stack: AlertStack) -> None:
    job = "diag-straggler"
    t0 = time.monotonic()
    train = start_workload(stack, job, "--ddp", "2", "--fault", "slow-compute@1:2.5")
    t_fault = first_seen(stack, job, 2)  # the slow rank is slow from its first step on
    slow = labels_match(alertname="GpuTrainingStraggler", host=HOST, training_job=job, rank="1")
    note, alert = stack.webhook.wait_for_alert(slow, timeout=FIRE_TIMEOUT, since=t0)
    TIMINGS["straggler (2-rank DDP, from steps)"] = note.received_wall - t_fault
    assert note.path == "/ticket" and alert["labels"]["severity"] == "warning"
    assert "Rank 1 of diag-straggler" in alert["annotations"]["description"]
    # Synchronous DDP: both ranks take the same time per step; the waits say who holds the other back.
    waits = {lab["rank"]: v for lab, v in metric(stack, "training_collective_wait_seconds_total", training_job=job)}
    steps = {lab["rank"]: v for lab, v in metric(stack, "training_step_duration_seconds_sum", training_job=job)}
    assert waits["0"] > 3 * waits["1"], (waits, steps)
    train.stop(signal.SIGKILL)
    fast = labels_match(alertname="GpuTrainingStraggler", training_job=job, rank="0")
    assert not [a for n in stack.webhook.notifications() for a in n.alerts() if fast(a)]


def test_ddp_hang_names_the_culprit_rank_and_its_cause(stack: AlertStack) -> None:
    job = "diag-hang"
    t0 = time.monotonic()
    # Rank 1's input pipeline hangs before step 30; rank 0 then waits for it in the all-reduce.
    train = start_workload(stack, job, "--ddp", "2", "--fault", "stall@30:90:1")
    first_seen(stack, job, 2)
    culprit = labels_match(alertname="GpuTrainingNoProgress", host=HOST, training_job=job, rank="1", phase="data")
    note, alert = stack.webhook.wait_for_alert(culprit, timeout=FIRE_TIMEOUT + 30, since=t0)
    assert note.path == "/page"
    assert "waits for its input data" in alert["annotations"]["description"]
    victim = labels_match(alertname="GpuTrainingNoProgress", training_job=job, rank="0", phase="collective")
    note0, alert0 = stack.webhook.wait_for_alert(victim, timeout=FIRE_TIMEOUT, since=t0)
    assert f"rank 1 on {HOST} is in data" in alert0["annotations"]["description"], alert0
    # Fault time: rank 1's last completed step (the hook keeps pushing while the rank hangs).
    last = {lab["rank"]: v for lab, v in metric(stack, "training_last_progress_timestamp_seconds", training_job=job)}
    TIMINGS["hang: culprit rank (data)"] = note.received_wall - last["1"]
    TIMINGS["hang: waiting rank (collective)"] = note0.received_wall - last["1"]
    seen = {lab["rank"]: v for lab, v in metric(stack, "training_last_seen_timestamp_seconds", training_job=job)}
    assert min(seen.values()) > last["1"] + 3, "the sender thread kept reporting while training was blocked"
    train.stop(signal.SIGKILL)


def test_killed_process_vanishes_and_pages(stack: AlertStack) -> None:
    job = "diag-killed"
    train = start_workload(stack, job)
    first_seen(stack, job, 1)
    pid = str(train.pid)
    t_kill = time.time()
    t0 = time.monotonic()
    assert train.stop(signal.SIGKILL) == -signal.SIGKILL
    gone = labels_match(alertname="GpuTrainingProcessEnded", host=HOST, training_job=job, pid=pid, reason="vanished")
    note, alert = stack.webhook.wait_for_alert(gone, timeout=FIRE_TIMEOUT, since=t0)
    TIMINGS["killed (SIGKILL -> vanished)"] = note.received_wall - t_kill
    assert note.path == "/page" and alert["labels"]["severity"] == "critical"
    assert "vanished without reporting an exit" in alert["annotations"]["description"]


def test_normal_end_is_a_series_and_no_page(stack: AlertStack) -> None:
    job = "diag-normal"
    train = start_workload(stack, job, "--duration", "3")
    first_seen(stack, job, 1)
    assert train.wait(60) == 0, train.log()
    ended = wait_until(lambda: metric(stack, "training_exit_timestamp_seconds", training_job=job), 20, message="exit series")
    assert [lab["reason"] for lab, _ in ended] == ["normal"]
    # Prometheus has the series and has evaluated the rules since: no alert (pending or firing) for it.
    wait_until(lambda: prom_query(stack.prometheus_url, f'training_exit_timestamp_seconds{{training_job="{job}"}}'), 20)
    t_seen = time.time()
    wait_until(lambda: evaluated_since(stack, "gpu-training-failures", t_seen + 1), 20, message="rule evaluation")
    assert not prom_query(stack.prometheus_url, f'ALERTS{{alertname="GpuTrainingProcessEnded",training_job="{job}"}}')
    normal = labels_match(alertname="GpuTrainingProcessEnded", training_job=job)
    assert not [a for n in stack.webhook.notifications() for a in n.alerts() if normal(a)]


def evaluated_since(stack: AlertStack, group: str, wall: float) -> bool:
    """Has Prometheus evaluated rule group ``group`` after Unix time ``wall``?"""
    status, body = http_get(stack.prometheus_url + "/api/v1/rules")
    assert status == 200, body
    for g in json.loads(body)["data"]["groups"]:
        if g["name"] == group:
            stamp = g["lastEvaluation"]  # RFC 3339 with nanoseconds
            return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp() > wall
    raise AssertionError(f"no rule group {group}")


def _simulate(stack: AlertStack, event: dict[str, Any]) -> None:
    status, body = http_post_json(stack.exporter_url + "/-/simulate/events", event)
    assert status == 200, body


def test_oom_names_the_gpu_and_the_job_that_filled_it_after_the_victim_died(stack: AlertStack) -> None:
    _simulate(stack, {"gpu": SHARED_GPU, "remove_process": 4242})  # the scenario's own tenant
    victim_job, grower_job = "diag-victim", "diag-grower"
    t0 = time.monotonic()
    # The victim holds 4 GiB and needs 8 GiB more in every step; the grower adds 8 GiB a step up to
    # 70 GiB, leaving 5.5 GiB: the victim's next step fails and, uncaught, ends the process.
    victim = start_workload(
        stack, victim_job, "--sim-gpu", str(SHARED_GPU), "--sim-memory", "4GiB", "--sim-transient", "8GiB",
        "--exit-on-oom", "--step-delay", "0.2",
    )  # fmt: skip
    first_seen(stack, victim_job, 1)
    grower = start_workload(
        stack, grower_job, "--sim-gpu", str(SHARED_GPU), "--sim-memory", "2GiB", "--sim-grow", "8GiB",
        "--sim-memory-max", "70GiB", "--step-delay", "0.2",
    )  # fmt: skip
    rc = victim.wait(START_TIMEOUT + 60)
    t_died = time.time()
    assert rc == 1, victim.log()  # an uncaught exception's exit status, unchanged by the hook
    log = victim.log()
    assert "torch.OutOfMemoryError: CUDA out of memory" in log, log  # the previous excepthook still ran
    oom = labels_match(alertname="GpuTrainingOutOfMemory", host=HOST, training_job=victim_job, pid=str(victim.pid))
    note, alert = stack.webhook.wait_for_alert(oom, timeout=FIRE_TIMEOUT, since=t0)
    assert alert["labels"]["gpu"] == str(SHARED_GPU) and alert["labels"]["uuid"].startswith("GPU-")
    description = alert["annotations"]["description"]
    assert f"Other holder: pid {grower.pid} ({grower_job} rank 0) held 70GiB" in description, description
    crash = labels_match(alertname="GpuTrainingProcessEnded", training_job=victim_job, reason="exception",
                         detail="OutOfMemoryError")
    note2, alert2 = stack.webhook.wait_for_alert(crash, timeout=FIRE_TIMEOUT, since=t0)
    assert note2.path == "/page" and "died of an uncaught OutOfMemoryError" in alert2["annotations"]["description"]
    # The OOM's own time (the hook's timestamp) to the notifications.
    t_oom = metric(stack, "training_cuda_oom_last_timestamp_seconds", training_job=victim_job)[0][1]
    assert t_oom <= t_died
    TIMINGS["OOM with co-tenants (from the OOM)"] = note.received_wall - t_oom
    TIMINGS["crash: uncaught OOM (from the OOM)"] = note2.received_wall - t_oom
    # The co-tenant record outlives the victim: NVML no longer lists it, the series still name the grower.
    _simulate(stack, {"gpu": SHARED_GPU, "remove_process": victim.pid})
    holders = wait_until(
        lambda: metric(stack, "training_oom_memory_holder_bytes", training_job=victim_job), 10, message="holders"
    )
    assert [(h["holder_pid"], h["holder_training_job"], v) for h, v in holders] == [
        (str(grower.pid), grower_job, 70 * GiB)
    ]
    grower.stop(signal.SIGKILL)

"""Issue 16's push fields through validation, the store and the training collector: phase, exit,
push interval; and the store keeping what the exporter learned about a process across pushes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.collectors.training import TrainingCollector
from exporter.ingest.store import Holder, IngestStore, OomRecord, ProcessGpu
from exporter.ingest.validate import IngestError, validate_report
from harness.clock import FakeClock
from harness.payloads import payload
from harness.support import parse_metrics


def render(store: IngestStore) -> dict[str, list[tuple[dict[str, str], float]]]:
    reg = CollectorRegistry()
    reg.register(TrainingCollector(store, "node1"))
    return parse_metrics(generate_latest(reg).decode())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("phase", "sleeping", "phase: expected one of"),
        ("exit", {"reason": "exploded", "detail": "", "timestamp": 1.0}, "exit.reason"),
        ("exit", {"reason": "signal", "detail": "SIGTERM", "timestamp": 1.0, "extra": 1}, "exit: unknown"),
        ("exit", {"reason": "signal", "detail": "x" * 500, "timestamp": 1.0}, "exit.detail"),
        ("exit", {"reason": "signal", "detail": "SIGTERM", "timestamp": -1}, "exit.timestamp"),
        ("push_interval_seconds", 0, "push_interval_seconds"),
        ("push_interval_seconds", 1e9, "push_interval_seconds"),
    ],
)
def test_bad_progress_fields_are_refused_with_the_field_named(key: str, value: Any, message: str) -> None:
    with pytest.raises(IngestError) as err:
        validate_report(payload(**{key: value}))
    assert message in str(err.value) and err.value.status == 422


def test_phase_exit_and_waits_render() -> None:
    store = IngestStore(clock=FakeClock())
    doc = payload(phase="collective", exit={"reason": "exception", "detail": "OutOfMemoryError", "timestamp": 5.0})
    store.submit(validate_report(json.loads(json.dumps(doc))))
    m = render(store)
    phases = {lab["phase"]: v for lab, v in m["training_phase"]}
    assert phases == {"between_steps": 0, "data": 0, "compute": 0, "collective": 1, "checkpoint": 0}
    [(labels, value)] = m["training_exit_timestamp_seconds"]
    assert (labels["reason"], labels["detail"], value) == ("exception", "OutOfMemoryError", 5.0)
    assert m["training_collective_wait_seconds_total"][0][1] == 0.0
    assert m["training_step_index"][0][1] == 3
    assert "training_process_gpu_info" not in m  # nothing learned yet


def test_what_the_exporter_learned_survives_new_pushes_and_vanished_is_an_exit() -> None:
    clock = FakeClock()
    store = IngestStore(clock=clock)
    first = validate_report(payload())
    store.submit(first)
    store.learn(first.process_key, gpu=ProcessGpu("3", "GPU-3"))
    doc = payload()
    doc["seq"] += 5
    store.submit(validate_report(doc))
    m = render(store)
    assert [(lab["gpu"], lab["uuid"]) for lab, _ in m["training_process_gpu_info"]] == [("3", "GPU-3")]
    seen = clock.now
    clock.advance(10)
    store.learn(first.process_key, vanished_at=clock.now)
    assert [(lab["reason"], v) for lab, v in render(store)["training_exit_timestamp_seconds"]] == [("vanished", seen)]


def test_an_oom_record_renders_its_gpu_and_co_tenants() -> None:
    store = IngestStore(clock=FakeClock())
    report = validate_report(payload())
    store.submit(report)
    gpu = ProcessGpu("5", "GPU-5")
    holders = (Holder(200, 70 << 30, "grower", "0", "", ""), Holder(4242, 1 << 30, "", "", "nb", "nb-0"))
    store.learn(report.process_key, gpu=gpu, oom=OomRecord(1.0, gpu, holders))
    m = render(store)
    assert [(lab["gpu"], lab["uuid"]) for lab, _ in m["training_cuda_oom_gpu_info"]] == [("5", "GPU-5")]
    rows = {(lab["holder_pid"], lab["holder_training_job"], lab["holder_container"], lab["holder_pod"]): v
            for lab, v in m["training_oom_memory_holder_bytes"]}
    assert rows == {("200", "grower", "", ""): 70 << 30, ("4242", "", "nb", "nb-0"): 1 << 30}
    # What the exporter learned counts in the series in use, exactly as rendered.
    assert store.series == sum(len(v) for k, v in m.items() if k.startswith("training_"))
    store.learn(report.process_key, vanished_at=1.0)
    m = render(store)
    assert store.series == sum(len(v) for k, v in m.items() if k.startswith("training_"))

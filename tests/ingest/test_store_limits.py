"""The store's bounds: distinct jobs and processes tracked at once (--training-max-jobs / -processes)."""

from __future__ import annotations

import json

import pytest

from harness.clock import FakeClock
from harness.payloads import minimal_push


def test_store_limits_distinct_jobs_and_processes() -> None:
    """New jobs past --training-max-jobs and new processes past --training-max-processes get 429;
    existing ones keep updating, and expiry frees room."""
    from exporter.ingest.store import IngestStore
    from exporter.ingest.validate import IngestError, validate_report

    now = FakeClock(1000.0)
    store = IngestStore(ttl_seconds=60, max_processes=6, clock=now, max_jobs=2)

    def push(job: str, rank: int, seq: int = 1) -> str:
        return store.submit(validate_report(json.loads(minimal_push(100 + rank, job, rank, seq))))

    assert [push("a", r) for r in range(4)] == ["accepted"] * 4
    assert push("b", 0) == "accepted"
    with pytest.raises(IngestError, match="2 training jobs") as err:
        push("c", 0)
    assert err.value.status == 429 and err.value.reason == "cardinality"
    assert push("a", 4) == "accepted" and push("a", 0, seq=2) == "accepted"  # known job: fine
    with pytest.raises(IngestError, match="6 training processes"):
        push("b", 1)
    assert push("b", 0, seq=2) == "accepted"  # an update is never refused
    _, rejected, tracked = store.stats()
    assert rejected == {"cardinality": 2} and tracked == 6
    now.advance(30)
    for r in range(5):
        push("a", r, seq=3)
    now.advance(45)  # b is now 75 s old: expired
    assert push("c", 0) == "accepted"
    assert {p.report.training_job for p in store.processes()} == {"a", "c"}

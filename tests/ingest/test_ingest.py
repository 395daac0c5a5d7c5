"""exporter.ingest: validation, the store (stale pushes, restarts, TTL, cardinality), the training
collector's exposition, and the router served by a real uvicorn on loopback. (The PID join that uses
the store's reports: tests/attribution/test_training_join.py.)"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.collectors.training import TrainingCollector
from exporter.hook.schema import INGEST_PATH, MAX_SERIES_PER_PROCESS
from exporter.ingest.router import make_ingest_router
from exporter.ingest.store import IngestStore
from exporter.ingest.validate import IngestError, parse_body, validate_report
from harness.clock import FakeClock
from harness.payloads import largest_push, payload
from harness.support import free_port, http_get, http_post_json, parse_metrics, wait_until


def render(store: IngestStore, host: str = "node1") -> dict[str, list[tuple[dict[str, str], float]]]:
    reg = CollectorRegistry()
    reg.register(TrainingCollector(store, host))
    return parse_metrics(generate_latest(reg).decode())


# ------------------------------------------------------------------------------------------ validation
def test_hook_payload_round_trips_through_validation() -> None:
    report = validate_report(json.loads(json.dumps(payload())))
    assert report.training_job == "job-a" and report.rank == "1" and report.world_size == "2"
    assert report.counters["steps"] == 3 and report.counters["samples"] == 24
    assert report.gauges["loss"] == 0.5
    assert report.auth_failures == {("hf_hub", "401"): 1}
    assert report.api_quota == {"openai": (10.0, 100.0)}


def test_nan_loss_is_accepted_but_nan_elsewhere_is_not() -> None:
    doc = payload()
    doc["gauges"]["loss"] = float("nan")
    assert validate_report(json.loads(json.dumps(doc))).gauges["loss"] != 0.0
    doc["gauges"]["last_step_duration_seconds"] = float("inf")
    with pytest.raises(IngestError, match=r"gauges.last_step_duration_seconds: expected a finite number"):
        validate_report(json.loads(json.dumps(doc)))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema=2), "schema: expected 1"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["counters"].update(steps=-1), "counters.steps: expected a non-negative number"),
        (lambda d: d["counters"].update(steps="3"), "counters.steps: expected a number"),
        (lambda d: d["counters"].update(bogus=1), "unknown counter 'bogus'"),
        (lambda d: d["gauges"].update(bogus=1), "unknown gauge 'bogus'"),
        (lambda d: d["identity"].update(pid=0), "identity.pid"),
        (lambda d: d["identity"].update(training_job=""), "identity.training_job: must not be empty"),
        (lambda d: d["identity"].update(rank="x" * 500), "identity.rank: longer than 128"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(auth_failures={}), "auth_failures: expected a list"),
        (lambda d: d.update(token_expiry={f"s{i}": 1 for i in range(40)}), "more than 32 entries"),
    ],
)
def test_schema_errors_name_the_field(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(payload())
    mutate(doc)
    with pytest.raises(IngestError, match=message) as info:
        validate_report(doc)
    assert info.value.status == 422


def test_body_limits() -> None:
    with pytest.raises(IngestError) as info:
        parse_body(b"{" * 70_000)
    assert info.value.status == 413 and info.value.reason == "too_large"
    with pytest.raises(IngestError) as info:
        parse_body(b"not json")
    assert info.value.status == 400


# ---------------------------------------------------------------------------------------------- store
def test_store_drops_reordered_pushes_and_replaces_restarted_process() -> None:
    clock = FakeClock(1_000_000.0)
    store = IngestStore(clock=clock)
    base = payload()
    newer = validate_report({**base, "seq": 5})
    older = validate_report({**base, "seq": 4})
    assert store.submit(newer) == "accepted"
    assert store.submit(older) == "stale"
    assert store.submit(newer) == "stale"  # a repeated push changes nothing
    assert store.processes()[0].report.seq == 5
    restarted = copy.deepcopy({**base, "seq": 1})
    restarted["process_start_time"] += 10
    restarted["counters"]["steps"] = 1
    assert store.submit(validate_report(restarted)) == "accepted"
    assert [p.report.counters["steps"] for p in store.processes()] == [1]


def test_store_ttl_keeps_then_expires() -> None:
    clock = FakeClock(1_000_000.0)
    store = IngestStore(ttl_seconds=60, clock=clock)
    store.submit(validate_report(payload()))
    clock.now += 59
    assert len(store.processes()) == 1
    assert render(store)["training_last_seen_timestamp_seconds"][0][1] == 1_000_000.0
    gen = store.generation
    clock.now += 2
    assert store.processes() == []
    assert store.generation > gen
    assert "training_steps_total" not in render(store)


def test_store_cardinality_limit() -> None:
    store = IngestStore(max_processes=1)
    doc = payload()
    store.submit(validate_report(doc))
    other = copy.deepcopy(doc)
    other["identity"]["pid"] += 1
    with pytest.raises(IngestError) as info:
        store.submit(validate_report(other))
    assert info.value.reason == "cardinality" and info.value.status == 429
    assert store.stats()[1] == {"cardinality": 1}


# ---------------------------------------------------------------------------------------- collector
def _training_samples(store: IngestStore) -> int:
    return sum(len(v) for k, v in render(store).items() if k.startswith("training_"))


def test_series_cost_is_what_the_collector_renders() -> None:
    """TrainingReport.series (what the budget counts) equals the samples rendered for the report, from
    the smallest push to the largest the schema allows (MAX_SERIES_PER_PROCESS)."""
    small = {"schema": 1, "seq": 1, "process_start_time": 1.0, "identity": {"training_job": "j", "pid": 5}}
    largest = largest_push(7)
    no_limit = copy.deepcopy(largest)
    no_limit["api_quota"] = {"s": {"remaining": 1}}
    only_sum = dict(small, counters={"step_duration_seconds_sum": 1.0})
    cases = [small, payload(), largest, no_limit, only_sum]
    for doc in cases:
        store = IngestStore(clock=FakeClock())
        report = validate_report(copy.deepcopy(doc))
        store.submit(report)
        assert _training_samples(store) == report.series == store.series, doc
    assert validate_report(largest).series == MAX_SERIES_PER_PROCESS


def test_series_budget_total_and_per_process() -> None:
    """New processes and growing updates past the budget get 429 series_budget and change nothing;
    expiry gives the series back."""
    clock = FakeClock()
    probe = payload()
    probe["auth_failures"], probe["token_expiry"], probe["api_quota"] = [], {}, {}
    base = validate_report(probe).series  # one process without per-service sections
    store = IngestStore(ttl_seconds=60, clock=clock, max_series=2 * base + 5, max_series_per_process=base + 17)

    def push(pid: int, seq: int = 1, services: int = 0) -> str:
        doc = payload()
        doc["identity"]["pid"], doc["seq"] = pid, seq
        doc["auth_failures"], doc["token_expiry"] = [], {}
        doc["api_quota"] = {f"s{i}": {"remaining": 1, "limit": 2} for i in range(services)}
        return store.submit(validate_report(doc))

    assert push(1) == "accepted"
    assert store.series == base
    with pytest.raises(IngestError, match="--training-max-series-per-process") as err:
        push(2, services=10)  # base + 20 > base + 17
    assert err.value.status == 429 and err.value.reason == "series_budget"
    assert push(2, services=2) == "accepted"
    assert store.series == 2 * base + 4
    with pytest.raises(IngestError, match=r"\(--training-max-series\)"):
        push(3)
    with pytest.raises(IngestError, match=f"the budget is {2 * base + 5}"):
        push(1, seq=2, services=6)  # an update that grows past the total: refused, the old one stays
    assert [p.report.seq for p in store.processes() if p.report.pid == 1] == [1]
    assert push(2, seq=2) == "accepted"  # an update that shrinks is always taken
    assert store.series == 2 * base
    assert store.stats()[1] == {"series_budget": 3}
    clock.now += 61
    store.expire()
    assert store.series == 0
    assert push(3) == "accepted"


def test_collector_renders_training_series_with_labels() -> None:
    store = IngestStore()
    doc = payload()
    store.submit(validate_report(doc))
    m = render(store)
    labels = {
        "host": "node1",
        "training_job": "job-a",
        "rank": "1",
        "local_rank": "1",
        "world_size": "2",
        "pid": str(doc["identity"]["pid"]),
    }
    assert m["training_steps_total"] == [(labels, 3.0)]
    assert m["training_samples_total"] == [(labels, 24.0)]
    assert m["training_tokens_total"] == [(labels, 300.0)]
    assert m["training_step_duration_seconds_count"] == [(labels, 3.0)]
    assert m["training_loss"] == [(labels, 0.5)]
    assert m["training_auth_failures_total"] == [({**labels, "service": "hf_hub", "status_code": "401"}, 1.0)]
    assert m["training_token_expiry_timestamp_seconds"] == [({**labels, "service": "hf_hub"}, 2e9)]
    assert m["training_api_quota_remaining"] == [({**labels, "service": "openai"}, 10.0)]
    assert m["training_api_quota_limit"] == [({**labels, "service": "openai"}, 100.0)]
    info = m["training_info"][0][0]
    assert info["framework"] == "plain" and info["device"] == "cpu"
    assert m["gpu_exporter_training_processes"] == [({"host": "node1"}, 1.0)]
    assert ({"host": "node1", "outcome": "accepted"}, 1.0) in m["gpu_exporter_ingest_requests_total"]
    # Same labels from a different container (another hostname, same PID): one series, newest wins.
    twin = copy.deepcopy(doc)
    twin["identity"]["hostname"] = "other-container"
    twin["counters"]["steps"] = 7
    store.submit(validate_report(twin))
    assert render(store)["training_steps_total"] == [(labels, 7.0)]


# ------------------------------------------------------------------------------ router over real HTTP
@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on a loopback port; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, message="uvicorn started")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def served_store() -> Iterator[tuple[IngestStore, str]]:
    from fastapi import FastAPI

    store = IngestStore()
    app = FastAPI()
    app.include_router(make_ingest_router(store, max_body_bytes=4096))
    with serve(app) as base:
        yield store, base


def test_router_accepts_rejects_and_counts(served_store: tuple[IngestStore, str]) -> None:
    store, base = served_store
    url = base + INGEST_PATH
    status, body = http_post_json(url, payload())
    assert status == 202 and json.loads(body)["status"] == "accepted"
    bad = payload()
    bad["counters"]["steps"] = -3
    status, body = http_post_json(url, bad)
    assert status == 422 and "counters.steps" in json.loads(body)["error"]
    big = payload()
    big["identity"]["training_job"] = "x" * 100
    big["token_expiry"] = {f"svc{i:03d}-{'y' * 100}": 1.0 for i in range(30)}
    status, body = http_post_json(url, big)
    assert status == 413 and json.loads(body)["reason"] == "too_large"
    status, _ = http_get(url)
    assert status == 405
    requests, rejected, tracked = store.stats()
    assert requests == {"accepted": 1, "rejected": 2}
    assert rejected == {"schema": 1, "too_large": 1}
    assert tracked == 1


def test_router_takes_dependencies() -> None:
    """The hardening layer plugs auth / rate limits in as FastAPI dependencies."""
    from fastapi import Depends, FastAPI, HTTPException

    store = IngestStore()

    def deny() -> None:
        store.count_rejected("unauthorized")
        raise HTTPException(status_code=401, detail="no token")

    app = FastAPI()
    app.include_router(make_ingest_router(store, dependencies=[Depends(deny)]))
    with serve(app) as base:
        status, _ = http_post_json(base + INGEST_PATH, payload())
    assert status == 401
    assert store.stats()[1] == {"unauthorized": 1}
    assert store.processes() == []


def test_store_is_thread_safe_under_concurrent_pushes() -> None:
    store = IngestStore()
    reports = []
    for i in range(8):
        doc = payload()
        doc["identity"]["pid"] = 1000 + i
        reports.append(doc)

    def push(doc: dict[str, Any]) -> None:
        for seq in range(1, 200):
            doc["seq"] = seq
            store.submit(validate_report(doc))

    threads = [threading.Thread(target=push, args=(copy.deepcopy(d),)) for d in reports]
    deadline = time.monotonic() + 30
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert sorted(p.report.seq for p in store.processes()) == [199] * 8

"""Property-based tests of POST /api/v1/training against the real app (exporter.cli.build, in-process).

Whatever arrives (random JSON, near-valid pushes with one field mutated, raw bytes, floods of new
identities), the exporter answers 2xx/4xx, never 5xx; /metrics keeps rendering every collector; and the
number of tracked training processes stays within the configured bound. Example counts are fixed so
the file runs in well under a minute on a slow CI machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from exporter.cli import build
from exporter.config import load_settings
from exporter.hook.schema import COUNTERS, GAUGES, INGEST_PATH, MAX_BODY_BYTES
from harness.support import parse_metrics

MAX_PROCESSES = 40
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    env = {"GPU_EXPORTER_SIMULATE": "healthy-8gpu"}
    argv = ["--listen", "127.0.0.1:1", "--interval", "1", "--training-max-processes", str(MAX_PROCESSES),
            "--ingest-rate-limit", "0"]
    runtime = build(load_settings(argv, environ=env))
    runtime.poller.start()
    try:
        with TestClient(runtime.app, client=("127.0.0.1", 50123), raise_server_exceptions=False) as c:
            yield c
    finally:
        runtime.close()


def valid_push(pid: int = 4242, job: str = "fuzz", rank: str = "0", seq: int = 1) -> dict[str, Any]:
    return {
        "schema": 1,
        "seq": seq,
        "process_start_time": 1_700_000_000.0,
        "sent_at": 1_700_000_100.0,
        "identity": {
            "hostname": "node-1", "training_job": job, "rank": rank, "local_rank": rank, "world_size": "2",
            "pid": pid, "pid_namespace_inode": 4026531836, "device": "cpu", "torch_version": "2.13.0",
            "framework": "plain",
        },
        "counters": {k: 10.0 for k in COUNTERS},
        "gauges": {k: 1.5 for k in GAUGES},
        "auth_failures": [{"service": "hf", "status_code": "401", "count": 2}],
        "token_expiry": {"hf": 1_800_000_000.0},
        "api_quota": {"hf": {"remaining": 10, "limit": 100}},
    }


def post(client: TestClient, body: bytes) -> int:
    r = client.post(INGEST_PATH, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, body[:300])
    if r.status_code >= 400:
        assert r.json().get("reason") in {"schema", "too_large", "cardinality", "unauthorized", "rate_limited"}
    return r.status_code


def check_metrics(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = client.get("/metrics")
    assert r.status_code == 200
    m = parse_metrics(r.text)
    failed = [lab["collector"] for lab, v in m["gpu_exporter_collector_success"] if v != 1]
    assert not failed, f"collectors failed to render after fuzzing: {failed}"
    tracked = m["gpu_exporter_training_processes"][0][1]
    assert tracked <= MAX_PROCESSES
    return m


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=20), kids, max_size=5),
    max_leaves=30,
)
# Strings a label must survive: control characters, quotes, backslashes, newlines, every plane.
nasty_text = st.text(st.characters(codec="utf-8"), max_size=200) | st.sampled_from(
    ["", "\n", '"', "\\", "a\x00b", "\u2028", "😀" * 40, "x" * 129, "x" * 128]
)


@FUZZ
@given(body=json_values)
def test_random_json_never_5xx(client: TestClient, body: Any) -> None:
    assert post(client, json.dumps(body).encode()) in (202, 400, 413, 422, 429)


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_random_bytes_never_5xx(client: TestClient, raw: bytes) -> None:
    assert post(client, raw) in (202, 400, 413, 422, 429)


def _mutations() -> st.SearchStrategy[tuple[tuple[str, ...], Any]]:
    paths = [("schema",), ("seq",), ("process_start_time",), ("identity",), ("counters",), ("gauges",),
             ("auth_failures",), ("token_expiry",), ("api_quota",), ("extra_key",)]
    paths += [("identity", k) for k in valid_push()["identity"]] + [("identity", "unexpected")]
    paths += [("counters", k) for k in list(COUNTERS)[:3]] + [("gauges", "loss"), ("gauges", "nope")]
    paths += [("auth_failures", 0, k) for k in ("service", "status_code", "count")]  # type: ignore[misc]
    values = json_values | nasty_text | st.sampled_from([-1, 2**63, -(2**63), 1e308, -0.0, 2**31 + 1])
    return st.tuples(st.sampled_from(paths), values)


@FUZZ
@given(mutation=_mutations(), pid=st.integers(1, 10**6))
def test_near_valid_pushes(client: TestClient, mutation: tuple[tuple[Any, ...], Any], pid: int) -> None:
    doc = valid_push(pid=pid % 7 + 1, job="near-valid")  # few identities: the store stays small
    path, value = mutation
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    status = post(client, json.dumps(doc).encode())
    assert status in (202, 400, 422, 429)


@FUZZ
@given(job=nasty_text, rank=nasty_text, service=nasty_text)
def test_label_values_cannot_break_the_exposition(client: TestClient, job: str, rank: str, service: str) -> None:
    doc = valid_push(pid=99, job=job or "j", rank=rank)
    doc["auth_failures"][0]["service"] = service or "s"
    status = post(client, json.dumps(doc).encode())
    if status == 202:
        assert len(job) <= 128 and len(rank) <= 128
    check_metrics(client)


def test_lone_surrogates_and_nonfinite_numbers(client: TestClient) -> None:
    """JSON can carry what Python's UTF-8 encoder and Prometheus's text format cannot."""
    base = json.dumps(valid_push(pid=77))
    for needle, replacement in (
        ('"training_job": "fuzz"', '"training_job": "bad\\ud800"'),
        ('"service": "hf"', '"service": "\\udfff"'),
        ('"steps": 10.0', '"steps": NaN'),
        ('"steps": 10.0', '"steps": Infinity'),
        ('"steps": 10.0', '"steps": 1e999'),
    ):
        assert needle in base
        assert post(client, base.replace(needle, replacement, 1).encode()) in (400, 422)
    check_metrics(client)


def test_oversized_and_deep_bodies(client: TestClient) -> None:
    assert post(client, b"[" * 100_000 + b"]" * 100_000) == 413
    assert post(client, b"[" * 20_000 + b"]" * 20_000) in (400, 422)  # deep but small: no RecursionError 500
    doc = valid_push(pid=5)
    doc["identity"]["device"] = "x" * MAX_BODY_BYTES
    assert post(client, json.dumps(doc).encode()) == 413
    check_metrics(client)


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
ROUTES = ["/metrics", "/healthz", "/readyz", "/status", "/-/simulate/events", INGEST_PATH, "/", "/docs",
          "/openapi.json", "/api/v1/training/x", "/metrics/", "/%00", "/..%2f..%2fetc%2fpasswd"]


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    path=st.sampled_from(ROUTES) | printable.map(lambda t: "/" + t.replace("?", "").replace("#", "")),
    query=printable,
    body=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()),
    headers=st.dictionaries(
        st.sampled_from(["Authorization", "Accept", "Content-Type", "Accept-Encoding", "X-Forwarded-For"]),
        printable, max_size=4,
    ),
)
def test_every_route_never_5xx(
    client: TestClient, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
) -> None:
    """Any method, path, query, header and body on the real app: 2xx/3xx/4xx, never 5xx."""
    r = client.request(method, path, params={"q": query} if query else None, content=body, headers=headers)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])


@FUZZ
@given(event=st.dictionaries(st.text(max_size=20), json_values, max_size=4) | json_values)
def test_simulate_events_never_5xx(client: TestClient, event: Any) -> None:
    """Malformed simulator events are 400 with a message; nothing reaches the fake NVML half-checked."""
    r = client.post("/-/simulate/events", content=json.dumps(event).encode())
    assert r.status_code in (200, 400), (event, r.status_code, r.text[:300])
    if r.status_code == 400:
        assert r.json()["error"]


def test_identity_flood_is_bounded(client: TestClient) -> None:
    """More new processes than --training-max-processes: the excess gets 429, memory stays bounded."""
    codes = [post(client, json.dumps(valid_push(pid=10_000 + i, job=f"flood-{i}")).encode())
             for i in range(MAX_PROCESSES + 25)]
    assert codes.count(429) >= 25
    m = check_metrics(client)
    assert m["gpu_exporter_training_processes"][0][1] == MAX_PROCESSES
    rejected = {lab["reason"]: v for lab, v in m["gpu_exporter_ingest_rejected_total"]}
    assert rejected.get("cardinality", 0) >= 25
    assert all(math.isfinite(v) for _, v in m["gpu_exporter_ingest_rejected_total"])
    # Bounded in bytes too: at the limit the exposition holds a fixed number of series per process.
    size_at_limit = len(client.get("/metrics").content)
    for i in range(50):
        post(client, json.dumps(valid_push(pid=20_000 + i, job=f"more-{i}")).encode())
    assert len(client.get("/metrics").content) <= size_at_limit * 1.05

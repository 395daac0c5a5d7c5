"""The hook never goes quiet (issue 13): non-finite or wrong-typed values passed to its public calls are
dropped and counted (the count reaches the exporter), a push the exporter refuses as invalid does not
freeze the job's series, and stop() stays bounded against a server that trickles its answer."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.hook.monitor import Monitor
from exporter.hook.sender import Sender
from harness.support import (
    REPO_ROOT,
    ManagedProcess,
    http_get,
    parse_metrics,
    scrape,
    start_exporter,
    wait_until,
)

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def exporter(log_dir: Path) -> Iterator[tuple[ManagedProcess, str]]:
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--interval", "1")
    yield proc, base
    proc.stop()


def _series(base: str, name: str, job: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for lab, v in scrape(base).get(name, []) if lab.get("training_job") == job]


def test_bad_values_are_dropped_counted_and_never_poison_later_pushes(
    exporter: tuple[ManagedProcess, str],
) -> None:
    _, base = exporter
    mon = Monitor("sanitise")
    sender = Sender(mon, base, interval=0.05)
    bad: list[Any] = [
        lambda: mon.set_api_quota("q", NAN),
        lambda: mon.set_api_quota("q2", 5, INF),
        lambda: mon.set_api_quota("q3", "5"),
        lambda: mon.set_token_expiry("t", INF),
        lambda: mon.set_token_expiry("t2", "tomorrow"),
        lambda: mon.record_auth_failure("a", {"a": [1, 2]}),
        lambda: mon.record_oom(requested_bytes=NAN),
        lambda: mon.step_end(samples=INF),
    ]
    for call in bad:
        call()
    with mon.step(samples=NAN):
        pass
    with mon.step(tokens=-INF):
        pass
    with mon.step(samples=True):
        pass
    for _ in range(20):
        with mon.step(samples=2, tokens=3):
            pass
    mon.set_api_quota("good", 3, 10)
    mon.set_token_expiry("good", 1_900_000_000)
    mon.record_auth_failure("good", 403)
    sender.start()
    try:
        wait_until(lambda: _series(base, "training_steps_total", "sanitise"), timeout=30,
                   message="the hook's pushes on /metrics")
        m = scrape(base)
    finally:
        sender.stop()

    def one(name: str) -> float:
        values = [v for lab, v in m.get(name, []) if lab.get("training_job") == "sanitise"]
        assert len(values) == 1, (name, values)
        return values[0]

    assert one("training_steps_total") == 24.0  # a step with a bad sample count is still a step
    assert one("training_samples_total") == 40.0 and one("training_tokens_total") == 60.0
    assert one("training_hook_invalid_values_total") == 11.0
    assert [lab["service"] for lab, _ in m["training_api_quota_remaining"]] == ["good"]
    assert [lab["service"] for lab, _ in m["training_token_expiry_timestamp_seconds"]] == ["good"]
    assert [(lab["service"], lab["status_code"]) for lab, _ in m["training_auth_failures_total"]] == [("good", "403")]
    assert "gpu_exporter_ingest_rejected_total" not in m or not [
        v for lab, v in m["gpu_exporter_ingest_rejected_total"] if lab["reason"] == "schema"]
    # one ingest rejection or a non-finite in the recorder would have frozen these; they still move
    assert sender.pushes_failed == 0


def test_a_refused_push_is_logged_once_and_the_job_keeps_reporting(
    exporter: tuple[ManagedProcess, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """A newer hook against an older exporter (a counter this exporter does not know) is refused with
    422: the hook says so once and falls back to the fields every exporter takes."""
    _, base = exporter
    mon = Monitor("skewed")
    real_build = mon.build_payload

    def from_the_future() -> dict[str, Any]:
        payload = real_build()
        payload["counters"]["from_the_future"] = 1.0
        return payload

    mon.build_payload = from_the_future  # type: ignore[method-assign]
    sender = Sender(mon, base, interval=0.05)
    with caplog.at_level(logging.WARNING, logger="exporter.hook"):
        sender.start()
        try:
            for target in (5, 10):
                while mon.steps < target:
                    with mon.step(samples=1):
                        pass
                wait_until(lambda t=target: [v for _, v in _series(base, "training_steps_total", "skewed")] == [t],
                           timeout=30, message=f"{target} steps on /metrics despite the refusals")
        finally:
            sender.stop()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert "from_the_future" in refused[0].getMessage()


class TricklingServer:
    """Accepts connections and answers one byte every ``period`` seconds, never finishing."""

    def __init__(self, period: float = 0.2) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.period = period
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            for ch in b"HTTP/1.1 202 Accepted\r\nX-Slow: " + b"z" * 10_000:
                if self.closed.wait(self.period):
                    return
                try:
                    conn.sendall(bytes([ch]))
                except OSError:
                    return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_stop_is_bounded_against_a_trickling_server() -> None:
    server = TricklingServer()
    mon = Monitor("trickle")
    sender = Sender(mon, f"http://127.0.0.1:{server.port}", interval=0.05)
    sender.start()
    try:
        wait_until(lambda: server.connections >= 1, timeout=10, message="the sender connected")
        started = time.monotonic()
        sender.stop(flush=True)
        took = time.monotonic() - started
    finally:
        server.close()
    assert took < 2.0, f"stop() took {took:.1f} s; documented bound ~1 s"


def test_invalid_value_counter_reaches_the_exporter_on_its_own_name(exporter: tuple[ManagedProcess, str]) -> None:
    """The counter is part of docs/metrics.md's training families (checked by name here)."""
    _, base = exporter
    mon = Monitor("counted")
    mon.set_api_quota("q", NAN)
    sender = Sender(mon, base, interval=0.05)
    assert sender.push_once()
    m = parse_metrics(http_get(base + "/metrics")[1])
    assert [v for lab, v in m["training_hook_invalid_values_total"] if lab["training_job"] == "counted"] == [1.0]
    assert (REPO_ROOT / "docs" / "metrics.md").read_text().count(
        "training_hook_invalid_values_total") >= 1


def test_core_fields_are_the_schema_1_figures() -> None:
    """What the hook falls back to must be what every exporter since schema 1 takes: the 22 figures
    of schema 1, none added since."""
    from exporter.hook.schema import CORE_KEYS
    from exporter.hook.sender import core_payload

    assert len(CORE_KEYS) == 22 and {"steps", "loss", "cuda_oom", "cuda_oom_last_timestamp_seconds"} <= CORE_KEYS
    assert "invalid_values" not in CORE_KEYS
    mon = Monitor("core")
    mon.set_api_quota("q", 1, 2)
    payload = core_payload(mon.build_payload())
    assert set(payload) == {"schema", "seq", "process_start_time", "identity", "counters", "gauges"}
    assert set(payload["counters"]) | set(payload["gauges"]) <= CORE_KEYS

"""Delivery (exporter.hook.sender) against a real HTTP server on loopback: cumulative pushes with the
bearer token, one log line per outage, backoff, recovery, refusals, and a training thread that is
never blocked by a hung exporter."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from exporter.hook.monitor import Monitor
from exporter.hook.schema import INGEST_PATH
from exporter.hook.sender import Sender
from harness.support import free_port, wait_until


class Receiver:
    """A tiny exporter stand-in: records pushes; can answer with a given status or hang."""

    def __init__(self, port: int) -> None:
        self.pushes: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = 202
        self.hang = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hang.is_set():
                    receiver.release.wait(10)
                receiver.pushes.append(json.loads(body))
                receiver.headers.append(dict(self.headers))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def receiver(port: int) -> Iterator[Receiver]:
    r = Receiver(port)
    yield r
    r.close()


def test_pushes_are_cumulative_with_token(
    receiver: Receiver, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPU_EXPORTER_TOKEN", "s3cret-token-value")
    mon = Monitor("j")
    sender = Sender(mon, f"http://127.0.0.1:{port}", interval=0.05)
    sender.start()
    try:
        for _ in range(20):
            with mon.step(samples=1):
                pass
        wait_until(lambda: receiver.pushes and receiver.pushes[-1]["counters"]["steps"] == 20, timeout=10)
    finally:
        sender.stop(flush=True)
    seqs = [p["seq"] for p in receiver.pushes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    steps = [p["counters"]["steps"] for p in receiver.pushes]
    assert steps == sorted(steps)  # cumulative: never goes down
    assert receiver.headers[-1]["Authorization"] == "Bearer s3cret-token-value"


def test_unreachable_logs_once_backs_off_and_recovers(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.hook")
    mon = Monitor("j")
    sender = Sender(mon, f"http://127.0.0.1:{port}", interval=0.02)
    sender.start()
    receiver = None
    try:
        wait_until(lambda: sender.pushes_failed >= 4, timeout=20, message="a few failed pushes")
        cannot = [r for r in caplog.records if "cannot reach" in r.getMessage()]
        assert len(cannot) == 1  # said once, not per retry
        assert sender._failures_in_row >= 4  # backing off: 0.02, 0.04, 0.08, 0.16 ...
        with mon.step(samples=3):
            pass
        receiver = Receiver(port)  # the exporter comes (back) up
        wait_until(lambda: receiver.pushes, timeout=30, message="push after recovery")
        assert receiver.pushes[-1]["counters"]["samples"] == 3  # the state kept while down
        assert any("again" in r.getMessage() for r in caplog.records)
    finally:
        sender.stop(flush=False)
        if receiver is not None:
            receiver.close()


def test_refusal_is_logged_once(receiver: Receiver, port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="exporter.hook")
    receiver.status = 422
    mon = Monitor("j")
    sender = Sender(mon, f"http://127.0.0.1:{port}", interval=0.01)
    sender.start()
    try:
        wait_until(lambda: len(receiver.pushes) >= 3, timeout=20)
    finally:
        sender.stop(flush=False)
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


def test_hung_exporter_never_blocks_training(receiver: Receiver, port: int) -> None:
    receiver.hang.set()
    mon = Monitor("j")
    sender = Sender(mon, f"http://127.0.0.1:{port}", interval=0.01, timeout=5)
    sender.start()
    try:
        wait_until(lambda: sender._thread.is_alive(), timeout=5)
        for _ in range(10_000):  # the sender is stuck in a request the whole time
            with mon.step(samples=1):
                pass
            mon.observe_loss(1.0)
        assert mon.steps == 10_000
        assert receiver.pushes == []  # still hung: training did not wait for it
    finally:
        receiver.release.set()
        sender.stop(flush=False)


def test_silent_monitor_sends_nothing(receiver: Receiver, port: int) -> None:
    mon = Monitor("j")
    mon._silent = True
    assert Sender(mon, f"http://127.0.0.1:{port}").push_once() is True
    assert receiver.pushes == [] and INGEST_PATH == "/api/v1/training"

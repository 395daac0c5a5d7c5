"""The HTTP server on loopback: the real ``python -m exporter --simulate ...`` process, plus an
in-process uvicorn around a gated test reader for the timing-sensitive cases (first poll, hung poll)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from exporter.poller import Poller
from exporter.snapshot import GpuSample, NodeSnapshot
from exporter.web.app import create_app
from harness.support import (
    ManagedProcess,
    free_port,
    http_get,
    http_post_json,
    parse_metrics,
    start_exporter,
    wait_until,
)

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


# ------------------------------------------------------------------------ the real exporter process


@pytest.fixture(scope="module")
def exporter_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("server-logs")
    proc, base = start_exporter(logs, "--simulate", "healthy-8gpu", "--interval", "0.2", "--host-label", "node-a")
    try:
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=20, message="readyz 200")
        yield base
    finally:
        proc.stop()


def test_metrics_text_format(exporter_url: str) -> None:
    status, body = http_get(exporter_url + "/metrics")
    assert status == 200
    samples = parse_metrics(body)
    up = samples["gpu_up"]
    assert sorted(int(labels["gpu"]) for labels, _ in up) == list(range(8))
    assert all(labels["host"] == "node-a" and value == 1.0 for labels, value in up)
    assert samples["gpu_exporter_nvml_up"] == [({"host": "node-a"}, 1.0)]
    assert samples["gpu_exporter_polls_total"][0][1] >= 1
    build = samples["gpu_exporter_build_info"][0][0]
    assert build["nvml_library"] == "simulated"
    success = {labels["collector"]: v for labels, v in samples["gpu_exporter_collector_success"]}
    assert success["gpu"] == 1.0


def test_openmetrics_negotiated(exporter_url: str) -> None:
    import urllib.request

    req = urllib.request.Request(exporter_url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    with urllib.request.urlopen(req, timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        body = resp.read().decode()
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(body)}  # parses strictly, or raises
    assert {"gpu_up", "gpu_exporter_polls"} <= names
    # Plain clients still get the classic format.
    with urllib.request.urlopen(exporter_url + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_status_page(exporter_url: str) -> None:
    status, body = http_get(exporter_url + "/status")
    assert status == 200
    doc = json.loads(body)
    assert doc["simulated"] is True and doc["ready"] is True and doc["nvml_up"] is True
    assert doc["config"]["simulate"] == "healthy-8gpu"
    assert doc["config"]["host_label"] == "node-a"
    assert doc["gpu_count"] == 8
    gpu = doc["gpus"][0]
    assert set(gpu) >= {"index", "uuid", "name", "up", "error", "unsupported", "processes"}
    assert gpu["uuid"].startswith("GPU-") and gpu["up"] is True
    assert doc["driver_version"]
    assert doc["last_poll"]["polls_total"] >= 1


def test_healthz_and_unknown_path(exporter_url: str) -> None:
    assert http_get(exporter_url + "/healthz")[0] == 200
    assert http_get(exporter_url + "/nope")[0] == 404


def test_simulated_event_bad_and_good(exporter_url: str) -> None:
    status, body = http_post_json(exporter_url + "/-/simulate/events", {"no_such_key": 1})
    assert status == 400
    assert "no_such_key" in json.loads(body)["error"]
    status, body = http_post_json(exporter_url + "/-/simulate/events", [1, 2])
    assert status == 400
    status, _ = http_post_json(exporter_url + "/-/simulate/events", {"gpu": 3, "set": {"temperature_gpu_celsius": 91}})
    assert status == 200, _

    def hot() -> bool:
        temps = parse_metrics(http_get(exporter_url + "/metrics")[1])["gpu_temperature_celsius"]
        return any(labels["gpu"] == "3" and value == 91 for labels, value in temps)

    wait_until(hot, timeout=10, message="GPU 3 at 91 C after the event")


def test_scrape_during_a_hung_nvml_call_returns_at_once(tmp_path: Path) -> None:
    """The simulator makes NVML hang for 3 s per poll; scrapes keep answering from the last snapshot."""
    proc, base = start_exporter(tmp_path, "--simulate", "healthy-8gpu", "--interval", "0.2")
    try:
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=20, message="ready")
        assert http_post_json(base + "/-/simulate/events", {"nvml_delay_seconds": 3})[0] == 200

        def hung_for_a_while() -> bool:
            poll = json.loads(http_get(base + "/status")[1])["last_poll"]
            return (poll["in_progress_seconds"] or 0) > 0.5

        wait_until(hung_for_a_while, timeout=10, message="a poll hanging in NVML")
        started = time.monotonic()
        status, body = http_get(base + "/metrics", timeout=5)
        elapsed = time.monotonic() - started
        assert status == 200
        assert elapsed < 1.0, f"scrape took {elapsed:.2f}s during a hung poll"
        samples = parse_metrics(body)
        assert len(samples["gpu_up"]) == 8  # still the last good snapshot
        assert samples["gpu_exporter_snapshot_age_seconds"][0][1] > 0.5
        assert http_post_json(base + "/-/simulate/events", {"nvml_delay_seconds": 0})[0] == 200
    finally:
        proc.stop()


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    proc, base = start_exporter(tmp_path, "--simulate", "healthy-8gpu", "--interval", "0.2")
    wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=20, message="ready")
    assert proc.stop(signal.SIGTERM) == 0
    assert "stopped on signal SIGTERM" in proc.log()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen(tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess(
        "exporter6",
        [sys.executable, "-m", "exporter", "--simulate", "healthy-8gpu", "--listen", f"[::1]:{port}"],
        tmp_path,
    )
    try:
        wait_until(lambda: http_get(f"http://[::1]:{port}/healthz", timeout=1)[0] == 200, timeout=30,
                   message="exporter on [::1]")
    finally:
        proc.stop()


def test_port_in_use_exits_nonzero(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "--simulate", "healthy-8gpu", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()


# ------------------------------------------------ in-process server around a gated reader (timing cases)


class GatedReader:
    """A reader whose read() blocks until the test opens the gate, like a hung NVML call."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads = 0

    def read(self) -> NodeSnapshot:
        self.gate.wait(30)
        self.reads += 1
        gpus = (GpuSample(index=0, uuid="GPU-0"),)
        return NodeSnapshot(host="h", timestamp_seconds=time.time(), nvml_up=True, gpus=gpus)


@contextlib.contextmanager
def serve_in_thread(poller: Poller, **kwargs: object) -> Iterator[str]:
    app = create_app(poller, host="h", **kwargs)  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(base + "/healthz", timeout=1)[0] == 200, timeout=10, message="server up")
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


def test_readyz_waits_for_first_snapshot_and_scrapes_never_wait_for_a_poll() -> None:
    reader = GatedReader()
    poller = Poller(reader, 0.05)
    poller.start()
    try:
        with serve_in_thread(poller) as base:
            # First poll hung: alive, not ready, /metrics still answers at once (self-metrics only).
            assert http_get(base + "/healthz")[0] == 200
            assert http_get(base + "/readyz")[0] == 503
            started = time.monotonic()
            status, body = http_get(base + "/metrics", timeout=2)
            assert status == 200 and time.monotonic() - started < 2
            assert parse_metrics(body)["gpu_exporter_nvml_up"][0][1] == 0.0
            reader.gate.set()
            wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=5, message="ready")
            # Now hang a later poll: scrapes return immediately with the previous snapshot.
            reader.gate.clear()
            wait_until(lambda: poller.stats.in_progress_since is not None, timeout=5, message="hung poll")

            def age() -> float:
                started = time.monotonic()
                status, body = http_get(base + "/metrics", timeout=2)
                assert status == 200 and time.monotonic() - started < 2
                return float(parse_metrics(body)["gpu_exporter_snapshot_age_seconds"][0][1])

            # Scrapes keep answering while the poll hangs, and the served snapshot visibly ages.
            wait_until(lambda: age() >= 0.3, timeout=5, message="snapshot age to reach 0.3s")
            doc = json.loads(http_get(base + "/status")[1])
            assert doc["last_poll"]["in_progress_seconds"] >= 0.2  # the age minus one interval
    finally:
        reader.gate.set()
        poller.stop()


def test_simulate_route_404_without_simulator() -> None:
    reader = GatedReader()
    reader.gate.set()
    poller = Poller(reader, 60)
    with serve_in_thread(poller) as base:
        status, body = http_post_json(base + "/-/simulate/events", {"gpu": 0})
        assert status == 404
        assert "--simulate" in json.loads(body)["error"]

"""Faults injected for real against the running exporter, each followed by recovery, asserted through
what /metrics says about the exporter itself.

NVML faults come from the simulator (POST /-/simulate/events): a GPU erroring mid-poll, a hung NVML
call, a GPU vanishing from enumeration and returning, NVML failing to initialise. Prometheus is the
real binary, SIGKILLed and restarted. Slow scrapers are raw sockets that never finish their request or
never read the answer. (Covered elsewhere, not repeated here: the exporter killed and restarted while
training pushes, tests/stack/test_training_e2e.py; the Docker daemon going away, tests/attribution/test_containers_docker.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.support import (
    ManagedProcess,
    http_get,
    http_post_json,
    prom_query,
    scrape,
    start_exporter,
    start_prometheus,
    wait_until,
)

pytestmark = pytest.mark.slow

Samples = dict[str, list[tuple[dict[str, str], float]]]


def value(m: Samples, name: str, **labels: str) -> float | None:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == want for k, want in labels.items()):
            return v
    return None


def event(base: str, ev: dict[str, object]) -> None:
    status, body = http_post_json(base + "/-/simulate/events", ev, timeout=15)
    assert status == 200, body


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, str]]:
    logs = tmp_path_factory.mktemp("faults")
    proc, base = start_exporter(logs, "--simulate", "healthy-8gpu", "--interval", "0.2", "--host-label", "f")
    try:
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=30, message="ready")
        yield proc, base
    finally:
        proc.stop()
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]


def polls(base: str) -> float:
    return value(scrape(base), "gpu_exporter_polls_total") or 0.0


def wait_polls(base: str, n: int) -> None:
    """Wait for ``n`` more completed polls (so a state seen afterwards is the poller's, not a leftover)."""
    start = polls(base)
    wait_until(lambda: polls(base) >= start + n, timeout=30, message=f"{n} more polls")


def test_gpu_errors_mid_poll_then_recovers(fleet: tuple[ManagedProcess, str]) -> None:
    _, base = fleet
    errors_before = value(scrape(base), "gpu_exporter_poll_errors_total", kind="timeout") or 0.0
    event(base, {"gpu": 1, "error": "timeout"})

    def failing() -> Samples | None:
        m = scrape(base)
        return m if value(m, "gpu_up", gpu="1") == 0 else None

    m = wait_until(failing, timeout=20, message="gpu_up{gpu=1} == 0")
    assert (value(m, "gpu_exporter_poll_errors_total", kind="timeout") or 0) > errors_before
    assert value(m, "gpu_exporter_nvml_up") == 1
    assert sorted(lab["gpu"] for lab, v in m["gpu_up"] if v == 1) == ["0", "2", "3", "4", "5", "6", "7"]

    event(base, {"gpu": 1, "error": None})
    wait_until(lambda: value(scrape(base), "gpu_up", gpu="1") == 1, timeout=20, message="gpu 1 back up")
    settled = value(scrape(base), "gpu_exporter_poll_errors_total", kind="timeout")
    wait_polls(base, 3)
    m = scrape(base)
    assert value(m, "gpu_exporter_poll_errors_total", kind="timeout") == settled  # no new errors
    assert all(v == 1 for _, v in m["gpu_up"]) and len(m["gpu_up"]) == 8


def test_hung_nvml_call_then_recovers(fleet: tuple[ManagedProcess, str]) -> None:
    """NVML stalls 3 s per poll: scrapes keep answering at once from the last snapshot, whose age
    (gpu_exporter_snapshot_age_seconds) grows; when the driver answers again polls resume."""
    _, base = fleet
    event(base, {"nvml_delay_seconds": 3})
    try:
        m = wait_until(
            lambda: (m := scrape(base, timeout=2)) and (value(m, "gpu_exporter_snapshot_age_seconds") or 0) > 2.0 and m,
            timeout=20,
            message="snapshot age > 2 s while NVML hangs",
        )
        assert len(m["gpu_up"]) == 8  # the last good snapshot is still served
        assert http_get(base + "/healthz", timeout=2)[0] == 200
        stuck = json.loads(http_get(base + "/status", timeout=2)[1])["last_poll"]
        assert stuck["in_progress_seconds"] is not None
    finally:
        event(base, {"nvml_delay_seconds": 0})
    wait_until(lambda: (value(scrape(base), "gpu_exporter_snapshot_age_seconds") or 99) < 1.0, timeout=20,
               message="fresh snapshots again")
    wait_polls(base, 3)


def test_gpu_disappears_and_returns(fleet: tuple[ManagedProcess, str]) -> None:
    _, base = fleet
    m = scrape(base)
    uuid_of = {lab["gpu"]: lab["uuid"] for lab, _ in m["gpu_up"]}
    gone = uuid_of["2"]
    event(base, {"gpu": 2, "present": False})

    def seven() -> Samples | None:
        m = scrape(base)
        return m if value(m, "gpu_devices") == 7 else None

    m = wait_until(seven, timeout=20, message="gpu_devices 7")
    up = {lab["uuid"] for lab, v in m["gpu_up"] if v == 1}
    assert gone not in up and len(up) == 7
    assert value(m, "gpu_exporter_nvml_up") == 1

    event(base, {"gpu": 2, "present": True})

    def all_back() -> bool:
        m = scrape(base)
        up = {lab["uuid"] for lab, v in m["gpu_up"] if v == 1}
        return value(m, "gpu_devices") == 8 and up == set(uuid_of.values())

    wait_until(all_back, timeout=20, message="all 8 GPUs back")


def test_nvml_fails_to_initialise_then_recovers(log_dir: Path) -> None:
    """The driver is not loaded when the exporter starts: it serves anyway (nvml_up 0, errors counted),
    and picks the GPUs up once NVML initialises."""
    scenario = log_dir / "no-driver.yaml"
    scenario.write_text(
        "name: no-driver\n"
        "gpus:\n"
        "  - count: 2\n"
        "    name: NVIDIA A100-SXM4-80GB\n"
        "    architecture: ampere\n"
        "    memory_total_bytes: 80GiB\n"
        "timeline:\n"
        "  - {at: 0, nvml_init_error: driver_not_loaded}\n"
    )
    proc, base = start_exporter(log_dir, "--simulate", str(scenario), "--interval", "0.2")
    try:
        def down() -> Samples | None:
            m = scrape(base)
            errors = value(m, "gpu_exporter_poll_errors_total", kind="nvml_init") or 0
            return m if value(m, "gpu_exporter_nvml_up") == 0 and errors >= 2 else None

        m = wait_until(down, timeout=30, message="nvml_up 0 with nvml_init errors counted")
        assert not [v for _, v in m.get("gpu_up", []) if v == 1]
        assert http_get(base + "/healthz")[0] == 200

        event(base, {"nvml_init_error": None})

        def up() -> bool:
            m = scrape(base)
            return value(m, "gpu_exporter_nvml_up") == 1 and [v for _, v in m.get("gpu_up", [])] == [1, 1]

        wait_until(up, timeout=30, message="NVML initialised, 2 GPUs up")
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


def test_prometheus_killed_and_restarted(fleet: tuple[ManagedProcess, str], log_dir: Path) -> None:
    """The exporter does not notice Prometheus going away; the restarted server scrapes it again."""
    exporter, base = fleet
    target = base.removeprefix("http://")
    config = (
        "global: {scrape_interval: 500ms, scrape_timeout: 400ms, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: gpu\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    prom, prom_base = start_prometheus(log_dir, config)
    port = prom_base.rsplit(":", 1)[1]
    try:
        wait_until(lambda: [r for r in prom_query(prom_base, "up{job='gpu'}") if r["value"][1] == "1"],
                   timeout=30, message="prometheus scraping the exporter")
        prom.stop(signal.SIGKILL)
        scrapes_while_down = [scrape(base)["gpu_up"] for _ in range(3)]
        assert all(len(s) == 8 for s in scrapes_while_down)
        restarted_at = time.time()
        prom, prom_base = start_prometheus(log_dir, config, port=int(port))

        def fresh_up() -> bool:
            rows = prom_query(prom_base, "up{job='gpu'}")
            return any(r["value"][1] == "1" and float(r["value"][0]) > restarted_at for r in rows) and bool(
                prom_query(prom_base, f"timestamp(gpu_exporter_polls_total) > {restarted_at}")
            )

        wait_until(fresh_up, timeout=45, interval=0.5, message="scrapes resumed after the restart")
    finally:
        prom.stop()
    assert exporter.alive()


def test_slow_scrapers_do_not_block_others(fleet: tuple[ManagedProcess, str]) -> None:
    """Clients that send half a request, or ask for /metrics and never read, tie up nothing others need."""
    exporter, base = fleet
    host, port = base.removeprefix("http://").split(":")
    fds_before = len(os.listdir(f"/proc/{exporter.proc.pid}/fd"))
    slow: list[socket.socket] = []
    try:
        for i in range(20):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if i % 2:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            else:
                # Full requests, pipelined, never read: the answers pile up in the socket buffers.
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
            slow.append(s)
        for _ in range(20):
            m = scrape(base, timeout=3)
            assert len(m["gpu_up"]) == 8
        assert http_get(base + "/healthz", timeout=3)[0] == 200
        assert http_post_json(base + "/-/simulate/events", {"gpu": 0, "set": {"temperature_gpu_celsius": 61}},
                              timeout=5)[0] == 200
        # Reading very slowly eventually gets the whole answer.
        reader = slow[0]
        reader.settimeout(10)
        got = b""
        while b"# EOF" not in got and b"gpu_exporter_polls_total" not in got:
            chunk = reader.recv(1024)
            if not chunk:
                break
            got += chunk
            time.sleep(0.001)
        assert got.startswith(b"HTTP/1.1 200")
    finally:
        for s in slow:
            s.close()
    wait_until(lambda: len(os.listdir(f"/proc/{exporter.proc.pid}/fd")) <= fds_before + 2, timeout=30,
               message="the slow clients' sockets released")
    assert exporter.alive()

"""Hostile and greedy clients against the real exporter process (issue 13): a series budget on what
training pushes may add to /metrics, idle and never-handshaking connection floods, proxy headers,
basic-auth timing, schema strictness, log floods and oversized simulator events."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from exporter.hook.schema import COUNTERS, INGEST_PATH
from harness.payloads import largest_push
from harness.process import open_fds, rss_bytes
from harness.security import make_pki
from harness.support import (
    ManagedProcess,
    free_port,
    http_get,
    parse_metrics,
    scrape,
    start_exporter,
    wait_until,
)

DEFAULT_SERIES_BUDGET = 3_000


def post(base: str, payload: Any, source: str = "127.0.0.1", headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST a push from a chosen loopback source address (each has its own rate-limit bucket)."""
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(source, 0))
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn.request("POST", INGEST_PATH, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"raw": text.decode("utf-8", "replace")}
        return resp.status, doc
    finally:
        conn.close()


def small_push(pid: int, seq: int = 1, job: str = "j", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": 1, "seq": seq, "process_start_time": 1_700_000_000.0,
        "identity": {"hostname": "n", "training_job": job, "rank": "0", "pid": pid},
        "counters": {k: float(seq) for k in COUNTERS if k in ("steps", "samples")},
    }
    doc.update(extra)
    return doc


@pytest.fixture
def exporter(log_dir: Path) -> Iterator[tuple[ManagedProcess, str]]:
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--interval", "1")
    yield proc, base
    proc.stop()


# ----------------------------------------------------------------------------------- 1. series budget


def test_series_budget_refuses_new_processes_and_keeps_what_it_took(exporter: tuple[ManagedProcess, str]) -> None:
    """Valid pushes at the documented caps (largest push per process) stop at the default series
    budget with 429 + reason; accepted processes stay and keep updating; /metrics stays small."""
    _, base = exporter
    outcomes: list[tuple[int, int, str]] = []
    for i in range(40):  # 40 x 154 series would be ~6k: past the default budget
        status, doc = post(base, largest_push(20_000 + i, job=f"j{i % 8}"), source=f"127.0.1.{2 + i // 40}")
        outcomes.append((20_000 + i, status, doc.get("reason", "")))
    accepted = [pid for pid, status, _ in outcomes if status == 202]
    refused = [(status, reason) for _, status, reason in outcomes if status != 202]
    assert refused, "every push was accepted: nothing bounds the series training pushes add"
    assert set(refused) == {(429, "series_budget")}, refused
    assert accepted and all(status == 202 for _, status, _ in outcomes[: len(accepted)])

    text = http_get(base + "/metrics", timeout=60)[1]
    assert len(text) < 4 * 2**20
    m = parse_metrics(text)
    training = sum(len(v) for k, v in m.items() if k.startswith("training_"))
    own = m["gpu_exporter_training_series"][0][1]
    assert training == own <= DEFAULT_SERIES_BUDGET
    assert {int(lab["pid"]) for lab, _ in m["training_info"]} == set(accepted)
    rejected = {lab["reason"]: v for lab, v in m["gpu_exporter_ingest_rejected_total"]}
    assert rejected == {"series_budget": len(refused)}
    # Already-accepted processes keep updating: an update is not a new process.
    first = accepted[0]
    status, _ = post(base, largest_push(first, seq=2, job="j0"), source="127.0.2.1")
    assert status == 202
    steps = {int(lab["pid"]): v for lab, v in scrape(base, timeout=60)["training_steps_total"]}
    assert steps[first] == 2.0
    # A small new process still fits where a big one does not.
    status, doc = post(base, small_push(99_999, job="j0"), source="127.0.2.1")
    assert status == 202, doc


# ------------------------------------------------------------------------------ 2. idle connection flood


def _probe(base: str, path: str, tries: int) -> list[int]:
    codes = []
    for _ in range(tries):
        try:
            codes.append(http_get(base + path, timeout=10)[0])
        except OSError:
            codes.append(0)
    return codes


def test_idle_connection_flood_does_not_starve_probes(exporter: tuple[ManagedProcess, str]) -> None:
    """600 idle TCP connections (no auth needed) must not turn /healthz or /metrics into 503."""
    proc, base = exporter
    host, _, port = base.removeprefix("http://").partition(":")
    flood: list[socket.socket] = []
    try:
        for _ in range(600):
            flood.append(socket.create_connection((host, int(port)), timeout=10))
        wait_until(lambda: open_fds(proc.pid) >= 400, timeout=30, message="the exporter accepted the flood")
        health = _probe(base, "/healthz", 30)
        metrics = _probe(base, "/metrics", 10)
    finally:
        for s in flood:
            s.close()
    assert health == [200] * 30, health
    assert metrics == [200] * 10, metrics


def test_refusals_at_the_connection_cap_are_answered_and_logged_once(log_dir: Path) -> None:
    """Every connection busy (bodies still arriving): new ones get 503 at once, and the log gets a
    line a minute, not one per refused connection."""
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--max-connections", "8")
    host, _, port = base.removeprefix("http://").partition(":")
    busy: list[socket.socket] = []
    try:
        for _ in range(8):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST " + INGEST_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            busy.append(s)
        # Once the eight heads are read, every slot holds a request in progress: new connections get 503.
        wait_until(lambda: _probe(base, "/healthz", 1) == [503], timeout=30, message="the cap reached")
        codes = _probe(base, "/healthz", 40)
        assert codes.count(503) >= 30, codes
    finally:
        for s in busy:
            s.close()
    wait_until(lambda: _probe(base, "/healthz", 1) == [200], timeout=20, message="healthz after the flood")
    proc.stop()
    lines = [line for line in proc.log().splitlines() if "limit" in line.lower() or "refus" in line.lower()]
    assert 1 <= len(lines) <= 3, lines


# ----------------------------------------------------------------------- 3. TLS handshakes never started


def test_tls_connections_that_never_handshake_are_bounded(log_dir: Path, tmp_path: Path) -> None:
    """Under TLS, 1,100 connections that never send a ClientHello count against the connection cap and
    are closed at the handshake deadline: file descriptors and memory stay bounded, probes answer."""
    pki = make_pki(tmp_path)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n")
    port = free_port()
    cmd = (f"ulimit -n 1024 && exec {sys.executable} -m exporter --listen 127.0.0.1:{port} "
           f"--simulate tiny --web-config-file {web}")
    proc = ManagedProcess("exporter-tls", ["sh", "-c", cmd], log_dir)
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    base = f"https://127.0.0.1:{port}"

    def healthz() -> int:
        import urllib.request

        with urllib.request.urlopen(base + "/healthz", timeout=10, context=ctx) as resp:
            return int(resp.status)

    flood: list[socket.socket] = []
    try:
        wait_until(lambda: healthz() == 200, timeout=30, message="exporter over TLS")
        rss_before = rss_bytes(proc.pid)
        fds_seen = []
        # 1,100 (past the exporter's 1,024), or what this process may open (at least ~900: past the cap).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        for i in range(min(1100, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100)):
            with contextlib.suppress(OSError):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i % 100 == 99:
                fds_seen.append(open_fds(proc.pid))
        # The exporter has taken the flood in (today's code: all of it, until its file limit).
        wait_until(lambda: open_fds(proc.pid) >= 400, timeout=30, message="the flood accepted")
        fds_seen.append(open_fds(proc.pid))
        codes = []
        for _ in range(10):
            try:
                codes.append(healthz())
            except OSError:
                codes.append(0)
        fds_seen.append(open_fds(proc.pid))
        rss_growth = rss_bytes(proc.pid) - rss_before
        # A connection that never starts its handshake is closed by the server at the deadline.
        first = flood[0]
        first.settimeout(30)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            assert first.recv(1) == b""
        closed_after = time.monotonic() - started
    finally:
        for s in flood:
            s.close()
    assert max(fds_seen) <= 600, fds_seen
    assert codes == [200] * 10, codes
    assert rss_growth < 64 * 2**20, rss_growth
    assert closed_after < 25
    assert proc.alive(), proc.log()
    proc.stop()


# ------------------------------------------------------------------------------------ 5. proxy headers


def test_forwarded_headers_are_ignored_unless_a_proxy_is_trusted(log_dir: Path) -> None:
    """X-Forwarded-For is a client-chosen string: without --trusted-proxies it never decides who the
    client is (not for the loopback-only policy, not for the per-client rate limit), whatever uvicorn's
    FORWARDED_ALLOW_IPS says."""
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--ingest-rate-limit", "5",
                                env={"FORWARDED_ALLOW_IPS": "*"})
    try:
        status, doc = post(base, small_push(10), headers={"X-Forwarded-For": "192.0.2.1"})
        assert status == 202, doc  # the loopback client is a loopback client, whatever it claims
        codes = [post(base, small_push(11, seq=i), headers={"X-Forwarded-For": f"10.0.0.{i}"})[0]
                 for i in range(2, 40)]
        assert 429 in codes, codes  # rotating the header does not escape the per-client limit
    finally:
        proc.stop()
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--trusted-proxies", "127.0.0.1",
                                name="exporter-proxied")
    try:
        status, doc = post(base, small_push(10), headers={"X-Forwarded-For": "192.0.2.1"})
        assert status == 403, doc  # behind a trusted proxy the forwarded client is the client
        assert post(base, small_push(10))[0] == 202
    finally:
        proc.stop()


# ------------------------------------------------------------------------------- 6. basic-auth timing


def _basic(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_unknown_users_cost_what_known_users_cost(log_dir: Path, tmp_path: Path) -> None:
    """The dummy hash unknown users are checked against has the configured cost, so the answer time
    does not tell which user names exist."""
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    proc, base = start_exporter(log_dir, "--simulate", "tiny", "--web-config-file", str(web))
    try:
        known: list[float] = []
        unknown: list[float] = []
        for i in range(15):  # a new password each time: no cached verdict
            for user, out in (("prometheus", known), (f"nobody{i}", unknown)):
                t0 = time.perf_counter()
                status, _ = http_get(base + "/metrics", headers=_basic(user, f"guess-{i}"))
                out.append(time.perf_counter() - t0)
                assert status == 401
        ratio = statistics.median(unknown) / statistics.median(known)
    finally:
        proc.stop()
    assert ratio < 3.0, (ratio, statistics.median(known), statistics.median(unknown))


def test_basic_auth_dummy_hash_has_the_configured_cost() -> None:
    from exporter.web.basic_auth import BasicAuth

    for rounds in (4, 6):
        users = {"a": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=rounds)), "b": bcrypt.hashpw(b"y", bcrypt.gensalt(4))}
        assert BasicAuth(users)._dummy.startswith(b"$2b$%02d$" % rounds)


# -------------------------------------------------------------------------- 7. schema, logs, simulator


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": True}, "schema"),
        ({"sent_at": "yesterday"}, "sent_at"),
        ({"sent_at": {"a": 1}}, "sent_at"),
        ({"auth_failures": [{"service": "s", "status_code": {"a": [1, 2]}, "count": 1}]}, "status_code"),
        ({"auth_failures": [{"service": "s", "status_code": 401, "count": 1}]}, "status_code"),
        ({"auth_failures": [{"service": "s", "status_code": "401", "count": 1, "extra": 1}]}, "auth_failures[0]"),
        ({"api_quota": {"s": {"remaining": 1, "limit": 2, "extra": 3}}}, "api_quota.s"),
    ],
    ids=["schema-true", "sent_at-str", "sent_at-object", "status_code-object", "status_code-int",
         "auth-extra-key", "quota-extra-key"],
)
def test_schema_is_strict(exporter: tuple[ManagedProcess, str], change: dict[str, Any], field: str) -> None:
    _, base = exporter
    status, doc = post(base, small_push(50, **change))
    assert status == 422, doc
    assert field in doc["error"], doc


def test_malformed_requests_do_not_flood_the_log(exporter: tuple[ManagedProcess, str]) -> None:
    """uvicorn writes a warning per malformed request: at most one a minute reaches the log."""
    proc, base = exporter
    host, _, port = base.removeprefix("http://").partition(":")
    for _ in range(50):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"\x00\x01garbage\r\n\r\n")
            with contextlib.suppress(OSError):
                s.recv(100)
    assert http_get(base + "/healthz")[0] == 200
    proc.stop()
    assert 1 <= proc.log().count("Invalid HTTP request") <= 2, proc.log()


def test_oversized_simulator_event_is_refused_without_a_traceback(exporter: tuple[ManagedProcess, str]) -> None:
    proc, base = exporter
    host, _, port = base.removeprefix("http://").partition(":")
    for size in (100 * 1024, 3 * 2**20):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/-/simulate/events", body=b"{" + b" " * size + b"}",
                         headers={"Content-Type": "application/json"})
            status = conn.getresponse().status
        except OSError:
            status = 0  # the server may close before the whole body is sent; the log must stay clean
        finally:
            conn.close()
        assert status in (413, 0), status
    assert http_get(base + "/healthz")[0] == 200
    proc.stop()
    log = proc.log()
    assert "Traceback" not in log and " ERROR " not in log, log

"""Access control on the real exporter: TLS, mutual TLS, basic auth and the ingest token together, and
security settings the exporter refuses to start with."""

from __future__ import annotations

import json
import socket
import ssl
import sys
from pathlib import Path

import pytest

from harness.payloads import minimal_push
from harness.security import HASH, PASSWORD, basic, write

INGEST = "/api/v1/training"


TOKEN = "live-ingest-token-0123456789abcdef"


def _https(url: str, ctx: ssl.SSLContext, method: str = "GET", body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_live_tls_basic_auth_and_ingest_token(tmp_path: Path, pki: dict[str, Path]) -> None:
    """The real exporter with a web-config (TLS + basic auth) and an ingest token file."""
    from harness.support import ManagedProcess, free_port, parse_metrics, wait_until

    web = write(tmp_path, f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n"
                          f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = ManagedProcess("exporter-tls", [
        sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", "--simulate", "healthy-8gpu",
        "--interval", "0.5", "--web-config-file", str(web), "--ingest-token-file", str(token_file),
    ], tmp_path)
    base = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    try:
        wait_until(lambda: _https(base + "/readyz", ctx)[0] == 200, timeout=30, message="exporter over TLS")
        # TLS: a client that does not trust the CA is refused; plain HTTP gets no metrics.
        with pytest.raises(OSError):
            _https(base + "/healthz", ssl.create_default_context())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"gpu_up" not in plain.recv(65536)
        # Basic auth on /metrics and /status, not on the probes.
        status, _ = _https(base + "/metrics", ctx)
        assert status == 401
        assert _https(base + "/metrics", ctx, headers=basic("prometheus", "wrong"))[0] == 401
        assert _https(base + "/status", ctx)[0] == 401
        status, body = _https(base + "/metrics", ctx, headers=basic("prometheus", PASSWORD))
        assert status == 200 and len(parse_metrics(body)["gpu_up"]) == 8
        # The ingest API takes the bearer token instead (the hook has no basic-auth password).
        url = base + INGEST
        hdr = {"Content-Type": "application/json"}
        assert _https(url, ctx, "POST", minimal_push(11), hdr)[0] == 401
        assert _https(url, ctx, "POST", minimal_push(11), {**hdr, "Authorization": "Bearer wrong"})[0] == 401
        status, body = _https(url, ctx, "POST", minimal_push(11), {**hdr, "Authorization": f"Bearer {TOKEN}"})
        assert status == 202, body
        m = parse_metrics(_https(base + "/metrics", ctx, headers=basic("prometheus", PASSWORD))[1])
        rejected = {lab["reason"]: v for lab, v in m["gpu_exporter_ingest_rejected_total"]}
        assert rejected.get("unauthorized") == 2
        assert [v for lab, v in m["training_steps_total"] if lab["training_job"] == "live"] == [1.0]
        sec = json.loads(_https(base + "/status", ctx, headers=basic("prometheus", PASSWORD))[1])["security"]
        assert sec == {"tls": True, "basic_auth_users": 1, "ingest_token_required": True,
                       "ingest_rate_limit_per_second": 50.0, "trusted_proxies": []}
    finally:
        proc.stop()
    assert TOKEN not in proc.log() and PASSWORD not in proc.log()


def test_live_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    """client_auth_type RequireAndVerifyClientCert: no client certificate, no connection."""
    from harness.support import ManagedProcess, free_port, parse_metrics, wait_until

    web = write(tmp_path, f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n"
                          f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki['ca_crt']}\n")
    port = free_port()
    proc = ManagedProcess("exporter-mtls", [
        sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", "--simulate", "healthy-8gpu",
        "--web-config-file", str(web),
    ], tmp_path)
    base = f"https://127.0.0.1:{port}"
    with_cert = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    with_cert.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    without_cert = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    try:
        wait_until(lambda: _https(base + "/readyz", with_cert)[0] == 200, timeout=30, message="exporter over mTLS")
        status, body = _https(base + "/metrics", with_cert)
        assert status == 200 and len(parse_metrics(body)["gpu_up"]) == 8
        with pytest.raises(OSError):  # TLS 1.3 may report the refusal at the first read
            _https(base + "/metrics", without_cert)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ({"web.yml": "tls_server_config:\n  cert_file: a\n  key_file: b\n  bogus: 1\n"}, "tls_server_config.bogus: unknown key"),
        ({"web.yml": "basic_auth_users:\n  admin: hunter2\n"}, "expected a bcrypt hash"),
        ({"token": ""}, "is empty"),
        ({}, "cannot read"),
    ],
    ids=["unknown-key", "plaintext-password", "empty-token", "missing-token-file"],
)
def test_unusable_security_config_stops_the_exporter(tmp_path: Path, setup: dict[str, str], expected: str) -> None:
    """Serving with less protection than configured is worse than not starting: exit 2, say why."""
    import subprocess

    args = [sys.executable, "-m", "exporter", "--simulate", "healthy-8gpu", "--listen", "127.0.0.1:1"]
    for name, text in setup.items():
        (tmp_path / name).write_text(text)
    if "web.yml" in setup:
        args += ["--web-config-file", str(tmp_path / "web.yml")]
    else:
        args += ["--ingest-token-file", str(tmp_path / "token")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "gpu-exporter: error:" in proc.stderr
    assert "hunter2" not in proc.stderr


def test_unknown_security_env_and_bad_rate_are_rejected() -> None:
    from exporter.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="GPU_EXPORTER_INGEST_TOKN"):
        load_settings([], environ={"GPU_EXPORTER_INGEST_TOKN": "x"})
    assert load_settings([], environ={"GPU_EXPORTER_INGEST_TOKEN": "x" * 20}).ingest_rate_limit == 50.0
    with pytest.raises(ConfigError, match="--ingest-rate-limit"):
        load_settings(["--ingest-rate-limit", "-1"], environ={})
    assert "s" * 20 not in str(load_settings([], environ={"GPU_EXPORTER_INGEST_TOKEN": "s" * 20}).summary())

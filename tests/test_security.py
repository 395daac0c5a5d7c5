"""Access control: the web-config file (TLS, basic auth), the ingest bearer token, the per-client rate
limit and body limits, first in-process against the ASGI pieces, then against the real exporter."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from exporter.ingest_auth import IngestAuthenticator, IngestTokenError, is_loopback, load_ingest_token
from exporter.ingest_guard import IngestGuardMiddleware, RateLimiter
from exporter.webconfig import (
    BasicAuth,
    BasicAuthMiddleware,
    WebConfigError,
    load_web_config,
    uvicorn_ssl_kwargs,
)
from harness.clock import FakeClock

INGEST = "/api/v1/training"
# bcrypt at the lowest cost keeps the tests fast; the format is what production hashes use.
PASSWORD = "s3cret-pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ------------------------------------------------------------------------------------------ certificates


def _write_cert(tmp: Path, name: str, cert: Any, key: Any) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    crt, keyf = tmp / f"{name}.crt", tmp / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, keyf


def make_pki(tmp: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out: dict[str, Path] = {}
    out["ca_crt"], out["ca_key"] = _write_cert(tmp, "ca", ca, ca_key)

    def leaf(cn: str, usage: Any, sans: list[Any]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    srv, srv_key = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    out["server_crt"], out["server_key"] = _write_cert(tmp, "server", srv, srv_key)
    cli, cli_key = leaf("prometheus", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    out["client_crt"], out["client_key"] = _write_cert(tmp, "client", cli, cli_key)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ------------------------------------------------------------------------------------- web-config parsing


def write(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_web_config_full_file_loads(tmp_path: Path, pki: dict[str, Path]) -> None:
    cfg = load_web_config(
        write(
            tmp_path,
            f"""
tls_server_config:
  cert_file: {pki['server_crt']}
  key_file: {pki['server_key']}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki['ca_crt']}
  min_version: TLS13
basic_auth_users:
  prometheus: '{HASH}'
""",
        )
    )
    assert cfg.tls is not None
    assert cfg.tls.client_auth_type == "RequireAndVerifyClientCert"
    ctx = cfg.tls.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert set(cfg.basic_auth_users) == {"prometheus"}
    kwargs = uvicorn_ssl_kwargs(cfg.tls)
    assert kwargs["ssl_certfile"] == str(pki["server_crt"])
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_web_config_relative_paths_resolve_against_the_file(tmp_path: Path, pki: dict[str, Path]) -> None:
    for k in ("server_crt", "server_key"):
        (tmp_path / pki[k].name).write_bytes(pki[k].read_bytes())
    cfg = load_web_config(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"))
    assert cfg.tls is not None and cfg.tls.cert_file == tmp_path / "server.crt"
    assert cfg.tls.min_version == "TLS12"


def test_web_config_empty_file_means_nothing_enabled(tmp_path: Path) -> None:
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg.tls is None and not cfg.basic_auth_users


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tls_server_config:\n  cert_fil: x\n", "tls_server_config.cert_fil: unknown key"),
        ("basic_auth_user:\n  a: b\n", "basic_auth_user: unknown key"),
        ("http_server_config:\n  http2: false\n", "http_server_config: not supported"),
        ("tls_server_config:\n  key_file: k\n", "tls_server_config.cert_file: required"),
        ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n", "does not exist"),
        ("basic_auth_users:\n  prometheus: plaintext\n", "basic_auth_users.prometheus: expected a bcrypt hash"),
        ("basic_auth_users: [a, b]\n", "basic_auth_users: expected a mapping"),
        ("- a\n- b\n", "(top level): expected a mapping"),
        ("tls_server_config: {cert_file: [\n", "invalid YAML"),
    ],
)
def test_web_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert "plaintext" not in str(err.value)  # a pasted password is never echoed


def test_web_config_tls_value_errors(tmp_path: Path, pki: dict[str, Path]) -> None:
    base = f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n"
    cases = {
        "  min_version: TLS14\n": "min_version: 'TLS14' is not one of",
        "  client_auth_type: RequireAndVerifyClientCert\n": "client_ca_file: required",
        "  client_auth_type: RequireAnyClientCert\n": "not supported",
        "  client_auth_type: Sometimes\n": "is not one of",
        "  min_version: TLS13\n  max_version: TLS12\n": "below min_version",
    }
    for extra, expected in cases.items():
        with pytest.raises(WebConfigError, match=expected):
            load_web_config(write(tmp_path, base + extra))
    # a key that does not belong to the certificate is caught at start-up, not at the first scrape
    mismatched = f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['client_key']}\n"
    with pytest.raises(WebConfigError, match="cannot load certificate"):
        load_web_config(write(tmp_path, mismatched))
    with pytest.raises(WebConfigError, match="cannot read"):
        load_web_config(tmp_path / "missing.yml")


# ------------------------------------------------------------------------------------------- basic auth


def test_basic_auth_checks_and_caches() -> None:
    auth = BasicAuth({"prometheus": HASH.encode()})
    assert auth.verify("prometheus", PASSWORD)
    assert not auth.verify("prometheus", "wrong")
    assert not auth.verify("nobody", PASSWORD)
    checks = auth.bcrypt_checks
    assert checks == 3
    for _ in range(20):  # scrape after scrape: answered from the cache, no bcrypt
        assert auth.verify("prometheus", PASSWORD)
        assert not auth.verify("prometheus", "wrong")
    assert auth.bcrypt_checks == checks
    assert auth.cached("prometheus", PASSWORD) is True
    assert BasicAuth.parse_header("Basic " + base64.b64encode(b"u:p:q").decode()) == ("u", "p:q")
    for bad in (None, "", "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()):
        assert BasicAuth.parse_header(bad) is None


def test_basic_auth_cache_is_bounded() -> None:
    auth = BasicAuth({"prometheus": HASH.encode()}, cache_size=8)
    for i in range(30):
        auth.verify("prometheus", f"guess-{i}")
    assert len(auth._cache) == 8


def _plain_app() -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok " + request.url.path)

    return Starlette(routes=[Route(p, ok) for p in ("/metrics", "/status", "/healthz", "/readyz")])


def test_basic_auth_middleware_guards_all_but_probes() -> None:
    app = _plain_app()
    app.add_middleware(BasicAuthMiddleware, auth=BasicAuth({"prometheus": HASH.encode()}))
    with TestClient(app) as client:
        for path in ("/metrics", "/status"):
            r = client.get(path)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Basic realm=")
            assert client.get(path, headers=basic("prometheus", "wrong")).status_code == 401
            assert client.get(path, headers=basic("other", PASSWORD)).status_code == 401
            r = client.get(path, headers=basic("prometheus", PASSWORD))
            assert r.status_code == 200 and r.text == f"ok {path}"
        for path in ("/healthz", "/readyz"):
            assert client.get(path).status_code == 200


# ------------------------------------------------------------------------------------------ ingest token


def test_token_from_file_wins_and_is_stripped(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("file-token-0123456789\n")
    assert load_ingest_token(f, {"GPU_EXPORTER_INGEST_TOKEN": "env-token-0123456789"}) == "file-token-0123456789"
    assert load_ingest_token(None, {"GPU_EXPORTER_INGEST_TOKEN": " env-token-0123456789 "}) == "env-token-0123456789"
    assert load_ingest_token(None, {}) is None


def test_token_errors_never_show_the_token(tmp_path: Path) -> None:
    with pytest.raises(IngestTokenError, match="cannot read"):
        load_ingest_token(tmp_path / "missing", {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(IngestTokenError, match="empty"):
        load_ingest_token(empty, {})
    spaced = tmp_path / "spaced"
    spaced.write_text("two words-secret-value")
    with pytest.raises(IngestTokenError) as err:
        load_ingest_token(spaced, {})
    assert "secret" not in str(err.value)
    assert "secret" not in repr(IngestAuthenticator("a-secret-token-123"))


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.4.5.6", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "testclient", "", None):
        assert not is_loopback(host), host


def test_authenticator_policy() -> None:
    open_ = IngestAuthenticator(None)
    assert open_.check("127.0.0.1", None) is None
    denial = open_.check("10.1.2.3", None)
    assert denial is not None and denial.status == 403 and "--ingest-token-file" in denial.message
    auth = IngestAuthenticator("right-token-0123456789")
    assert auth.check("10.1.2.3", "Bearer right-token-0123456789") is None
    assert auth.check("10.1.2.3", "bearer  right-token-0123456789 ") is None
    for header in (None, "", "Bearer", "Basic cmlnaHQ=", "Bearer wrong-token", "Bearer right-token-012345678"):
        d = auth.check("127.0.0.1", header)  # loopback too: a configured token is required of everyone
        assert d is not None and d.status == 401, header
        assert any(k == "WWW-Authenticate" for k, _ in d.headers)
        assert "right-token" not in d.message


# ---------------------------------------------------------------------------------------- rate limiting


def test_token_bucket_refills_at_the_rate() -> None:
    clock = FakeClock()
    rl = RateLimiter(2.0, burst=4, clock=clock)
    assert all(rl.allow("a") is None for _ in range(4))
    wait = rl.allow("a")
    assert wait is not None and 0 < wait <= 0.5
    assert rl.allow("b") is None  # another client has its own bucket
    clock.now += 0.5
    assert rl.allow("a") is None
    assert rl.allow("a") is not None
    assert RateLimiter(0).allow("x") is None  # 0 disables


def test_rate_limiter_table_is_bounded() -> None:
    rl = RateLimiter(1.0, max_clients=100, clock=FakeClock())
    for i in range(5000):
        rl.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(rl) == 100


# ------------------------------------------------------------------------------------- the ingest guard


def _guarded_app(token: str | None, rejected: list[str], rate: float = 0.0, **kw: Any) -> Starlette:
    seen: list[bytes] = []

    async def ingest(request: Request) -> JSONResponse:
        body = await request.body()
        seen.append(body)
        return JSONResponse({"status": "accepted", "bytes": len(body)}, status_code=202)

    app = Starlette(routes=[Route(INGEST, ingest, methods=["POST"]), Route("/metrics", ingest)])
    app.add_middleware(
        IngestGuardMiddleware,
        authenticator=IngestAuthenticator(token),
        limiter=RateLimiter(rate, burst=rate) if rate else None,
        on_reject=rejected.append,
        **kw,
    )
    app.state.seen = seen
    return app


@pytest.fixture
def local_client() -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(app: Starlette, host: str = "127.0.0.1") -> TestClient:
        c = TestClient(app, client=(host, 40000))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_guard_tokens_missing_wrong_right(local_client: Any) -> None:
    rejected: list[str] = []
    client = local_client(_guarded_app("the-ingest-token-42", rejected))
    r = client.post(INGEST, content=b"{}")
    assert r.status_code == 401 and "bearer" in r.headers["www-authenticate"].lower()
    r = client.post(INGEST, content=b"{}", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["reason"] == "unauthorized"
    r = client.post(INGEST, content=b'{"x": 1}', headers={"Authorization": "Bearer the-ingest-token-42"})
    assert r.status_code == 202 and r.json()["bytes"] == 8
    assert rejected == ["unauthorized", "unauthorized"]
    assert client.get("/metrics").status_code == 202  # other paths are not the guard's business


def test_guard_without_token_admits_loopback_only(local_client: Any) -> None:
    rejected: list[str] = []
    app = _guarded_app(None, rejected)
    assert local_client(app, "127.0.0.1").post(INGEST, content=b"{}").status_code == 202
    r = local_client(app, "192.0.2.7").post(INGEST, content=b"{}")
    assert r.status_code == 403 and "--ingest-token-file" in r.json()["detail"]
    assert rejected == ["unauthorized"]


def test_guard_rate_limits_per_client(local_client: Any) -> None:
    rejected: list[str] = []
    app = _guarded_app("the-ingest-token-42", rejected, rate=3.0)
    hdr = {"Authorization": "Bearer the-ingest-token-42"}
    a, b = local_client(app, "10.0.0.1"), local_client(app, "10.0.0.2")
    codes = [a.post(INGEST, content=b"{}", headers=hdr).status_code for _ in range(6)]
    assert codes[:3] == [202, 202, 202] and 429 in codes[3:]
    limited = a.post(INGEST, content=b"{}", headers=hdr)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert b.post(INGEST, content=b"{}", headers=hdr).status_code == 202
    assert set(rejected) == {"rate_limited"}


def test_guard_body_limits(local_client: Any) -> None:
    rejected: list[str] = []
    app = _guarded_app(None, rejected, max_body_bytes=1024)
    client = local_client(app)
    assert client.post(INGEST, content=b"x" * 1024).status_code == 202
    r = client.post(INGEST, content=b"x" * 1025)
    assert r.status_code == 413 and r.json()["reason"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(100):
            yield b"y" * 100

    r = client.post(INGEST, content=chunks())
    assert r.status_code == 413
    r = client.post(INGEST, content=b"{}", headers={"Content-Length": "abc"})
    assert r.status_code == 400
    assert rejected == ["too_large", "too_large", "schema"]
    assert app.state.seen == [b"x" * 1024]


def test_guard_times_out_a_slow_body() -> None:
    """A push whose body never finishes arriving (slow loris on the ingest API): 408, reason timeout."""
    import threading
    import time

    import uvicorn

    from harness.support import free_port, wait_until

    rejected: list[str] = []
    app = _guarded_app(None, rejected, body_timeout_seconds=0.5)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.started, timeout=10, message="uvicorn started")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"POST " + INGEST.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert time.monotonic() - started < 4
        assert rejected == ["timeout"] and app.state.seen == []
    finally:
        srv.should_exit = True
        thread.join(10)


# ------------------------------------------------------------------------------ cardinality of the store


def _push(pid: int, job: str = "live", rank: int = 0, seq: int = 1) -> bytes:
    from exporter.hook.schema import COUNTERS

    return json.dumps({
        "schema": 1, "seq": seq, "process_start_time": 1_700_000_000.0,
        "identity": {"hostname": "n", "training_job": job, "rank": str(rank), "pid": pid},
        "counters": {k: 1.0 for k in COUNTERS},
    }).encode()


def test_store_limits_distinct_jobs_and_processes() -> None:
    """New jobs past --training-max-jobs and new processes past --training-max-processes get 429;
    existing ones keep updating, and expiry frees room."""
    from exporter.ingest import IngestError, IngestStore, validate_report

    now = [1000.0]
    store = IngestStore(ttl_seconds=60, max_processes=6, clock=lambda: now[0], max_jobs=2)

    def push(job: str, rank: int, seq: int = 1) -> str:
        return store.submit(validate_report(json.loads(_push(100 + rank, job, rank, seq))))

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
    now[0] += 30
    for r in range(5):
        push("a", r, seq=3)
    now[0] += 45  # b is now 75 s old: expired
    assert push("c", 0) == "accepted"
    assert {p.report.training_job for p in store.processes()} == {"a", "c"}


# ------------------------------------------------------------------------ the real exporter, end to end

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
        assert _https(url, ctx, "POST", _push(11), hdr)[0] == 401
        assert _https(url, ctx, "POST", _push(11), {**hdr, "Authorization": "Bearer wrong"})[0] == 401
        status, body = _https(url, ctx, "POST", _push(11), {**hdr, "Authorization": f"Bearer {TOKEN}"})
        assert status == 202, body
        m = parse_metrics(_https(base + "/metrics", ctx, headers=basic("prometheus", PASSWORD))[1])
        rejected = {lab["reason"]: v for lab, v in m["gpu_exporter_ingest_rejected_total"]}
        assert rejected.get("unauthorized") == 2
        assert [v for lab, v in m["training_steps_total"] if lab["training_job"] == "live"] == [1.0]
        sec = json.loads(_https(base + "/status", ctx, headers=basic("prometheus", PASSWORD))[1])["security"]
        assert sec == {"tls": True, "basic_auth_users": 1, "ingest_token_required": True,
                       "ingest_rate_limit_per_second": 50.0}
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

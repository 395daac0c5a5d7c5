"""The ingest guard before any parsing: per-client token buckets, auth first, body size and read-time limits."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from exporter.ingest.auth import IngestAuthenticator
from exporter.ingest.guard import IngestGuardMiddleware, RateLimiter
from harness.clock import FakeClock

INGEST = "/api/v1/training"


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

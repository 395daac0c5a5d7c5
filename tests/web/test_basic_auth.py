"""Basic auth: bcrypt verdicts cached under an HMAC, a bounded cache, every path guarded but the probes."""

from __future__ import annotations

import base64

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from exporter.web.basic_auth import BasicAuth, BasicAuthMiddleware
from harness.security import HASH, PASSWORD, basic


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

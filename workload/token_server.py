"""A small bearer-token HTTP "dataset" server: the sample workload fetches its batches from it.

It issues HS256 JWTs with an ``exp`` claim and answers ``GET /batch`` only with a valid, unexpired
token (401 otherwise, 429 once the token's request quota is used up). Every answer carries
``X-RateLimit-Remaining`` / ``X-RateLimit-Limit``. A batch is a seed from which the workload draws
its synthetic images, so the server stays tiny. Standard library only.

    python -m workload.token_server --port 8700 --token-ttl 30 --token-file /tmp/token
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("workload.token_server")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenServer:
    """Issues and checks tokens; serves /batch on a loopback port in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, quota: int | None = None) -> None:
        self._secret = secrets.token_bytes(32)
        self.quota = quota
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()
        self.requests = {"ok": 0, "unauthorized": 0, "quota": 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="token-server", daemon=True)

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def issue(self, ttl_seconds: float, subject: str = "workload") -> str:
        """A JWT (HS256) valid for ``ttl_seconds`` from now."""
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = _b64(json.dumps({"sub": subject, "exp": int(time.time() + ttl_seconds)}).encode())
        sig = hmac.new(self._secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
        return f"{header}.{claims}.{_b64(sig)}"

    def check(self, token: str) -> str | None:
        """None when valid, else why not (the 401 body)."""
        try:
            header, claims, sig = token.split(".")
            want = hmac.new(self._secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, _unb64(sig)):
                return "invalid token signature"
            exp = json.loads(_unb64(claims)).get("exp")
        except (ValueError, TypeError):
            return "malformed token"
        if not isinstance(exp, (int, float)) or time.time() >= exp:
            return "token expired"
        return None

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urlparse(req.path)
        if url.path != "/batch":
            self._reply(req, 404, {"error": "not found"})
            return
        auth = req.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        problem = self.check(token) if token else "missing bearer token"
        if problem is not None:
            with self._lock:
                self.requests["unauthorized"] += 1
            self._reply(req, 401, {"error": f"Authentication failed: {problem}"}, {"WWW-Authenticate": "Bearer"})
            return
        with self._lock:
            used = self._used.get(token, 0)
            if self.quota is not None and used >= self.quota:
                self.requests["quota"] += 1
                self._reply(req, 429, {"error": "quota exhausted"}, self._quota_headers(used))
                return
            self._used[token] = used + 1
            self.requests["ok"] += 1
        query = parse_qs(url.query)
        seed = int(query.get("seed", ["0"])[0]) if query.get("seed", ["0"])[0].isdigit() else 0
        self._reply(req, 200, {"seed": seed}, self._quota_headers(used + 1))

    def _quota_headers(self, used: int) -> dict[str, str]:
        if self.quota is None:
            return {}
        return {"X-RateLimit-Limit": str(self.quota), "X-RateLimit-Remaining": str(max(0, self.quota - used))}

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.token_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="lifetime of the issued token, seconds")
    parser.add_argument("--token-file", help="write the issued token here (else it is printed)")
    parser.add_argument("--quota", type=int, default=None, help="requests allowed per token (429 after)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = TokenServer(args.host, args.port, quota=args.quota)
    token = server.issue(args.token_ttl)
    if args.token_file:
        with open(args.token_file, "w", encoding="utf-8") as fh:
            fh.write(token)
        os.chmod(args.token_file, 0o600)
    print(json.dumps({"url": server.url, **({} if args.token_file else {"token": token})}), flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Admission control in front of the ingest API: auth, per-client rate limit, body size and read time.

Runs as pure ASGI middleware on POST /api/v1/training, before FastAPI parses anything, so a hostile or
broken client costs O(1) work and bounded memory:

1. auth (exporter.ingest.auth): 401 with ``WWW-Authenticate`` / 403 for remote clients without a token
   configured. Checked first so that unauthenticated noise never spends a legitimate client's budget.
2. rate limit: a token bucket per client address (``--ingest-rate-limit`` requests/s, burst twice
   that); 429 with ``Retry-After``. The bucket table is bounded (LRU), so many addresses cannot grow it.
3. body size: 413 when Content-Length says too much, and while reading when a chunked body runs past
   the limit; 408 when the body does not arrive within ``body_timeout_seconds`` (slow-loris pushes).

The body, once read (at most ``max_body_bytes``), is replayed to the route. Each refusal is reported
through ``on_reject(reason)`` with the reasons of ``gpu_exporter_ingest_rejected_total`` (unauthorized,
rate_limited, too_large, timeout); refusals are logged at most once a minute per reason, never with the token.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from exporter.hook.schema import INGEST_PATH, MAX_BODY_BYTES
from exporter.ingest.auth import Denial, IngestAuthenticator
from exporter.web.asgi import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class RateLimiter:
    """Token buckets keyed by client address, at most ``max_clients`` of them (least recent evicted).

    Evicting a bucket forgets that client's debt; the alternative, an unbounded table, lets anyone
    with many source addresses exhaust memory. ``rate <= 0`` disables limiting.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: float | None = None,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(rate_per_second)
        self.burst = float(burst) if burst is not None else max(1.0, 2.0 * self.rate)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> float | None:
        """None when the request may proceed, else seconds until one token is available."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            wait: float | None = None
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait


class _TooLarge(Exception):
    pass


class IngestGuardMiddleware:
    """See the module docstring. Add with ``app.add_middleware(IngestGuardMiddleware, ...)``."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: IngestAuthenticator,
        limiter: RateLimiter | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout_seconds: float = 10.0,
        on_reject: Callable[[str], None] | None = None,
        paths: Iterable[str] = (INGEST_PATH,),
    ) -> None:
        self.app = app
        self.auth = authenticator
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.on_reject = on_reject
        self.paths = frozenset(paths)
        self._last_log: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = str(client[0]) if client else None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}

        denial = self.auth.check(host, headers.get("authorization"))
        if denial is not None:
            await self._reject(send, "unauthorized", denial, host)
            return
        if self.limiter is not None:
            wait = self.limiter.allow(host or "unknown")
            if wait is not None:
                retry = str(max(1, math.ceil(wait)))
                await self._reject(
                    send, "rate_limited", Denial(429, "too many pushes from this client", (("Retry-After", retry),)), host
                )
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await self._reject(send, "schema", Denial(400, "invalid Content-Length"), host)
                return
            if int(length) > self.max_body_bytes:
                await self._reject(send, "too_large", self._too_large(), host)
                return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await self._reject(send, "too_large", self._too_large(), host)
            return
        except TimeoutError:
            await self._reject(send, "timeout", Denial(408, "request body not received in time"), host)
            return
        if body is None:  # client went away mid-body
            return

        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for http.disconnect

        await self.app(scope, replay, send)

    def _too_large(self) -> Denial:
        return Denial(413, f"request body larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive: Receive) -> bytes | None:
        import anyio

        chunks: list[bytes] = []
        size = 0
        with anyio.fail_after(self.body_timeout_seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

    async def _reject(self, send: Send, reason: str, denial: Denial, host: str | None) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(reason)
            except Exception:  # a metrics hiccup must not turn a 4xx into a 500
                log.exception("ingest rejection counter failed")
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= 60.0:
            self._last_log[reason] = now
            log.warning("refused an ingest push from %s: %d %s (logged once a minute per reason)", host, denial.status, denial.message)
        body = json.dumps({"detail": denial.message, "reason": reason}).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in denial.headers]
        if denial.status in (408, 413):
            hdrs.append((b"connection", b"close"))  # the rest of the body is never read
        await send({"type": "http.response.start", "status": denial.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

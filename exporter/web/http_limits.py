"""Connection-level limits under uvicorn's HTTP protocol: request head size, head read time, body size.

uvicorn (0.3x-0.5x, httptools parser) buffers a request's URL and headers without limit and waits for
them without a deadline: one client sending a never-ending header grows the exporter's memory without
bound, and idle or half-sent connections stay open forever (slowloris). The ASGI layer cannot help,
it runs only once the head is complete. So this subclasses uvicorn's own protocol class and:

- answers 431 and closes when a request head (request line + headers) exceeds ``MAX_HEAD_BYTES``;
- answers 408 and closes when a connection has not delivered a complete head ``HEAD_TIMEOUT_SECONDS``
  after it opened or after the previous response (data trickling in does not extend the deadline);
  one that sent nothing at all is closed quietly (uvicorn's keep-alive timeout, 5 s, usually does so first);
- answers 413 and closes when a request body exceeds ``MAX_BODY_BYTES`` (the ingest API's own limit
  is far lower; this bounds every route, including ones that read the whole body).

Pass ``**uvicorn_limits()`` to ``uvicorn.Config``: the protocol class, and uvicorn's own
``limit_concurrency`` (``MAX_CONNECTIONS``: beyond it requests get 503 at once), so the number of
connections, each holding at most one bounded head or one unread response, is bounded too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 512  # a node has a few scrapers and one pusher per training process

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def guarded_protocol_class(
    max_head_bytes: int = MAX_HEAD_BYTES,
    head_timeout_seconds: float = HEAD_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with the limits above."""
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:  # no httptools: h11 (which bounds the head itself, but not its read time)
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol

    class GuardedHttpProtocol(base):
        """One connection; a request is "in its head" until uvicorn has made its request cycle."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._seen_cycle: Any = None
            self._head_timer: asyncio.TimerHandle | None = None
            self._start_head()

        def _start_head(self) -> None:
            self._in_head = True
            self._count = 0  # bytes of the current request so far (head, then head + body)
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_seconds, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self._count == 0:  # nothing asked: close quietly, as a keep-alive timeout does
                self.transport.close()
            else:
                self._refuse(408, "request head not received in time")

        def _refuse(self, status: int, message: str) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                body = (message + "\n").encode()
                self.transport.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
                )
            log.debug("closing a connection from %s: %d %s", self.client, status, message)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._count += len(data)
            super().data_received(data)
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if self._in_head and cycle is not None and cycle is not self._seen_cycle:
                # The head completed within this chunk. Where it ended is not known here, so the
                # body limit below applies to head + body (the head is at most max_head_bytes).
                self._seen_cycle = cycle
                self._in_head = False
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
            elif self._in_head and self._count > max_head_bytes:
                self._refuse(431, f"request head larger than {max_head_bytes} bytes")
            elif not self._in_head and self._count > max_body_bytes + max_head_bytes:
                self._refuse(413, f"request body larger than {max_body_bytes} bytes")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            cycle = self.cycle
            if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
                return  # closing, or a pipelined request (head already read) has started
            self._start_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return GuardedHttpProtocol


def uvicorn_limits(max_connections: int = MAX_CONNECTIONS) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments with every limit of this module."""
    return {"http": guarded_protocol_class(), "limit_concurrency": max_connections}

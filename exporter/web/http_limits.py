"""Connection-level limits under uvicorn's HTTP protocol: how many connections, how long a request head
or a TLS handshake may take, how large a head or body may be.

uvicorn (0.3x-0.5x, httptools parser) buffers a request's URL and headers without limit and waits for
them without a deadline; its ``limit_concurrency`` answers 503 once that many connections are open, so
a few hundred idle TCP connections starve everyone else (the liveness probe included), and under TLS
(asyncio's ``create_server(ssl=...)``) a connection is not even seen until its handshake completes, so
ones that never start it escape every limit for 60 s. The ASGI layer cannot help: it runs once a head
is complete. So this subclasses uvicorn's own protocol class and:

- keeps every connection, TLS handshakes included, in one ``ConnectionTable`` of ``MAX_CONNECTIONS``
  (``--max-connections``). A new connection at the cap evicts the one that has been waiting longest
  without a request in progress (idle keep-alive, never sent anything, head still arriving, handshake
  not done) or whose client has not read its response for ``SLOW_READER_SECONDS``, closing it; only when every connection is serving a request is the new one
  refused with 503, logged at most once a minute;
- does TLS itself (``loop.start_tls`` after accept) under ``TLS_HANDSHAKE_TIMEOUT_SECONDS``;
- answers 431 and closes when a request head (request line + headers) exceeds ``MAX_HEAD_BYTES``;
- answers 408 and closes when a connection has not delivered a complete head ``HEAD_TIMEOUT_SECONDS``
  after it opened or after the previous response (data trickling in does not extend the deadline);
  one that sent nothing at all is closed quietly (uvicorn's keep-alive timeout, 5 s, usually does so first);
- answers 413 and closes when a request body exceeds ``MAX_BODY_BYTES`` (the ingest API's own limit
  is far lower; this bounds every route, including ones that read the whole body).

Pass ``**uvicorn_limits(max_connections, ssl_context)`` to ``uvicorn.Config`` (and no ``ssl_*`` options).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_SECONDS = 10.0
SLOW_READER_SECONDS = 10.0  # a response the client has not read for this long no longer holds its slot
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 512  # a node has a few scrapers and one pusher per training process
TLS_HANDSHAKE_TIMEOUT_SECONDS = 5.0
TLS_SHUTDOWN_TIMEOUT_SECONDS = 5.0
REFUSAL_LINGER_SECONDS = 1.0  # a refused client gets this long to read its 503 before the close
MAX_LINGERING = 64  # refused connections lingering at once (beyond: closed at once)

_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def _response(status: int, message: str) -> bytes:
    body = (message + "\n").encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
    )


class ConnectionTable:
    """The connections of one server, oldest-evictable first; see the module docstring.

    An entry is any object with ``evictable()`` (no request in progress) and ``evict()`` (close
    quietly). Entries move to the end when they become evictable again (``idle``), so the front holds
    the ones that have waited longest. Used from the event loop thread only.
    """

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        self.limit = limit
        self._entries: OrderedDict[Any, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.lingering = 0
        self._refused_unlogged = 0
        self._last_log = -math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, entry: Any) -> bool:
        """Take ``entry`` in, evicting the longest-waiting idle one at the cap; False: refuse it."""
        if len(self._entries) >= self.limit:
            victim = next((e for e in self._entries if e.evictable()), None)
            if victim is None:
                self.refused += 1
                self._log_refusal()
                return False
            self._entries.pop(victim, None)
            self.evicted += 1
            victim.evict()
        self._entries[entry] = None
        return True

    def idle(self, entry: Any) -> None:
        if entry in self._entries:
            self._entries.move_to_end(entry)

    def remove(self, entry: Any) -> None:
        self._entries.pop(entry, None)

    def _log_refusal(self) -> None:
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            log.warning(
                "refused %d connection(s): all %d connections are serving requests (--max-connections; "
                "logged at most once a minute)",
                self._refused_unlogged,
                self.limit,
            )
            self._last_log = now
            self._refused_unlogged = 0


class OncePerMinute(logging.Filter):
    """Lets each distinct message (its format string) through at most once per ``interval``; the next
    one that passes says how many were held back. On uvicorn's logger: it writes a line per malformed
    request or failed connection, which any client can turn into a log flood."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}  # format string -> (last let through, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        last, held = self._seen.get(key, (-math.inf, 0))
        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) >= 256:  # format strings come from code: a few dozen at most
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.interval:.0f} s)"
        return True


def guarded_protocol_class(
    max_head_bytes: int = MAX_HEAD_BYTES,
    head_timeout_seconds: float = HEAD_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
    table: ConnectionTable | None = None,
    slow_reader_seconds: float = SLOW_READER_SECONDS,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with the limits above.

    ``table``: the connection table this server shares (one per server; None: a fresh one at the
    default cap).
    """
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:  # no httptools: h11 (which bounds the head itself, but not its read time)
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    connections = table if table is not None else ConnectionTable()

    class GuardedHttpProtocol(base):
        """One connection; a request is "in its head" until uvicorn has made its request cycle."""

        table = connections

        def connection_made(self, transport: asyncio.BaseTransport, slot: Any = None) -> None:
            # ``slot``: the table entry standing for this connection (a TLS front admitted it already).
            self._slot = self if slot is None else slot
            self._seen_cycle: Any = None
            self._head_timer: asyncio.TimerHandle | None = None
            self._write_paused_at: float | None = None
            self._in_head = True
            self._count = 0
            self._admitted = slot is not None or connections.admit(self)
            if not self._admitted:
                self._refuse_connection(transport)
                return
            super().connection_made(transport)
            self._start_head()

        def _refuse_connection(self, transport: Any) -> None:
            """At the cap with every connection busy: 503, and a moment to read it before the close."""
            transport.write(_response(503, "too many connections; try again later"))
            if connections.lingering >= MAX_LINGERING or not transport.can_write_eof():
                transport.close()
                return
            connections.lingering += 1
            self._lingering = transport
            transport.write_eof()  # the response, then FIN; reads are discarded until the client closes
            asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

        def evictable(self) -> bool:
            """No request in progress, or a response its client has stopped reading."""
            paused = self._write_paused_at
            return bool(self._in_head) or (paused is not None and self.loop.time() - paused >= slow_reader_seconds)

        def evict(self) -> None:
            if self._write_paused_at is not None:
                log.debug("dropping a connection from %s that stopped reading its response", self.client)
                self.transport.abort()  # close() would wait for the unread response to drain: forever
            elif not self.transport.is_closing():
                log.debug("closing an idle connection from %s to make room for a new one", self.client)
                self.transport.close()

        def pause_writing(self) -> None:
            self._write_paused_at = self.loop.time()
            super().pause_writing()

        def resume_writing(self) -> None:
            self._write_paused_at = None
            super().resume_writing()

        def _start_head(self) -> None:
            self._in_head = True
            self._count = 0  # bytes of the current request so far (head, then head + body)
            connections.idle(self._slot)
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
                self.transport.write(_response(status, message))
            log.debug("closing a connection from %s: %d %s", self.client, status, message)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if not self._admitted:
                return  # a refused connection lingering for its 503: discard
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

        def eof_received(self) -> Any:
            if not self._admitted:
                return None  # the refused client has read its 503 and closed: close our side too
            return super().eof_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            cycle = self.cycle
            if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
                return  # closing, or a pipelined request (head already read) has started
            self._start_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._admitted:
                if getattr(self, "_lingering", None) is not None:
                    self._lingering = None
                    connections.lingering -= 1
                return
            connections.remove(self._slot)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return GuardedHttpProtocol


def tls_front_class(
    http_class: type[asyncio.Protocol],
    ssl_context: ssl.SSLContext,
    handshake_timeout_seconds: float = TLS_HANDSHAKE_TIMEOUT_SECONDS,
) -> type[asyncio.Protocol]:
    """A protocol that admits a TCP connection into ``http_class.table`` as soon as it is accepted,
    puts asyncio's TLS layer (``asyncio.sslproto.SSLProtocol``, what ``create_server(ssl=...)`` uses)
    under it with its own handshake deadline, then relays to an ``http_class`` instance.

    The TLS layer is installed inside ``connection_made``, before the first byte can arrive (with
    uvloop, ``loop.start_tls`` from a task can lose a ClientHello that came first).
    """
    from asyncio.sslproto import SSLProtocol  # asyncio's own TLS layer (stable across 3.11-3.13)

    class BoundedSSLProtocol(SSLProtocol):
        # asyncio allocates (and zero-fills) a 256 KiB read buffer per connection up front, handshake
        # or not: 128 MiB at the connection cap. One TLS record (16 KiB) at a time is plenty here.
        max_size = 16 * 1024

    table: ConnectionTable = http_class.table  # type: ignore[attr-defined]

    class TlsFront(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs  # uvicorn's protocol arguments, for the HTTP protocol made later
            self._raw: Any = None
            self._http: Any = None

        def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio's classes
            if self._raw is not None:  # the second call: the handshake is done, this is the TLS transport
                self._http = http_class(**self._kwargs)
                self._http.connection_made(transport, slot=self)
                return
            if not table.admit(self):
                transport.abort()  # no TLS yet, so no way to say 503
                return
            self._raw = transport
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            waiter.add_done_callback(self._handshake_done)
            tls = BoundedSSLProtocol(
                loop,
                self,
                ssl_context,
                waiter,
                server_side=True,
                ssl_handshake_timeout=handshake_timeout_seconds,  # type: ignore[arg-type]  # typeshed says int
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_SECONDS,
            )
            transport.set_protocol(tls)
            tls.connection_made(transport)

        def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
            exc = None if waiter.cancelled() else waiter.exception()
            if exc is not None or waiter.cancelled():  # timed out, failed, evicted or lost mid-handshake
                log.debug("TLS handshake failed or timed out: %r", exc)
                table.remove(self)
                if not self._raw.is_closing():
                    self._raw.abort()

        # -- the table's view: a handshake in progress is as evictable as an idle connection
        def evictable(self) -> bool:
            return self._http is None or bool(self._http.evictable())

        def evict(self) -> None:
            if self._http is not None:
                self._http.evict()
            else:
                self._raw.abort()

        # -- relayed from the TLS layer to the HTTP protocol (which exists before the first byte)
        def data_received(self, data: bytes) -> None:
            self._http.data_received(data)

        def eof_received(self) -> Any:
            return self._http.eof_received() if self._http is not None else None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._http is not None:
                self._http.connection_lost(exc)
            else:
                table.remove(self)

        def pause_writing(self) -> None:
            if self._http is not None:
                self._http.pause_writing()

        def resume_writing(self) -> None:
            if self._http is not None:
                self._http.resume_writing()

    return TlsFront


def uvicorn_limits(
    max_connections: int = MAX_CONNECTIONS, ssl_context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments with every limit of this module (and TLS, when given a
    context: pass no ``ssl_*`` option to uvicorn then, the handshake happens here)."""
    http = guarded_protocol_class(table=ConnectionTable(max_connections))
    if ssl_context is not None:
        http = tls_front_class(http, ssl_context)
    # uvicorn's own limit_concurrency would answer 503 with a log line per request while idle
    # connections hold the slots; the table above replaces it.
    return {"http": http, "limit_concurrency": None}

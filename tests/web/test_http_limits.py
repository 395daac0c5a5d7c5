"""Connection-level limits (exporter.web.http_limits): oversized heads, heads that never finish, idle
connections, oversized bodies. First an in-process uvicorn with small limits (fast), then the real
exporter fed a 64 MiB header, whose memory must not follow."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from exporter.web.http_limits import ConnectionTable, guarded_protocol_class, uvicorn_limits
from harness.support import free_port, start_exporter, wait_until

HEAD, TIMEOUT, BODY = 4096, 1.0, 100_000


async def echo(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{len(body)}")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
        http=guarded_protocol_class(max_head_bytes=HEAD, head_timeout_seconds=TIMEOUT, max_body_bytes=BODY),
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, timeout=10, message="uvicorn started")
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(10)


def connect(server: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(server, timeout=5)
    return s


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (or the timeout)."""
    s.settimeout(timeout)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def request(body: bytes = b"", extra: bytes = b"", close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (b"POST /echo HTTP/1.1\r\nHost: x\r\n" + extra + conn
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_normal_keep_alive_and_pipelined_requests_pass(server: tuple[str, int]) -> None:
    with connect(server) as s:
        for n in (0, 10, BODY):
            s.sendall(request(b"x" * n))
            reply = b""
            while not reply.endswith(str(n).encode()):
                reply += s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
        s.sendall(request(b"a") * 4 + request(b"bb", close=True))  # pipelined
        replies = read_all(s)
    assert replies.count(b"HTTP/1.1 200") == 5 and replies.endswith(b"2")


def test_oversized_head_gets_431_and_is_closed(server: tuple[str, int]) -> None:
    with connect(server) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(64):
                s.sendall(b"a" * 1024)
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 431")
    with connect(server) as s:  # many small headers add up the same way
        with contextlib.suppress(OSError):
            s.sendall(b"GET /echo HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000)
        assert read_all(s).startswith(b"HTTP/1.1 431")


def test_trickled_head_gets_408_within_the_deadline(server: tuple[str, int]) -> None:
    """Slowloris: a byte every 0.2 s never extends the deadline."""
    started = time.monotonic()
    with connect(server) as s:
        reply = b""
        s.settimeout(0.2)
        with contextlib.suppress(OSError):
            for ch in b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100:
                s.sendall(bytes([ch]))
                with contextlib.suppress(TimeoutError):
                    reply += s.recv(1024)
                if reply:
                    break
        reply += read_all(s, 2)
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < TIMEOUT + 3


def test_idle_connections_are_closed_quietly(server: tuple[str, int]) -> None:
    with connect(server) as fresh, connect(server) as used:
        used.sendall(request(b"1"))
        assert used.recv(65536).startswith(b"HTTP/1.1 200")
        assert read_all(fresh, TIMEOUT + 3) == b""  # closed, no unsolicited response
        assert read_all(used, TIMEOUT + 3) == b""


def test_oversized_body_gets_413(server: tuple[str, int]) -> None:
    with connect(server) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(60):  # 240 KiB, never terminated: only the limit can answer this
                s.sendall(b"1000\r\n" + b"y" * 4096 + b"\r\n")
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 413")


def test_idle_connections_make_room_and_busy_ones_do_not() -> None:
    """At the cap an idle connection is closed for a new one; only when every connection is serving a
    request is the new one answered 503 (and it can read that answer)."""
    async def slow(request: Request) -> PlainTextResponse:
        await request.body()  # waits for a body that only arrives on release
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/slow", slow, methods=["POST"])])
    port = free_port()
    limits = uvicorn_limits(max_connections=4)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off", **limits))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    table = limits["http"].table
    try:
        wait_until(lambda: srv.started, timeout=10, message="uvicorn started")
        idle = [connect(("127.0.0.1", port)) for _ in range(4)]
        wait_until(lambda: len(table) == 4, timeout=10, message="idle connections accepted")
        with connect(("127.0.0.1", port)) as extra:
            extra.sendall(request(b"", close=True))
            assert read_all(extra).startswith(b"HTTP/1.1 200")
        assert read_all(idle[0], 5) == b""  # the longest idle one was closed to make room
        for s in idle:
            s.close()
        wait_until(lambda: len(table) == 0, timeout=10, message="connections gone")
        busy = [connect(("127.0.0.1", port)) for _ in range(4)]
        for s in busy:
            s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        wait_until(lambda: len(table) == 4 and not any(e.evictable() for e in table._entries), timeout=10,
                   message="four requests in progress")
        with connect(("127.0.0.1", port)) as extra:
            extra.sendall(request(b"", close=True))
            assert read_all(extra).startswith(b"HTTP/1.1 503")
        assert table.refused == 1
        for s in busy:
            s.sendall(b"67890")
            assert read_all(s).startswith(b"HTTP/1.1 200")
            s.close()
    finally:
        srv.should_exit = True
        thread.join(10)


def test_clients_that_stop_reading_lose_their_slot(caplog: pytest.LogCaptureFixture) -> None:
    """A response its client never reads holds a connection only for slow_reader_seconds: then a new
    connection at the cap takes the slot (the slow one is aborted), and nothing is logged as an error."""
    import logging

    from starlette.responses import StreamingResponse

    chunk, chunks = b"x" * 65536, 256  # 16 MiB in pieces: the response stays in progress while unread

    async def huge(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield chunk

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/huge", huge)])
    port = free_port()
    table = ConnectionTable(3)
    http = guarded_protocol_class(table=table, slow_reader_seconds=0.5)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                                        http=http, limit_concurrency=None))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    slow: list[socket.socket] = []
    try:
        wait_until(lambda: srv.started, timeout=10, message="uvicorn started")
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
                slow.append(s)
            wait_until(lambda: len(table) == 3 and all(e._write_paused_at for e in table._entries), timeout=20,
                       message="three responses stuck unread")
            wait_until(lambda: any(e.evictable() for e in table._entries), timeout=10, message="slow for 0.5 s")
            with connect(("127.0.0.1", port)) as fresh:
                fresh.sendall(request(b"ok", close=True))
                assert read_all(fresh).startswith(b"HTTP/1.1 200")
            assert table.evicted == 1 and table.refused == 0
            # The evicted one was aborted, not left to drain a response nobody reads.
            assert len(read_all(slow[0], 5)) < chunks * len(chunk)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        for s in slow:
            s.close()
        srv.should_exit = True
        thread.join(10)


def test_real_exporter_memory_does_not_follow_a_huge_header(tmp_path: Path) -> None:
    proc, base = start_exporter(tmp_path, "--simulate", "healthy-8gpu", "--interval", "1")
    try:
        pid = proc.proc.pid

        def rss() -> int:
            with open(f"/proc/{pid}/status") as fh:
                return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

        before = rss()
        host, port = base.removeprefix("http://").split(":")
        sent = 0
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ")
            with contextlib.suppress(OSError):
                for _ in range(64):
                    s.sendall(b"a" * 2**20)
                    sent += 1
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert sent < 64  # the server hung up long before the 64 MiB were through
        assert rss() - before < 16 * 2**20
        from harness.support import http_get

        assert http_get(base + "/metrics")[0] == 200
    finally:
        proc.stop()

"""The proxy's HTTP/1.1 client to the providers (service/proxy/http_client.py) and the
stream relay on top of it, against loopback servers that write their answers byte by byte
as a provider might: pieces pushed to the relay as they arrive, a relay whose client's
socket is full, silences, lost connections, keep-alive and the pool, TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from starlette.types import Message

from service.proxy.context import RequestContext
from service.proxy.http_client import (
    ConnectFailed,
    ConnectionPool,
    ConnectTimeout,
    UpstreamResponse,
)
from service.proxy.stream import StreamBounds, StreamRelay

Serve = Callable[[asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(i: int) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i


async def http_chunk(writer: asyncio.StreamWriter, data: bytes, pause: float = 0.02) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()
    await asyncio.sleep(pause)  # its own read on the other side


@contextlib.asynccontextmanager
async def pool_for(
    read_timeout: float = 5,
    connect_timeout: float = 2,
    keepalive_s: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ConnectionPool]:
    pool = ConnectionPool(connect_timeout, read_timeout, keepalive_s, ssl_context)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def upstream(serve: Serve, read_timeout: float = 5) -> AsyncIterator[UpstreamResponse]:
    """A response from a loopback server whose body `serve` writes, headers read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD)
        with contextlib.suppress(ConnectionError):
            await serve(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, pool_for(read_timeout) as pool:
        response = await pool.request("GET", f"http://127.0.0.1:{port}/", None, {})
        try:
            yield response
        finally:
            response.close()


class Taker:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.taken: list[bytes] = []
        self.wakes = 0
        self.woken = asyncio.Event()

    def take(self, piece: bytes) -> bool:
        if self.accept:
            self.taken.append(piece)
        return self.accept

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()


async def test_each_piece_reaches_the_taker_as_it_arrives_and_the_end_wakes_it() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        for i in range(5):
            await http_chunk(writer, event(i))
        writer.write(b"0\r\n\r\n")

    async with upstream(serve) as response:
        taker = Taker()
        response.push_to(taker)
        await asyncio.wait_for(taker.woken.wait(), 5)
        # Nothing is left in the buffer but what came with the head, before the push began.
        before = response.read_nowait()
        assert before + b"".join(taker.taken) == b"".join(event(i) for i in range(5))
        assert len(taker.taken) >= 4  # one piece per read: pushed, not buffered
        assert response.is_eof() and taker.wakes == 1


async def test_a_piece_the_taker_cannot_take_stays_buffered_in_order() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        for i in range(3):
            await http_chunk(writer, event(i), pause=0.01)
        writer.write(b"0\r\n\r\n")

    async with upstream(serve) as response:
        taker = Taker(accept=False)
        response.push_to(taker)
        while not response.is_eof() and response._error is None:
            await asyncio.wait_for(taker.woken.wait(), 5)
            taker.woken.clear()
            if response._eof:
                break
        assert response.read_nowait() == b"".join(event(i) for i in range(3))
        assert response.is_eof() and response.read_nowait() == b""


async def test_a_connection_lost_mid_body_wakes_the_taker_with_an_error() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await http_chunk(writer, event(0))
        # Closed without the last chunk: the body is incomplete.

    async with upstream(serve) as response:
        taker = Taker()
        response.push_to(taker)
        await asyncio.wait_for(taker.woken.wait(), 5)
        with pytest.raises(ConnectionError):
            response.read_nowait()
        with pytest.raises(ConnectionError):
            await response.read()


async def test_a_silent_provider_times_out_but_a_slow_steady_one_does_not() -> None:
    async def silent_body(writer: asyncio.StreamWriter) -> None:
        await http_chunk(writer, event(0))
        await asyncio.sleep(2)

    async def slow_body(writer: asyncio.StreamWriter) -> None:
        for i in range(8):  # 0.8 s in all, never 0.3 s quiet
            await http_chunk(writer, event(i), pause=0.1)
        writer.write(b"0\r\n\r\n")

    async with upstream(silent_body, read_timeout=0.3) as response:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await response.read()
        assert 0.25 < time.perf_counter() - started < 1.5
    async with upstream(slow_body, read_timeout=0.3) as response:
        assert await response.read() == b"".join(event(i) for i in range(8))

    async def no_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)
        writer.close()

    server = await asyncio.start_server(no_head, "127.0.0.1", 0)
    async with server, pool_for(read_timeout=0.3) as pool:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(TimeoutError):
            await pool.request("POST", url, b"{}", {})
        assert not pool._open, "a connection whose answer never came is not kept"


class Recorder:
    """A keep-alive server that records each connection and what it read, and answers
    each request with `answer` (by default a 200 with a length)."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") -> None:
        self.answer = answer
        self.connections = 0
        self.reads: list[bytes] = []
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buffered = b""
        while True:
            data = await reader.read(1 << 20)
            if not data:
                self.closed.set()
                writer.close()
                return
            self.reads.append(data)
            buffered += data
            head, sep, rest = buffered.partition(b"\r\n\r\n")
            if not sep:
                continue
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                continue
            buffered = rest[length:]
            writer.write(self.answer)
            await writer.drain()


@contextlib.asynccontextmanager
async def recorder(answer: bytes | None = None) -> AsyncIterator[tuple[Recorder, str]]:
    seen = Recorder(answer) if answer is not None else Recorder()
    server = await asyncio.start_server(seen.handle, "127.0.0.1", 0)
    async with server:
        yield seen, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat"


async def test_a_request_leaves_in_one_write_and_its_connection_is_kept_alive() -> None:
    async with recorder() as (seen, url), pool_for() as pool:
        for _ in range(3):
            response = await pool.request("POST", url, b'{"a":1}', {"Authorization": "Bearer k"})
            assert (response.status, await response.read()) == (200, b"ok")
            response.release()
        assert seen.connections == 1
        # Head and body in one segment: the provider starts on it without waiting for more.
        assert all(r.endswith(b'\r\n\r\n{"a":1}') for r in seen.reads), seen.reads
        assert seen.reads[0].startswith(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"Authorization: Bearer k\r\nContent-Length: 7\r\n" in seen.reads[0]
        big = b"x" * (3 << 20)
        response = await pool.request("POST", url, big, {})
        assert await response.read() == b"ok"
        response.release()
        assert b"".join(seen.reads).endswith(big) and seen.connections == 1


async def test_only_a_whole_keep_alive_answer_gives_its_connection_back() -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with recorder(closing) as (seen, url), pool_for() as pool:
        for _ in range(2):
            response = await pool.request("POST", url, b"{}", {})
            assert await response.read() == b"ok"
            response.release()
        assert seen.connections == 2
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"
    async with recorder(partial) as (seen, url), pool_for() as pool:
        response = await pool.request("POST", url, b"{}", {})
        response.release()  # before its end: the rest would have to be read first
        await asyncio.wait_for(seen.closed.wait(), 5)
        response = await pool.request("POST", url, b"{}", {})
        response.close()
        assert seen.connections == 2


async def test_idle_connections_are_closed_after_the_keep_alive_time() -> None:
    async with recorder() as (seen, url), pool_for(keepalive_s=0.2) as pool:
        response = await pool.request("POST", url, b"{}", {})
        await response.read()
        response.release()
        assert pool._idle[response._connection.key]
        await asyncio.wait_for(seen.closed.wait(), 5)
        assert not pool._open


async def test_a_providers_keep_alive_timeout_shortens_the_reuse_of_its_connections() -> None:
    async def connections_for(keep_alive: bytes, idle_s: float) -> int:
        answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: %s\r\nContent-Length: 2\r\n\r\nok" % keep_alive
        async with recorder(answer) as (seen, url), pool_for() as pool:
            for _ in range(2):
                response = await pool.request("POST", url, b"{}", {})
                assert await response.read() == b"ok"
                response.release()
                await asyncio.sleep(idle_s)
            return seen.connections

    # timeout=1: reused while idle under 0.5 s (half of it, for the answer's way here).
    assert await connections_for(b"timeout=1, max=100", 0.05) == 1
    assert await connections_for(b"timeout=1, max=100", 0.7) == 2
    # timeout=5: reused while idle under 4 s; a header that says nothing usable changes nothing.
    assert await connections_for(b"timeout=5", 0.7) == 1
    assert await connections_for(b"max=3, timeout=abc", 0.7) == 1
    assert await connections_for(b"timeout=nan", 0.7) == 1
    # timeout=0: the provider keeps nothing idle, so nothing is pooled.
    assert await connections_for(b"timeout=0", 0) == 2


def closing_idle_server(idle_close_s: float) -> tuple[str, list[int], threading.Thread]:
    """A provider on a thread of its own that answers each request on a connection kept
    alive, and closes a connection idle `idle_close_s`: it closes while this test's loop is
    blocked, so the close reaches this host before the loop reads it. Returns its URL, the
    requests it answered per connection, and its thread (it stops after two connections)."""
    listener = socket.create_server(("127.0.0.1", 0))
    answered: list[int] = []

    def serve() -> None:
        with listener:
            for _ in range(2):
                connection, _ = listener.accept()
                answered.append(0)
                with connection:
                    connection.settimeout(idle_close_s)
                    try:
                        while data := connection.recv(1 << 16):
                            assert data.endswith(b"\r\n\r\n{}")
                            answered[-1] += 1
                            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    except TimeoutError:
                        pass  # idle long enough: closed, as a server's keep-alive timeout does

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat", answered, thread


async def test_a_connection_its_provider_closed_while_the_loop_was_busy_is_not_reused() -> None:
    url, answered, thread = closing_idle_server(idle_close_s=0.2)
    async with pool_for() as pool:
        response = await pool.request("POST", url, b"{}", {})
        assert await response.read() == b"ok"
        response.release()
        # The loop is held past the provider's idle close and the poll's threshold: its FIN
        # is here, unread, when the next request takes the connection from the pool.
        time.sleep(1.3)
        response = await pool.request("POST", url, b"{}", {})
        assert (response.status, await response.read()) == (200, b"ok")
        response.release()
    thread.join(5)
    assert answered == [1, 1]


async def test_interim_heads_and_bodies_ended_by_the_connection() -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    async with recorder(interim) as (_, url), pool_for() as pool:
        response = await pool.request("POST", url, b"{}", {})
        assert response.status == 201 and response.header(b"content-type") == "application/json"
        assert await response.read() == b"{}"
        response.release()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(until_close, "127.0.0.1", 0)
    async with server, pool_for() as pool:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        response = await pool.request("GET", url, None, {})
        assert await response.read() == b"all of it"
        response.release()


async def test_what_is_not_http_or_not_there_is_a_connection_error() -> None:
    async with recorder(b"SSH-2.0-OpenSSH_9.2\r\n") as (_, url), pool_for() as pool:
        with pytest.raises(ConnectionError, match="not HTTP"):
            await pool.request("POST", url, b"{}", {})
    async with recorder() as (_, url):
        pass  # the server is gone: its port refuses
    async with pool_for() as pool:
        with pytest.raises(ConnectFailed):
            await pool.request("POST", url, b"{}", {})
    async with pool_for(connect_timeout=0) as pool:
        with pytest.raises(ConnectTimeout):
            await pool.request("POST", url, b"{}", {})


async def test_a_reader_that_falls_behind_pauses_the_provider_and_loses_nothing() -> None:
    piece = b"data: " + b"x" * 4000 + b"\n\n"
    count = 5000  # 20 MB: past the high-water mark and what the kernel buffers
    wrote = 0

    async def serve(writer: asyncio.StreamWriter) -> None:
        nonlocal wrote
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            wrote += 1
        writer.write(b"0\r\n\r\n")

    async with upstream(serve) as response:
        taker = Taker(accept=False)
        response.push_to(taker)
        await asyncio.sleep(0.5)
        # Paused: the kernel's buffers hold some, the rest waits in the provider.
        assert response._connection._paused and wrote < count
        # At most the high-water mark and one read of the socket (uvloop's: 256 kB).
        assert response._buffered < (1 << 16) + (256 << 10)
        received = b""
        while True:
            received += response.read_nowait()
            if response.is_eof():
                break
            await asyncio.wait_for(taker.woken.wait(), 5)
            taker.woken.clear()
        assert received == piece * count


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_providers_are_verified(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    seen = Recorder()
    server = await asyncio.start_server(seen.handle, "127.0.0.1", 0, ssl=serving)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1/chat"
    trusting = ssl.create_default_context(cafile=str(cert))
    async with server:
        async with pool_for(ssl_context=trusting) as pool:
            response = await pool.request("POST", url, b"{}", {})
            assert await response.read() == b"ok"
            response.release()
        async with pool_for() as pool:  # the system's authorities: a self-signed one fails
            with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.request("POST", url, b"{}", {})


def _relay(response: UpstreamResponse, max_gap_s: float = 60) -> StreamRelay:
    provider = SimpleNamespace(name="loopback")
    ctx = SimpleNamespace(
        completion_allowance=None,
        request_id="req-push",
        response_headers={},
        model="m",
        provider=provider,
        attempts=1,
    )
    bounds = StreamBounds(max_duration_s=60, max_line_bytes=1 << 20, max_gap_s=max_gap_s)
    return StreamRelay(cast(RequestContext, ctx), response, False, time.perf_counter(), bounds)


async def _never_disconnects() -> Message:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


async def test_a_send_that_must_wait_keeps_every_later_piece_in_order() -> None:
    """The client's socket fills on the second piece: the pieces arriving while its send
    waits are relayed after it, in order, none lost, and the stream ends as usual."""
    pieces = 12

    async def serve(writer: asyncio.StreamWriter) -> None:
        for i in range(pieces):
            await http_chunk(writer, event(i), pause=0.01)
        writer.write(b"0\r\n\r\n")

    received: list[bytes] = []
    more: list[bool] = []
    full = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body":
            return
        if len(received) == 2 and not full.is_set():
            # A full socket: this send waits while later pieces arrive.
            await asyncio.sleep(0.08)
            full.set()
        received.append(message.get("body", b""))
        more.append(message.get("more_body", False))

    async with upstream(serve) as response:
        relay = _relay(response)
        await asyncio.wait_for(relay.run(send, _never_disconnects), 10)
    assert full.is_set()
    assert more[-1] is False and all(more[:-1])
    assert b"".join(received) == b"".join(event(i) for i in range(pieces))
    assert relay.complete and relay.ttft_ms is not None


async def test_a_failing_send_fails_the_relay_where_it_awaits() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        for i in range(3):
            await http_chunk(writer, event(i))
        writer.write(b"0\r\n\r\n")

    calls = 0

    async def send(message: Message) -> None:
        nonlocal calls
        if message["type"] == "http.response.body":
            calls += 1
            if calls == 2:
                raise RuntimeError("the server refused the message")

    async with upstream(serve) as response:
        relay = _relay(response)
        with pytest.raises(RuntimeError, match="refused"):
            await asyncio.wait_for(relay.run(send, _never_disconnects), 10)


async def test_the_relay_times_the_providers_silence() -> None:
    """The relay's one timer per stream ends a stream whose provider goes quiet past the
    gap, as a 504, and a client that holds the stream up is not the provider's silence."""
    gap = 0.3

    async def serve(writer: asyncio.StreamWriter) -> None:
        for i in range(4):
            await http_chunk(writer, event(i), pause=gap / 2)  # well within the gap
        await asyncio.sleep(gap * 4)  # then silent

    slow_once = True

    async def send(message: Message) -> None:
        nonlocal slow_once
        if message["type"] == "http.response.body" and slow_once:
            slow_once = False
            await asyncio.sleep(gap * 2)  # the client's socket is full for two gaps

    async with upstream(serve, read_timeout=gap) as response:
        relay = _relay(response, max_gap_s=gap)
        started = time.perf_counter()
        await asyncio.wait_for(relay.run(send, _never_disconnects), 10)
        took = time.perf_counter() - started
    assert (relay.status, relay.error_code) == (504, "upstream_timeout")
    assert relay.meter.completion_text() == "w0w1w2w3", "every piece passed on"
    # Two gaps held up by the client, then the provider's pieces, then one gap of silence.
    assert gap * 3 <= took < gap * 6


async def test_an_answer_nothing_asked_for_or_past_its_bound_is_refused() -> None:
    twice = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 2
    async with recorder(twice) as (seen, url), pool_for() as pool:
        response = await pool.request("POST", url, b"{}", {})
        assert await response.read() == b"ok"
        response.release()
        await asyncio.wait_for(seen.closed.wait(), 5)  # the second answer closed it
        response = await pool.request("POST", url, b"{}", {})
        response.close()
        assert seen.connections == 2

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(200):  # 200 kB of headers, a read at a time, never ending
                writer.write(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000))
                await writer.drain()
                await asyncio.sleep(0.002)
        writer.close()

    server = await asyncio.start_server(endless_head, "127.0.0.1", 0)
    async with server, pool_for() as pool:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(ConnectionError, match="head past 64 kB"):
            await pool.request("POST", url, b"{}", {})

"""A stream's pieces reach the relay as aiohttp's parser hands them over (service/proxy/push.py).

The push relies on aiohttp internals: that its parser hands every body piece to the
response reader's `feed_data` and ends the body with `feed_eof` or `set_exception`, and that
a subclass of its slotted `StreamReader` may become a reader's class. These tests fail,
rather than the relay silently falling back to buffering (or losing pieces), if an aiohttp
upgrade changes either. The relay's own handling of a send that must wait is tested here
too: a client's full socket must not reorder or drop a piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from starlette.types import Message

from service.proxy.context import RequestContext
from service.proxy.push import pushed
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
async def upstream(serve: Serve, read_timeout: float = 5) -> AsyncIterator[aiohttp.ClientResponse]:
    """A response from a loopback server whose body `serve` writes, headers read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD)
        with contextlib.suppress(ConnectionError):
            await serve(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeout = aiohttp.ClientTimeout(sock_read=read_timeout)
    async with (
        server,
        aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
        session.get(f"http://127.0.0.1:{port}/") as response,
    ):
        yield response


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
        content = response.content
        taker = Taker()
        with pushed(content, taker):
            await asyncio.wait_for(taker.woken.wait(), 5)
            # Nothing was left in aiohttp's buffer but what came before the push began.
            before = content.read_nowait()
        assert before + b"".join(taker.taken) == b"".join(event(i) for i in range(5))
        assert len(taker.taken) >= 4  # one piece per read: pushed, not buffered
        assert content.is_eof() and taker.wakes == 1
        assert type(content) is aiohttp.StreamReader  # as it was once the push is over


async def test_a_piece_the_taker_cannot_take_stays_in_aiohttps_buffer() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        await http_chunk(writer, event(0))
        writer.write(b"0\r\n\r\n")

    async with upstream(serve) as response:
        taker = Taker(accept=False)
        with pushed(response.content, taker):
            await asyncio.wait_for(taker.woken.wait(), 5)
            assert response.content.read_nowait() == event(0)


async def test_the_read_timeout_wakes_the_taker_with_a_timeout() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await http_chunk(writer, event(0))
        await asyncio.sleep(3)  # a provider gone quiet

    async with upstream(serve, read_timeout=0.3) as response:
        taker = Taker()
        with pushed(response.content, taker):
            await asyncio.wait_for(taker.woken.wait(), 5)
        assert isinstance(response.content.exception(), TimeoutError)


async def test_a_connection_lost_mid_body_wakes_the_taker_with_an_error() -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await http_chunk(writer, event(0))
        # Closed without the last chunk: the body is incomplete.

    async with upstream(serve) as response:
        taker = Taker()
        with pushed(response.content, taker):
            await asyncio.wait_for(taker.woken.wait(), 5)
        assert isinstance(response.content.exception(), aiohttp.ClientPayloadError)


def _relay(response: aiohttp.ClientResponse, max_gap_s: float = 60) -> StreamRelay:
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


async def test_the_relay_times_the_providers_silence_in_place_of_aiohttp() -> None:
    """aiohttp's read timer is off for the body (it re-armed a timer per piece): the relay's
    own ends a stream whose provider goes quiet past the gap, as a 504, and a client that
    holds the stream up is not the provider's silence."""
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
        assert response.connection is not None and response.connection.protocol is not None
        assert response.connection.protocol.read_timeout is None
    assert (relay.status, relay.error_code) == (504, "upstream_timeout")
    assert relay.meter.payloads() and len(relay.meter.payloads()) == 4, "every piece passed on"
    # Two gaps held up by the client, then the provider's pieces, then one gap of silence.
    assert gap * 3 <= took < gap * 6


def test_only_an_open_plain_reader_can_be_pushed() -> None:
    class Other:
        pass

    with pytest.raises(TypeError), pushed(cast(Any, Other()), Taker()):
        pass

"""A response's headers leave with its first body piece (service/http_protocol.py).

A real uvicorn server on loopback, with the protocol `meterline serve` uses; the connection's
transport records each write it is asked for. If uvicorn stops making a cycle per request in
`on_headers_complete`, or writes its headers some other way, the write counts here change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from service.http_protocol import HttpProtocol

WRITES: list[bytes] = []  # what the server's connections wrote, in order, one item a write


class _Recording:
    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _RecordingProtocol(HttpProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_Recording(transport))  # type: ignore[arg-type]


first_token = asyncio.Event()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await first_token.wait()  # the test sets it once it has read the headers
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b'{"echo": %d}' % len(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=_RecordingProtocol, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    WRITES.clear()
    try:
        yield bound
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 5)


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def test_a_whole_response_is_one_write_and_keep_alive_still_works(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for body in (b"{}", b'{"a": 1}'):
        writer.write(
            b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        response = await _read_response(reader)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(b'{"echo": %d}' % len(body))
    writer.close()
    assert len(WRITES) == 2, "one write per response: headers and body together"
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b"}") for w in WRITES)


async def test_headers_go_at_the_end_of_the_turn_when_no_body_follows(port: int) -> None:
    first_token.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    # The app waits for this test before its first piece: the headers must come first.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in head
    first_token.set()
    assert (
        await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
    )
    writer.close()
    assert WRITES[0] == head, "the headers alone, once the turn they were sent in ended"


async def test_an_interim_continue_and_a_closing_response_are_not_held_back(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"{}")
    response = await asyncio.wait_for(reader.read(), 5)  # to the end: the server closes
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b'{"echo": 2}')
    assert b"connection: close" in response
    writer.close()
    assert WRITES[0] == interim and len(WRITES) == 2

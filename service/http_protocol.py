"""uvicorn's httptools protocol, writing a response's headers together with its first body piece.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`,
then each body piece as it is sent: a whole response is two write(2)s and two TCP segments
the client wakes up for. A write(2) is the largest single cost of a proxied request (on
loopback the kernel runs the receiver's side of TCP in it too), so here a cycle's headers
are held and go out in one write with the first body piece. When no body piece follows in
the same turn of the event loop (a stream whose first token has not arrived), they go at
the end of that turn, so a client never waits longer for its headers than before.

What this relies on in uvicorn (`tests/test_http_protocol.py` fails if it changes): each
request's `RequestResponseCycle` is made in `on_headers_complete` and writes through its
own `transport` attribute, the headers in one write that starts with the status line.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_STATUS_LINE_START = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "  # an interim response: written at once, never held


class HeldHeaders:
    """One cycle's view of the connection's transport: the headers' write is held until the
    next write (or close, or the end of the loop's turn) and goes out with it."""

    __slots__ = ("_headers_written", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._headers_written = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif (
            not self._headers_written
            and data.startswith(_STATUS_LINE_START)
            and not data.startswith(_CONTINUE)
        ):
            self._headers_written = True
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write the held headers, if any are still held."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, …
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """What `meterline serve` gives uvicorn as its HTTP protocol (service/serving.py)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # A new cycle writes straight to the connection; one already given its view (an
        # upgrade returns before making a cycle) is left as it is.
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = cast(asyncio.Transport, HeldHeaders(self.transport, self.loop))

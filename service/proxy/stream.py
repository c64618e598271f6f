"""A streamed answer passed through chunk by chunk, metered on the way, cut when it must be.

The status line goes out before the first chunk, so what goes wrong after it — the
provider too slow or gone, a generation past what its reservation pays for — ends the
stream with an error event in OpenAI's shape, which the SDKs raise. A client that
disconnects cancels the generation upstream (the connection is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.types import Receive, Send

from service.errors import error_body
from service.proxy.asgi import send_part, start
from service.proxy.context import RequestContext
from service.proxy.sse import OutputCounter, StreamMeter
from service.proxy.upstream import (
    UPSTREAM_FAILURES,
    passed_headers,
    route_headers,
    upstream_failure,
)

_STREAM_ERRORS = {
    "upstream_timeout": "the provider stopped sending before the stream was complete",
    "upstream_disconnected": "the provider closed the stream before it was complete",
    "max_tokens_exceeded": (
        "the provider generated past the completion tokens this request's budget "
        "reservation pays for (it ignored max_tokens); the stream was cut there"
    ),
    "stream_too_long": "the stream ran past the longest a stream may last; it was cut there",
    "upstream_line_too_long": (
        "the provider sent a line longer than a stream event may be; the stream was cut there"
    ),
}


@dataclass(frozen=True, slots=True)
class StreamBounds:
    """What one stream may cost a worker: its whole duration and the bytes of one line
    (what is kept of an incomplete event). Settings `stream_max_duration_s` and
    `stream_max_line_bytes`; the gap between two pieces is the upstream read timeout."""

    max_duration_s: float
    max_line_bytes: int


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("Content-Type", "").startswith("text/event-stream")


class StreamRelay:
    """One stream: `run` passes it on; then `status`, `error_code` and `ttft_ms` say how it
    went and `meter` what it carried."""

    def __init__(
        self,
        ctx: RequestContext,
        response: aiohttp.ClientResponse,
        hide_usage: bool,
        started: float,
        bounds: StreamBounds,
    ) -> None:
        self.ctx = ctx
        self.response = response
        self.started = started
        self.bounds = bounds
        self._line_bytes = 0  # bytes received since the provider's last newline
        self._mid_line = False  # the client's bytes end inside a line
        self.meter = StreamMeter(hide_usage)
        allowance = ctx.completion_allowance
        self.counter = OutputCounter(allowance) if allowance is not None else None
        self.status = response.status
        self.error_code: str | None = None
        self.ttft_ms: int | None = None
        self.disconnected = False
        self.done = False

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.error_code is None

    async def run(self, send: Send, receive: Receive) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            await start(send, self.status, self._headers())
            await self._pass_on(send, watcher)
        except UPSTREAM_FAILURES as exc:
            self.status = upstream_failure(exc).status_code
            self.error_code = "upstream_timeout" if self.status == 504 else "upstream_disconnected"
        finally:
            self.done = True
            watcher.cancel()
        if self.disconnected:
            self.status, self.error_code = 499, "client_disconnected"
        elif self.error_code is not None:
            # The status line is gone already: the error goes in the stream, as an event of
            # its own even when the cut came mid-line.
            event = error_body(_STREAM_ERRORS[self.error_code], "api_error", self.error_code)
            frame = b"data: " + orjson.dumps(event) + b"\n\n"
            if self._mid_line:
                frame = b"\n\n" + frame
            with contextlib.suppress(Exception):
                await send_part(send, frame, more=False)

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", self.response.headers.get("Content-Type", "").encode()),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", self.ctx.request_id.encode()),
            *passed_headers(self.response, self.ctx.response_headers),
            *route_headers(self.ctx),
        ]

    async def _pass_on(self, send: Send, watcher: asyncio.Task[None]) -> None:
        content = self.response.content
        deadline = self.started + self.bounds.max_duration_s
        while piece := await content.readany():  # whatever arrived: no buffering
            newline = piece.rfind(b"\n")
            if newline < 0:
                self._line_bytes += len(piece)
            else:
                self._line_bytes = len(piece) - newline - 1
            # Hiding injected usage holds an incomplete event back: bounded the same way.
            if max(self._line_bytes, self.meter.held) > self.bounds.max_line_bytes:
                self.status, self.error_code = 502, "upstream_line_too_long"
                return
            if time.perf_counter() > deadline:
                self.status, self.error_code = 502, "stream_too_long"
                return
            piece, cut = self._within_allowance(piece)
            out = self.meter.feed(piece)
            if out:
                self._mid_line = not out.endswith(b"\n")
                if self.ttft_ms is None:
                    self.ttft_ms = int((time.perf_counter() - self.started) * 1000)
                await send_part(send, out)
            if self.disconnected:
                return
            if cut:
                self.status, self.error_code = 502, "max_tokens_exceeded"
                return
        if not self.disconnected:
            self.done = True
            watcher.cancel()
            await send_part(send, self.meter.flush(), more=False)

    def _within_allowance(self, piece: bytes) -> tuple[bytes, bool]:
        """The part of an upstream piece to pass on, and whether the stream is cut after it."""
        if self.counter is None:
            return piece, False
        keep = self.counter.feed(piece)
        return (piece, False) if keep is None else (piece[:keep], True)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.disconnected = True
                    self.response.close()
                return

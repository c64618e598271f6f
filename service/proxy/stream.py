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
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Send

from service.errors import error_body
from service.proxy.asgi import send_part, start
from service.proxy.context import RequestContext
from service.proxy.http_client import UpstreamResponse
from service.proxy.sse import OutputCounter, StreamMeter
from service.proxy.upstream import (
    UPSTREAM_FAILURES,
    passed_headers,
    route_headers,
    upstream_failure,
)

# What `finish` resumes: an `__await__` generator or a coroutine, both driven by send/throw.
Started = Generator[Any, None, Any] | Coroutine[Any, Any, Any]


async def finish(waiting: Started, awaited: Any) -> None:
    """Run to its end `waiting`, started by hand, which had to wait on `awaited`, as a task
    would.

    The wait is for `awaited` to be done (not an `await` of it: the generator's own `await`
    still holds it), then the generator resumes and sees its outcome."""
    while True:
        try:
            if awaited is None:  # a bare yield: one turn of the loop
                await asyncio.sleep(0)
            else:
                await asyncio.wait((awaited,))
        except BaseException as exc:  # this task cancelled: so is the generator, where it waits
            try:
                awaited = waiting.throw(exc)
            except StopIteration:
                return
            continue
        try:
            awaited = waiting.send(None)
        except StopIteration:
            return


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
    """What one stream may cost a worker: its whole duration, the bytes of one line (what is
    kept of an incomplete event) and the longest the provider may stay silent. Settings
    `stream_max_duration_s`, `stream_max_line_bytes` and `upstream_read_timeout_s`."""

    max_duration_s: float
    max_line_bytes: int
    max_gap_s: float


def is_event_stream(response: UpstreamResponse) -> bool:
    return response.header(b"content-type").startswith("text/event-stream")


class StreamRelay:
    """One stream: `run` passes it on; then `status`, `error_code` and `ttft_ms` say how it
    went and `meter` what it carried."""

    def __init__(
        self,
        ctx: RequestContext,
        response: UpstreamResponse,
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
        self._deadline = started + bounds.max_duration_s
        self._send: Send | None = None
        self._wake: asyncio.Future[None] | None = None
        self._halted = False  # cut (error_code says why) or failed: nothing more is sent
        self._blocked = False  # a send waits: pieces stay in the response's buffer, in order
        self._pending: tuple[Generator[Any, None, None], Any] | None = None
        self._failure: BaseException | None = None
        self._last_piece = started  # time.perf_counter() of the provider's last piece
        self._gap_timer: asyncio.TimerHandle | None = None

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
            if self._gap_timer is not None:
                self._gap_timer.cancel()
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
            (b"content-type", self.response.header(b"content-type").encode()),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", self.ctx.request_id.encode()),
            *passed_headers(self.response, self.ctx.response_headers),
            *route_headers(self.ctx),
        ]

    async def _pass_on(self, send: Send, watcher: asyncio.Task[None]) -> None:
        """The body relayed: each piece is taken as the connection's parser hands it over
        (`take`, no task switch per piece) while this waits for the end, a cut, the client
        gone, or a send that must wait; then what was buffered meanwhile is relayed from
        here, in order."""
        content = self.response
        self._send = send
        self._blocked = True  # what arrived with the headers goes first, from here
        loop = asyncio.get_running_loop()
        self._time_gaps(loop)
        content.push_to(self)
        try:
            while True:
                if self._pending is not None:
                    await finish(*self._pending)
                    self._pending = None
                if self._failure is not None:
                    raise self._failure
                if self._halted or self.disconnected:
                    return
                while piece := content.read_nowait():  # raises what ended the body
                    out = self._piece(piece)
                    if out:
                        await send_part(send, out)
                    if self._halted or self.disconnected:
                        return
                if content.is_eof():
                    break
                self._blocked = False
                self._wake = loop.create_future()
                await self._wake
        finally:
            content.push_to(None)
            if self._pending is not None:
                self._pending[0].close()
        if not self.disconnected:
            self.done = True
            watcher.cancel()
            await send_part(send, self.meter.flush(), more=False)

    def take(self, piece: bytes) -> bool:
        """A piece just received: metered and sent at once (`BodyTaker`)."""
        if self._blocked or self._halted:
            return False  # relayed in order by `_pass_on` once the send before it is done
        try:
            out = self._piece(piece)
            if out:
                assert self._send is not None, "pieces are pushed from _pass_on on"
                waiting = send_part(self._send, out).__await__()
                try:
                    self._pending = (waiting, waiting.send(None))
                except StopIteration:
                    pass  # sent: the usual case
                else:
                    self._blocked = True  # the client's socket is full: later pieces wait
                    self.wake()
        except BaseException as exc:
            self._failure, self._halted = exc, True
        if self._halted or self.disconnected:
            self.wake()
        return True

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _time_gaps(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time the provider's silences with one timer per stream, moved on only when it
        fires (a stream relays tens of thousands of pieces a second per worker)."""
        self._last_piece = time.perf_counter()
        self._gap_timer = loop.call_later(self.bounds.max_gap_s, self._check_gap, loop)

    def _check_gap(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.done or self._halted:
            return
        quiet = time.perf_counter() - self._last_piece
        if self._blocked:  # a send to the client waits: it holds the stream up, not the provider
            quiet = 0.0
        if quiet < self.bounds.max_gap_s:
            delay = self.bounds.max_gap_s - quiet
            self._gap_timer = loop.call_later(delay, self._check_gap, loop)
            return
        self._failure = TimeoutError("the provider sent nothing within the read timeout")
        self._halted = True
        self.wake()

    def _piece(self, piece: bytes) -> bytes:
        """What of an upstream piece to send the client; sets `_halted` when it cuts."""
        now = self._last_piece = time.perf_counter()
        newline = piece.rfind(b"\n")
        if newline < 0:
            self._line_bytes += len(piece)
        else:
            self._line_bytes = len(piece) - newline - 1
        # Hiding injected usage holds an incomplete event back: bounded the same way.
        if max(self._line_bytes, self.meter.held) > self.bounds.max_line_bytes:
            self._cut("upstream_line_too_long")
            return b""
        if now > self._deadline:
            self._cut("stream_too_long")
            return b""
        piece, cut = self._within_allowance(piece)
        out = self.meter.feed(piece)
        if cut:
            self._cut("max_tokens_exceeded")
        if out:
            self._mid_line = not out.endswith(b"\n")
            if self.ttft_ms is None:
                self.ttft_ms = int((now - self.started) * 1000)
        return out

    def _cut(self, code: str) -> None:
        self.status, self.error_code, self._halted = 502, code, True

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
                    self.wake()
                return

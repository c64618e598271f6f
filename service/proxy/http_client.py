"""HTTP/1.1 to the providers: pooled keep-alive connections, on asyncio's transports and
httptools' parser (the one uvicorn parses the clients' requests with).

A general client was about a quarter of a forwarded request's CPU: with aiohttp's, the server
spent 279 to 304 µs per request at 8 connections, with this one 217 to 220 (`python -m bench
proxy`, alternated in the same hour), and every piece of a stream crosses it too. What the
proxy needs is narrow, so this is all there is:

- a request is one write: its head is built once per provider, endpoint and headers, and
  the body follows it in the same `write(2)`;
- a response is read by the connection's protocol: its head resolves one future, each body
  piece goes to the `BodyTaker` the stream relay set (metered and relayed in the parser's
  callback, no task switch per piece) or to a buffer that `read` and `read_nowait` drain;
- past `_HIGH_WATER` buffered bytes (the relay's client is slow) the provider is paused,
  and draining the buffer resumes it;
- a connection goes back to the pool only when its response ended whole and the provider
  keeps it alive; one idle past `keepalive_s` is closed, or sooner when the provider's
  `Keep-Alive: timeout=N` says it closes them sooner;
- a connection idle for a while is polled before it is reused: a provider's close that has
  reached this host but not yet the loop would otherwise fail the request written on it;
- failures are the builtin ones: `ConnectFailed` / `ConnectTimeout` before anything was
  sent (safe to retry), then `ConnectionError` (the provider closed or spoke no HTTP) and
  `TimeoutError` (silent past the read timeout).
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections.abc import Mapping
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httptools

# A body buffered past this (the relay's client reads slower than the provider sends)
# pauses the provider's socket; the kernel's buffers and TCP's window hold the rest.
_HIGH_WATER = 1 << 16
# The most an answer's head may take (status line and headers) before it is refused.
_MAX_HEAD = 1 << 16
# Servers close idle connections after a few seconds (uvicorn, and so vLLM, and node after
# 5). A connection idle at least this long is polled (one poll(2)) before it is reused: a
# close that reached this host but not yet the loop would fail the request written on it.
# A busy pool's connections are never idle this long: they cost nothing here.
_POLL_IDLE_AFTER_S = 1.0


class _Unasked(Exception):
    """The provider answered twice to one request."""


class ConnectFailed(ConnectionError):
    """No connection could be made: the provider has seen nothing."""


class ConnectTimeout(TimeoutError):
    """The connection was not made in time: the provider has seen nothing."""


class BodyTaker(Protocol):
    def take(self, piece: bytes) -> bool:
        """Relay `piece` now (True), or leave it buffered in the response (False)."""

    def wake(self) -> None:
        """The body ended (its end, or an error): whoever waits on it looks."""


class _Target:
    """Where a URL's requests go, and their head up to the body's length (built once)."""

    __slots__ = ("head", "key")

    def __init__(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        self.key = (parts.hostname, parts.port or (443 if tls else 80), tls)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.head = ("\r\n".join(lines) + "\r\n").encode("latin-1")


class UpstreamResponse:
    """A provider's answer: `status` and `raw_headers` read, the body arriving."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_connection",
        "_done",
        "_eof",
        "_error",
        "_keep_alive",
        "_taker",
        "_waiter",
        "raw_headers",
        "status",
    )

    def __init__(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], connection: _Connection
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self._connection = connection
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._taker: BodyTaker | None = None
        self._keep_alive = False
        self._done = False  # released or closed: the connection is not this response's now

    def header(self, name: bytes) -> str:
        """The value of header `name` (lower case), or "" when absent."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""

    # -- reading -----------------------------------------------------------------------

    async def read(self) -> bytes:
        """The whole body; raises what ended it early."""
        while not self._eof and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        body = b"".join(self._buffer)
        self._buffer.clear()
        return body

    def read_nowait(self) -> bytes:
        """What is buffered (b"" when nothing is); raises what ended the body early."""
        if self._error is not None:
            raise self._error
        if not self._buffer:
            return b""
        data = b"".join(self._buffer)
        self._buffer.clear()
        if self._buffered > _HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return data

    def is_eof(self) -> bool:
        """The body is all in, and all read."""
        return self._eof and not self._buffer

    def push_to(self, taker: BodyTaker | None) -> None:
        """From now on each piece goes to `taker` as it arrives (None: to the buffer); the
        body's end or failure wakes it."""
        self._taker = taker

    async def _wait(self) -> None:
        self._waiter = self._connection.loop.create_future()
        silence = _Silence(self._connection, self._waiter)
        try:
            await self._waiter
        finally:
            self._waiter = None
            silence.cancel()

    # -- what the connection's parser hands over --------------------------------------

    def _feed(self, piece: bytes) -> None:
        taker = self._taker
        if taker is not None and taker.take(piece):
            return
        self._buffer.append(piece)
        self._buffered += len(piece)
        if self._buffered > _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _end(self, keep_alive: bool) -> None:
        self._eof, self._keep_alive = True, keep_alive
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._eof or self._error is not None:
            return
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._taker is not None:
            self._taker.wake()

    # -- the connection back ---------------------------------------------------------

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the body ended
        whole and the provider keeps it alive, and is closed otherwise."""
        if self._done:
            return
        self._done = True
        if self._eof and self._error is None:
            self._connection.finished(self._keep_alive)
        else:  # what is left of the body would have to be read first: not worth it
            self._connection.close()

    def close(self) -> None:
        """Done with the response, whatever is left of it: the connection is dropped (a
        generation in progress upstream stops)."""
        self._done = True
        self._connection.close()


class _Connection(asyncio.Protocol):
    """One connection to a provider, one request at a time."""

    def __init__(self, pool: ConnectionPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        # How long it may stay idle and be reused: the pool's keep-alive time, or less when
        # the provider says (`Keep-Alive: timeout=N`).
        self.idle_limit_s = pool.keepalive_s
        self.received_at = 0.0  # the loop's time of the provider's last bytes
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._interim = False  # a 1xx head: the real one follows
        self._head_bytes = 0
        self._paused = False

    # -- asyncio ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.received_at = self.loop.time()
        if self._head is None and (self.response is None or self.response._eof):
            self._refuse("the provider sent bytes nothing asked for")
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._refuse(f"the provider's answer is not HTTP/1.1: {exc}")
            return
        except _Unasked:
            self._refuse("the provider sent an answer nothing asked for")
            return
        if self._head is not None:  # all of it was head: bounded like a line of a stream
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._refuse("the provider's answer has a head past 64 kB")

    def eof_received(self) -> None:
        return None  # the transport closes; `connection_lost` ends the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is not None and not response._eof and exc is None and self._until_close():
            response._end(False)  # a body delimited by the connection's end: whole
            return
        self._lost(ConnectionError("the provider closed the connection"))

    # -- httptools ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        if len(name) == 10 and name.lower() == b"keep-alive":
            self._provider_keeps(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer follows
            self._interim = True
            self._raw_headers = []
            return
        head, self._head = self._head, None
        if head is None:  # a second answer to one request
            raise _Unasked
        self.response = UpstreamResponse(status, self._raw_headers, self)
        if not head.done():
            head.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.response is not None:
            self.response._end(self._parser.should_keep_alive())

    # -- the proxy's side --------------------------------------------------------------

    async def request(self, head: bytes, body: bytes | None) -> UpstreamResponse:
        """Send one request (`head` ends with its headers' last line) and wait for the
        answer's head."""
        assert self.transport is not None and self.response is None
        self._raw_headers = []
        self._head_bytes = 0
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._head = waiter
        if body is None:
            self.transport.write(head + b"\r\n")
        else:
            self.transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        self.received_at = self.loop.time()
        silence = _Silence(self, waiter)
        try:
            response = await waiter
        except BaseException:
            self.close()  # failed or cancelled half-way: the connection is in no state
            raise
        finally:
            silence.cancel()
            self._head = None
        return response

    def finished(self, keep_alive: bool) -> None:
        """The response ended and was released: back to the pool, or closed."""
        self.response = None
        if keep_alive and not self.closed and not self._paused and self.idle_limit_s > 0:
            self.pool.put_back(self)
        else:
            self.close()

    def reusable(self, now: float) -> bool:
        """Idle and still open: within its idle limit and, after a while idle, with nothing
        arrived that the loop has not read yet (the provider's close, or bytes nothing asked
        for: either way it cannot carry a request)."""
        idle_s = now - self.idle_since
        if idle_s >= self.idle_limit_s or self.transport_closing():
            return False
        if idle_s < _POLL_IDLE_AFTER_S:
            return True
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        poll = select.poll()  # not select(2): a worker's descriptors pass 1,024
        poll.register(sock.fileno(), select.POLLIN)
        return not poll.poll(0)

    def transport_closing(self) -> bool:
        """Closed, by us or by the transport itself (a write that failed, `connection_lost`
        still to come)."""
        return self.transport is None or self.transport.is_closing()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    # -- inside ------------------------------------------------------------------------

    def _provider_keeps(self, value: bytes) -> None:
        """`Keep-Alive: timeout=N, max=M`: the provider closes a connection idle N seconds
        (from when it sent its answer). Ours is reused only while idle less than N, less a
        margin for the answer's way here and the provider's clock: N - 1 s, or N/2 below 2 s."""
        for part in value.split(b","):
            name, _, number = part.strip().partition(b"=")
            if name.lower() != b"timeout":
                continue
            try:
                seconds = float(number)
            except ValueError:
                return
            if seconds >= 0:  # not NaN, not negative
                limit = seconds - min(1.0, seconds / 2)
                self.idle_limit_s = min(self.pool.keepalive_s, limit)
            return

    def _refuse(self, why: str) -> None:
        self._lost(ConnectionError(why))
        self.close()

    def _lost(self, error: ConnectionError) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    def _until_close(self) -> bool:
        """The response's body has neither a length nor chunks: it ends with the connection."""
        response = self.response
        assert response is not None
        return not response.header(b"content-length") and "chunked" not in response.header(
            b"transfer-encoding"
        )


class _Silence:
    """Fails a wait with a TimeoutError once the provider has been silent for the read
    timeout: one timer per wait, moved on only when it fires, not one per piece."""

    __slots__ = ("_connection", "_timer", "_waiter")

    def __init__(self, connection: _Connection, waiter: asyncio.Future[Any]) -> None:
        self._connection, self._waiter = connection, waiter
        self._timer = connection.loop.call_later(connection.pool.read_timeout_s, self._check)

    def _check(self) -> None:
        if self._waiter.done():
            return
        connection = self._connection
        quiet = connection.loop.time() - connection.received_at
        left = connection.pool.read_timeout_s - quiet
        if left > 0:
            self._timer = connection.loop.call_later(left, self._check)
            return
        silent = TimeoutError("the provider sent nothing within the read timeout")
        self._waiter.set_exception(silent)

    def cancel(self) -> None:
        self._timer.cancel()


class ConnectionPool:
    """Keep-alive connections to the providers, by host, port and TLS; one per worker."""

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[tuple[str, str, tuple[tuple[str, str], ...]], _Target] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def target(self, method: str, url: str, headers: Mapping[str, str]) -> _Target:
        key = (method, url, tuple(headers.items()))
        found = self._targets.get(key)
        if found is None:
            found = self._targets[key] = _Target(method, url, headers)
        return found

    async def request(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        """The answer's head to one request, on a pooled connection or a new one."""
        target = self.target(method, url, headers)
        connection = self._idle_connection(target.key) or await self._connect(target.key)
        return await connection.request(target.head, body)

    def _idle_connection(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        now = self.loop.time()
        while idle:
            connection = idle.pop()  # the most recent: the least likely to be closed
            if connection.reusable(now):
                return connection
            connection.close()
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        host, port, tls = key
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    port,
                    ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection to {host}:{port} in time") from exc
        except OSError as exc:  # refused, unreachable, no such host, TLS refused
            raise ConnectFailed(f"no connection to {host}:{port}: {exc}") from exc
        self._open.add(connection)
        return connection

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_s, self._close_stale)

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _close_stale(self) -> None:
        self._sweep = None
        # The sweep runs every `keepalive_s`: a connection with a shorter limit (its
        # provider's `Keep-Alive: timeout`) may stay open past it until then, never reused.
        now = self.loop.time()
        for idle in self._idle.values():
            for connection in [c for c in idle if now - c.idle_since >= c.idle_limit_s]:
                connection.close()
        if any(self._idle.values()):
            self._sweep = self.loop.call_later(self.keepalive_s, self._close_stale)

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # the transports' close callbacks run

"""A request's body leaves with its headers (service/proxy/eager.py).

The factory relies on aiohttp writing the body from `ClientRequest.write_bytes`, handed to
`asyncio.create_task`: if an upgrade changes that, no body writer reaches the factory and
these tests fail, rather than the body silently going one loop turn late again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.proxy.upstream import UpstreamClient

Seen = list[tuple[str, asyncio.Future[Any], bool]]  # (coroutine, its task, done when made)


async def _answer_with_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A provider that answers each request with the length of the body it received."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            break
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        answer = b'{"received": %d}' % len(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
    writer.close()


@pytest.fixture
async def provider_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(_answer_with_length, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"


@pytest.fixture
async def client_seen() -> AsyncIterator[tuple[UpstreamClient, Seen]]:
    """A started client, and each task the loop's factory made since."""
    loop = asyncio.get_running_loop()
    before = loop.get_task_factory()
    loop.set_task_factory(None)
    client = UpstreamClient(connect_timeout_s=2, read_timeout_s=10, retries=0)
    await client.start()
    installed = loop.get_task_factory()
    assert installed is not None, "the client installs its task factory"
    seen: Seen = []

    def recording(
        loop: asyncio.AbstractEventLoop, coro: Any, /, **kwargs: Any
    ) -> asyncio.Future[Any]:
        task = installed(loop, coro, **kwargs)
        seen.append((getattr(coro, "__qualname__", ""), task, task.done()))
        return task

    loop.set_task_factory(recording)
    try:
        yield client, seen
    finally:
        await client.close()
        loop.set_task_factory(before)


async def _post(client: UpstreamClient, url: str, body: bytes) -> bytes:
    response = await client.send("POST", url, body, {"Content-Type": "application/json"})
    try:
        return await response.read()
    finally:
        response.release()


async def test_a_body_that_fits_the_socket_is_written_before_the_request_waits(
    client_seen: tuple[UpstreamClient, Seen], provider_url: str
) -> None:
    client, seen = client_seen
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    assert await _post(client, provider_url, body) == b'{"received": %d}' % len(body)
    writers = [(task, done) for name, task, done in seen if name == "ClientRequest.write_bytes"]
    assert len(writers) == 1, f"aiohttp's body writer reached the factory: {seen}"
    task, done_when_made = writers[0]
    assert done_when_made, "written at once, not from a task of its own"
    assert task.exception() is None


async def test_a_body_larger_than_the_socket_takes_a_task_and_arrives_whole(
    client_seen: tuple[UpstreamClient, Seen], provider_url: str
) -> None:
    client, seen = client_seen
    body = b"x" * (16 * 1024 * 1024)  # far past the transport's high-water mark: it pauses
    assert await _post(client, provider_url, body) == b'{"received": %d}' % len(body)
    writers = [(task, done) for name, task, done in seen if name == "ClientRequest.write_bytes"]
    assert len(writers) == 1
    task, done_when_made = writers[0]
    assert isinstance(task, asyncio.Task) and not done_when_made, "the writer had to wait"
    assert task.done() and task.exception() is None
    # The connection is reused afterwards: the writer left it in order.
    small = b"{}"
    assert await _post(client, provider_url, small) == b'{"received": 2}'

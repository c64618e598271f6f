"""The proxy's answers, written as ASGI messages (no Response objects on the hot path)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

import orjson
from starlette.types import Send

from service.errors import MeterlineError

Headers = list[tuple[bytes, bytes]]
JSON = b"application/json"


# `start` and `send_part` are not coroutines: they hand back `send`'s own awaitable, so no
# frame is added per message (a stream sends one per chunk).


def start(send: Send, status: int, headers: Headers) -> Awaitable[None]:
    return send({"type": "http.response.start", "status": status, "headers": headers})


def send_part(send: Send, body: bytes, more: bool = True) -> Awaitable[None]:
    """One piece of a streamed body; `more=False` ends it."""
    return send({"type": "http.response.body", "body": body, "more_body": more})


async def send_whole(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    content_type: bytes = JSON,
) -> None:
    """A response with its whole body: content type and length, then `headers`."""
    length = str(len(body)).encode()
    await start(
        send, status, [(b"content-type", content_type), (b"content-length", length), *headers]
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: MeterlineError, request_id: str | None) -> None:
    """`error` in OpenAI's shape, with its own headers (Retry-After, x-ratelimit-*, …)."""
    headers = [(b"x-request-id", request_id.encode())] if request_id else []
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send_whole(send, error.status_code, orjson.dumps(error.body()), headers)

"""The request body limit of the billing API (the proxy enforces the same limit itself).

Without it a client could make the server buffer a body of any size before anything
(authentication included) looks at it. A declared `Content-Length` past the limit is
refused at once; an undeclared (chunked) body is counted as it arrives.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge

# The proxy's own paths: it reads and limits its bodies itself, in OpenAI's error shape.
_PROXY_PREFIX = "/v1/"


def _too_large(limit: int) -> str:
    return f"request body exceeds {limit} bytes"


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_PROXY_PREFIX):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing unchanged and is
                # rendered by the application's handler, in the one error shape.
                raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps(PayloadTooLarge(_too_large(self.max_bytes)).body())
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

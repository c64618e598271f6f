"""A bare pass-through proxy: the yardstick Meterline's overhead is measured against.

It forwards `POST /v1/chat/completions` to `BENCH_UPSTREAM` with the provider key and
returns the answer, streamed or not, and nothing else: no auth, no parsing, no ledger.
`BENCH_CLIENT` picks the HTTP client: `aiohttp` (what Meterline uses), `httpx-aiohttp`
(httpx on the aiohttp transport) or `httpx` (httpx's default transport).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create_app() -> Starlette:
    upstream = os.environ["BENCH_UPSTREAM"].rstrip("/")
    kind = os.environ.get("BENCH_CLIENT", "aiohttp")
    headers = {
        "Authorization": f"Bearer {os.environ.get('BENCH_PROVIDER_KEY', '')}",
        "Content-Type": "application/json",
    }
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if kind == "aiohttp":
            state["session"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
            )
        else:
            transport: httpx.AsyncBaseTransport | None = None
            if kind == "httpx-aiohttp":
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport()
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
            state["client"] = httpx.AsyncClient(transport=transport, limits=limits, timeout=600)
        yield
        if "session" in state:
            await state["session"].close()
        else:
            await state["client"].aclose()

    async def forward(request: Request) -> Response:
        body = await request.body()
        stream = b'"stream":true' in body.replace(b" ", b"")
        url = f"{upstream}/chat/completions"
        if kind == "aiohttp":
            response = await state["session"].post(url, data=body, headers=headers)
            if stream:

                async def pieces() -> AsyncIterator[bytes]:
                    async for piece in response.content.iter_any():
                        yield piece
                    response.release()

                return StreamingResponse(pieces(), media_type="text/event-stream")
            raw = await response.read()
            response.release()
            return Response(raw, response.status, media_type="application/json")
        client: httpx.AsyncClient = state["client"]
        if stream:
            upstream_response = await client.send(
                client.build_request("POST", url, content=body, headers=headers), stream=True
            )

            async def chunks() -> AsyncIterator[bytes]:
                async for piece in upstream_response.aiter_raw():
                    yield piece
                await upstream_response.aclose()

            return StreamingResponse(chunks(), media_type="text/event-stream")
        answer = await client.post(url, content=body, headers=headers)
        return Response(answer.content, answer.status_code, media_type="application/json")

    return Starlette(
        routes=[Route("/v1/chat/completions", forward, methods=["POST"])], lifespan=lifespan
    )

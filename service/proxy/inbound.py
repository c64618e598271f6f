"""The client's request, read and checked: its credential, task headers, body and route.

Everything here refuses with a `MeterlineError` in OpenAI's shape before anything is
forwarded; nothing waits on Postgres (keys come from the in-memory `KeyCache`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from starlette.types import Receive, Scope

from service.auth.key_cache import CachedKey, KeyCache
from service.errors import (
    BadRequest,
    MeterlineError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from service.ledger.record import has_control_characters
from service.providers.config import Provider
from service.proxy.context import RequestContext
from service.routing.schemas import parse_model_spec
from service.routing.service import Candidate, ModelRouter, Route

MAX_TASK_FIELD = 128
MAX_MODEL = 256


class ModelNotFound(NotFound):
    code = "model_not_found"


class ProviderNotConfigured(MeterlineError):
    """The provider of a model has no key (its `api_key_env` is unset): the operator's to
    fix, so the provider's 401 never reaches a customer as if their key were bad."""

    status_code = 503
    type = "api_error"
    code = "provider_not_configured"


class ClientGone(Exception):
    """The client left before sending its whole request: there is nothing to answer."""


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    # Header names arrive lower-cased (ASGI); a repeated header keeps its last value.
    return dict(scope["headers"])


async def authenticate(
    keys: KeyCache, headers: Mapping[bytes, bytes], key_headers: tuple[tuple[bytes, str], ...]
) -> CachedKey:
    """The key the request carries (`Authorization: Bearer` or one of `key_headers`: each a
    lower-cased ASGI name and the name as configured, for messages)."""
    key = await keys.lookup(_credential(headers, key_headers))
    if key is None:
        raise Unauthorized("Incorrect API key provided, or the key was revoked or expired.")
    return key


def _credential(headers: Mapping[bytes, bytes], key_headers: tuple[tuple[bytes, str], ...]) -> str:
    """The one key the request carries: `Authorization: Bearer` or any of `key_headers`."""
    found: dict[str, str] = {}
    authorization = headers.get(b"authorization")
    if authorization:
        scheme, _, value = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <key>'")
        found["Authorization"] = value.strip()
    for name, shown in key_headers:
        raw = headers.get(name)
        if raw and raw.strip():
            found[shown] = raw.decode("latin-1").strip()
    if len(set(found.values())) > 1:
        raise BadRequest(
            f"{' and '.join(found)} carry different keys; send one",
            code="conflicting_credentials",
        )
    if not found:
        raise Unauthorized(
            "You didn't provide an API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    return next(iter(found.values()))


async def read_request(
    endpoint: str,
    headers: Mapping[bytes, bytes],
    receive: Receive,
    *,
    key: CachedKey,
    routing: ModelRouter,
    max_body_bytes: int,
    body_timeout_s: float,
    request_id: str,
    occurred_at: datetime,
) -> RequestContext:
    """The request of an authenticated key, checked and routed to its providers."""
    task_id = _task_header(headers, b"x-task-id")
    task_type = _task_header(headers, b"x-task-type")
    raw = await _read_body(receive, max_body_bytes, body_timeout_s, headers.get(b"content-length"))
    body = _parse_body(raw, endpoint)
    asked = body["model"]
    route: Route | None = None
    if isinstance(asked, str):
        model = asked
        providers = _providers(routing, model)
    else:
        spec = parse_model_spec(asked, MAX_MODEL)
        route = routing.choose(spec, key.account_id, task_id, occurred_at)
        model, providers = route.candidates[0].model, (route.candidates[0].provider,)
    ctx = RequestContext(
        request_id=request_id,
        occurred_at=occurred_at,
        account_id=key.account_id,
        key_id=key.key_id,
        key_prefix=key.prefix,
        endpoint=endpoint,
        model=model,
        task_id=task_id,
        task_type=task_type,
        body=body,
        raw_body=raw,
        stream=endpoint != "embeddings" and body.get("stream") is True,
        provider=providers[0],
    )
    if route is not None:
        ctx.routed = True
        ctx.fallbacks = route.candidates[1:]
        ctx.costliest = route.costliest
    elif len(providers) > 1:
        ctx.fallbacks = tuple(Candidate(model, p) for p in providers[1:])
        # A markup over provider cost may price the providers differently.
        ctx.costliest = routing.price(key.account_id, model, occurred_at)
    return ctx


def _providers(routing: ModelRouter, model: str) -> tuple[Provider, ...]:
    """The providers a model name is tried at, or the 404 / 503 saying why there is none."""
    providers = routing.serving(model)
    if providers:
        return providers
    if not routing.providers.route_all(model):
        raise ModelNotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )
    raise ProviderNotConfigured(
        f"The model `{model}` cannot be served now: its provider is not configured "
        "on this server (the operator has been told at start-up).",
        headers={"x-should-retry": "false"},
    )


async def _read_body(
    receive: Receive, limit: int, timeout_s: float, declared: bytes | None
) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual small body: in one piece, no timer
        if len(first) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return first
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_rest(receive, limit, [first])
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} seconds."
        ) from None


async def _read_rest(receive: Receive, limit: int, chunks: list[bytes]) -> bytes:
    size = sum(map(len, chunks))
    while True:
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            return b"".join(chunks)


def _task_header(headers: Mapping[bytes, bytes], name: bytes) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.decode("utf-8", "replace").strip()
    if len(value) > MAX_TASK_FIELD:
        raise BadRequest(
            f"{name.decode()} must be at most {MAX_TASK_FIELD} characters",
            code="invalid_header",
            param=name.decode(),
        )
    if has_control_characters(value):
        raise BadRequest(
            f"{name.decode()} must not contain control characters (such as NUL)",
            code="invalid_header",
            param=name.decode(),
        )
    return value or None


def _parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    _check_model(body.get("model"), endpoint)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise BadRequest("stream must be a boolean", code="invalid_type", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest(
            "stream_options must be an object", code="invalid_type", param="stream_options"
        )
    _check_input(body, endpoint)
    return body


def _check_model(model: object, endpoint: str) -> None:
    if isinstance(model, dict) and endpoint != "embeddings":
        return  # a model object, read by service/routing/schemas.py
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", code="missing_model", param="model")
    if len(model) > MAX_MODEL:
        raise BadRequest("model name too long", code="invalid_model", param="model")
    if has_control_characters(model):
        raise BadRequest(
            "model must not contain control characters (such as NUL)",
            code="invalid_model",
            param="model",
        )


def _check_input(body: dict[str, Any], endpoint: str) -> None:
    """What the endpoint generates from: messages, a prompt, or the input to embed."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "messages must be a non-empty array", code="invalid_type", param="messages"
            )
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest(
                "each message must be an object", code="invalid_type", param="messages"
            )
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), str | list):
            raise BadRequest(
                "prompt must be a string or an array", code="invalid_type", param="prompt"
            )
    elif endpoint == "embeddings" and not isinstance(body.get("input"), str | list):
        raise BadRequest("input must be a string or an array", code="invalid_type", param="input")

"""Bad input gets a clear 4xx in OpenAI's error shape, never a 500, and leaves the ledger alone.

Malformed JSON, wrong types, invalid UTF-8, oversized bodies, absurd header values, unknown
models and bad keys, sent as raw HTTP (an SDK would refuse to send most of them) to the
proxy and to the billing API of a server with a 64 KiB body limit.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from markupsafe import escape

from service.app import create_app  # noqa: F401  (registers the console's pages)
from service.console.pages import router as console_router
from tests.conftest import ADMIN_TOKEN, Meterline
from tests.reliability import (
    LIMIT_BYTES,
    admin,
    new_customer,
)
from tests.support import Database

LIMIT = LIMIT_BYTES
HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "mock-chat", "messages": HELLO}


@pytest.fixture
def server(reliability_server: Meterline) -> Meterline:
    return reliability_server


@pytest.fixture(scope="module")
def key(reliability_server: Meterline) -> str:
    return new_customer(reliability_server.url)[2]


@pytest.fixture(scope="module")
def ledger_before(reliability_server: Meterline, key: str) -> datetime:
    """When this module's requests began (the database's clock, as `occurred_at` is)."""
    started: datetime = Database(reliability_server.database_url).fetchval("SELECT now()")
    return started


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A clear error: the expected status and OpenAI's shape, with a message that says why."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and len(error["message"]) > 5
    if code is not None:
        assert error["code"] == code, error
    return error


def post(server: Meterline, key: str, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/{path}",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )


BAD_BODIES: list[tuple[str, str, bytes, int, str]] = [
    ("not JSON", "chat/completions", b'{"model": "mock-chat", "messages": [', 400, "invalid_json"),
    ("empty body", "chat/completions", b"", 400, "invalid_json"),
    ("a JSON array", "chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("a JSON string", "chat/completions", b'"hello"', 400, "invalid_json"),
    (
        "invalid UTF-8",
        "chat/completions",
        b'{"model": "mock-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "invalid_json",
    ),
    (
        "nested 20,000 deep",
        "chat/completions",
        b"[" * 20_000 + b"]" * 20_000,
        400,
        "invalid_json",
    ),
    ("no model", "chat/completions", b'{"messages": []}', 400, "missing_model"),
    (
        "model is a number",
        "chat/completions",
        b'{"model": 7, "messages": []}',
        400,
        "missing_model",
    ),
    (
        "model of 10,000 characters",
        "chat/completions",
        b'{"model": "' + b"m" * 10_000 + b'", "messages": [{"role": "user", "content": "x"}]}',
        400,
        "invalid_model",
    ),
    (
        "messages is a string",
        "chat/completions",
        b'{"model": "mock-chat", "messages": "hi"}',
        400,
        "invalid_type",
    ),
    (
        "messages are strings",
        "chat/completions",
        b'{"model": "mock-chat", "messages": ["hi"]}',
        400,
        "invalid_type",
    ),
    (
        "no messages",
        "chat/completions",
        b'{"model": "mock-chat", "messages": []}',
        400,
        "invalid_type",
    ),
    (
        "stream is a string",
        "chat/completions",
        b'{"model": "mock-chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        400,
        "invalid_type",
    ),
    (
        "stream_options is a list",
        "chat/completions",
        b'{"model": "mock-chat", "messages": [{"role": "user", "content": "x"}], '
        b'"stream": true, "stream_options": [1]}',
        400,
        "invalid_type",
    ),
    (
        "prompt is a number",
        "completions",
        b'{"model": "mock-base", "prompt": 12}',
        400,
        "invalid_type",
    ),
    ("input is null", "embeddings", b'{"model": "mock-embed", "input": null}', 400, "invalid_type"),
    (
        "unknown model",
        "chat/completions",
        b'{"model": "no-such/model", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "model_not_found",
    ),
]


@pytest.mark.parametrize(
    ("path", "content", "status", "code"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_bodies_get_a_clear_4xx(
    server: Meterline,
    key: str,
    ledger_before: datetime,
    path: str,
    content: bytes,
    status: int,
    code: str,
) -> None:
    response = post(server, key, path, content)
    error = assert_error(response, status, code)
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("req_")


def test_an_oversized_body_is_a_413(server: Meterline, key: str, ledger_before: datetime) -> None:
    big = b'{"model": "mock-chat", "messages": [{"role": "user", "content": "' + b"x" * LIMIT
    big += b'"}]}'
    assert_error(post(server, key, "chat/completions", big), 413, "request_too_large")

    # The same without a Content-Length (chunked): counted as it arrives, refused past it.
    def chunks() -> Iterator[bytes]:
        for _ in range(2 * LIMIT // 1024):
            yield b"x" * 1024

    response = httpx.post(
        f"{server.v1}/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert_error(response, 413, "request_too_large")


BAD_CREDENTIALS: list[tuple[str, dict[str, str] | dict[str, bytes], int, str | None]] = [
    ("no key", {}, 401, None),
    ("unknown key", {"Authorization": "Bearer ml-" + "A" * 43}, 401, "invalid_api_key"),
    ("not a Meterline key", {"Authorization": "Bearer sk-something"}, 401, "invalid_api_key"),
    ("basic auth", {"Authorization": "Basic dXNlcjpwYXNz"}, 401, None),
    ("bearer without a key", {"Authorization": "Bearer"}, 401, None),
    ("a key of 8 KiB", {"Authorization": "Bearer ml-" + "A" * 8192}, 401, "invalid_api_key"),
    ("non-ASCII key", {"Authorization": "Bearer ml-clé".encode()}, 401, None),
    ("unknown key in X-API-Key", {"X-API-Key": "ml-" + "B" * 43}, 401, "invalid_api_key"),
]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [case[1:] for case in BAD_CREDENTIALS],
    ids=[case[0] for case in BAD_CREDENTIALS],
)
def test_bad_keys_get_a_401(
    server: Meterline,
    ledger_before: datetime,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    response = httpx.post(f"{server.v1}/chat/completions", json=CHAT, headers=headers)
    error = assert_error(response, status, code)
    assert error["type"] == "authentication_error"


def test_two_different_keys_are_a_400(server: Meterline, key: str, ledger_before: datetime) -> None:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", "X-API-Key": "ml-" + "C" * 43},
    )
    assert_error(response, 400, "conflicting_credentials")


def test_a_revoked_key_gets_a_401(server: Meterline, ledger_before: datetime) -> None:
    _, key_id, key = new_customer(server.url)
    with admin(server.url) as client:
        assert client.delete(f"/billing/keys/{key_id}").status_code in (200, 204)
    response = httpx.post(
        f"{server.v1}/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    )
    assert_error(response, 401, "invalid_api_key")


def test_absurd_task_headers(server: Meterline, key: str, ledger_before: datetime) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    too_long = httpx.post(
        f"{server.v1}/chat/completions",
        json=CHAT,
        headers={**auth, "X-Task-Id": "t" * 10_000},
        timeout=30,
    )
    error = assert_error(too_long, 400, "invalid_header")
    assert error["param"] == "x-task-id"
    # A quarter of a megabyte of headers nobody reads: served as the valid request it is.
    huge = httpx.post(
        f"{server.v1}/chat/completions",
        json=CHAT,
        headers={**auth, **{f"X-Filler-{i}": "f" * 4000 for i in range(64)}},
        timeout=30,  # a loaded machine parses a quarter megabyte of headers slowly
    )
    assert huge.status_code == 200


def test_a_non_ascii_task_id_is_kept_as_sent(server: Meterline, key: str) -> None:
    """Not an error: UTF-8 in a header is unusual but valid, and lands in the ledger intact."""
    task = "tâche-été-✓"
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json=CHAT,
        headers=[(b"Authorization", f"Bearer {key}".encode()), (b"X-Task-Id", task.encode())],
    )
    assert response.status_code == 200
    db = Database(server.database_url)
    deadline = time.monotonic() + 5
    while True:
        stored = db.fetchval(
            "SELECT task_id FROM usage_ledger WHERE request_id = $1",
            response.headers["x-request-id"],
        )
        if stored is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stored == task


BILLING_CASES: list[tuple[str, str, str, bytes | None, int]] = [
    ("malformed JSON", "POST", "/billing/accounts", b'{"name": ', 422),
    ("invalid UTF-8", "POST", "/billing/accounts", b'{"name": "\xff"}', 422),
    ("name is a number", "POST", "/billing/accounts", b'{"name": 5}', 422),
    (
        "budget is text",
        "POST",
        "/billing/accounts",
        b'{"name": "a", "monthly_budget_usd": "lots"}',
        422,
    ),
    (
        "budget is negative",
        "POST",
        "/billing/accounts",
        b'{"name": "a", "monthly_budget_usd": "-1"}',
        422,
    ),
    (
        "budget of 40 digits",
        "POST",
        "/billing/accounts",
        b'{"name": "a", "monthly_budget_usd": "' + b"9" * 40 + b'"}',
        422,
    ),
    ("unknown tier", "POST", "/billing/accounts", b'{"name": "a", "tier": "gold"}', 422),
    ("unknown field", "POST", "/billing/accounts", b'{"name": "a", "admin": true}', 422),
    ("id that is no UUID", "POST", "/billing/accounts/not-a-uuid/keys", b"{}", 422),
    ("date that is no date", "GET", "/billing/usage?start=yesterday", None, 422),
]


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [case[1:] for case in BILLING_CASES],
    ids=[case[0] for case in BILLING_CASES],
)
def test_the_billing_api_refuses_bad_input_clearly(
    server: Meterline,
    method: str,
    path: str,
    content: bytes | None,
    status: int,
) -> None:
    with admin(server.url) as client:
        response = client.request(
            method, path, content=content, headers={"Content-Type": "application/json"}
        )
    # Unparseable bodies may be a 400 or a 422; either way a 4xx in the one error shape.
    if status == 422 and response.status_code == 400:
        status = 400
    assert_error(response, status)


def test_bad_input_left_the_ledger_untouched(server: Meterline, ledger_before: datetime) -> None:
    """Only the two valid requests of this module (huge headers, non-ASCII task id) count."""
    time.sleep(0.5)  # anything wrongly recorded would have been flushed by now
    db = Database(server.database_url)
    rows = db.fetch("SELECT status_code FROM usage_ledger WHERE occurred_at >= $1", ledger_before)
    assert [r["status_code"] for r in rows] == [200, 200]


def test_non_ascii_credentials_on_the_billing_api(server: Meterline) -> None:
    """Header bytes that are not ASCII are a bad credential, not a crash."""
    for headers in (
        [(b"Authorization", "Bearer clé".encode())],
        [(b"Authorization", "Bearer clé".encode()), (b"X-API-Key", b"other")],
        [(b"X-API-Key", "clé".encode())],
    ):
        response = httpx.get(f"{server.url}/billing/usage", headers=headers)
        assert response.status_code in (400, 401), (headers, response.status_code)
        assert_error(response, response.status_code)


def test_the_billing_api_refuses_oversized_bodies(server: Meterline) -> None:
    """Before authentication even: a client cannot make the server buffer any size."""
    big = b'{"name": "' + b"x" * LIMIT + b'"}'
    declared = httpx.post(
        f"{server.url}/billing/accounts",
        content=big,
        headers={"Content-Type": "application/json"},
    )
    assert_error(declared, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(2 * LIMIT // 1024):
            yield b"x" * 1024
        yield b'"}'

    with admin(server.url) as client:
        chunked = client.post(
            "/billing/accounts", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_error(chunked, 413, "request_too_large")
        # Just under the limit is an ordinary request (here, a name too long: 422).
        near = client.post("/billing/accounts", json={"name": "x" * (LIMIT - 100)})
        assert_error(near, 422)


# Text that reaches SQL with a character Postgres cannot store (NUL) or that no name, model
# or task id holds (any other control character): a 422 naming the field, never a 500.
CONTROL_CHARACTERS = ["\x00", "\x1b", "\x7f", "\x85"]
NOWHERE = "00000000-0000-4000-8000-000000000000"
CONTROL_IN_QUERIES: list[tuple[str, str]] = [
    ("/billing/usage", "model"),
    ("/billing/usage", "task_id"),
    ("/billing/usage", "group_by"),
    ("/billing/usage/events", "model"),
    ("/billing/usage/events", "task_id"),
    ("/billing/prices", "model"),
    ("/billing/prices/lookup", "model"),
    ("/billing/tasks", "model"),
    ("/billing/tasks", "task_type"),
]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=repr)
@pytest.mark.parametrize(("path", "name"), CONTROL_IN_QUERIES)
def test_control_characters_in_query_strings_are_a_422(
    server: Meterline, path: str, name: str, character: str
) -> None:
    with admin(server.url) as client:
        response = client.get(path, params={name: f"a{character}b"})
    error = assert_error(response, 422, "validation_error")
    assert error["param"] == f"query.{name}"
    assert "control characters" in error["message"]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=repr)
def test_control_characters_in_a_task_id_path_are_a_422(server: Meterline, character: str) -> None:
    task_id = quote(f"a{character}b")
    with admin(server.url) as client:
        for path in (f"/billing/tasks/{task_id}", f"/billing/tasks/{task_id}/complete"):
            method = "POST" if path.endswith("complete") else "GET"
            response = client.request(
                method, path, params={"account_id": NOWHERE}, json={"outcome": "failed"}
            )
            assert assert_error(response, 422, "validation_error")["param"] == "path.task_id"


CONTROL_IN_BODIES: list[tuple[str, str, dict[str, Any], str]] = [
    ("POST", "/billing/accounts", {"name": "a{c}b"}, "name"),
    ("PATCH", f"/billing/accounts/{NOWHERE}", {"name": "a{c}b"}, "name"),
    ("POST", f"/billing/accounts/{NOWHERE}/keys", {"name": "k{c}"}, "name"),
    (
        "POST",
        "/billing/prices",
        {"model": "m{c}x", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"},
        "model",
    ),
    (
        "POST",
        "/billing/quotes",
        {"account_id": NOWHERE, "task_type": "t{c}", "model": "mock-chat", "prompt_tokens": 1},
        "task_type",
    ),
    (
        "POST",
        "/billing/quotes",
        {"account_id": NOWHERE, "task_type": "t", "model": "mock{c}", "prompt_tokens": 1},
        "model",
    ),
    ("POST", f"/billing/quotes/{NOWHERE}/accept", {"task_id": "t{c}"}, "task_id"),
    ("POST", f"/billing/invoices/{NOWHERE}/void", {"reason": "r{c}"}, "reason"),
]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=repr)
@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    CONTROL_IN_BODIES,
    ids=[f"{case[0]} {case[1].replace(NOWHERE, 'ID')} {case[3]}" for case in CONTROL_IN_BODIES],
)
def test_control_characters_in_stored_names_are_a_422(
    server: Meterline,
    method: str,
    path: str,
    body: dict[str, Any],
    field: str,
    character: str,
) -> None:
    """Account, key and task names, models, reasons: nothing with a NUL reaches Postgres."""
    sent = {k: v.format(c=character) if isinstance(v, str) else v for k, v in body.items()}
    with admin(server.url) as client:
        response = client.request(method, path, json=sent)
    error = assert_error(response, 422, "validation_error")
    assert error["param"] == f"body.{field}"


def _cursor(*key: object) -> str:
    raw = json.dumps(list(key)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Each list's cursor holds its sort key: (time, id), events (time, request id), invoices
# (period, id). Forged ones, part by part.
BEFORE_YEAR_1 = "0001-01-01T00:00:00+01:00"
AFTER_9999 = "9999-12-31T23:59:59-01:00"
FORGED_CURSORS: list[tuple[str, list[Any]]] = [
    *[
        (path, [time, NOWHERE])
        for path in ("/billing/accounts", "/billing/accounts/{own}/keys", "/billing/tasks")
        for time in (BEFORE_YEAR_1, AFTER_9999)
    ],
    ("/billing/accounts", ["yesterday", NOWHERE]),
    ("/billing/accounts", ["2026-01-01T00:00:00Z", "not-an-id"]),
    ("/billing/usage/events", [BEFORE_YEAR_1, "req_1"]),
    ("/billing/usage/events", [AFTER_9999, "req_1"]),
    ("/billing/usage/events", ["2026-01-01T00:00:00Z", "req_\x00"]),
    ("/billing/usage/events", ["2026-01-01T00:00:00Z", "req_\ud800"]),
    ("/billing/usage/events", ["2026-01-01T00:00:00Z", 7]),
    ("/billing/invoices", ["2026-01\x00", NOWHERE]),
    ("/billing/invoices", ["2026-01\ud800", NOWHERE]),
]


@pytest.fixture(scope="module")
def own_account(reliability_server: Meterline) -> uuid.UUID:
    return new_customer(reliability_server.url)[0]


@pytest.mark.parametrize(
    ("path", "key"), FORGED_CURSORS, ids=[f"{p} {k!r}" for p, k in FORGED_CURSORS]
)
def test_forged_cursors_are_a_422(
    server: Meterline, own_account: uuid.UUID, path: str, key: list[object]
) -> None:
    with admin(server.url) as client:
        response = client.get(path.format(own=own_account), params={"cursor": _cursor(*key)})
    error = assert_error(response, 422, "validation_error")
    assert error["param"] == "query.cursor"


# Months no route may take: past the last one a datetime can end (9999-12 ends in year
# 10000), before the first billed one, no such month, not zero-padded, a line feed behind.
BAD_PERIODS = ["9999-12", "0000-01", "1969-12", "2026-13", "2026-1", "", "2026-01\n"]
PERIOD_REFUSAL = "Value error, period must be a month YYYY-MM from 1970-01 to 9999-11, got {!r}"


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _valid_value(schema: dict[str, Any]) -> Any:
    """A value of `schema` that passes validation (what fills the other required fields)."""
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("format") == "uuid":
        return NOWHERE
    return {"integer": 1, "boolean": False}.get(schema.get("type", "string"), "x")


def period_operations(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, where) of every operation that takes a `period`, by the OpenAPI schema:
    a query parameter (`query`) or a field of the JSON body (`body`)."""
    found = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if any(p["name"] == "period" for p in operation.get("parameters", [])):
                found.append((method, path, "query"))
            content = operation.get("requestBody", {}).get("content", {})
            body = content.get("application/json", {}).get("schema")
            if body and "period" in _resolved(spec, body).get("properties", {}):
                found.append((method, path, "body"))
    return found


def _request_with_period(
    spec: dict[str, Any], method: str, path: str, where: str, period: str
) -> dict[str, Any]:
    """The request's parts, every required field valid but `period`."""
    operation = spec["paths"][path][method]
    params: dict[str, Any] = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            path = path.replace(f"{{{parameter['name']}}}", str(_valid_value(parameter["schema"])))
        elif parameter["in"] == "query" and parameter.get("required"):
            params[parameter["name"]] = _valid_value(parameter["schema"])
    json_body = None
    if where == "body":
        schema = _resolved(spec, operation["requestBody"]["content"]["application/json"]["schema"])
        json_body = {
            name: _valid_value(_resolved(spec, schema["properties"][name]))
            for name in schema.get("required", [])
        }
        json_body["period"] = period
    else:
        params["period"] = period
    return {"method": method.upper(), "url": path, "params": params, "json": json_body}


def test_every_route_that_takes_a_period_refuses_a_bad_one_alike(server: Meterline) -> None:
    """One validator reads every month: the same 422, code and message on every route, the
    param named where it was sent (`query.period`, `body.period`). The routes come from the
    OpenAPI schema, so a new one is held to the same answer."""
    with admin(server.url) as client:
        spec = client.get("/openapi.json").json()
        operations = period_operations(spec)
        expected = {
            ("get", "/billing/reports/monthly", "query"),
            ("post", "/billing/invoices", "body"),
        }
        assert expected <= set(operations), operations
        assert len(operations) >= 6, operations
        for method, path, where in operations:
            for period in BAD_PERIODS:
                sent = _request_with_period(spec, method, path, where, period)
                response = client.request(**sent)
                assert_error(response, 422, "validation_error")
                param = f"{where}.period"
                assert response.json() == {
                    "error": {
                        "message": f"{param}: {PERIOD_REFUSAL.format(period)}",
                        "type": "invalid_request_error",
                        "code": "validation_error",
                        "param": param,
                    }
                }, (method, path, period)


def test_a_period_that_is_not_a_string_is_refused_as_a_month(server: Meterline) -> None:
    with admin(server.url) as client:
        response = client.post("/billing/invoices", json={"account_id": NOWHERE, "period": 202611})
    error = assert_error(response, 422, "validation_error")
    assert (error["param"], error["message"]) == (
        "body.period",
        "body.period: Value error, period must be a month YYYY-MM",
    )


def _console_period_pages() -> list[str]:
    """Console GET routes with a `period` query parameter (the console is not in OpenAPI)."""
    return [
        route.path
        for route in console_router.routes
        if isinstance(route, APIRoute)
        and "GET" in (route.methods or ())
        and any(p.name == "period" for p in route.dependant.query_params)
    ]


def test_the_console_refuses_a_bad_period_as_the_api_does(server: Meterline) -> None:
    """Its pages and its invoice form read a month with the same validator: 422, the same words."""
    pages = _console_period_pages()
    assert {"/console/invoices", "/console/reports", "/console/reports/monthly"} <= set(pages)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        form = client.get("/console/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        signed_in = client.post(
            "/console/sign-in", data={"credential": ADMIN_TOKEN, "csrf_token": token.group(1)}
        )
        assert signed_in.status_code == 303, signed_in.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/invoices").text)
        assert csrf is not None
        for period in [p for p in BAD_PERIODS if p]:  # a blank filter means "any month"
            words = str(escape(f"period: {PERIOD_REFUSAL.format(period)}"))
            for path in pages:
                response = client.get(path, params={"period": period})
                assert response.status_code == 422, (path, period)
                assert words in response.text, (path, period)
            if period != period.strip():
                continue  # a form's fields are read stripped of blanks
            posted = client.post(
                "/console/invoices",
                data={"account_id": NOWHERE, "period": period, "csrf_token": csrf.group(1)},
            )
            assert posted.status_code == 422 and words in posted.text, period


@pytest.mark.parametrize(
    "instant",
    [
        "0001-01-01T00:00:00Z",  # Postgres would store it as -infinity
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC
        "1969-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999Z",  # +infinity
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
    ],
)
def test_stored_times_outside_the_billable_range_are_a_422(
    server: Meterline, own_account: uuid.UUID, instant: str
) -> None:
    """A price's start or a key's expiry must read back as the instant it was."""
    model = f"range/{secrets.token_hex(4)}"
    price = {"model": model, "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}
    with admin(server.url) as client:
        response = client.post("/billing/prices", json={**price, "effective_from": instant})
        assert assert_error(response, 422, "validation_error")["param"] == "body.effective_from"
        key = client.post(f"/billing/accounts/{own_account}/keys", json={"expires_at": instant})
        assert assert_error(key, 422, "validation_error")["param"] == "body.expires_at"
        # Prices and keys still read back whole.
        assert client.get("/billing/prices/lookup", params={"model": model}).status_code == 404
        assert client.get(f"/billing/accounts/{own_account}/keys").status_code == 200

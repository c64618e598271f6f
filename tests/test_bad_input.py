"""Bad input gets a clear 4xx in OpenAI's error shape, never a 500, and leaves the ledger alone.

Malformed JSON, wrong types, invalid UTF-8, oversized bodies, absurd header values, unknown
models and bad keys, sent as raw HTTP (an SDK would refuse to send most of them) to the
proxy and to the billing API of a server with a 64 KiB body limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import Meterline
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
        f"{server.v1}/chat/completions", json=CHAT, headers={**auth, "X-Task-Id": "t" * 10_000}
    )
    error = assert_error(too_long, 400, "invalid_header")
    assert error["param"] == "x-task-id"
    # A quarter of a megabyte of headers nobody reads: served as the valid request it is.
    huge = httpx.post(
        f"{server.v1}/chat/completions",
        json=CHAT,
        headers={**auth, **{f"X-Filler-{i}": "f" * 4000 for i in range(64)}},
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

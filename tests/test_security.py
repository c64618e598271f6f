"""Secrets stay secret and doors stay shut.

- A customer key's plaintext and the provider's key never appear in the server's log, in any
  response (but the one creating the key), in any text column of the database, or in the
  files of the data directory (spool, metrics).
- Keys are stored as SHA-256 only.
- Every billing operation needs credentials; admin operations refuse customer keys; an empty
  admin token is no admin token.
- A provider that echoes its key in an answer (error body, header, streamed chunk) has it
  blanked before the customer sees it; a failing statement's error carries no parameters.
- No CORS unless origins are configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import traceback
import uuid
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from service.accounts import service as accounts_service
from service.app import create_app
from service.auth.keys import NewKey, generate_key
from service.db.engine import create_engine, session_factory, transaction
from service.settings import Settings
from tests.conftest import PROVIDER_KEY, Meterline, Upstream, start_meterline
from tests.reliability import admin, new_customer, own_database
from tests.support import Database

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def server(reliability_server: Meterline) -> Meterline:
    return reliability_server


class _Seen(Protocol):
    @property
    def headers(self) -> Any: ...

    @property
    def content(self) -> bytes: ...


def _exercise(server: Meterline, account_id: uuid.UUID, key_id: uuid.UUID, key: str) -> list[bytes]:
    """Use the key every way a customer would (and a few wrong ways); every response seen."""
    seen: list[bytes] = []

    def keep(response: _Seen) -> None:
        seen.append(str(dict(response.headers)).encode() + b"\n" + response.content)

    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    keep(raw.http_response)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=HELLO, stream=True
    ) as stream:
        stream.read()
        keep(stream.http_response)
    near = key[:-1] + ("A" if key[-1] != "A" else "B")
    chat = {"model": MODEL, "messages": HELLO}
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as http:
        for body in (
            {**chat, "mock": {"status": 401}},
            {**chat, "mock": {"status": 500}},
            {"model": "mock-embed", "input": "hello"},
        ):
            path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
            keep(http.post(path, json=body))
        keep(http.get("/v1/models"))
        for path in ("/billing/usage", "/billing/usage/events", f"/billing/accounts/{account_id}"):
            keep(http.get(path))
        # Wrong ways: a near miss, the key in the wrong place, a conflicting pair.
        keep(
            http.post(
                "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {near}"}
            )
        )
        keep(http.post("/v1/chat/completions", json=chat, headers={"X-API-Key": near}))
        keep(http.get("/billing/usage", headers={"Authorization": f"Token {key}"}))
    with admin(server.url) as admin_client:
        keep(admin_client.get(f"/billing/accounts/{account_id}"))
        keep(admin_client.delete(f"/billing/keys/{key_id}"))
    keep(httpx.post(f"{server.v1}/chat/completions", json=chat, headers=auth))
    return seen


def _text_columns(db: Database) -> list[tuple[str, str, str]]:
    return [
        (r["table_name"], r["column_name"], r["data_type"])
        for r in db.fetch(
            "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND c.data_type IN "
            "('text', 'character varying', 'character', 'json', 'jsonb', 'bytea')"
        )
    ]


def _database_holds(db: Database, needle: str) -> list[str]:
    """Every (table.column) whose values contain `needle`, as text or as bytes."""
    found = []
    for table, column, data_type in _text_columns(db):
        value = f"encode(\"{column}\", 'escape')" if data_type == "bytea" else f'"{column}"::text'
        hits = db.fetchval(f'SELECT count(*) FROM "{table}" WHERE strpos({value}, $1) > 0', needle)
        if hits:
            found.append(f"{table}.{column}")
    return found


def test_no_secret_in_logs_responses_database_or_files(server: Meterline) -> None:
    account_id, key_id, key = new_customer(server.url)
    seen = _exercise(server, account_id, key_id, key)
    secret = key[11:]  # past the display prefix, which lists show on purpose

    leaks = [i for i, body in enumerate(seen) if key.encode() in body or secret.encode() in body]
    assert not leaks, f"responses {leaks} carry the key"
    assert not [i for i, body in enumerate(seen) if PROVIDER_KEY.encode() in body]

    log = server.log.read_bytes()
    assert b"event=" in log  # the log was written, at debug level
    for needle in (key, secret, PROVIDER_KEY):
        assert needle.encode() not in log

    db = Database(server.database_url)
    assert len(_text_columns(db)) > 20  # the scan covers the schema, not an empty list
    for needle in (key, secret, PROVIDER_KEY):
        assert _database_holds(db, needle) == []
    # What is kept of the key: its SHA-256, and the short prefix lists show.
    stored = db.fetch("SELECT key_hash, prefix FROM api_keys WHERE id = $1", key_id)[0]
    assert bytes(stored["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert key.startswith(stored["prefix"]) and len(stored["prefix"]) <= 11

    files = [p for p in Path(server.data_dir).rglob("*") if p.is_file()]
    for path in files:
        content = path.read_bytes()
        for needle in (key, secret, PROVIDER_KEY):
            assert needle.encode() not in content, path


def _operations(server: Meterline) -> list[tuple[str, str]]:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    return [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        if path.startswith("/billing")
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]


def _fill(path: str) -> str:
    """A path with its parameters filled by well-formed values of nothing that exists."""
    parts = []
    for part in path.split("/"):
        if part.startswith("{"):
            part = str(uuid.uuid4())
        parts.append(part)
    return "/".join(parts)


def test_every_billing_operation_needs_credentials(server: Meterline) -> None:
    operations = _operations(server)
    assert len(operations) >= 5
    for method, path in operations:
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token"}):
            response = httpx.request(
                method, f"{server.url}{_fill(path)}", json={}, headers=headers, timeout=30
            )
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.json()["error"]["type"] == "authentication_error"


def test_admin_operations_do_not_exist_for_a_customer(server: Meterline) -> None:
    _, _, key = new_customer(server.url)
    other_account, other_key_id, _ = new_customer(server.url)
    auth = {"Authorization": f"Bearer {key}"}
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/billing/accounts", {"name": "mine now"}),
        ("POST", f"/billing/accounts/{other_account}/keys", {}),
        ("DELETE", f"/billing/keys/{other_key_id}", {}),
        ("GET", f"/billing/accounts/{other_account}", {}),
        (
            "POST",
            "/billing/prices",
            {"model": "x", "input_usd_per_mtok": "0", "output_usd_per_mtok": "0"},
        ),
    ]
    for method, path, body in attempts:
        response = httpx.request(method, f"{server.url}{path}", json=body, headers=auth)
        assert response.status_code in (403, 404), (method, path, response.status_code)
    # Nothing happened: the other account's key still works.
    db = Database(server.database_url)
    assert db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", other_key_id) is None


def test_no_cors_unless_configured(server: Meterline) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    for path in ("/v1/chat/completions", "/billing/accounts", "/billing/usage"):
        response = httpx.options(f"{server.url}{path}", headers=preflight)
        assert "access-control-allow-origin" not in response.headers, path
    response = httpx.get(f"{server.url}/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers

    # Configured: the listed origin only (the preflight never reaches the application).
    app = create_app(
        Settings(database_url="postgresql://unused/none", cors_origins=["https://app.example"])
    )
    client = TestClient(app)
    allowed = client.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "https://app.example"}
    )
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    refused = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("token", ["", "   "], ids=["empty", "blank"])
def test_an_empty_admin_token_disables_admin_access(
    postgres_server: str, template_database: str, upstream: Upstream, tmp_path: Path, token: str
) -> None:
    """`METERLINE_ADMIN_TOKEN=` must not make an empty credential the administrator."""
    assert Settings(admin_token=token).admin_token is None
    with (
        own_database(postgres_server, template_database) as url,
        start_meterline(url, upstream, tmp_path, METERLINE_ADMIN_TOKEN=token) as server,
    ):
        # What a client can send of an empty token (HTTP drops the spaces around a value).
        for headers in ({"X-API-Key": ""}, {"Authorization": "Bearer"}, {}):
            response = httpx.get(f"{server.url}/billing/accounts", headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
            create = httpx.post(
                f"{server.url}/billing/accounts", json={"name": "x"}, headers=headers
            )
            assert create.status_code == 401, (headers, create.text)


def _echoing(server: Meterline, key: str) -> list[bytes]:
    """Every way a provider that quotes its credential can answer, as the client saw it."""
    seen: list[bytes] = []
    auth = {"Authorization": f"Bearer {key}"}
    chat: dict[str, Any] = {"model": MODEL, "messages": HELLO, "mock": {"echo_key": True}}
    with httpx.Client(base_url=server.v1, headers=auth, timeout=30) as http:
        for body in (
            {**chat, "mock": {"echo_key": True, "status": 401}},  # error body and header
            {**chat, "stream": True, "mock": {"echo_key": True, "status": 500}},
            chat,  # a reply quoting it
        ):
            response = http.post("/chat/completions", json=body)
            seen.append(str(response.headers.raw).encode() + b"\n" + response.content)
        # Streamed: the key arrives in two pieces, passed through as they come (the client
        # asked for usage) or re-framed by events (Meterline asked for it on its behalf).
        for options in ({"stream_options": {"include_usage": True}}, {}):
            body = {**chat, "stream": True, **options}
            with http.stream("POST", "/chat/completions", json=body) as streamed:
                raw = b"".join(streamed.iter_raw())
                seen.append(str(streamed.headers.raw).encode() + b"\n" + raw)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, extra_body={"mock": {"echo_key": True}}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    seen.append(text.encode())
    return seen


def test_a_provider_echoing_its_key_never_shows_it_to_the_customer(server: Meterline) -> None:
    _, _, key = new_customer(server.url)
    seen = _echoing(server, key)
    assert len(seen) == 6
    leaks = [i for i, answer in enumerate(seen) if PROVIDER_KEY.encode() in answer]
    assert not leaks, f"answers {leaks} carry the provider key"
    # Blanked, not dropped: each answer still says what the provider said, key-shaped.
    mask = b"*" * len(PROVIDER_KEY)
    assert all(mask in answer for answer in seen)
    assert b"Incorrect API key provided: " + mask in seen[0]
    assert b"(b'retry-after', b'" + mask in seen[0]


async def _create_key(url: str, account_id: uuid.UUID) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with transaction(session_factory(engine)) as session:
            await accounts_service.create_key(session, account_id, name="hash")
    finally:
        await engine.dispose()


def test_a_failed_key_insert_never_carries_the_new_key(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error of a failing statement (logged with its traceback) holds no parameters."""
    db = Database(fresh_database_url)
    db.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
    )
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON api_keys FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    account_id = db.fetchval("INSERT INTO accounts (name) VALUES ('hash') RETURNING id")
    made: list[NewKey] = []

    def generate() -> NewKey:
        made.append(generate_key())
        return made[-1]

    monkeypatch.setattr(accounts_service, "generate_key", generate)
    with pytest.raises(DBAPIError) as failure:
        asyncio.run(_create_key(fresh_database_url, account_id))
    [new] = made
    shown = "".join(traceback.format_exception(failure.value))
    assert "refused by the test" in shown
    for secret in (repr(new.key_hash), new.key_hash.hex(), new.plaintext, new.plaintext[11:]):
        assert secret not in shown

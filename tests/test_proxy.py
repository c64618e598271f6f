"""The metering proxy as a customer meets it: the official `openai` SDK against `meterline serve`
and the mock provider, with every request checked in the Postgres ledger."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import PROVIDER_KEY, Meterline, Upstream
from tests.support import Database

PRICED = "meta-llama/Llama-3.3-70B-Instruct"  # $0.40 / M tokens in and out (default prices)
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def ledger_row(db: Database, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The ledger row of a request; the writer flushes every 50 ms in tests."""
    deadline = time.monotonic() + timeout
    while True:
        rows = db.fetch("SELECT * FROM usage_ledger WHERE request_id = $1", request_id)
        if rows:
            return rows[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for {request_id}")
        time.sleep(0.05)


def account_rows(
    db: Database, account_id: uuid.UUID, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = db.fetch(
            "SELECT * FROM usage_ledger WHERE account_id = $1 ORDER BY request_id", account_id
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.fixture
def customer(meterline: Meterline) -> tuple[uuid.UUID, str]:
    return meterline.customer()


@pytest.fixture
def client(meterline: Meterline, customer: tuple[uuid.UUID, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=meterline.v1, api_key=customer[1], max_retries=0)


@pytest.fixture
def aclient(meterline: Meterline, customer: tuple[uuid.UUID, str]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=meterline.v1, api_key=customer[1], max_retries=0)


def test_chat_completion_is_recorded_with_upstream_usage_key_task_and_cost(
    client: openai.OpenAI, customer: tuple[uuid.UUID, str], db: Database
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=PRICED,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise the ledger."},
            {"role": "assistant", "content": "It is append-only."},
            {"role": "user", "content": "And the spool?"},
        ],
        max_tokens=7,
        temperature=0.2,
        top_p=0.9,
        stop=["\n"],
        extra_headers={"X-Task-Id": "ticket-42", "X-Task-Type": "summarize"},
    )
    reply = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_")
    assert reply.usage is not None and reply.usage.completion_tokens == 7  # max_tokens honoured
    assert reply.choices[0].finish_reason == "length"

    row = ledger_row(db, request_id)
    account_id, _ = customer
    assert row["account_id"] == account_id
    assert row["key_id"] is not None
    assert (row["task_id"], row["task_type"]) == ("ticket-42", "summarize")
    assert (row["endpoint"], row["stream"], row["status_code"]) == ("chat", False, 200)
    assert row["error_code"] is None
    assert row["usage_source"] == "upstream"
    assert row["provider"] == "mock"
    assert row["requested_model"] == PRICED and row["upstream_model"] == PRICED
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens
    assert row["total_tokens"] == reply.usage.total_tokens
    expected = Decimal(reply.usage.total_tokens) * Decimal("0.40") / 1_000_000
    assert row["cost_usd"] == expected
    assert row["price_version_id"] is not None
    assert Decimal(raw.headers["x-meterline-cost-usd"]) == expected
    assert row["latency_ms"] is not None and row["latency_ms"] >= 0


def test_unpriced_model_costs_null_not_zero(client: openai.OpenAI, db: Database) -> None:
    raw = client.chat.completions.with_raw_response.create(model="mock-chat", messages=HELLO)
    row = ledger_row(db, raw.headers["x-request-id"])
    assert row["prompt_tokens"] > 0
    assert row["cost_usd"] is None and row["price_version_id"] is None
    assert "x-meterline-cost-usd" not in raw.headers


async def test_async_client_streaming_and_not(aclient: openai.AsyncOpenAI, db: Database) -> None:
    raw = await aclient.chat.completions.with_raw_response.create(model=PRICED, messages=HELLO)
    reply = raw.parse()
    row = await asyncio.to_thread(ledger_row, db, raw.headers["x-request-id"])
    assert reply.usage is not None
    assert row["total_tokens"] == reply.usage.total_tokens

    stream = await aclient.chat.completions.create(
        model=PRICED, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None
    request_id = stream.response.headers["x-request-id"]
    row = await asyncio.to_thread(ledger_row, db, request_id)
    assert (row["stream"], row["status_code"], row["usage_source"]) == (True, 200, "upstream")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["ttft_ms"] is not None


def test_cached_and_reasoning_tokens_are_captured(client: openai.OpenAI, db: Database) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=PRICED,
        messages=HELLO,
        extra_body={"mock": {"cached_tokens": 2, "reasoning_tokens": 5}},
    )
    row = ledger_row(db, raw.headers["x-request-id"])
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (2, 5)

    stream = client.chat.completions.create(
        model="last/model",
        messages=HELLO,
        stream=True,
        extra_body={"mock": {"cached_tokens": 3, "reasoning_tokens": 4}},
    )
    for _ in stream:
        pass
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (3, 4)


# -- streaming: every way providers report usage -------------------------------------------


def _events(response: httpx.Response) -> list[Any]:
    """The SSE data payloads of a response, parsed, with per-call ids and times removed."""
    import json

    events: list[Any] = []
    for block in response.text.split("\n\n"):
        if not block.startswith("data: "):
            continue
        data = block[len("data: ") :]
        if data == "[DONE]":
            events.append("[DONE]")
            continue
        event = json.loads(data)
        event.pop("id", None)
        event.pop("created", None)
        events.append(event)
    return events


def test_injected_usage_is_hidden_from_a_client_that_did_not_ask(
    meterline: Meterline, upstream: Upstream, customer: tuple[uuid.UUID, str], db: Database
) -> None:
    """The `inject` provider only reports usage when asked: Meterline asks, records it, and
    the client gets exactly the stream the provider sends without the option."""
    body = {"model": PRICED, "messages": HELLO, "stream": True, "max_tokens": 5}
    direct = httpx.post(
        f"{upstream.v1('openai')}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
    )
    via = httpx.post(
        f"{meterline.v1}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {customer[1]}"},
    )
    assert via.status_code == 200
    assert via.headers["content-type"].startswith("text/event-stream")
    assert _events(via) == _events(direct)
    assert all("usage" not in e for e in _events(via) if isinstance(e, dict))

    row = ledger_row(db, via.headers["x-request-id"])
    assert row["usage_source"] == "upstream"
    assert row["completion_tokens"] == 5
    assert row["prompt_tokens"] > 0


def test_a_client_that_asks_for_usage_gets_the_provider_stream_unchanged(
    meterline: Meterline, upstream: Upstream, customer: tuple[uuid.UUID, str]
) -> None:
    body = {
        "model": PRICED,
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    direct = httpx.post(
        f"{upstream.v1('openai')}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
    )
    via = httpx.post(
        f"{meterline.v1}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {customer[1]}"},
    )
    assert _events(via) == _events(direct)
    assert _events(via)[-2]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("model", "source"),
    [
        ("last/chat", "upstream"),  # usage in the last chunk whatever was asked
        ("running/chat", "upstream"),  # running usage in every chunk: the last one counts
        ("none/chat", "estimated"),  # no usage at all: counted with the tokenizer
        ("strict/chat", "estimated"),  # rejects stream_options: Meterline never sends it
    ],
)
@pytest.mark.parametrize("ask_usage", [False, True])
def test_every_streaming_behaviour_is_metered(
    client: openai.OpenAI, db: Database, model: str, source: str, ask_usage: bool
) -> None:
    options: Any = {"include_usage": True} if ask_usage else openai.omit
    stream = client.chat.completions.create(
        model=model,
        messages=HELLO,
        stream=True,
        stream_options=options,
        extra_body={"mock": {"chunks": 9}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.split() == ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "the"]
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert row["status_code"] == 200
    assert row["usage_source"] == source
    # The mock counts one token per word, as the tokenizer does for these words.
    assert row["completion_tokens"] == 9
    assert row["prompt_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + 9


def test_estimates_match_what_the_provider_would_have_reported(
    client: openai.OpenAI, db: Database
) -> None:
    """The same request to a provider that reports usage and to one that does not."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Count tokens carefully, please."},
        {"role": "user", "content": "How many tokens does this prompt have?"},
    ]
    reported = client.chat.completions.with_raw_response.create(model=PRICED, messages=messages)
    estimated = client.chat.completions.with_raw_response.create(
        model="none/chat", messages=messages
    )
    assert estimated.parse().usage is None  # the provider says nothing...
    exact = ledger_row(db, reported.headers["x-request-id"])
    guess = ledger_row(db, estimated.headers["x-request-id"])
    assert guess["usage_source"] == "estimated"  # ...and Meterline still counts
    assert (guess["prompt_tokens"], guess["completion_tokens"]) == (
        exact["prompt_tokens"],
        exact["completion_tokens"],
    )


# -- the rest of the API surface -----------------------------------------------------------

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    "tool_choice",
    ["auto", "none", {"type": "function", "function": {"name": "lookup"}}],
)
def test_tool_calls_pass_through_and_are_metered(
    client: openai.OpenAI, db: Database, tool_choice: Any
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=PRICED, messages=HELLO, tools=[WEATHER_TOOL], tool_choice=tool_choice
    )
    reply = raw.parse()
    calls = reply.choices[0].message.tool_calls
    if tool_choice == "none":
        assert not calls
    else:
        assert calls and calls[0].type == "function"
        assert calls[0].function.name == "lookup"
        assert calls[0].function.arguments == '{"query": "metered"}'
    row = ledger_row(db, raw.headers["x-request-id"])
    assert reply.usage is not None
    assert row["completion_tokens"] == reply.usage.completion_tokens

    stream = client.chat.completions.create(
        model="none/chat",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        stream=True,
    )
    arguments = ""
    for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += (call.function.arguments if call.function else None) or ""
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert row["usage_source"] == "estimated"
    if tool_choice != "none":
        assert arguments == '{"query": "metered"}'
        assert row["completion_tokens"] == reply.usage.completion_tokens  # name + arguments


def test_text_completions_for_base_models(client: openai.OpenAI, db: Database) -> None:
    raw = client.completions.with_raw_response.create(
        model="meta-llama/Meta-Llama-3.1-405B", prompt="Once upon a time", max_tokens=4
    )
    reply = raw.parse()
    assert reply.choices[0].text == " the quick brown fox"
    row = ledger_row(db, raw.headers["x-request-id"])
    assert row["endpoint"] == "completions"
    assert reply.usage is not None and row["total_tokens"] == reply.usage.total_tokens
    assert row["cost_usd"] == Decimal(reply.usage.total_tokens) * 4 / 1_000_000

    stream = client.completions.create(
        model="none/base", prompt="Once upon a time", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == " the quick brown fox"
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert (row["endpoint"], row["usage_source"], row["completion_tokens"]) == (
        "completions",
        "estimated",
        4,
    )


def test_embeddings(client: openai.OpenAI, db: Database) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="mock-embed", input=["first text", "second text here"]
    )
    reply = raw.parse()
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 8
    row = ledger_row(db, raw.headers["x-request-id"])
    assert row["endpoint"] == "embeddings"
    assert row["prompt_tokens"] == reply.usage.prompt_tokens > 0
    assert row["completion_tokens"] == 0


def test_models_lists_what_the_providers_file_routes(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"mock-chat", "mock-base", "mock-embed"} <= ids


async def test_200_concurrent_requests_all_land_exactly(meterline: Meterline, db: Database) -> None:
    account_id, key = meterline.customer()
    client = openai.AsyncOpenAI(base_url=meterline.v1, api_key=key, max_retries=0)

    async def one(i: int) -> tuple[str, int, int]:
        if i % 2:
            raw = await client.chat.completions.with_raw_response.create(
                model=PRICED, messages=HELLO, extra_body={"mock": {"chunks": 1 + i % 13}}
            )
            usage = raw.parse().usage
            assert usage is not None
            return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens
        stream = await client.chat.completions.create(
            model="running/chat",
            messages=HELLO,
            stream=True,
            extra_body={"mock": {"chunks": 1 + i % 13}},
        )
        last = None
        async for chunk in stream:
            last = chunk.usage or last
        assert last is not None
        return stream.response.headers["x-request-id"], last.prompt_tokens, last.completion_tokens

    results = await asyncio.gather(*(one(i) for i in range(200)))
    rows = await asyncio.to_thread(account_rows, db, account_id, 200)
    assert len(rows) == 200
    by_id = {r["request_id"]: r for r in rows}
    for request_id, prompt, completion in results:
        row = by_id[request_id]
        assert (row["prompt_tokens"], row["completion_tokens"], row["status_code"]) == (
            prompt,
            completion,
            200,
        )
    await client.close()


# -- errors, in OpenAI's shape --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_pass_through_and_are_recorded(
    client: openai.OpenAI, db: Database, status: int, stream: bool
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=PRICED, messages=HELLO, stream=stream, extra_body={"mock": {"status": status}}
        )
    error = caught.value
    assert error.status_code == status
    assert error.body == {  # the provider's body, unchanged
        "message": f"mock failure {status}",
        "type": "invalid_request_error" if status < 500 else "server_error",
        "code": "mock_error",
        "param": None,
    } | ({"type": "rate_limit_error"} if status == 429 else {})
    row = ledger_row(db, error.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"], row["stream"]) == (status, "mock_error", stream)
    assert row["total_tokens"] == 0 and row["usage_source"] == "none"
    # A whole-body answer has the same headers whether the request asked to stream or not.
    assert Decimal(error.response.headers["x-meterline-cost-usd"]) == row["cost_usd"] == 0


def _post(meterline: Meterline, key: str | None, body: Any, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else None
    return httpx.post(
        f"{meterline.v1}/chat/completions",
        content=content,
        json=None if content is not None else body,
        headers=headers,
    )


def _assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        ({"messages": HELLO}, 400, "missing_model", "model"),
        ({"model": 42, "messages": HELLO}, 400, "missing_model", "model"),
        ({"model": PRICED, "messages": "hi"}, 400, "invalid_type", "messages"),
        ({"model": PRICED, "messages": HELLO, "stream": "yes"}, 400, "invalid_type", "stream"),
        ({"model": "gpt-99-unknown", "messages": HELLO}, 404, "model_not_found", "model"),
    ],
)
def test_bad_requests_get_clear_errors_and_no_ledger_row(
    meterline: Meterline,
    customer: tuple[uuid.UUID, str],
    db: Database,
    body: Any,
    status: int,
    code: str,
    param: str | None,
) -> None:
    response = _post(meterline, customer[1], body)
    _assert_openai_error(response, status, code)
    assert response.json()["error"]["param"] == param
    assert response.headers["x-request-id"].startswith("req_")
    time.sleep(0.2)
    assert db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", customer[0]) == 0


def test_oversized_body_is_413(meterline: Meterline, customer: tuple[uuid.UUID, str]) -> None:
    big = "x" * (8 * 1024 * 1024 + 10)
    response = _post(
        meterline, customer[1], {"model": PRICED, "messages": [{"role": "user", "content": big}]}
    )
    _assert_openai_error(response, 413, "request_too_large")


def test_authentication(meterline: Meterline, customer: tuple[uuid.UUID, str]) -> None:
    body = {"model": PRICED, "messages": HELLO}
    _, key = customer
    _assert_openai_error(_post(meterline, None, body), 401, None)
    _assert_openai_error(_post(meterline, "ml-" + "x" * 43, body), 401, "invalid_api_key")
    _assert_openai_error(_post(meterline, key, body, **{"X-API-Key": key + "x"}), 400, None)
    assert _post(meterline, None, body, **{"X-API-Key": key}).status_code == 200
    assert _post(meterline, key, body, **{"X-API-Key": key}).status_code == 200
    # The billing API's admin token is not a customer key: it has no account to bill.
    from tests.conftest import ADMIN_TOKEN

    _assert_openai_error(_post(meterline, ADMIN_TOKEN, body), 401, None)
    models = httpx.get(f"{meterline.v1}/models")
    _assert_openai_error(models, 401, None)


def _wait_status(meterline: Meterline, key: str, status: int, within: float) -> float:
    started = time.monotonic()
    while True:
        response = _post(meterline, key, {"model": PRICED, "messages": HELLO})
        if response.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"still {response.status_code}"
        time.sleep(0.02)


def test_revoked_key_is_refused_at_once(meterline: Meterline) -> None:
    account = meterline.new_account()
    with meterline.admin() as admin:
        created = admin.post(f"/billing/accounts/{account['id']}/keys", json={}).json()
        assert _post(meterline, created["key"], {"model": PRICED, "messages": HELLO}).is_success
        assert admin.delete(f"/billing/keys/{created['id']}").is_success
    # LISTEN/NOTIFY: well before the periodic reload (every 5 s) would have seen it.
    assert _wait_status(meterline, created["key"], 401, within=2.0) < 2.0


def test_revocation_without_notification_is_seen_within_5s(
    meterline: Meterline, db: Database
) -> None:
    account = meterline.new_account()
    key = meterline.new_key(account["id"])
    assert _post(meterline, key, {"model": PRICED, "messages": HELLO}).is_success
    db.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE account_id = $1",
        uuid.UUID(str(account["id"])),
    )
    # The reload every 5 s, plus its query and this loop's requests on a busy machine.
    assert _wait_status(meterline, key, 401, within=7.0) < 7.0


def test_expired_key_is_refused(meterline: Meterline) -> None:
    from datetime import UTC, datetime, timedelta

    account = meterline.new_account()
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    key = meterline.new_key(account["id"], expires_at=expires.isoformat())
    assert _post(meterline, key, {"model": PRICED, "messages": HELLO}).is_success
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    _assert_openai_error(_post(meterline, key, {"model": PRICED, "messages": HELLO}), 401, None)


# -- cut streams ------------------------------------------------------------------------------


def test_client_disconnect_mid_stream_is_billed_what_was_generated(
    meterline: Meterline, customer: tuple[uuid.UUID, str], db: Database
) -> None:
    body = {
        "model": PRICED,
        "messages": HELLO,
        "stream": True,
        "mock": {"chunks": 400, "chunk_delay_ms": 20},  # 8 s if read to the end
    }
    received = 0
    with httpx.stream(
        "POST",
        f"{meterline.v1}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {customer[1]}"},
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 6:  # the role chunk and five words
                break
    cut_at = time.monotonic()
    row = ledger_row(db, request_id, timeout=5.0)
    assert time.monotonic() - cut_at < 4.0  # recorded at the cut, not when the stream ends
    assert (row["status_code"], row["error_code"]) == (499, "client_disconnected")
    assert row["usage_source"] == "estimated"
    assert row["prompt_tokens"] > 0
    assert 5 <= row["completion_tokens"] < 100  # of 400: the generation stopped at the cut
    assert row["cost_usd"] == Decimal(row["total_tokens"]) * Decimal("0.40") / 1_000_000


def _read_stream_slowly(meterline: Meterline, key: str, body: dict[str, Any]) -> bytes:
    """The raw response to `body`, through a socket with a tiny receive buffer that reads
    nothing for a second: the server's writes to it fill up and must wait."""
    payload = json.dumps(body).encode()
    host, port = meterline.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        time.sleep(1.0)
        sock.settimeout(30)
        parts = []
        while part := sock.recv(65536):
            parts.append(part)
    return b"".join(parts)


def test_a_client_too_slow_to_keep_up_gets_every_chunk_in_order(
    meterline: Meterline, customer: tuple[uuid.UUID, str], db: Database
) -> None:
    """The relay writes each piece as it arrives; when the client's socket is full the write
    waits (uvicorn's flow control: at 30,000 chunks it did, checked by hand), and what the
    provider sends meanwhile follows it, in order, none lost."""
    chunks = 30_000  # about 5 MB of events, sent as fast as the provider can
    body = {"model": PRICED, "messages": HELLO, "stream": True, "mock": {"chunks": chunks}}
    raw = _read_stream_slowly(meterline, customer[1], body)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    pieces, at = [], 0
    while length := int(chunked[at : chunked.index(b"\r\n", at)], 16):
        start = chunked.index(b"\r\n", at) + 2
        pieces.append(chunked[start : start + length])
        at = start + length + 2
    decoded = b"".join(pieces)
    events = [e for e in decoded.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    words = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert sum(1 for w in words if w) == chunks
    assert b'"error"' not in decoded
    request_id = next(
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    row = ledger_row(db, request_id, timeout=10.0)
    assert (row["status_code"], row["completion_tokens"]) == (200, chunks)


def test_provider_dropping_the_stream_is_a_502_row_and_an_error_event(
    client: openai.OpenAI, db: Database
) -> None:
    stream = client.chat.completions.create(
        model=PRICED, messages=HELLO, stream=True, extra_body={"mock": {"drop_after": 4}}
    )
    words = []
    with pytest.raises(openai.APIError, match="closed the stream"):
        for chunk in stream:
            if chunk.choices:
                words.append(chunk.choices[0].delta.content)
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (502, "upstream_disconnected")
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 3


def test_malformed_chunks_pass_through_and_the_stream_is_still_metered(
    meterline: Meterline, customer: tuple[uuid.UUID, str], db: Database
) -> None:
    response = _post(
        meterline,
        customer[1],
        {"model": "none/chat", "messages": HELLO, "stream": True, "mock": {"malformed": True}},
    )
    assert "data: {not json\n\n" in response.text
    row = ledger_row(db, response.headers["x-request-id"])
    assert row["status_code"] == 200 and row["completion_tokens"] == 16

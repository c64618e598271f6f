"""Upstream faults: the client gets a clear answer, and the ledger tells what happened.

Connection refused, a provider too slow to answer, a stream cut in the middle, a malformed
event, and the provider's own 429 and 5xx answers; each ends as exactly one ledger row
carrying its status and what was generated.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Meterline
from tests.reliability import new_customer
from tests.support import Database

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def server(reliability_server: Meterline) -> Meterline:
    return reliability_server


@pytest.fixture
def db(server: Meterline) -> Database:
    return Database(server.database_url)


@pytest.fixture
def customer(server: Meterline) -> tuple[uuid.UUID, openai.OpenAI, str]:
    account_id, _, key = new_customer(server.url)
    return account_id, openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0), key


def ledger_row(db: Database, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        rows = db.fetch("SELECT * FROM usage_ledger WHERE request_id = $1", request_id)
        if rows:
            assert len(rows) == 1
            return rows[0]
        assert time.monotonic() < deadline, f"no ledger row for {request_id}"
        time.sleep(0.05)


def _error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_connection_refused_is_a_502_and_a_row(
    customer: tuple[uuid.UUID, openai.OpenAI, str], db: Database
) -> None:
    _, client, _ = customer
    error = _error(lambda: client.chat.completions.create(model="refused/model", messages=HELLO))
    assert error.status_code == 502
    body: Any = error.body
    assert (body["type"], body["code"]) == ("api_error", "upstream_unavailable")
    row = ledger_row(db, error.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"], row["provider"]) == (
        502,
        "upstream_unavailable",
        "refused",
    )
    assert row["completion_tokens"] == 0


def test_a_provider_too_slow_is_a_504_and_a_row(
    customer: tuple[uuid.UUID, openai.OpenAI, str], db: Database
) -> None:
    _, client, _ = customer
    started = time.monotonic()
    error = _error(
        lambda: client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"mock": {"delay_ms": 5000}}
        )
    )
    assert time.monotonic() - started < 4.5  # the configured 2 s, not the provider's 5 s
    assert error.status_code == 504
    body: Any = error.body
    assert body["code"] == "upstream_timeout"
    row = ledger_row(db, error.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (504, "upstream_timeout")


def test_a_stream_cut_mid_way_bills_what_was_generated(
    customer: tuple[uuid.UUID, openai.OpenAI, str], db: Database
) -> None:
    _, client, _ = customer
    words = []
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        extra_body={"mock": {"chunks": 16, "drop_after": 5}},
    ) as response:
        request_id = response.headers["x-request-id"]
        # The client is told, in the stream, that it was cut: the SDK raises.
        with pytest.raises(openai.APIError, match="closed the stream"):
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    words.append(chunk.choices[0].delta.content)
    assert 0 < len(words) < 16
    row = ledger_row(db, request_id)
    assert (row["status_code"], row["error_code"]) == (502, "upstream_disconnected")
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == len(words)  # one token per word in the mock
    assert row["prompt_tokens"] > 0


def test_a_malformed_event_passes_through_and_usage_is_still_captured(
    customer: tuple[uuid.UUID, openai.OpenAI, str], server: Meterline, db: Database
) -> None:
    _, _, key = customer
    with httpx.stream(
        "POST",
        f"{server.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
            "mock": {"malformed": True, "chunks": 4},
        },
    ) as response:
        request_id = response.headers["x-request-id"]
        raw = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert b"data: {not json" in raw  # the provider's bytes, unchanged
    assert raw.rstrip().endswith(b"data: [DONE]")
    row = ledger_row(db, request_id)
    assert (row["status_code"], row["usage_source"], row["completion_tokens"]) == (
        200,
        "upstream",
        4,
    )


@pytest.mark.parametrize("status", [429, 500, 503])
def test_provider_errors_pass_through_and_are_recorded(
    customer: tuple[uuid.UUID, openai.OpenAI, str], db: Database, status: int
) -> None:
    _, client, _ = customer
    error = _error(
        lambda: client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"mock": {"status": status}}
        )
    )
    assert error.status_code == status
    body: Any = error.body
    assert body["message"] == f"mock failure {status}"  # the provider's own message
    row = ledger_row(db, error.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (status, "mock_error")
    assert row["cost_usd"] in (None, 0)


def test_each_fault_is_one_row(
    customer: tuple[uuid.UUID, openai.OpenAI, str], db: Database
) -> None:
    """A burst of mixed faults: one row each, none lost, none doubled."""
    account_id, client, _ = customer
    plan = [{"status": 500}, {"status": 429}, {"delay_ms": 5000}, {}, {"drop_after": 2}]
    seen = []
    for mock in plan:
        try:
            if "drop_after" in mock:
                with client.chat.completions.with_streaming_response.create(
                    model=MODEL, messages=HELLO, stream=True, extra_body={"mock": mock}
                ) as response:
                    seen.append(response.headers["x-request-id"])
                    with pytest.raises(openai.APIError):
                        list(response.parse())
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HELLO, extra_body={"mock": mock}
                )
                seen.append(raw.headers["x-request-id"])
        except openai.APIStatusError as error:
            seen.append(error.response.headers["x-request-id"])
    statuses = sorted(ledger_row(db, rid)["status_code"] for rid in seen)
    count = db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id)
    print(f"\n[upstream faults] sent={len(plan)} recorded={count} statuses={statuses}")
    assert statuses == [200, 429, 500, 502, 504]
    assert count == len(plan)

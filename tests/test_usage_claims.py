"""What a provider claims, and what reaches the ledger: the proxy's edge.

Texts a customer sends are refused when no ledger could store them; texts a provider
sends are stored with their control characters made visible; counts that are not
non-negative integers are estimated, never zero; well-formed but implausible counts are
stored as claimed and flagged. Against `meterline serve`, the mock provider steered with
`mock.usage_override` / `model_override` / `error_code`, and the `openai` SDK.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Meterline
from tests.support import Database
from tests.test_proxy import HELLO, PRICED, account_rows, ledger_row

# Usage objects no count can be read from, field by field: each such field is missing.
UNUSABLE = [
    pytest.param({"completion_tokens": "12"}, id="string"),
    pytest.param({"prompt_tokens": 12.0}, id="float"),
    pytest.param({"prompt_tokens": -5}, id="negative"),
    pytest.param({"completion_tokens": 1e30}, id="1e30"),
    pytest.param({"prompt_tokens": True, "completion_tokens": False}, id="bools"),
    pytest.param({"completion_tokens": 2**63}, id="past-bigint"),
    pytest.param({"completion_tokens": 2**70}, id="past-64-bits"),
    pytest.param({"prompt_tokens": None, "completion_tokens": [3]}, id="null-and-list"),
]


@pytest.fixture
def customer(meterline: Meterline) -> tuple[uuid.UUID, str]:
    return meterline.customer()


@pytest.fixture
def client(meterline: Meterline, customer: tuple[uuid.UUID, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=meterline.v1, api_key=customer[1], max_retries=0)


def request_id_of(client: openai.OpenAI, stream: bool, **create: Any) -> str:
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=PRICED, messages=HELLO, stream=True, **create
        ) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
            request_id: str = response.headers["x-request-id"]
            return request_id
    raw = client.chat.completions.with_raw_response.create(model=PRICED, messages=HELLO, **create)
    assert raw.status_code == 200
    return raw.headers["x-request-id"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("override", UNUSABLE)
def test_usage_that_is_not_a_count_is_estimated_never_billed_as_zero(
    client: openai.OpenAI, db: Database, override: dict[str, Any], stream: bool
) -> None:
    request_id = request_id_of(
        client, stream, extra_body={"mock": {"chunks": 6, "usage_override": override}}
    )
    row = ledger_row(db, request_id)
    assert row["usage_source"] == "estimated"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["cost_usd"] > 0 and row["usage_flag"] is None


def test_usable_counts_of_a_claim_are_kept_and_only_the_others_estimated(
    client: openai.OpenAI, db: Database
) -> None:
    mock = {"chunks": 6, "usage_override": {"prompt_tokens": 777, "completion_tokens": "6"}}
    row = ledger_row(db, request_id_of(client, False, extra_body={"mock": mock}))
    assert (row["prompt_tokens"], row["usage_source"]) == (777, "estimated")
    assert row["completion_tokens"] == 6  # six words, counted by the tokenizer


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(
    ("override", "flag"),
    [
        ({"completion_tokens": 4_294_967_295}, "completion_over_limit"),
        ({"completion_tokens": 40}, "completion_over_limit"),
        ({"prompt_tokens_details": {"cached_tokens": 3_000_000_000}}, "implausible_count"),
        ({"prompt_tokens": 2**31, "total_tokens": 2**31 + 16}, "implausible_count"),
    ],
    ids=["2^32-1", "over-max-tokens", "cached-3e9", "prompt-2^31"],
)
def test_implausible_counts_are_stored_as_claimed_and_flagged(
    client: openai.OpenAI, db: Database, override: dict[str, Any], flag: str, stream: bool
) -> None:
    request_id = request_id_of(
        client, stream, max_tokens=16, extra_body={"mock": {"usage_override": override}}
    )
    row = ledger_row(db, request_id)
    assert (row["usage_source"], row["usage_flag"]) == ("upstream", flag)
    for name, value in override.items():
        if name == "prompt_tokens_details":
            assert row["cached_tokens"] == value["cached_tokens"]
        else:
            assert row[name] == value


def test_plausible_counts_are_not_flagged(client: openai.OpenAI, db: Database) -> None:
    row = ledger_row(db, request_id_of(client, False, max_tokens=16, n=2))
    assert (row["completion_tokens"], row["usage_flag"]) == (16, None)
    mock = {"usage_override": {"completion_tokens": 30}}  # two choices of 16 allow 32
    row = ledger_row(
        db, request_id_of(client, False, max_tokens=16, n=2, extra_body={"mock": mock})
    )
    assert (row["completion_tokens"], row["usage_flag"]) == (30, None)


@pytest.mark.parametrize("model", ["mock\x00chat", "meta-llama/\x07bell", "tab\tbed", "nel\x85"])
def test_a_model_name_with_control_characters_is_refused_in_openai_shape(
    client: openai.OpenAI, customer: tuple[uuid.UUID, str], db: Database, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=HELLO)
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["code"], error["type"]) == (
        "model",
        "invalid_model",
        "invalid_request_error",
    )
    assert "control characters" in error["message"]
    assert account_rows(db, customer[0], 1, timeout=0.5) == []


@pytest.mark.parametrize("header", ["X-Task-Id", "X-Task-Type"])
@pytest.mark.parametrize("value", ["ticket\t42", "ticket\u008542"])
def test_a_task_header_with_control_characters_is_refused(
    meterline: Meterline, customer: tuple[uuid.UUID, str], db: Database, header: str, value: str
) -> None:
    # The HTTP parser already refuses a NUL in a header; a tab or a C1 control passes it.
    response = httpx.post(
        f"{meterline.v1}/chat/completions",
        headers=[
            (b"authorization", f"Bearer {customer[1]}".encode()),
            (header.encode(), value.encode()),
        ],
        json={"model": PRICED, "messages": HELLO},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == header.lower()
    assert response.json()["error"]["code"] == "invalid_header"
    assert account_rows(db, customer[0], 1, timeout=0.5) == []


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_provider_model_name_with_a_nul_is_stored_escaped(
    client: openai.OpenAI, db: Database, stream: bool
) -> None:
    mock = {"model_override": "mock\x00chat\x1b[31m"}
    row = ledger_row(db, request_id_of(client, stream, extra_body={"mock": mock}))
    assert row["upstream_model"] == "mock\\x00chat\\x1b[31m"
    assert row["usage_source"] == "upstream"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_provider_error_code_with_a_nul_is_stored_escaped(
    client: openai.OpenAI, db: Database, stream: bool
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=PRICED,
            messages=HELLO,
            stream=stream,
            extra_body={"mock": {"status": 500, "error_code": "overloaded\x00\x00"}},
        )
    row = ledger_row(db, caught.value.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (500, "overloaded\\x00\\x00")

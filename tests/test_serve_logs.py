"""What `meterline serve` writes for its operator: the start-up summary block, and one
key=value access line per proxied request (no secret in either)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.providers.config import parse_providers
from service.settings import Settings
from service.startup import Serving, startup_summary
from tests.conftest import ADMIN_TOKEN, PROVIDER_KEY, Meterline, Upstream, start_meterline

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
PRICED = "meta-llama/Llama-3.3-70B-Instruct"  # in the price list loaded on first start


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))


def access_lines(log: Path, request_id: str, timeout: float = 5.0) -> list[dict[str, str]]:
    """The access lines of one request (written within 100 ms, so polled briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            _fields(line)
            for line in log.read_text().splitlines()
            if "logger=meterline.access" in line and f"request_id={request_id} " in line
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_one_access_line_per_request_with_its_figures_and_no_secret(
    meterline: Meterline,
) -> None:
    account_id, key = meterline.customer()
    client = openai.OpenAI(base_url=meterline.v1, api_key=key, max_retries=0)
    plain = client.chat.completions.with_raw_response.create(
        model=PRICED, messages=HELLO, extra_headers={"X-Task-Id": "ticket 7"}
    )
    usage = plain.parse().usage
    assert usage is not None
    with client.chat.completions.with_streaming_response.create(
        model="mock-chat", messages=HELLO, stream=True
    ) as streamed:
        streamed_id = streamed.headers["x-request-id"]
        for _ in streamed.iter_lines():
            pass
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nobody/serves-this", messages=HELLO)
    bad_key = "ml-" + "x" * 43
    stranger = openai.OpenAI(base_url=meterline.v1, api_key=bad_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.chat.completions.create(model="mock-chat", messages=HELLO)

    [line] = access_lines(meterline.log, plain.headers["x-request-id"])
    assert line["account"] == str(account_id)
    assert line["key_prefix"] == key[:11]
    assert (line["endpoint"], line["model"], line["stream"]) == ("chat", PRICED, "false")
    assert (line["status"], line["error"]) == ("200", "-")
    assert line["task"] == '"ticket 7"'  # a value with a space is quoted, the line stays parseable
    assert int(line["prompt_tokens"]) == usage.prompt_tokens
    assert int(line["completion_tokens"]) == usage.completion_tokens
    assert int(line["total_tokens"]) == usage.total_tokens
    assert line["cost_usd"] == plain.headers["x-meterline-cost-usd"]
    assert int(line["latency_ms"]) >= 0

    [line] = access_lines(meterline.log, streamed_id)
    assert (line["stream"], line["status"], line["key_prefix"]) == ("true", "200", key[:11])
    assert int(line["completion_tokens"]) > 0 and line["ttft_ms"] != "-"

    # Answered by Meterline itself: still one line, with what was known of the caller.
    [line] = access_lines(meterline.log, missing.value.response.headers["x-request-id"])
    assert (line["status"], line["error"], line["account"]) == (
        "404",
        "model_not_found",
        str(account_id),
    )
    [line] = access_lines(meterline.log, refused.value.response.headers["x-request-id"])
    assert (line["status"], line["error"], line["account"], line["key_prefix"]) == (
        "401",
        "invalid_api_key",
        "-",
        "-",
    )

    log = meterline.log.read_text()
    for secret in (key, key[11:], bad_key[11:], PROVIDER_KEY, ADMIN_TOKEN):
        assert secret not in log


def test_summary_names_what_serve_runs_with(meterline: Meterline) -> None:
    log = meterline.log.read_text()
    summary = log[log.index("Meterline ") :]
    assert f"listening   {meterline.url}" in summary
    assert "database    Postgres at postgresql://" in summary
    assert "mock: " in summary and "models mock-*, meta-llama/*" in summary
    assert "workers     1" in summary and "access log  on" in summary
    # Every key is set and there is one worker: nothing to warn about.
    assert "warning:" not in summary


def test_summary_warns_and_access_log_can_be_switched_off(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    providers = tmp_path / "unset-key.yaml"
    providers.write_text(
        "providers:\n"
        "  - name: keyless\n"
        f"    base_url: {upstream.v1()}\n"
        "    api_key_env: METERLINE_TEST_UNSET_PROVIDER_KEY\n"
        "    models: ['mock-*']\n"
    )
    with start_meterline(
        database_url,
        upstream,
        tmp_path,
        "--workers",
        "2",
        METERLINE_ADMIN_TOKEN="",
        METERLINE_PROVIDERS=str(providers),
        METERLINE_ACCESS_LOG="false",
        METERLINE_TIER_BASIC_RPM="60",
    ) as server:
        refused = httpx.post(f"{server.v1}/chat/completions", json={}, headers={"X-API-Key": "x"})
        assert refused.status_code == 401
        time.sleep(0.5)
        log = server.log.read_text()
    warnings = [line for line in log.splitlines() if line.startswith("  warning: ")]
    assert len(warnings) == 3, warnings
    assert "provider keyless: METERLINE_TEST_UNSET_PROVIDER_KEY is not set" in warnings[0]
    assert "no admin token (METERLINE_ADMIN_TOKEN)" in warnings[1]
    assert "2 workers without METERLINE_REDIS_URL" in warnings[2]
    assert "access log  off" in log
    assert "logger=meterline.access" not in log


def test_summary_hides_passwords_and_names_the_embedded_database(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        redis_url="redis://:redis-secret@cache:6379/0",
        admin_token="admin-secret",
        providers=tmp_path / "providers.yaml",
    )
    providers = parse_providers(
        "providers:\n  - name: p\n    base_url: https://p.example/v1\n"
        "    api_key_env: P_KEY\n    models: ['a/*', 'b']\n",
        environ={"P_KEY": "provider-secret"},
    )
    external = Serving("0.0.0.0", 8080, 2, "postgresql://meter:db-secret@db:5432/meterline", None)
    text = startup_summary(settings, external, providers, {"P_KEY": "provider-secret"})
    assert "Postgres at postgresql://meter:***@db:5432/meterline" in text
    assert "redis://:***@cache:6379/0 (prefix meterline:)" in text
    assert "p: https://p.example/v1 (stream usage native, key from P_KEY) models a/*, b" in text
    for secret in ("db-secret", "redis-secret", "admin-secret", "provider-secret"):
        assert secret not in text
    assert "warning:" not in text  # two workers, but sharing Redis

    embedded = Serving("127.0.0.1", 8080, 1, "postgresql://u@/db", tmp_path / "pg")
    assert f"embedded Postgres in {tmp_path / 'pg'}" in startup_summary(
        settings, embedded, providers, {}
    )

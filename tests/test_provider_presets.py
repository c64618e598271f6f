"""Providers that read their key from another header, static provider headers, a provider
whose key is not set (503 `provider_not_configured`, never the provider's 401), and clients
that carry their Meterline key in a provider's own header (`Infuzu-API-Key`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from service.providers.config import ProvidersFileError, parse_providers
from tests.conftest import Meterline, Upstream, start_meterline
from tests.reliability import new_customer, wait_for_rows
from tests.support import Database

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}


def _providers(upstream: Upstream) -> str:
    return f"""
providers:
  - name: infuzu-like
    base_url: {upstream.v1("openai")}
    api_key_env: MOCK_PROVIDER_KEY
    auth_header: Infuzu-API-Key
    headers: {{X-Client: meterline-tests}}
    models: ["infuzu/*"]
  - name: unconfigured
    base_url: {upstream.v1("openai")}
    api_key_env: METERLINE_TEST_KEY_NOBODY_SET
    models: ["unconfigured/*"]
"""


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Meterline]:
    workdir = tmp_path_factory.mktemp("presets")
    providers = workdir / "presets.yaml"
    providers.write_text(_providers(upstream))
    with start_meterline(database_url, upstream, workdir, METERLINE_PROVIDERS=str(providers)) as m:
        yield m


def test_a_provider_reading_its_key_from_its_own_header_gets_the_bare_key(
    server: Meterline,
) -> None:
    # The mock answers 401 unless the key arrives in exactly one of `Authorization: Bearer`
    # and `Infuzu-API-Key` (bare): a 200 shows the proxy sent it as the provider expects.
    _, _, key = new_customer(server.url)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    completion = client.chat.completions.create(model="infuzu/chat", **CHAT)  # type: ignore[call-overload]
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_a_provider_without_its_key_answers_503_and_records_nothing(
    server: Meterline, database_url: str
) -> None:
    account_id, _, key = new_customer(server.url)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="unconfigured/chat", **CHAT)  # type: ignore[call-overload]
    assert refused.value.status_code == 503
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "provider_not_configured"
    assert refused.value.response.headers["x-should-retry"] == "false"
    # A served request after it is the account's only row: the refusal was not recorded.
    client.chat.completions.create(model="infuzu/chat", **CHAT)  # type: ignore[call-overload]
    db = Database(database_url)
    sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1"
    assert wait_for_rows(db, sql, account_id, count=1) == 1
    rows = db.fetch("SELECT requested_model FROM usage_ledger WHERE account_id = $1", account_id)
    assert [r["requested_model"] for r in rows] == ["infuzu/chat"]
    # The operator was told at start-up.
    log = server.log.read_text()
    assert "METERLINE_TEST_KEY_NOBODY_SET is not set" in log
    assert "provider_not_configured" in log


@pytest.mark.parametrize("header", ["Infuzu-API-Key", "X-Infuzu-API-Key", "X-API-Key"])
def test_a_client_may_carry_its_key_in_a_providers_own_header(
    server: Meterline, header: str
) -> None:
    _, _, key = new_customer(server.url)
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "infuzu/chat", **CHAT},
        headers={header: key},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    # The same key twice is one credential; two different ones are refused.
    same = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "infuzu/chat", **CHAT},
        headers={header: key, "Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert same.status_code == 200
    other = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "infuzu/chat", **CHAT},
        headers={header: key, "Authorization": "Bearer ml-" + "C" * 43},
        timeout=30,
    )
    assert other.status_code == 400
    assert other.json()["error"]["code"] == "conflicting_credentials"
    assert header in other.json()["error"]["message"]


def test_the_providers_file_refuses_unusable_auth_and_static_headers(tmp_path: Path) -> None:
    base = "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models: ['m']\n"
    parsed = parse_providers(
        base + "    auth_header: Infuzu-API-Key\n    api_key_env: K\n    headers: {X-A: b}\n",
        {"K": "secret"},
    )[0]
    assert parsed.auth_headers() == {"X-A": "b", "Infuzu-API-Key": "secret"}
    bearer = parse_providers(base + "    api_key_env: K\n", {"K": "secret"})[0]
    assert bearer.auth_headers() == {"Authorization": "Bearer secret"}
    assert parse_providers(base + "    api_key_env: K\n", {})[0].configured is False
    assert parse_providers(base, {})[0].configured is True  # no key needed (a local vLLM)
    for extra, says in [
        ("    auth_header: 'Bad Header'\n", "auth_header must be a header name"),
        ("    headers: [a]\n", "headers must be a mapping"),
        ("    headers: {Authorization: 'Bearer x'}\n", "headers.Authorization is set by Meterline"),
        ("    headers: {Content-Type: text/plain}\n", "headers.Content-Type is set by Meterline"),
        ('    headers: {X-A: "a\\nb"}\n', "headers.X-A must be one line of text"),
        ("    headers: {X-A: 1}\n", "headers.X-A must be one line of text"),
    ]:
        with pytest.raises(ProvidersFileError, match=says.replace(".", r"\.")):
            parse_providers(base + extra, {})


def test_an_openai_endpoint_meterline_does_not_proxy_is_an_openai_shaped_404(
    server: Meterline,
) -> None:
    _, _, key = new_customer(server.url)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="infuzu/chat", input="Hello")
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["message"].startswith("Invalid URL (POST /v1/responses): Meterline proxies ")
    assert "POST /v1/chat/completions" in body["message"]

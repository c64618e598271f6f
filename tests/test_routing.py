"""Routing: the model object (candidates, exclusions, price caps, weights), failover between
providers before the first byte, what is billed and recorded, and the live statistics.

Clients send the model object through the openai SDK's `extra_body` (its `model` argument
must be a string; `extra_body`'s `model` replaces it in the JSON sent). Upstreams are the mock
provider on loopback: `/fail/30/…` fails three requests in ten with a 503, and a closed port
is a provider that is down entirely.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from pricing.prices import BEGINNING_OF_TIME, Price, PriceBook
from pricing.rate_cards import MarkupBasis, RateCardAssignment, RateCardTerms, Tariff
from service.providers.config import Provider
from service.providers.router import ProviderRouter
from service.proxy.service import within
from service.routing.schemas import parse_model_spec
from service.routing.service import RANKING_TTL_S, ModelRouter
from service.routing.stats import RouteFigures, RoutingStats
from tests.conftest import ADMIN_TOKEN, Meterline, Upstream, meterline_env, start_meterline
from tests.reliability import new_customer, own_database, wait_for_rows
from tests.support import Database, free_port, running

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
SUFFIX = secrets.token_hex(3)  # models of this run only: the database is shared

# model → (input, output) USD per 1M tokens
PRICES = {
    "cheap": ("0.10", "0.20"),
    "mid": ("0.50", "1.00"),
    "dear": ("2.00", "4.00"),
    "flaky": ("1.00", "1.00"),
    "healthy": ("1.00", "1.00"),
    "failover": ("1.00", "1.00"),
    "slow": ("1.00", "1.00"),
}


def m(name: str) -> str:
    """The model id of `name` in this run."""
    return f"route{SUFFIX}/{name}"


def _providers(upstream: Upstream, down_port: int) -> str:
    return f"""
providers:
  - name: cheap-co
    base_url: {upstream.v1("openai")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["{m("cheap")}", "{m("mid")}", "{m("dear")}"]
    stream_usage: inject
  - name: flaky-co
    base_url: {upstream.url}/fail/30/openai/v1
    api_key_env: MOCK_PROVIDER_KEY
    models: ["{m("flaky")}"]
    stream_usage: inject
  - name: slow-co
    base_url: {upstream.url}/slow/300/openai/v1
    api_key_env: MOCK_PROVIDER_KEY
    models: ["{m("slow")}"]
    stream_usage: inject
  - name: down-co
    base_url: http://127.0.0.1:{down_port}/v1
    api_key_env: MOCK_PROVIDER_KEY
    models: ["{m("failover")}"]
    stream_usage: inject
  - name: healthy-co
    base_url: {upstream.v1("openai")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["{m("healthy")}", "{m("failover")}"]
    stream_usage: inject
"""


def _add_prices(db: Database) -> None:
    for name, (prompt, completion) in PRICES.items():
        db.execute(
            "INSERT INTO price_versions (model, input_usd_per_mtok, output_usd_per_mtok, "
            "effective_from, source) VALUES ($1, $2, $3, '1970-01-01', 'test')"
            " ON CONFLICT DO NOTHING",
            m(name),
            Decimal(prompt),
            Decimal(completion),
        )


@pytest.fixture(scope="module")
def database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """A database of this file's own: the prices it adds for its models must not change how
    the run's shared database prices anyone else's."""
    with own_database(postgres_server, template_database) as url:
        yield url


@contextlib.contextmanager
def _routing_server(
    database_url: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
    **settings: str,
) -> Iterator[Meterline]:
    """Meterline on this file's providers and prices, with `settings` on top."""
    _add_prices(Database(database_url))
    workdir = tmp_path_factory.mktemp("routing")
    providers = workdir / "routing.yaml"
    providers.write_text(_providers(upstream, free_port()))
    with start_meterline(
        database_url, upstream, workdir, METERLINE_PROVIDERS=str(providers), **settings
    ) as meterline:
        yield meterline


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Meterline]:
    with _routing_server(
        database_url,
        upstream,
        tmp_path_factory,
        METERLINE_ROUTING_COOLDOWN_FAILURES="3",
        METERLINE_ROUTING_COOLDOWN_S="600",
    ) as meterline:
        yield meterline


def _client(server: Meterline) -> tuple[uuid.UUID, openai.OpenAI]:
    account_id, _, key = new_customer(server.url)
    return account_id, openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)


def _routed(client: openai.OpenAI, model: dict[str, Any], **fields: Any) -> Any:
    """A chat completion whose model is `model`, sent as the SDK lets clients send it."""
    return client.chat.completions.with_raw_response.create(
        model="routed", extra_body={"model": model}, **{**CHAT, **fields}
    )


def test_the_price_weight_alone_picks_the_cheapest_candidate_and_bills_its_price(
    server: Meterline, database_url: str
) -> None:
    account_id, client = _client(server)
    raw = _routed(client, {"llms": [m("dear"), m("mid"), m("cheap")], "weights": {"price": 1}})
    assert raw.headers["x-meterline-model"] == m("cheap")
    assert raw.headers["x-meterline-provider"] == "cheap-co"
    assert raw.headers["x-meterline-attempts"] == "1"
    completion = raw.parse()
    assert completion.model == m("cheap")  # what the upstream said
    usage = completion.usage
    assert usage is not None
    db = Database(database_url)
    sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1"
    assert wait_for_rows(db, sql, account_id, count=1) == 1
    row = db.fetch(
        "SELECT requested_model, provider, cost_usd FROM usage_ledger WHERE account_id = $1",
        account_id,
    )[0]
    expected = (
        usage.prompt_tokens * Decimal("0.10") + usage.completion_tokens * Decimal("0.20")
    ) / 1_000_000
    assert (row["requested_model"], row["provider"]) == (m("cheap"), "cheap-co")
    assert row["cost_usd"] == expected
    assert raw.headers["x-meterline-cost-usd"] == format(expected, "f")


def test_max_input_cost_and_exclude_llms_filter_the_candidates(server: Meterline) -> None:
    _, client = _client(server)
    llms = [m("dear"), m("mid"), m("cheap")]
    unweighted = {"price": 0, "error": 0, "start_latency": 0, "end_latency": 0}
    # All weights 0: every score ties, so the order of `llms` decides.
    first = _routed(client, {"llms": llms, "weights": unweighted})
    assert first.headers["x-meterline-model"] == m("dear")
    capped = _routed(client, {"llms": llms, "weights": unweighted, "max_input_cost": "0.50"})
    assert capped.headers["x-meterline-model"] == m("mid")  # dear's 2.00 is over the cap
    both = {"llms": llms, "weights": unweighted, "max_input_cost": 0.5, "exclude_llms": [m("mid")]}
    assert _routed(client, both).headers["x-meterline-model"] == m("cheap")
    output_capped = {"llms": llms, "weights": unweighted, "max_output_cost": "0.20"}
    assert _routed(client, output_capped).headers["x-meterline-model"] == m("cheap")
    globbed = {"llms": llms, "weights": unweighted, "exclude_llms": [f"route{SUFFIX}/d*"]}
    assert _routed(client, globbed).headers["x-meterline-model"] == m("mid")


@pytest.mark.parametrize(
    ("model", "param", "named"),
    [
        (
            {"llms": [m("mid"), m("dear")], "max_input_cost": "0.05"},
            "model.max_input_cost",
            "max_input_cost 0.05",
        ),
        ({"llms": [m("mid")], "exclude_llms": [m("mid")]}, "model.exclude_llms", "exclude_llms"),
        ({"llms": ["nobody/serves-this"]}, "model", "no provider serves it"),
        (
            {"llms": [m("dear")], "max_output_cost": "1"},
            "model.max_output_cost",
            "max_output_cost 1",
        ),
    ],
)
def test_no_candidate_left_is_a_400_naming_the_filter_that_removed_the_last(
    server: Meterline, model: dict[str, Any], param: str, named: str
) -> None:
    _, client = _client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        _routed(client, model)
    body = refused.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("no_model_matches", param)
    assert named in body["message"]


@pytest.mark.parametrize(
    ("model", "param"),
    [
        ({"llms": "a"}, "model.llms"),
        ({"llms": ["a"], "max_input_cost": "lots"}, "model.max_input_cost"),
        ({"llms": ["a"], "max_input_cost": "-1"}, "model.max_input_cost"),
        ({"llms": ["a"], "weights": {"speed": 1}}, "model.weights"),
        ({"llms": ["a"], "weights": {"price": "high"}}, "model.weights.price"),
        ({"candidates": ["a"]}, "model"),
    ],
)
def test_a_malformed_model_object_is_a_400_naming_its_field(
    server: Meterline, model: dict[str, Any], param: str
) -> None:
    _, client = _client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        _routed(client, model)
    body = refused.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("invalid_model", param)


def test_the_object_is_not_taken_by_embeddings(server: Meterline) -> None:
    _, client = _client(server)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input="hi", extra_body={"model": {"llms": ["x"]}})


def test_an_error_weighted_object_sends_almost_everything_to_the_healthy_provider(
    server: Meterline, database_url: str
) -> None:
    account_id, client = _client(server)
    model = {"llms": [m("flaky"), m("healthy")], "weights": {"error": 1}}
    for _ in range(20):  # warm-up: the flaky provider is tried until it fails
        assert _routed(client, model).parse().choices
    served = Counter(_routed(client, model).headers["x-meterline-provider"] for _ in range(100))
    assert served["healthy-co"] >= 95, served
    # The flaky provider was tried (and failed): its failures are in its statistics.
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        stats = admin.get("/billing/routing/stats").json()
    flaky = [r for r in stats["data"] if r["provider"] == "flaky-co" and r["model"] == m("flaky")]
    assert flaky and flaky[0]["error_rate"] > 0
    healthy = [
        r for r in stats["data"] if r["provider"] == "healthy-co" and r["model"] == m("healthy")
    ]
    assert healthy and healthy[0]["error_rate"] == 0 and healthy[0]["latency_ms"] is not None
    # Every client request was served and billed once; a failed attempt is a row at no charge.
    db = Database(database_url)
    sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1 AND status_code = 200"
    assert wait_for_rows(db, sql, account_id, count=120) == 120
    failed = db.fetch(
        "SELECT provider, status_code, cost_usd FROM usage_ledger"
        " WHERE account_id = $1 AND status_code <> 200",
        account_id,
    )
    assert failed and all(
        (r["provider"], r["status_code"], r["cost_usd"]) == ("flaky-co", 503, 0) for r in failed
    )


def test_a_start_latency_weighted_object_moves_to_the_provider_quick_to_answer(
    server: Meterline,
) -> None:
    _, client = _client(server)
    model = {"llms": [m("slow"), m("healthy")], "weights": {"start_latency": 1}}
    served = [_routed(client, model).headers["x-meterline-provider"] for _ in range(10)]
    # Each is tried once (a route not measured yet wins a tie), then the quick one wins.
    assert sorted(served[:2]) == ["healthy-co", "slow-co"]
    assert served[2:] == ["healthy-co"] * 8
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        stats = admin.get("/billing/routing/stats").json()["data"]
    slow = [r for r in stats if r["provider"] == "slow-co"]
    assert slow and slow[0]["ttft_ms"] >= 300  # the mock waits 300 ms before its first byte


def test_an_attempt_past_the_requests_deadline_gives_way_to_the_next_candidate(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`routing_deadline_s` bounds the attempts that may fail over: a provider slower to
    answer than the request's deadline is left for the next candidate, which is tried once
    more as the last attempt. The slow attempt is a row of its own, a 504 at no charge."""
    # slow-co takes 300 ms to its first byte; the request may wait 100 ms before failing over.
    with _routing_server(
        database_url, upstream, tmp_path_factory, METERLINE_ROUTING_DEADLINE_S="0.1"
    ) as meterline:
        account_id, client = _client(meterline)
        unweighted = {"price": 0, "error": 0, "start_latency": 0, "end_latency": 0}
        raw = _routed(client, {"llms": [m("slow"), m("healthy")], "weights": unweighted})
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-meterline-provider"] == "healthy-co"
        assert raw.headers["x-meterline-attempts"] == "2"
        request_id = raw.headers["x-request-id"]
        db = Database(database_url)
        sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1"
        assert wait_for_rows(db, sql, account_id, count=2) == 2
        rows = db.fetch(
            "SELECT request_id, provider, status_code, error_code, cost_usd FROM usage_ledger"
            " WHERE account_id = $1 ORDER BY request_id",
            account_id,
        )
    served, slow = rows
    assert (served["request_id"], served["provider"], served["status_code"]) == (
        request_id,
        "healthy-co",
        200,
    )
    assert served["cost_usd"] > 0
    assert (slow["request_id"], slow["provider"], slow["status_code"], slow["cost_usd"]) == (
        f"{request_id}.1",
        "slow-co",
        504,
        0,
    )


def test_a_provider_down_entirely_every_request_is_served_by_the_other(
    server: Meterline, database_url: str
) -> None:
    account_id, client = _client(server)
    for _ in range(10):
        raw = client.chat.completions.with_raw_response.create(model=m("failover"), **CHAT)
        assert raw.headers["x-meterline-provider"] == "healthy-co"
        assert raw.parse().choices[0].message.content
    stream = client.chat.completions.create(model=m("failover"), stream=True, **CHAT)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    db = Database(database_url)
    sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1 AND status_code = 200"
    assert wait_for_rows(db, sql, account_id, count=11) == 11
    rows = db.fetch(
        "SELECT request_id, provider, status_code, error_code, cost_usd FROM usage_ledger"
        " WHERE account_id = $1 ORDER BY request_id",
        account_id,
    )
    billed = [r for r in rows if r["status_code"] == 200]
    assert len(billed) == 11 and all(
        r["provider"] == "healthy-co" and r["cost_usd"] > 0 for r in billed
    )
    # The first three attempts at the dead provider are visible, at no charge, each beside
    # the request it was made for; then it is cooled down and not tried.
    failed = [r for r in rows if r["status_code"] != 200]
    assert len(failed) == 3
    for row in failed:
        assert (row["provider"], row["status_code"], row["error_code"], row["cost_usd"]) == (
            "down-co",
            502,
            "upstream_unavailable",
            0,
        )
        request_id, attempt = row["request_id"].rsplit(".", 1)
        assert attempt == "1" and request_id in {r["request_id"] for r in billed}
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        health = admin.get("/billing/routing/stats").json()["providers"]
    down = [p for p in health if p["provider"] == "down-co"]
    assert down and down[0]["cooled_down_until"] is not None


def test_a_fallback_never_overshoots_a_budget_reservation(server: Meterline) -> None:
    # No max_tokens: the request is capped to what the budget pays for, at the costliest
    # candidate's price (dear's 4.00 per 1M output), not at the one tried first (cheap's 0.20).
    # Two accounts with the same budget: neither request holds the other's.
    clients = []
    for _ in range(2):
        _, _, key = new_customer(server.url, monthly_budget_usd="0.0004")
        clients.append(openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0))
    ask = {"messages": [{"role": "user", "content": "Hello"}]}
    alone = clients[0].chat.completions.with_raw_response.create(model=m("cheap"), **ask)  # type: ignore[call-overload]
    model = {"llms": [m("cheap"), m("dear")], "weights": {"price": 1}}
    routed = clients[1].chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        model="routed", extra_body={"model": model}, **ask
    )
    assert routed.headers["x-meterline-model"] == m("cheap")
    cap_alone = int(alone.headers["x-meterline-max-tokens-capped"])
    cap_routed = int(routed.headers["x-meterline-max-tokens-capped"])
    assert cap_routed < cap_alone
    assert Decimal(cap_routed) * Decimal("4.00") / 1_000_000 <= Decimal("0.0004")


def test_routing_statistics_are_the_admins_only(server: Meterline) -> None:
    _, _, key = new_customer(server.url)
    with httpx.Client(base_url=server.url) as http:
        customer = http.get("/billing/routing/stats", headers={"Authorization": f"Bearer {key}"})
        assert customer.status_code == 404
        admin = http.get(
            "/billing/routing/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert admin.status_code == 200 and admin.json()["shared"] is False


def test_the_model_object_is_read_with_exact_decimals() -> None:
    spec = parse_model_spec({"llms": ["a", "a", "b"], "max_input_cost": 0.1}, 256)
    assert spec.llms == ("a", "b") and spec.max_input_cost == Decimal("0.1")
    assert spec.weights == (1.0, 1.0, 1.0, 1.0)


def test_two_workers_with_redis_see_the_same_statistics_within_a_second(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _add_prices(Database(database_url))
    workdir = tmp_path_factory.mktemp("routing-shared")
    providers = workdir / "routing.yaml"
    providers.write_text(_providers(upstream, free_port()))
    prefix = f"meterline-test-{secrets.token_hex(4)}:"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **meterline_env(database_url, workdir / "data", providers),
        "METERLINE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "METERLINE_REDIS_PREFIX": prefix,
    }
    # Two workers start slowly on a loaded machine: more time than one server gets.
    with running(
        ["serve", "--port", str(port), "--workers", "2"],
        f"{url}/healthz",
        env=env,
        log=workdir / "meterline.log",
        timeout=240,
    ) as process:
        server = Meterline(
            url, database_url, workdir / "data", workdir / "meterline.log", process.pid
        )
        _, client = _client(server)
        model = {"llms": [m("flaky"), m("healthy")], "weights": {"error": 1}}
        # Fresh connections: each request may land on either worker.
        for _ in range(30):
            _routed(client, model, extra_headers={"Connection": "close"})
        stopped = time.monotonic()
        # Every view fetched a second after the last request, from either worker, is the
        # same; fresh connections until both workers have answered.
        views: dict[str, list[Any]] = {}
        with httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"},
        ) as admin:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - stopped)))
            while time.monotonic() - stopped < 30 and len(views) < 2:
                page = admin.get("/billing/routing/stats").json()
                assert page["shared"] is True
                seen = views.setdefault(page["worker"], page["data"])
                assert seen == page["data"], "a view changed with no traffic"
                time.sleep(0.01)
        assert len(views) == 2, "both workers answered"
        first, second = views.values()
        assert first == second, (first, second)
        routes = {(r["provider"], r["model"]) for r in first}
        assert ("healthy-co", m("healthy")) in routes
        total = sum(r["samples"] for r in first if r["model"] in (m("flaky"), m("healthy")))
        assert total >= 30  # every worker's attempts, not one worker's share


def test_a_request_on_a_quoted_task_routes_only_to_the_quoted_model(server: Meterline) -> None:
    _, _, key = new_customer(server.url)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
        quote = http.post(
            "/billing/quotes",
            json={
                "task_type": "routed",
                "model": m("dear"),
                "prompt_tokens": 100,
                "max_completion_tokens": 100,
            },
        )
        quote.raise_for_status()
        task = http.post(f"/billing/quotes/{quote.json()['id']}/accept").json()
    client = openai.OpenAI(
        base_url=server.v1, api_key=key, max_retries=0, default_headers={"X-Task-Id": task["id"]}
    )
    # The price weight alone would pick cheap; the task was quoted for dear.
    raw = _routed(client, {"llms": [m("cheap"), m("dear")], "weights": {"price": 1}})
    assert raw.headers["x-meterline-model"] == m("dear")
    with pytest.raises(openai.BadRequestError) as refused:
        _routed(client, {"llms": [m("cheap"), m("mid")]})
    body = refused.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == (
        "no_model_matches",
        "x-task-id",
    )
    assert m("dear") in body["message"]


class _Prices:
    """The live prices a router reads: a tariff swapped whole, as a refresh does."""

    def __init__(self, tariff: Tariff) -> None:
        self.tariff = tariff
        self.book = tariff.list_prices

    async def refresh(self) -> None:
        return None


def test_candidates_kept_between_requests_follow_every_price_in_force() -> None:
    """The filtered, priced candidates a router keeps between requests are those of the
    request's own instant: a list price, a rate card version or an assignment that starts
    later, a refreshed tariff, and an earlier instant (a stream begun before) each count."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    later, latest = now + timedelta(hours=1), now + timedelta(hours=2)
    cheap, dear = "kept-cheap", "kept-dear"
    book = PriceBook(
        [
            Price(cheap, Decimal(1), Decimal(1), BEGINNING_OF_TIME),
            Price(dear, Decimal(2), Decimal(2), BEGINNING_OF_TIME),
            Price(cheap, Decimal(5), Decimal(5), later),  # from `later`, the dearer one
        ]
    )
    account = uuid.uuid4()
    # From `latest` the account pays by a card that makes `dear` cheap again.
    card = RateCardTerms(
        1,
        BEGINNING_OF_TIME,
        Decimal(0),
        MarkupBasis.LIST_PRICE,
        rates=(Price(dear, Decimal("0.5"), Decimal("0.5"), BEGINNING_OF_TIME),),
    )
    tariff = Tariff(book, rate_cards=[card], assignments=[RateCardAssignment(account, 1, latest)])
    prices = _Prices(tariff)
    provider = Provider("kept", "http://127.0.0.1:1/v1", ("kept-*",), "inject")
    router = ModelRouter(ProviderRouter([provider]), prices, RoutingStats(), 3)
    by_price = parse_model_spec({"llms": [cheap, dear], "weights": {"price": 1}}, 256)
    capped = parse_model_spec({"llms": [cheap, dear], "max_input_cost": "3"}, 256)

    def first(spec: Any, at: datetime) -> str:
        return router.choose(spec, account, None, at).candidates[0].model

    assert first(by_price, now) == cheap
    assert first(by_price, later) == dear  # a list price that started since
    assert first(by_price, now) == cheap  # an instant before the span kept
    assert [c.model for c in router.choose(capped, account, None, later).candidates] == [dear]
    route = router.choose(capped, account, None, now)
    assert [c.model for c in route.candidates] == [cheap, dear]
    assert route.costliest is not None and route.costliest.input_usd_per_mtok == 2
    assert first(by_price, latest) == dear  # the rate card, assigned since
    dearest = router.choose(by_price, account, None, latest).costliest
    assert dearest is not None  # what a budget reserves: the dearest of the two
    assert (dearest.input_usd_per_mtok, dearest.output_usd_per_mtok) == (Decimal(5), Decimal(5))
    # A refresh replaces the tariff: read at once, though the instant is in the span kept.
    prices.tariff = Tariff(
        PriceBook(
            [
                Price(dear, Decimal(1), Decimal(1), BEGINNING_OF_TIME),
                Price(cheap, Decimal(3), Decimal(3), BEGINNING_OF_TIME),
            ]
        )
    )
    assert first(by_price, now) == dear


def test_each_request_is_ranked_by_the_statistics_of_its_instant() -> None:
    """The candidates kept between requests are ranked again on each: a route not measured
    yet wins a tie, then the order of `llms`, then the file's; a cooled-down provider's
    routes go last; and what a budget reserves is the dearest of the models now tried."""
    cheap, dear = "ranked-cheap", "ranked-dear"
    book = PriceBook(
        [
            Price(cheap, Decimal(1), Decimal(1), BEGINNING_OF_TIME),
            Price(dear, Decimal(2), Decimal(3), BEGINNING_OF_TIME),
        ]
    )
    prices = _Prices(Tariff(book))
    providers = ProviderRouter(
        [
            Provider("first", "http://127.0.0.1:1/v1", ("ranked-*",), "inject"),
            Provider("second", "http://127.0.0.1:2/v1", ("ranked-*",), "inject"),
        ]
    )
    stats = RoutingStats(cooldown_failures=1, cooldown_s=600)
    every = ModelRouter(providers, prices, stats, 4)
    top = ModelRouter(providers, prices, stats, 1)
    spec = parse_model_spec({"llms": [dear, cheap], "weights": {"start_latency": 1}}, 256)
    account, now = uuid.uuid4(), datetime.now(UTC)

    def order() -> list[tuple[str, str]]:
        route = every.choose(spec, account, None, now)
        return [(c.model, c.provider.name) for c in route.candidates]

    def reserved() -> tuple[Decimal, Decimal]:
        price = top.choose(spec, account, None, now).costliest
        assert price is not None
        return price.input_usd_per_mtok, price.output_usd_per_mtok

    # Nothing measured: all tie, in the order of `llms`, then the file's.
    assert order() == [(dear, "first"), (dear, "second"), (cheap, "first"), (cheap, "second")]
    assert reserved() == (Decimal(2), Decimal(3))
    # The dear model measured at both providers: the routes not measured yet win the tie
    # with the quickest of them.
    stats.observe("first", dear, False, 50.0, 60.0)
    stats.observe("second", dear, False, 10.0, 20.0)
    assert order() == [(cheap, "first"), (cheap, "second"), (dear, "second"), (dear, "first")]
    assert reserved() == (Decimal(1), Decimal(1))
    stats.observe("first", cheap, False, 30.0, 40.0)
    stats.observe("second", cheap, False, 20.0, 30.0)
    assert order() == [(dear, "second"), (cheap, "second"), (cheap, "first"), (dear, "first")]
    assert reserved() == (Decimal(2), Decimal(3))
    # The second provider fails once and is cooled down: its routes go last.
    stats.observe("second", cheap, True, None, None)
    assert stats.cooled("second")
    assert order() == [(cheap, "first"), (dear, "first"), (dear, "second"), (cheap, "second")]
    assert reserved() == (Decimal(1), Decimal(1))


def _at_two_providers(model: str, stats: RoutingStats, **options: Any) -> ModelRouter:
    """A router of `model` at one price, served by `first` then `second` in the file."""
    book = PriceBook([Price(model, Decimal(1), Decimal(1), BEGINNING_OF_TIME)])
    providers = ProviderRouter(
        [
            Provider("first", "http://127.0.0.1:1/v1", (model,), "inject"),
            Provider("second", "http://127.0.0.1:2/v1", (model,), "inject"),
        ]
    )
    return ModelRouter(providers, _Prices(Tariff(book)), stats, 2, **options)


def test_a_ranking_holds_a_few_milliseconds_unless_something_may_reorder_it() -> None:
    """Latencies drifting within `RANKING_TTL_S` keep the last ranking; past it they count.
    A failure, the end of a failure streak and the other workers' figures re-rank at once."""
    model = "held-model"
    stats = RoutingStats(cooldown_failures=100)
    clock = [1000.0]
    router = _at_two_providers(model, stats, clock=lambda: clock[0])
    spec = parse_model_spec({"llms": [model], "weights": {"end_latency": 1, "error": 1}}, 256)
    account, now = uuid.uuid4(), datetime.now(UTC)

    def order() -> list[str]:
        return [c.provider.name for c in router.choose(spec, account, None, now).candidates]

    stats.observe("first", model, False, 10.0, 20.0)
    stats.observe("second", model, False, 10.0, 30.0)
    assert order() == ["first", "second"]
    for _ in range(30):  # the first provider slows down: only latencies change
        stats.observe("first", model, False, 10.0, 90.0)
    clock[0] += RANKING_TTL_S / 2
    assert order() == ["first", "second"], "kept within its few milliseconds"
    clock[0] += RANKING_TTL_S
    assert order() == ["second", "first"], "past them, the slowdown counts"
    # A failure re-ranks at once: the second provider's error goes against it.
    for _ in range(3):
        stats.observe("second", model, True, None, None)
    assert order() == ["first", "second"]
    # The first fails too, then succeeds: its failure streak ends, a re-ranking at once.
    for _ in range(15):  # past the second's error rate (its fewer samples weigh more)
        stats.observe("first", model, True, None, None)
    assert order() == ["second", "first"]
    generation = stats.generation
    stats.observe("first", model, False, 10.0, 90.0)
    assert stats.generation == generation + 1
    # Figures from the other workers re-rank at once: there the first is quick and sound.
    view = dict(stats.local)
    view[("first", model)] = RouteFigures(100.0, 0.0, 5.0, 6.0, time.time())
    stats.replace_view(view)
    assert order() == ["first", "second"]


def test_an_error_rate_ranks_its_route_last_and_fades_with_idleness() -> None:
    """The error term counts once some route has an error rate: the route failing more
    goes after an equally quick one, and an old error fades below a new one."""
    model = "faded-model"
    stats = RoutingStats(cooldown_failures=100)
    router = _at_two_providers(model, stats)
    spec = parse_model_spec({"llms": [model], "weights": {"error": 1}}, 256)
    account, now = uuid.uuid4(), datetime.now(UTC)

    def order() -> list[str]:
        return [c.provider.name for c in router.choose(spec, account, None, now).candidates]

    for provider in ("first", "second"):
        stats.observe(provider, model, False, 10.0, 20.0)
    assert order() == ["first", "second"]  # no errors: a tie, in the file's order
    stats.observe("first", model, True, None, None)
    assert order() == ["second", "first"]
    stats.observe("second", model, True, None, None)
    stats.observe("second", model, True, None, None)
    assert order() == ["first", "second"]  # the one failing more goes last
    # An error seen an hour ago has faded below one seen just now.
    stats.local[("second", model)].updated -= 3600
    stats.observe("first", model, True, None, None)
    assert order() == ["second", "first"]


async def test_an_attempt_under_a_deadline_times_out_or_stays_cancellable() -> None:
    """`within` (what bounds a routed attempt): the attempt's result before the deadline, a
    TimeoutError after it with the task free to go on, and a cancellation from elsewhere
    still a cancellation."""
    assert await within(1.0, asyncio.sleep(0, "answered")) == "answered"
    await asyncio.sleep(0.03)  # the timer of the attempt that answered never fires
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(0.02, asyncio.sleep(5))
    assert time.monotonic() - started < 1
    await asyncio.sleep(0.01)  # not cancelled any more: the next attempt can run

    async def attempt() -> None:
        await within(5.0, asyncio.sleep(5))

    task = asyncio.ensure_future(attempt())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

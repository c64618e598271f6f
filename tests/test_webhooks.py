"""Webhooks as a receiver meets them: signed as Standard Webhooks says (checked by the
`standardwebhooks` package), retried with the same event id until answered, none lost when
Meterline is killed in the middle; the endpoints' API; the destinations refused.

The receiver is a real HTTP server on loopback that answers 500 to the first attempts of
every event before it verifies and accepts it; the servers are `meterline serve` processes,
killed with SIGKILL where a test says so.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.settings import Settings
from service.webhooks import destinations
from service.webhooks.http import PublicResolver
from service.webhooks.sender import retry_delay
from service.webhooks.signing import new_secret, signed_headers
from tests.conftest import Meterline, Upstream
from tests.reliability import (
    Server,
    add_price,
    admin,
    new_customer,
    own_database,
    redis_available,
    redis_namespace,
)
from tests.support import Database

# $1,000 per million tokens: a request of the mock's (10 prompt tokens, 16 generated) costs
# 2.6 cents.
MODEL = "meta-llama/webhooks-test"
PRICE = Decimal(1000)
MESSAGES: list[Any] = [{"role": "user", "content": "Say something"}]
MAX_TOKENS = 16
PAST_MONTH = "2026-10"
# Two workers importing the app on a busy machine may take well over the usual minute.
STARTUP_S = 180.0
# Every attempt waits for the sender's next look (0.1 s) after its delay (0.2 s, doubling).
FAST_RETRIES = {
    "METERLINE_WEBHOOKS_ALLOW_PRIVATE": "1",
    "METERLINE_WEBHOOK_RETRY_BASE_S": "0.2",
    "METERLINE_WEBHOOK_POLL_INTERVAL_S": "0.1",
    "METERLINE_WEBHOOK_TIMEOUT_S": "2",
    "METERLINE_BUDGET_RESYNC_S": "1",
    "METERLINE_TASK_GUARD_REFRESH_S": "0.5",
}


# -- the receiver ---------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    path: str = "/hooks"


@dataclass
class Receiver:
    """Answers 500 to the first `fail_first` attempts of each event id, then verifies the
    signature with `standardwebhooks` and answers 204 (400 if it does not verify)."""

    fail_first: int = 3
    secret: str | None = None
    attempts: dict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, headers: dict[str, str], body: bytes, path: str = "/hooks") -> int:
        message_id = headers.get("webhook-id", "")
        with self.lock:
            seen = len(self.attempts[message_id])
            verified = False
            if seen >= self.fail_first and self.secret is not None:
                try:
                    Webhook(self.secret).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
            self.attempts[message_id].append(Received(headers, body, verified, path))
        if seen < self.fail_first:
            return 500
        return 204 if verified else 400

    def accepted(self) -> dict[str, Received]:
        """Each event id's accepted (verified) attempt."""
        with self.lock:
            return {
                i: next(a for a in tries if a.verified)
                for i, tries in self.attempts.items()
                if any(a.verified for a in tries)
            }

    def events(self, type_: str) -> list[dict[str, Any]]:
        return [
            json.loads(a.body)
            for a in self.accepted().values()
            if json.loads(a.body)["type"] == type_
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path == "/redirect":  # elsewhere: a sender that followed would reach it
                self.send_response(307)
                self.send_header("location", "/hooks")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if self.path == "/slow":  # answers after the sender's timeout (2 s here)
                time.sleep(4)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = state.handle(headers, body, self.path)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def subscribe(url: str, receiver: Receiver, events: list[str]) -> dict[str, Any]:
    with admin(url) as client:
        created = client.post("/billing/webhooks", json={"url": receiver.url, "events": events})
    assert created.status_code == 201, created.text
    endpoint: dict[str, Any] = created.json()
    receiver.secret = endpoint["secret"]
    return endpoint


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def finalized_invoice(client: httpx.Client, account_id: uuid.UUID) -> dict[str, Any]:
    draft = client.post(
        "/billing/invoices", json={"account_id": str(account_id), "period": PAST_MONTH}
    )
    assert draft.status_code in (200, 201), draft.text
    final = client.post(f"/billing/invoices/{draft.json()['id']}/finalize")
    assert final.status_code == 200, final.text
    invoice: dict[str, Any] = final.json()
    return invoice


# -- signing, backoff, destinations (no server) ----------------------------------------


def test_signature_is_accepted_by_the_standard_webhooks_verifier() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    body = '{"type":"invoice.finalized","timestamp":"2026-12-01T00:00:00Z","data":{"a":"1.50"}}'
    headers = signed_headers(secret, "evt_0123", int(time.time()), body)
    assert Webhook(secret).verify(body, headers)["data"] == {"a": "1.50"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("1.50", "9.50"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_backoff_doubles_from_the_base_delay_up_to_its_cap() -> None:
    settings = Settings(webhook_retry_base_s=5, webhook_retry_max_delay_s=3600)
    delays = [retry_delay(settings, n) for n in range(1, 12)]
    assert delays[:5] == [5, 10, 20, 40, 80]
    assert delays[-1] == 3600 and max(delays) == 3600
    # With the defaults, retries go on for the whole 24 h window: about 20 attempts.
    default = Settings()
    spent, attempts = 0.0, 1
    while spent + retry_delay(default, attempts) <= default.webhook_retry_window_s:
        spent += retry_delay(default, attempts)
        attempts += 1
    assert 15 <= attempts <= 25


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_loopback_private_and_odd_destinations_are_refused(url: str) -> None:
    with pytest.raises(destinations.UnsafeDestination):
        asyncio.run(destinations.check(url, allow_private=False))


def test_the_delivery_resolver_connects_to_public_addresses_only() -> None:
    async def resolve(host: str) -> object:
        resolver = PublicResolver()
        try:
            return await resolver.resolve(host, 80)
        finally:
            await resolver.close()

    with pytest.raises(OSError, match="no public address"):
        asyncio.run(resolve("localhost"))


def test_a_public_address_passes_and_private_ones_pass_when_allowed() -> None:
    asyncio.run(destinations.check("https://93.184.216.34/hook", allow_private=False))
    asyncio.run(destinations.check("http://127.0.0.1:9/hook", allow_private=True))


def test_the_server_refuses_a_loopback_url_unless_allowed(meterline: Meterline) -> None:
    with meterline.admin() as client:
        refused = client.post(
            "/billing/webhooks", json={"url": "http://127.0.0.1:9/", "events": ["task.completed"]}
        )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unsafe_webhook_url"
    assert refused.json()["error"]["param"] == "body.url"


# -- a server of the module's own ------------------------------------------------------


@pytest.fixture(scope="module")
def database(postgres_server: str, template_database: str) -> Iterator[str]:
    with own_database(postgres_server, template_database) as url:
        add_price(Database(url), MODEL, PRICE)
        yield url


@pytest.fixture(scope="module")
def server(
    database: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("webhooks")
    # Retries give up 5 s after an event was raised (the restart test keeps the 24 h).
    # Due quoted tasks are expired every half second.
    running = Server(
        database,
        upstream,
        workdir,
        **FAST_RETRIES,
        METERLINE_WEBHOOK_RETRY_WINDOW_S="5",
        METERLINE_TASK_EXPIRY_INTERVAL_S="0.5",
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_endpoints_are_created_listed_changed_and_deleted_by_the_admin_only(
    server: Server, receiver: Receiver
) -> None:
    _, _, key = new_customer(server.url)
    with admin(server.url) as client:
        bad = client.post("/billing/webhooks", json={"url": receiver.url, "events": ["nope"]})
        assert bad.status_code == 422
        empty = client.post("/billing/webhooks", json={"url": receiver.url, "events": []})
        assert empty.status_code == 422
        created = client.post(
            "/billing/webhooks",
            json={"url": receiver.url, "events": ["task.completed", "task.completed"]},
        )
        assert created.status_code == 201
        endpoint = created.json()
        assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["task.completed"]
        webhook_id = endpoint["id"]
        listed = client.get("/billing/webhooks", params={"limit": 200}).json()["data"]
        mine = next(e for e in listed if e["id"] == webhook_id)
        assert (
            "secret" not in mine
            and "secret" not in client.get(f"/billing/webhooks/{webhook_id}").json()
        )
        changed = client.patch(
            f"/billing/webhooks/{webhook_id}",
            json={"events": ["invoice.finalized", "invoice.voided"], "enabled": False},
        )
        assert changed.status_code == 200
        assert changed.json()["events"] == ["invoice.finalized", "invoice.voided"]
        assert changed.json()["enabled"] is False
        assert (
            client.patch(f"/billing/webhooks/{webhook_id}", json={"url": None}).status_code == 422
        )
        assert client.get(f"/billing/webhooks/{webhook_id}/deliveries").json()["data"] == []
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as own:
            assert own.get("/billing/webhooks").status_code == 404
            assert own.get(f"/billing/webhooks/{webhook_id}/deliveries").status_code == 404
        assert client.delete(f"/billing/webhooks/{webhook_id}").status_code == 204
        assert client.get(f"/billing/webhooks/{webhook_id}").status_code == 404
        assert client.delete(f"/billing/webhooks/{webhook_id}").status_code == 404


def test_task_budget_and_cap_events_arrive_signed_after_three_failures(
    server: Server, receiver: Receiver, database: str
) -> None:
    endpoint = subscribe(
        server.url, receiver, ["task.completed", "budget.threshold", "task.cost_cap_reached"]
    )
    # A budget of ten requests' cost: the 80 % and 100 % thresholds, once each.
    account_id, _, key = new_customer(server.url)
    sdk = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    first = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, extra_headers={"X-Task-Id": "t-1"}
    )
    assert first.status_code == 200
    db = Database(database)
    wait_until(
        lambda: db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id),
        10,
        "the first request's ledger row",
    )
    cost = Decimal(
        db.fetchval("SELECT cost_usd FROM usage_ledger WHERE account_id = $1", account_id)
    )
    budgeted, _, budget_key = new_customer(server.url, monthly_budget_usd=str(10 * cost))
    budget_sdk = openai.OpenAI(base_url=server.v1, api_key=budget_key, max_retries=0)
    served = 0
    for _ in range(11):
        try:
            budget_sdk.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
            )
            served += 1
        except openai.RateLimitError:
            pass
    # A hard budget refuses what might not fit: the tenth request, reserving more than it
    # costs, is refused at 90 % spent. The operator then lowers the budget to the spend:
    # 100 %, told once a request meets the new budget.
    assert served == 9
    with admin(server.url) as client:
        lowered = client.patch(
            f"/billing/accounts/{budgeted}", json={"monthly_budget_usd": str(9 * cost)}
        )
        assert lowered.status_code == 200
    time.sleep(1.5)  # the key directory's refresh (0.5 s here)
    with pytest.raises(openai.RateLimitError):
        budget_sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    # A quoted task with a tiny cap.
    with admin(server.url) as client:
        quoted = client.post(
            "/billing/quotes",
            json={
                "account_id": str(account_id),
                "task_type": "webhooks",
                "model": MODEL,
                "prompt_tokens": 1,
                "max_completion_tokens": 1,
            },
        )
        assert quoted.status_code in (200, 201), quoted.text
        accepted = client.post(
            f"/billing/quotes/{quoted.json()['id']}/accept", json={"task_id": "capped"}
        )
        assert accepted.status_code in (200, 201), accepted.text
    # Its price is a cent (quotes round up to cents), its cap three: the second request
    # passes the cap, the next is refused.
    refused = None
    for _ in range(4):
        try:
            sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                extra_headers={"X-Task-Id": "capped"},
            )
        except openai.APIStatusError as exc:
            refused = exc
            break
    assert refused is not None and refused.status_code == 402
    with admin(server.url) as client:
        done = client.post(
            "/billing/tasks/t-1/complete",
            params={"account_id": str(account_id)},
            json={"outcome": "succeeded"},
        )
        assert done.status_code == 200, done.text

    def arrived() -> bool:
        return (
            len(receiver.events("task.completed")) == 1
            and len(receiver.events("budget.threshold")) == 2
            and len(receiver.events("task.cost_cap_reached")) == 1
        )

    wait_until(arrived, 30, "the task, budget and cap events")
    completed = receiver.events("task.completed")[0]
    assert completed["data"]["id"] == "t-1" and completed["data"]["status"] == "succeeded"
    assert completed["data"]["cost_usd"] == f"{cost:f}"
    thresholds = sorted(
        receiver.events("budget.threshold"), key=lambda e: e["data"]["threshold_percent"]
    )
    assert [t["data"]["threshold_percent"] for t in thresholds] == [80, 100]
    assert {t["data"]["account_id"] for t in thresholds} == {str(budgeted)}
    assert Decimal(thresholds[0]["data"]["spent_usd"]) in (8 * cost, 9 * cost)
    assert Decimal(thresholds[0]["data"]["budget_usd"]) == 10 * cost
    assert Decimal(thresholds[1]["data"]["spent_usd"]) == 9 * cost
    assert Decimal(thresholds[1]["data"]["budget_usd"]) == 9 * cost
    capped = receiver.events("task.cost_cap_reached")[0]["data"]
    assert capped["task_id"] == "capped" and Decimal(capped["cost_usd"]) >= Decimal(
        capped["cost_cap_usd"]
    )
    # Every event was refused three times and accepted on the fourth attempt, same id.
    for message_id, tries in receiver.attempts.items():
        assert len(tries) == 4, message_id
        assert {t.headers["webhook-id"] for t in tries} == {message_id}
        assert len({t.body for t in tries}) == 1
    # Nothing is raised twice: more spend and another look change nothing.
    time.sleep(1.5)
    assert len(receiver.events("budget.threshold")) == 2
    with admin(server.url) as client:
        deliveries = client.get(f"/billing/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert len(deliveries) == 4
    for delivery in deliveries:
        assert delivery["status"] == "delivered" and delivery["attempts"] == 4
        assert delivery["last_status_code"] == 204 and delivery["next_attempt_at"] is None
        assert delivery["event_id"] in receiver.attempts


def test_credit_notes_and_tier_changes_are_told(server: Server, receiver: Receiver) -> None:
    receiver.fail_first = 0
    subscribe(server.url, receiver, ["credit_note.created", "account.tier_changed"])
    account_id, _, _ = new_customer(server.url)
    with admin(server.url) as client:
        adjusted = client.post(
            f"/billing/accounts/{account_id}/adjustments",
            json={
                "amount_usd": "5.00",
                "reason": "setup fee",
                "occurred_at": f"{PAST_MONTH}-15T12:00:00Z",
            },
        )
        assert adjusted.status_code == 201, adjusted.text
        invoice = finalized_invoice(client, account_id)
        assert Decimal(invoice["total_usd"]) == Decimal("5.00")
        note = client.post(
            f"/billing/invoices/{invoice['id']}/credit-notes",
            json={"amount_usd": "1.25", "reason": "goodwill"},
        )
        assert note.status_code == 201, note.text
        moved = client.patch(f"/billing/accounts/{account_id}", json={"tier": "pro"})
        assert moved.status_code == 200, moved.text

    def arrived() -> bool:
        return bool(receiver.events("credit_note.created")) and bool(
            receiver.events("account.tier_changed")
        )

    wait_until(arrived, 30, "the credit note and tier events")
    credited = receiver.events("credit_note.created")[0]["data"]
    assert credited["number"] == note.json()["number"]
    assert credited["invoice_id"] == invoice["id"] and credited["amount_usd"] == "1.25"
    assert credited["account_id"] == str(account_id) and credited["reason"] == "goodwill"
    tier = receiver.events("account.tier_changed")[0]["data"]
    assert tier == {
        "account_id": str(account_id),
        "from_tier": "basic",
        "to_tier": "pro",
        "reason": "admin",
    }


def test_a_failed_delivery_is_retried_on_demand_with_its_id(
    server: Server, receiver: Receiver
) -> None:
    receiver.fail_first = 1000  # never accepts: the retry window (5 s here) runs out
    endpoint = subscribe(server.url, receiver, ["invoice.finalized"])
    account_id, _, _ = new_customer(server.url)
    with admin(server.url) as client:
        finalized_invoice(client, account_id)

        def failed() -> bool:
            rows = client.get(f"/billing/webhooks/{endpoint['id']}/deliveries").json()["data"]
            return bool(rows) and rows[0]["status"] == "failed"

        wait_until(failed, 30, "the delivery to give up")
        delivery = client.get(f"/billing/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
        assert delivery["last_status_code"] == 500 and delivery["last_error"] == "HTTP 500"
        assert delivery["next_attempt_at"] is None
        tried = delivery["attempts"]
        assert tried == len(receiver.attempts[delivery["event_id"]])
        receiver.fail_first = 0
        retried = client.post(
            f"/billing/webhooks/{endpoint['id']}/deliveries/{delivery['id']}/retry"
        )
        assert retried.status_code == 200 and retried.json()["status"] == "pending"
        wait_until(lambda: delivery["event_id"] in receiver.accepted(), 10, "the retried delivery")
        after = client.get(f"/billing/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
        assert after["status"] == "delivered" and after["attempts"] == tried + 1
        missing = client.post(f"/billing/webhooks/{endpoint['id']}/deliveries/{uuid.uuid4()}/retry")
        assert missing.status_code == 404


# -- credit alerts ----------------------------------------------------------------------

# A request of the mock's, 16 tokens generated, its prompt reported as the 10 tokens the proxy
# estimates (the mock itself counts 4): it costs exactly what it reserved, 2.6 cents, so a
# balance of whole requests is spent to 0.
REQUEST_COST = Decimal("0.026")
EXACT_USAGE = {"mock": {"usage_override": {"prompt_tokens": 10, "total_tokens": 26}}}
THRESHOLD = Decimal("0.03")


def _credit_events(db: Database, account_id: uuid.UUID) -> list[str]:
    rows = db.fetch(
        "SELECT type FROM webhook_events WHERE account_id = $1 AND type LIKE 'credits.%'"
        " ORDER BY created_at",
        account_id,
    )
    return [row["type"] for row in rows]


def _credit_alerts_are_told_once_a_grant(url: str, receiver: Receiver, db: Database) -> None:
    """Whole requests drain a prepaid balance: `credits.low` once it is below the threshold,
    `credits.depleted` once it is 0, each once; a purchase re-arms both."""
    receiver.fail_first = 0
    subscribe(url, receiver, ["credits.low", "credits.depleted"])
    account_id, _, key = new_customer(
        url, billing_mode="prepaid", low_balance_threshold_usd=str(THRESHOLD)
    )
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    def spend(requests: int) -> None:
        for _ in range(requests):
            sdk.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, extra_body=EXACT_USAGE
            )

    def told(type_: str) -> list[dict[str, Any]]:
        return [e for e in receiver.events(type_) if e["data"]["account_id"] == str(account_id)]

    with admin(url) as client:
        answer = client.post(
            f"/billing/accounts/{account_id}/credits",
            json={"amount_usd": str(3 * REQUEST_COST), "kind": "grant"},
        )
        assert answer.status_code == 201, answer.text
    spend(1)  # 0.052 left: above the threshold
    spend(1)  # 0.026: below it
    wait_until(lambda: told("credits.low"), 10, "credits.low")
    assert not told("credits.depleted")
    spend(1)  # 0
    drained = time.monotonic()
    wait_until(lambda: told("credits.depleted"), 10, "credits.depleted")
    print(f"\n[credits] depleted told {time.monotonic() - drained:.2f} s after the request")
    with pytest.raises(openai.APIStatusError) as refused:
        spend(1)
    assert refused.value.status_code == 402
    (low,) = told("credits.low")
    assert low["data"] == {
        "account_id": str(account_id),
        "balance_usd": low["data"]["balance_usd"],
        "threshold_usd": low["data"]["threshold_usd"],
    }
    assert Decimal(low["data"]["balance_usd"]) == REQUEST_COST
    assert Decimal(low["data"]["threshold_usd"]) == THRESHOLD
    (depleted,) = told("credits.depleted")
    assert Decimal(depleted["data"]["balance_usd"]) == 0
    assert Decimal(depleted["data"]["threshold_usd"]) == THRESHOLD
    # Another look, a refused request: nothing told again.
    time.sleep(2.5)
    assert _credit_events(db, account_id) == ["credits.low", "credits.depleted"]

    # A purchase of four requests re-arms both: told again on the way down, once each.
    with admin(url) as client:
        answer = client.post(
            f"/billing/accounts/{account_id}/credits",
            json={"amount_usd": str(4 * REQUEST_COST), "kind": "purchase"},
        )
        assert answer.status_code == 201, answer.text
    time.sleep(1.5)  # the grant reaches every worker; nothing is low yet
    assert len(told("credits.low")) == 1
    spend(3)  # 0.026 left
    wait_until(lambda: len(told("credits.low")) == 2, 10, "the second credits.low")
    assert len(told("credits.depleted")) == 1
    spend(1)
    wait_until(lambda: len(told("credits.depleted")) == 2, 10, "the second credits.depleted")
    time.sleep(2.5)
    assert _credit_events(db, account_id) == ["credits.low", "credits.depleted"] * 2
    events = told("credits.low") + told("credits.depleted")
    # Every attempt the receiver saw verified (standardwebhooks) and was answered 204.
    assert len(events) == 4
    assert all(a.verified for tries in receiver.attempts.values() for a in tries)
    assert len({e["timestamp"] for e in events}) == 4


def test_a_prepaid_balance_tells_low_then_depleted_once_and_a_purchase_rearms_them(
    server: Server, receiver: Receiver, database: str
) -> None:
    _credit_alerts_are_told_once_a_grant(server.url, receiver, Database(database))


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_two_workers_sharing_redis_tell_each_credit_alert_once_right_after_the_request(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """Both workers see the balance in Redis and may both notice a crossing; the outbox
    stores it once. The ledger is re-read only every 10 minutes here: the alerts come from
    the settlements themselves."""
    with own_database(postgres_server, template_database) as url, redis_namespace() as shared:
        add_price(Database(url), MODEL, PRICE)
        settings = {**FAST_RETRIES, "METERLINE_BUDGET_RESYNC_S": "600", **shared}
        running = Server(url, upstream, tmp_path / "server", "--workers", "2", **settings)
        running.start(timeout=STARTUP_S)
        try:
            _credit_alerts_are_told_once_a_grant(running.url, receiver, Database(url))
        finally:
            running.stop()


def test_a_quoted_task_expired_at_its_deadline_is_told_as_completed(
    server: Server, receiver: Receiver, database: str
) -> None:
    receiver.fail_first = 0
    subscribe(server.url, receiver, ["task.completed"])
    account_id, _, key = new_customer(server.url)
    with admin(server.url) as client:
        quoted = client.post(
            "/billing/quotes",
            json={
                "account_id": str(account_id),
                "task_type": "webhooks",
                "model": MODEL,
                "prompt_tokens": 100,
                "max_completion_tokens": 100,
            },
        )
        assert quoted.status_code == 201, quoted.text
        accepted = client.post(
            f"/billing/quotes/{quoted.json()['id']}/accept", json={"task_id": "lapsing"}
        )
        assert accepted.status_code == 201, accepted.text
    sdk = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        extra_headers={"X-Task-Id": "lapsing"},
    )
    db = Database(database)
    wait_until(
        lambda: db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id),
        10,
        "the task's ledger row",
    )
    # Its deadline (a week after acceptance by default) brought to the past.
    db.execute(
        "UPDATE tasks SET expires_at = now() - interval '1 second'"
        " WHERE account_id = $1 AND external_id = 'lapsing'",
        account_id,
    )

    def told() -> list[dict[str, Any]]:
        return [
            e
            for e in receiver.events("task.completed")
            if e["data"]["account_id"] == str(account_id)
        ]

    wait_until(told, 15, "task.completed of the expired task")
    with admin(server.url) as client:
        task = client.get("/billing/tasks/lapsing", params={"account_id": str(account_id)}).json()
    (event,) = told()
    assert task["status"] == "expired" and task["billed_as"] == "fixed_price"
    assert event["data"] == {name: task[name] for name in event["data"]}
    assert event["data"]["status"] == "expired"
    assert Decimal(event["data"]["fixed_price_usd"]) == Decimal(quoted.json()["price_usd"])
    assert event["data"]["requests"] == 1
    # The job's later rounds close nothing more: told once.
    time.sleep(1.5)
    assert (
        db.fetchval(
            "SELECT count(*) FROM webhook_events WHERE account_id = $1 AND type = 'task.completed'",
            account_id,
        )
        == 1
    )


# -- killed in the middle --------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_event_is_lost_when_meterline_is_killed_mid_delivery(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    receiver: Receiver,
    tmp_path: Path,
    workers: str,
) -> None:
    """With two workers, both senders claim from the same outbox (SKIP LOCKED)."""
    with own_database(postgres_server, template_database) as url:
        db = Database(url)
        # Retries after 0.5, 1 and 2 s: no event is accepted sooner than 3.5 s after it was raised.
        settings = {**FAST_RETRIES, "METERLINE_WEBHOOK_RETRY_BASE_S": "0.5"}
        first = Server(url, upstream, tmp_path / "server", "--workers", workers, **settings)
        first.start(timeout=STARTUP_S)
        try:
            subscribe(first.url, receiver, ["invoice.finalized", "invoice.voided"])
            accounts = [new_customer(first.url)[0] for _ in range(12)]
            with admin(first.url) as client:
                invoices = [finalized_invoice(client, a) for a in accounts[:6]]
            # Killed as soon as the sixth is raised: its event (at least) not yet delivered.
            first.kill()
            accepted_at_kill = len(receiver.accepted())
            assert accepted_at_kill < 6
            attempts_at_kill = sum(len(t) for t in receiver.attempts.values())
            # While it is down, nothing is sent; the outbox holds everything.
            time.sleep(0.5)
            assert sum(len(t) for t in receiver.attempts.values()) == attempts_at_kill
            first.start(timeout=STARTUP_S)  # the same database, a new process
            with admin(first.url) as client:
                invoices += [finalized_invoice(client, a) for a in accounts[6:]]
                for invoice in invoices[:4]:
                    voided = client.post(
                        f"/billing/invoices/{invoice['id']}/void", json={"reason": "test"}
                    )
                    assert voided.status_code == 200, voided.text
            raised = {
                f"evt_{row['id'].hex}": row["type"]
                for row in db.fetch("SELECT id, type FROM webhook_events")
            }
            assert sorted(raised.values()).count("invoice.finalized") == 12
            assert sorted(raised.values()).count("invoice.voided") == 4
            # Leases of the attempts cut by the kill run out (2 s timeout + 5 s) first.
            wait_until(lambda: set(receiver.accepted()) == set(raised), 60, "every event")
        finally:
            first.stop()
    for message_id, tries in receiver.attempts.items():
        assert len(tries) >= 4, message_id  # three refused, then accepted (or cut, then again)
        assert {t.headers["webhook-id"] for t in tries} == {message_id}
        assert len({t.body for t in tries}) == 1
    finalized = {e["data"]["invoice_id"] for e in receiver.events("invoice.finalized")}
    assert finalized == {i["id"] for i in invoices}
    void_events = receiver.events("invoice.voided")
    assert {e["data"]["invoice_id"] for e in void_events} == {i["id"] for i in invoices[:4]}
    assert all(e["data"]["status"] == "void" for e in void_events)
    number = {
        e["data"]["invoice_id"]: e["data"]["number"] for e in receiver.events("invoice.finalized")
    }
    assert number == {i["id"]: i["number"] for i in invoices}


def test_redirects_are_not_followed_and_a_slow_receiver_times_out(
    server: Server, receiver: Receiver
) -> None:
    receiver.fail_first = 0
    base = receiver.url.removesuffix("/hooks")
    with admin(server.url) as client:
        endpoints = {}
        for path in ("/redirect", "/slow"):
            created = client.post(
                "/billing/webhooks", json={"url": base + path, "events": ["invoice.finalized"]}
            )
            assert created.status_code == 201
            endpoints[path] = created.json()
        receiver.secret = endpoints["/slow"]["secret"]
        account_id, _, _ = new_customer(server.url)
        finalized_invoice(client, account_id)

        def last(path: str) -> dict[str, Any]:
            rows = client.get(f"/billing/webhooks/{endpoints[path]['id']}/deliveries").json()
            return dict(rows["data"][0]) if rows["data"] else {}

        wait_until(lambda: last("/redirect").get("attempts", 0) >= 2, 20, "redirected attempts")
        wait_until(lambda: last("/slow").get("attempts", 0) >= 1, 20, "a slow attempt")
        wait_until(lambda: last("/slow").get("last_error") is not None, 20, "the timeout")
        redirected, slow = last("/redirect"), last("/slow")
    assert redirected["last_status_code"] == 307 and redirected["status"] != "delivered"
    assert "redirects are not followed" in redirected["last_error"]
    assert slow["last_error"] == "timed out" and slow["status"] != "delivered"

    # The redirect's target never heard of the event; the slow receiver did, too late.
    def paths() -> set[str]:
        with receiver.lock:
            return {a.path for a in receiver.attempts[redirected["event_id"]]}

    wait_until(lambda: "/slow" in paths(), 10, "the slow receiver to finish")
    assert paths() == {"/slow"}

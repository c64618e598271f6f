"""The web console as people use it: in a real headless Chromium (Debian's `chromium`, driven
by Playwright), against `meterline serve` on a database of this module's own, with usage sent
through the official `openai` SDK. Screenshots of the main pages at a desktop and a phone
size are saved under `tests/artifacts/console/` (the run prints the folder).

The tests without a browser (sign-in answers, sessions ending, CSRF) use plain HTTP.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pypdf import PdfReader

from service.console.endpoints import PAGE
from tests.conftest import (
    ADMIN_TOKEN,
    Meterline,
    Upstream,
    _clone,
    _with_database,
    start_meterline,
)
from tests.support import ROOT, Database
from tests.usage_rows import insert_usage, usage_row

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
ISSUER = "Console Test Billing GmbH"
MODEL = "mock-console-chat"


@pytest.fixture(scope="module")
def server(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Meterline]:
    """`meterline serve` on a database of its own (the tests add prices: global state)."""
    admin, name = _clone(postgres_server, template_database)
    url = _with_database(postgres_server, name)
    try:
        with start_meterline(
            url,
            upstream,
            tmp_path_factory.mktemp("console"),
            METERLINE_INVOICE_ISSUER_NAME=ISSUER,
            METERLINE_INVOICE_ISSUER_ADDRESS='["Hauptstrasse 1", "10115 Berlin"]',
            METERLINE_INVOICE_ISSUER_TAX_ID="DE123456789",
            # The daily rollup folds rows within the tests, so pages read it and the ledger.
            METERLINE_USAGE_ROLLUP_INTERVAL_S="1",
            # Webhook endpoints on this host (refused otherwise): the deliveries are real.
            METERLINE_WEBHOOKS_ALLOW_PRIVATE="true",
        ) as meterline:
            yield meterline
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db(server: Meterline) -> Database:
    return Database(server.database_url)


# -- a browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history(server: Meterline, db: Database) -> dict[str, Any]:
    """An account with two keys and a month of varied usage up to now, a few errors in it."""
    account = server.new_account(name="Northwind Traders", monthly_budget_usd="400")
    with server.admin() as api:
        for name in ("web", "batch"):
            api.post(f"/billing/accounts/{account['id']}/keys", json={"name": name})
        keys = [k["id"] for k in api.get(f"/billing/accounts/{account['id']}/keys").json()["data"]]
    models = {
        "meta-llama/Llama-3.3-70B-Instruct": "0.000000400",
        "deepseek-ai/DeepSeek-V3": "0.000001250",
        "Qwen/Qwen2.5-72B-Instruct": "0.000000400",
    }
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    rows = []
    for day in range(30):
        for i in range(8 + (day * 7) % 23):
            model, rate = list(models.items())[i % 3]
            prompt, completion = 800 + 97 * ((day + i) % 13), 150 + 41 * (i % 7)
            status = 502 if (day + i) % 37 == 0 else 429 if (day * i) % 53 == 5 else 200
            # Within the UTC day `day` days back and before now, at any hour the test runs:
            # just after midnight, an hour back would be the day before.
            at = midnight - timedelta(days=day) + (now - midnight) * (60 - i) / 64
            rows.append(
                usage_row(
                    str(account["id"]),
                    at,
                    model=model,
                    key_id=keys[i % 2],
                    prompt=prompt,
                    completion=completion if status == 200 else 0,
                    cost=str(Decimal(rate) * (prompt + completion) * 40),
                    status=status,
                )
            )
    insert_usage(db, *rows)
    return {"account": account, "start": (now - timedelta(days=29)).date()}


@pytest.fixture(scope="module")
def browser(
    server: Meterline, two_customers: dict[str, Any], history: dict[str, Any]
) -> Iterator[Any]:
    """Chromium for the module. Playwright's sync API keeps an event loop running while it
    is open, so everything set up with `asyncio.run` (databases, rows) comes before it."""
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if __import__("os").environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots and downloads: {ARTIFACTS}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def signed_in(browser: Any, server: Meterline, credential: str, size: str = "desktop") -> Any:
    """A new browser context (its own cookies) signed in with `credential`; its page."""
    width, height = SIZES[size]
    context = browser.new_context(
        viewport={"width": width, "height": height}, accept_downloads=True
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.url}/console")
    assert page.url.startswith(f"{server.url}/console/sign-in")
    page.fill("input[name=credential]", credential)
    page.click("form[action='/console/sign-in'] button[type=submit]")
    page.wait_for_url(f"{server.url}/console")
    page.console_errors = errors
    return page


def screenshot(page: Any, name: str) -> None:
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def chart_drawn(page: Any, selector: str) -> dict[str, Any]:
    """What the chart drew: points, non-zero points, and whether its canvas has ink."""
    page.wait_for_selector(f"{selector}[data-drawn] canvas")
    result: dict[str, Any] = page.eval_on_selector(
        selector,
        """el => {
            const canvas = el.querySelector("canvas");
            const context = canvas.getContext("2d");
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let ink = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) ink++;
            return {points: Number(el.dataset.drawn), nonzero: Number(el.dataset.nonzero), ink};
        }""",
    )
    return result


def bars_drawn(page: Any, selector: str) -> dict[str, Any]:
    """What a chart drawn on the server shows: its days, the days with spend, and the bars
    laid out with a height on the page."""
    result: dict[str, Any] = page.eval_on_selector(
        selector,
        """el => ({
            points: Number(el.dataset.drawn),
            nonzero: Number(el.dataset.nonzero),
            bars: [...el.querySelectorAll("rect")].filter(
                r => r.getBoundingClientRect().height > 0).length,
        })""",
    )
    return result


def amount_text(value: str) -> str:
    """An API decimal as the console and the PDF print it (thousands separated, cents)."""
    amount = Decimal(value)
    return f"{amount:,.2f}"


# -- the operator's day -------------------------------------------------------------------


@pytest.mark.browser
def test_operator_signs_in_creates_an_account_and_a_key_and_sees_its_usage(
    browser: Any, server: Meterline, history: dict[str, Any]
) -> None:
    page = signed_in(browser, server, ADMIN_TOKEN)

    # A price for the model first, through the console, so the usage is priced.
    page.goto(f"{server.url}/console/prices")
    form = page.locator("#new-price")
    form.locator("input[name=model]").fill(MODEL)
    form.locator("input[name=input_usd_per_mtok]").fill("250")
    form.locator("input[name=output_usd_per_mtok]").fill("1000")
    form.locator("input[name=effective_from]").fill("2020-01-01T00:00:00Z")
    form.locator("button[type=submit]").click()
    page.wait_for_selector(f"#prices td:has-text('{MODEL}')")

    name = f"Acme Analytics {secrets.token_hex(3)}"
    page.goto(f"{server.url}/console/accounts")
    page.fill("#new-account input[name=name]", name)
    page.select_option("#new-account select[name=tier]", "pro")
    page.fill("#new-account input[name=monthly_budget_usd]", "250")
    page.click("#new-account button[type=submit]")
    page.wait_for_selector(f"h1:has-text('{name}')")
    account_id = page.url.rsplit("/", 1)[-1]

    page.fill("#new-key-form input[name=name]", "production")
    page.click("#new-key-form button[type=submit]")
    key = page.inner_text("#new-key-value").strip()
    assert key.startswith("ml-")
    page.reload()  # shown once: a fresh page has only its prefix
    assert key not in page.content()

    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    for i in range(6):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Summarise ticket {i} in a sentence."}],
            max_tokens=40,
        )

    # Every row in the ledger (the writer batches), then the overview: the month's figures
    # for every account, the chart drawn with the usage.
    def all_recorded() -> bool:
        with server.admin() as api:
            totals = api.get("/billing/usage", params={"account_id": account_id}).json()
        return bool(totals["data"][0]["requests"] == 6)

    assert _eventually(all_recorded), "the requests never reached the ledger"
    page.goto(f"{server.url}/console")
    assert name in page.inner_text("main")
    drawn = bars_drawn(page, "#daily-chart")
    assert drawn["points"] >= 1 and drawn["nonzero"] >= 1, drawn
    assert drawn["bars"] == drawn["nonzero"], drawn  # each day with spend has its bar
    assert not page.console_errors, page.console_errors
    for size in SIZES:
        page.set_viewport_size(dict(zip(("width", "height"), SIZES[size], strict=True)))
        screenshot(page, f"overview-{size}")

    # The usage explorer over a month of an account's history, by day and by model.
    page.set_viewport_size({"width": 1280, "height": 800})
    northwind = history["account"]["id"]
    page.goto(f"{server.url}/console/usage?account_id={northwind}&start={history['start']}")
    assert chart_drawn(page, "#usage-chart")["points"] == 30
    for size in SIZES:
        page.set_viewport_size(dict(zip(("width", "height"), SIZES[size], strict=True)))
        screenshot(page, f"usage-{size}")
    page.goto(
        f"{server.url}/console/usage?account_id={northwind}&start={history['start']}&group=model"
    )
    assert page.locator("#usage-table tbody tr").count() == 3
    screenshot(page, "usage-by-model-phone")

    # This account's usage and its CSV: the same figures as the API's.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"{server.url}/console/usage?account_id={account_id}&group=day")
    chart_drawn(page, "#usage-chart")
    with page.expect_download() as download:
        page.click("#usage-csv")
    path = ARTIFACTS / "usage.csv"
    download.value.save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    today = datetime.now(UTC).date()
    # Named by the range the page showed: this month so far.
    assert download.value.suggested_filename == (
        f"meterline-usage-{today.replace(day=1)}-{today}-by-day.csv"
    )
    with server.admin() as api:
        expected = api.get(
            "/billing/usage",
            params={
                "account_id": account_id,
                "group_by": "day",
                "start": f"{today.replace(day=1)}T00:00:00Z",
                "end": f"{today + timedelta(days=1)}T00:00:00Z",
            },
        ).json()["data"]
    assert [(r["day"], r["requests"], r["cost_usd"]) for r in rows] == [
        (e["day"], str(e["requests"]), e["cost_usd"]) for e in expected
    ]
    assert int(rows[-1]["requests"]) == 6 and Decimal(rows[-1]["cost_usd"]) > 0

    # This month's draft invoice, from the console; its PDF matches the API's JSON.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"{server.url}/console/invoices")
    page.select_option("#new-invoice select[name=account_id]", account_id)
    page.click("#new-invoice button[type=submit]")
    page.wait_for_selector("#invoice-lines")
    invoice_id = page.url.rsplit("/", 1)[-1]
    for size in SIZES:
        page.set_viewport_size(dict(zip(("width", "height"), SIZES[size], strict=True)))
        screenshot(page, f"invoice-{size}")
    with page.expect_download() as download:
        page.click("#invoice-pdf")
    pdf = ARTIFACTS / "invoice.pdf"
    download.value.save_as(pdf)
    with server.admin() as api:
        invoice = api.get(f"/billing/invoices/{invoice_id}").json()
    text = pdf_text(pdf)
    assert invoice["lines"] and Decimal(invoice["total_usd"]) > 0
    for line in invoice["lines"]:
        assert amount_text(line["amount_usd"]) in text
    assert f"Total (USD) {amount_text(invoice['total_usd'])}" in text
    assert "DRAFT INVOICE" in text and ISSUER in text and name in text
    page.context.close()


def pdf_text(path: Path) -> str:
    text = "\n".join(p.extract_text() for p in PdfReader(path).pages)
    return re.sub(r"[ \t]+", " ", text)


def _eventually(check: Any, seconds: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


# -- a customer sees its own account only -------------------------------------------------


@pytest.fixture(scope="module")
def two_customers(server: Meterline, db: Database) -> dict[str, Any]:
    """Two accounts with a key each, usage last month, and an invoice each."""
    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).replace(hour=12)
    period = f"{last_month:%Y-%m}"
    out: dict[str, Any] = {"period": period}
    with server.admin() as api:
        for label in ("mine", "theirs"):
            account = server.new_account(name=f"Customer {label} {secrets.token_hex(2)}")
            key = server.new_key(account["id"], name=label)
            insert_usage(
                db,
                *(
                    usage_row(str(account["id"]), last_month - timedelta(days=d), cost="0.01234")
                    for d in range(3)
                ),
            )
            invoice = api.post(
                "/billing/invoices", json={"account_id": account["id"], "period": period}
            ).json()
            out[label] = {"account": account, "key": key, "invoice": invoice}
    return out


@pytest.mark.browser
def test_a_customer_key_sees_only_its_own_account(
    browser: Any, server: Meterline, two_customers: dict[str, Any]
) -> None:
    mine, theirs = two_customers["mine"], two_customers["theirs"]
    page = signed_in(browser, server, mine["key"])
    main = page.inner_text("main")
    assert mine["account"]["name"] in main and theirs["account"]["name"] not in main
    nav = page.inner_text("nav.tabs")
    assert "Accounts" not in nav.split() and "Account" in nav.split()

    page.goto(f"{server.url}/console/invoices")
    listed = page.inner_text("#invoice-list")
    assert mine["invoice"]["total_usd"] in listed
    assert page.locator("#invoice-list tbody tr").count() == 1

    for path in (
        f"/console/invoices/{theirs['invoice']['id']}",
        f"/console/invoices/{theirs['invoice']['id']}/pdf",
        f"/console/accounts/{theirs['account']['id']}",
        f"/console/usage?account_id={theirs['account']['id']}",
        "/console/accounts",
    ):
        response = page.request.get(f"{server.url}{path}")
        assert response.status == 404, path
    response = page.goto(f"{server.url}/console/invoices/{theirs['invoice']['id']}")
    assert response is not None and response.status == 404
    assert "Not found" in page.inner_text("main")
    own = page.request.get(f"{server.url}/console/invoices/{mine['invoice']['id']}/pdf")
    assert own.status == 200 and own.body().startswith(b"%PDF")
    page.context.close()


@pytest.mark.browser
def test_a_form_posted_without_its_csrf_token_is_refused(browser: Any, server: Meterline) -> None:
    page = signed_in(browser, server, ADMIN_TOKEN)
    name = f"csrf probe {secrets.token_hex(3)}"
    page.goto(f"{server.url}/console/accounts")
    # The browser's own form, with its token removed, as a forged page would post it.
    page.eval_on_selector("#new-account input[name=csrf_token]", "el => el.remove()")
    page.fill("#new-account input[name=name]", name)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("#new-account button[type=submit]")
    assert posted.value.status == 403
    assert "did not come from the console" in page.inner_text("main")
    wrong = page.request.post(
        f"{server.url}/console/accounts",
        form={"name": name, "csrf_token": "not-the-token"},
    )
    assert wrong.status == 403
    with server.admin() as api:
        names = [a["name"] for a in api.get("/billing/accounts?limit=200").json()["data"]]
    assert name not in names
    page.context.close()


@pytest.mark.browser
def test_api_docs_render_with_the_network_blocked(browser: Any, server: Meterline) -> None:
    context = browser.new_context()
    blocked: list[str] = []

    def only_this_host(route: Any) -> None:
        host = httpx.URL(route.request.url).host
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_host)
    page = context.new_page()
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/billing/invoices/{invoice_id}/pdf" in p for p in paths)
    screenshot(page, "docs-desktop")
    page.goto(f"{server.url}/redoc")
    page.wait_for_selector("h1:has-text('Meterline')", timeout=20_000)
    page.wait_for_selector("[role=menuitem] >> text=invoices", timeout=20_000)
    assert blocked == [], blocked
    context.close()


# -- rate cards, credits, credit notes and webhooks ---------------------------------------


def submit(page: Any, form: str, **fields: str) -> Any:
    """Fill a form's text fields and selects by name, submit it; the answer to its POST."""
    for name, value in fields.items():
        field = page.locator(f"{form} [name={name}]")
        if field.evaluate("el => el.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click(f"{form} button[type=submit]")
    page.wait_for_load_state()
    return posted.value


@pytest.mark.browser
def test_operator_prices_an_account_by_a_rate_card_credits_it_and_subscribes_a_webhook(
    browser: Any, server: Meterline
) -> None:
    page = signed_in(browser, server, ADMIN_TOKEN)
    page.on("dialog", lambda dialog: dialog.accept())  # the destructive forms ask first

    # A webhook endpoint, its secret shown once; it receives the credit note raised below.
    page.goto(f"{server.url}/console/webhooks")
    page.fill("#new-webhook-form input[name=url]", "http://127.0.0.1:9/meterline")
    page.check("#new-webhook-form input[value='credit_note.created']")
    submit(page, "#new-webhook-form", description="finance")
    secret = page.inner_text("#new-webhook-secret").strip()
    assert secret.startswith("whsec_")
    page.goto(f"{server.url}/console/webhooks")
    assert secret not in page.content()
    assert "http://127.0.0.1:9/meterline" in page.inner_text("#webhook-list")
    hook_row = "#webhook-list tr:has-text('127.0.0.1:9')"
    # Edited on its own page, as the API's PATCH edits it: every field, the switch included.
    page.click(f"{hook_row} a")
    hook_id = page.url.rsplit("/", 1)[-1]
    page.check("#edit-webhook-form input[value='task.completed']")
    page.uncheck("#edit-webhook-form input[name=enabled]")
    edited = submit(
        page, "#edit-webhook-form", url="http://127.0.0.1:9/meterline/v2", description=""
    )
    assert edited.status == 303
    with server.admin() as api:
        hook = api.get(f"/billing/webhooks/{hook_id}").json()
    assert hook["url"] == "http://127.0.0.1:9/meterline/v2" and hook["description"] is None
    assert sorted(hook["events"]) == ["credit_note.created", "task.completed"]
    assert hook["enabled"] is False
    assert page.is_checked("#edit-webhook-form input[value='task.completed']")
    assert not page.is_checked("#edit-webhook-form input[name=enabled]")
    screenshot(page, "webhook-desktop")
    page.goto(f"{server.url}/console/webhooks")
    for action, state in (("Enable", "yes"), ("Disable", "no"), ("Enable", "yes")):
        with page.expect_response(lambda r: r.request.method == "POST"):
            page.click(f"{hook_row} button:has-text('{action}')")
        page.wait_for_selector(f"{hook_row} td:nth-child(3):text-is('{state}')")

    # A rate card with explicit rates, then a later version of it.
    name = f"resellers {secrets.token_hex(3)}"
    page.goto(f"{server.url}/console/rate-cards")
    submit(
        page,
        "#new-rate-card",
        name=name,
        markup_pct="25",
        effective_from="2020-01-01",
        rates=f"{MODEL} 100 200\n",
    )
    page.wait_for_selector("#rate-card-versions")
    card_id = int(page.url.rsplit("/", 1)[-1])
    assert f"{MODEL} 100 / 200 / —" in page.inner_text("#rate-card-versions")
    submit(page, "#new-rate-card-version", markup_pct="10", effective_from="2999-01-01")
    assert page.locator("#rate-card-versions tbody tr").count() == 2
    page.goto(f"{server.url}/console/rate-cards")
    row = page.inner_text(f"#rate-card-list tr:has-text('{name}')")
    assert "25 %" in row and "10 %" not in row  # the terms in force now, not the future ones

    # A prepaid account, assigned the card, given credit: its balance as the API states it.
    customer = f"Prepaid Partners {secrets.token_hex(3)}"
    page.goto(f"{server.url}/console/accounts")
    submit(page, "#new-account", name=customer, billing_mode="prepaid")
    account_id = page.url.rsplit("/", 1)[-1]
    submit(page, "#assign-rate-card", rate_card_id=str(card_id), effective_from="2020-06-01")
    assert page.inner_text("#rate-card-now") == name
    submit(
        page, "#new-credit", amount_usd="20", kind="purchase", expires_at="2999-01-01", priority="2"
    )
    submit(page, "#new-credit", amount_usd="5.50", kind="grant", reference="goodwill")
    assert page.locator("#grants tbody tr").count() == 2
    with page.expect_response(lambda r: r.request.method == "POST"):
        page.click("#grants tr:has-text('goodwill') button:has-text('Void')")
    page.wait_for_selector("#grants tr:has-text('goodwill') .status-voided")
    with server.admin() as api:
        account = api.get(f"/billing/accounts/{account_id}").json()
        balance = api.get(f"/billing/accounts/{account_id}/balance").json()
    assert account["rate_card_id"] == card_id and account["billing_mode"] == "prepaid"
    assert Decimal(balance["balance_usd"]) == Decimal(20)
    figures = page.inner_text("#balance")
    assert figures.count("$20.00") == 2, figures  # balance and available; nothing reserved
    kinds = page.locator("#credit-transactions tbody td:nth-child(2)").all_inner_texts()
    assert sorted(kinds) == ["grant", "grant", "void"]
    screenshot(page, "account-credits-desktop")

    # A finalized invoice of last month, an adjustment on it, then a credit note against it.
    billed = server.new_account(name=f"Credited {secrets.token_hex(3)}")
    last_month = datetime.now(UTC).replace(day=1) - timedelta(days=1)
    page.goto(f"{server.url}/console/accounts/{billed['id']}")
    submit(
        page,
        "#new-adjustment",
        amount_usd="30",
        reason="Onboarding workshop",
        occurred_at=f"{last_month:%Y-%m-%d}",
    )
    page.goto(f"{server.url}/console/invoices")
    submit(page, "#new-invoice", account_id=str(billed["id"]), period=f"{last_month:%Y-%m}")
    assert "30.00" in page.inner_text("#invoice-lines tr.adjustment")
    assert "Onboarding workshop" in page.inner_text("#adjustment-list")
    with page.expect_response(lambda r: r.request.method == "POST"):
        page.click("form[action$='/finalize'] button[type=submit]")
    page.wait_for_selector("#new-credit-note")
    token = page.input_value("#new-credit-note input[name=csrf_token]")
    too_much = page.request.post(
        f"{page.url}/credit-notes",
        form={"amount_usd": "31", "reason": "goodwill", "csrf_token": token},
    )
    assert too_much.status == 409 and "30.00 USD left" in too_much.text()
    submit(page, "#new-credit-note", amount_usd="12.50", reason="Workshop shortened")
    assert "Workshop shortened" in page.inner_text("#credit-note-list")
    assert page.inner_text("#amount-due") == "17.50"
    with page.expect_download() as download:
        page.click("#invoice-pdf")
    text = pdf_text(Path(download.value.path()))
    assert "CN-" in text and "12.50" in text and "17.50" in text

    # The credit note's event reached the endpoint's deliveries; a retry keeps it going.
    page.goto(f"{server.url}/console/webhooks")
    page.click("#webhook-list a:has-text('127.0.0.1:9')")
    page.wait_for_selector("#deliveries td:has-text('credit_note.created')")
    with page.expect_response(lambda r: r.request.method == "POST") as retried:
        page.click("#deliveries button:has-text('Retry now')")
    assert retried.value.status == 303
    page.wait_for_selector("#deliveries")
    assert not page.console_errors, page.console_errors
    page.context.close()

    # The account's customer reads its own balance and transactions, and no operator page.
    key = server.new_key(account_id, name="customer")
    page = signed_in(browser, server, key)
    assert "Credit available $20.00" in " ".join(page.inner_text("section.kpis").split())
    page.goto(f"{server.url}/console/account")
    assert page.inner_text("#balance").count("$20.00") == 2
    assert page.locator("#credit-transactions tbody tr").count() == 3
    assert page.locator("#new-credit, #assign-rate-card, #grants button").count() == 0
    assert name not in page.content()  # the operator's terms are not the customer's
    assert "Webhooks" not in page.inner_text("nav.tabs")
    for path in ("/console/webhooks", "/console/rate-cards", f"/console/rate-cards/{card_id}"):
        assert page.request.get(f"{server.url}{path}").status == 404, path
    page.context.close()


def _paged_through(page: Any, url: str, rows: str, pager: str) -> list[str]:
    """Every row's text over all of a list's pages, following its next-page link."""
    page.goto(url)
    seen: list[str] = []
    for _ in range(20):
        shown = page.locator(rows).all_inner_texts()
        assert len(shown) <= PAGE, (url, len(shown))  # a page, never the whole list
        seen += shown
        following = page.locator(pager)
        if following.count() == 0:
            return seen
        following.click()
        page.wait_for_load_state()
    raise AssertionError(f"{url} has no last page")


@pytest.mark.browser
def test_webhook_and_key_lists_are_read_a_page_at_a_time(browser: Any, server: Meterline) -> None:
    # One more row than a page holds, of each list that grows without bound.
    tag = secrets.token_hex(3)
    account = server.new_account(name=f"Many keys {tag}")
    with server.admin() as api:
        for i in range(PAGE + 1):
            created = api.post(
                "/billing/webhooks",
                json={"url": f"http://127.0.0.1:9/{tag}/{i}", "events": ["task.completed"]},
            )
            assert created.status_code == 201, created.text
    for i in range(PAGE + 1):
        server.new_key(account["id"], name=f"key-{i}")
    page = signed_in(browser, server, ADMIN_TOKEN)

    hooks = _paged_through(
        page, f"{server.url}/console/webhooks", "#webhook-list tbody tr", "p.pager a"
    )
    mine = [h for h in hooks if f"/{tag}/" in h]
    assert sorted(mine) == sorted(set(mine)) and len(mine) == PAGE + 1, hooks

    listed = _paged_through(
        page,
        f"{server.url}/console/accounts/{account['id']}",
        "#keys tbody tr",
        "a:has-text('Next keys')",
    )
    names = sorted(re.findall(r"key-\d+", " ".join(listed)))
    assert names == sorted(f"key-{i}" for i in range(PAGE + 1)), listed
    assert not page.console_errors, page.console_errors
    page.context.close()


# -- sign-in and sessions, over plain HTTP ------------------------------------------------


def _sign_in(server: Meterline, credential: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=server.url, timeout=30)
    form = client.get("/console/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    response = client.post(
        "/console/sign-in", data={"credential": credential, "csrf_token": token.group(1)}
    )
    return client, response


def test_a_wrong_credential_answers_the_same_whether_or_not_the_account_exists(
    server: Meterline,
) -> None:
    account_id, key = server.customer()
    with server.admin() as api:
        key_id = api.get(f"/billing/accounts/{account_id}/keys").json()["data"][0]["id"]
        api.delete(f"/billing/keys/{key_id}").raise_for_status()
    answers = []
    for credential in (
        "ml-" + secrets.token_urlsafe(32),  # no such key
        key,  # a real account's key, revoked
        ADMIN_TOKEN + "x",  # not the admin token
        "",
    ):
        client, response = _sign_in(server, credential)
        body = re.sub(r'value="[^"]+"', "", response.text)  # the form's fresh token
        answers.append((response.status_code, body))
        assert "meterline_console=" not in response.headers.get("set-cookie", "")
        client.close()
    assert answers[0][0] == 401
    assert all(answer == answers[0] for answer in answers), "the answers differ"


def test_sessions_are_http_only_strict_cookies_that_end_with_sign_out_or_their_key(
    server: Meterline,
) -> None:
    account_id, key = server.customer()
    client, response = _sign_in(server, key)
    assert response.status_code == 303
    cookie = next(c for c in response.headers.get_list("set-cookie") if "meterline_console=" in c)
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert client.get("/console").status_code == 200

    # Sign-out needs the CSRF token too, and then the cookie no longer works.
    page = client.get("/console").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    assert client.post("/console/sign-out", data={}).status_code == 403
    stale = dict(client.cookies)  # the session cookie as it was before signing out
    assert "meterline_console" in stale
    assert client.post("/console/sign-out", data={"csrf_token": token.group(1)}).status_code == 303
    client.cookies.clear()
    client.cookies.update(stale)  # replayed after sign-out, it opens nothing
    again = client.get("/console")
    assert again.status_code == 303 and "/console/sign-in" in again.headers["location"]
    client.close()

    # A session of a key that is then revoked stops at once.
    client, _ = _sign_in(server, key)
    assert client.get("/console/account").status_code == 200
    with server.admin() as api:
        key_id = api.get(f"/billing/accounts/{account_id}/keys").json()["data"][0]["id"]
        api.delete(f"/billing/keys/{key_id}").raise_for_status()
    after = client.get("/console/account")
    assert after.status_code == 303 and "/console/sign-in" in after.headers["location"]
    client.close()


def test_the_root_leads_to_the_console_and_pages_are_not_cached_or_framed(
    server: Meterline,
) -> None:
    root = httpx.get(f"{server.url}/")
    assert root.status_code == 307 and root.headers["location"] == "/console"
    client, _ = _sign_in(server, ADMIN_TOKEN)
    response = client.get("/console")
    assert response.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    client.close()


def test_the_overview_names_its_files_by_content_and_browsers_keep_them(
    server: Meterline,
) -> None:
    """A page's next view asks for none of its files again: each is linked by a URL that
    carries its content's hash, served as immutable for a year."""
    client, _ = _sign_in(server, ADMIN_TOKEN)
    page = client.get("/console").text
    # No file at all: the chart is drawn on the server, the page has nothing for a script
    # to do, and the style sheet is in the page, admitted by the policy by its hash.
    assert re.findall(r'(?:href|src)="(/console/static/[^"]+)"', page) == []
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    policy = client.get("/console").headers["content-security-policy"]
    assert f"style-src 'self' 'sha256-{digest}'" in policy
    # A page with forms to confirm has its script, linked by its content's hash.
    files = re.findall(
        r'(?:href|src)="(/console/static/[^"]+)"', client.get("/console/webhooks").text
    )
    assert len(files) == 1, files
    for url in files:
        path, _, version = url.partition("?v=")
        served = client.get(url)
        assert served.status_code == 200
        assert version == hashlib.sha256(served.content).hexdigest()[:12], url
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
        # Unversioned, the same file is revalidated as before (the API docs link them so).
        assert "cache-control" not in client.get(path).headers
    client.close()


def _overview_figures(client: httpx.Client) -> tuple[int, Decimal]:
    """The overview's requests and exact spend, as its figures' titles carry them."""
    page = client.get("/console").text
    requests = re.search(r'Requests</div>\s*<div class="kpi-value" title="([\d,]+)"', page)
    spend = re.search(r'title="exact: (-?[\d.]+)"', page)
    assert requests is not None and spend is not None, re.findall(r'title="exact[^"]*"', page)
    return int(requests.group(1).replace(",", "")), Decimal(spend.group(1))


def test_the_overview_counts_every_row_whether_folded_or_not(server: Meterline) -> None:
    """The server holds the rollup it read and adds the ledger rows recorded since: each
    reload shows the API's figures while the rollup job (every second here) folds rows in
    between. Usage through the proxy, with the `openai` SDK."""
    account_id, key = server.customer(name=f"Reloads {secrets.token_hex(3)}")
    client, _ = _sign_in(server, key)
    assert _overview_figures(client) == (0, Decimal(0))
    sdk = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)

    def api_figures() -> tuple[int, Decimal]:
        with server.admin() as api:
            totals = api.get("/billing/usage", params={"account_id": str(account_id)}).json()
        return int(totals["data"][0]["requests"]), Decimal(totals["data"][0]["cost_usd"])

    for n in range(1, 5):
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Reload {n}"}], max_tokens=20
        )
        reached = _eventually(lambda n=n: api_figures()[0] == n)
        assert reached, "the request never reached the ledger"
        expected = api_figures()
        assert _overview_figures(client) == expected
        time.sleep(1.5)  # a fold between reads
        assert _overview_figures(client) == expected
    client.close()


def test_the_console_asks_the_same_services_as_the_api(server: Meterline) -> None:
    """An operator-only page is a 404 for a customer, as the API's admin-only resources are."""
    _, key = server.customer()
    client, _ = _sign_in(server, key)
    for path in ("/console/accounts", f"/console/accounts/{uuid.uuid4()}"):
        assert client.get(path).status_code == 404
    client.close()


def _form_token(client: httpx.Client, path: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert token is not None
    return token.group(1)


def test_bad_input_on_the_billing_forms_is_a_clear_page_never_a_500(
    server: Meterline, two_customers: dict[str, Any]
) -> None:
    account = server.new_account(name=f"Bad input {secrets.token_hex(3)}")
    draft = two_customers["mine"]["invoice"]["id"]
    client, _ = _sign_in(server, ADMIN_TOKEN)
    token = _form_token(client, "/console/rate-cards")
    posts: list[tuple[str, dict[str, Any], int, str]] = [
        ("/console/rate-cards", {"name": ""}, 422, "name"),
        ("/console/rate-cards", {"name": "x", "markup_pct": "ten"}, 422, "markup_pct"),
        ("/console/rate-cards", {"name": "x", "rates": "m 1 x"}, 422, "rates"),
        ("/console/rate-cards", {"name": "x", "rates": "m 1"}, 422, "rates, line 1"),
        ("/console/rate-cards/99999999999999999999/versions", {}, 422, "rate_card_id"),
        ("/console/rate-cards/424242/versions", {}, 404, "rate card 424242 not found"),
        (f"/console/accounts/{account['id']}/rate-card", {"rate_card_id": "abc"}, 422, "rate"),
        (f"/console/accounts/{account['id']}/rate-card", {"rate_card_id": "424242"}, 404, ""),
        (f"/console/accounts/{account['id']}", {"billing_mode": "weekly"}, 422, "billing_mode"),
        (f"/console/accounts/{account['id']}/credits", {"amount_usd": "1"}, 422, "kind"),
        (
            f"/console/accounts/{account['id']}/credits",
            {"amount_usd": "-3", "kind": "grant"},
            422,
            "amount_usd",
        ),
        (
            f"/console/accounts/{account['id']}/credits",
            {"amount_usd": "1", "kind": "grant", "expires_at": "soon"},
            422,
            "expires_at",
        ),
        (
            f"/console/accounts/{uuid.uuid4()}/credits",
            {"amount_usd": "1", "kind": "grant"},
            404,
            "",
        ),
        (f"/console/credits/{uuid.uuid4()}/void", {}, 404, "credit grant"),
        (f"/console/accounts/{account['id']}/adjustments", {"amount_usd": "0"}, 422, "amount"),
        (f"/console/invoices/{draft}/credit-notes", {"amount_usd": "1", "reason": "x"}, 409, ""),
        (f"/console/invoices/{draft}/credit-notes", {"amount_usd": "0.001"}, 422, "amount_usd"),
        ("/console/provider-costs", {"model": "m", "input_usd_per_mtok": "1"}, 422, ""),
        ("/console/webhooks", {"url": "ftp://example.com", "events": "task.completed"}, 422, ""),
        ("/console/webhooks", {"url": "https://example.com", "events": "no.such"}, 422, "events"),
        ("/console/webhooks", {"url": "https://example.com"}, 422, "events"),
        (f"/console/webhooks/{uuid.uuid4()}/delete", {}, 404, "webhook endpoint"),
        (f"/console/webhooks/{uuid.uuid4()}/enabled", {"enabled": "true"}, 404, "webhook"),
        (f"/console/webhooks/{uuid.uuid4()}", {"url": "https://example.com"}, 422, "events"),
        (
            f"/console/webhooks/{uuid.uuid4()}",
            {"url": "https://example.com", "events": "task.completed"},
            404,
            "webhook",
        ),
        (f"/console/webhooks/{uuid.uuid4()}/deliveries/{uuid.uuid4()}/retry", {}, 404, ""),
    ]
    for path, form, status, words in posts:
        response = client.post(path, data={**form, "csrf_token": token})
        assert response.status_code == status, (path, form, response.text[-400:])
        assert words in response.text and "<h1>" in response.text, (path, form)
    assert client.get("/console/rate-cards/424242").status_code == 404
    assert client.get(f"/console/webhooks/{uuid.uuid4()}").status_code == 404
    client.close()

    # A customer's session finds no operator form, whatever it posts.
    client, _ = _sign_in(server, two_customers["mine"]["key"])
    token = _form_token(client, "/console/account")
    mine = two_customers["mine"]["account"]["id"]
    for path, form in (
        ("/console/webhooks", {"url": "https://example.com", "events": "task.completed"}),
        ("/console/rate-cards", {"name": "mine"}),
        (f"/console/accounts/{mine}/credits", {"amount_usd": "100", "kind": "grant"}),
        (f"/console/accounts/{mine}/rate-card", {"rate_card_id": ""}),
        ("/console/provider-costs", {}),
    ):
        assert client.post(path, data={**form, "csrf_token": token}).status_code == 404, path
    client.close()


def test_a_credit_form_posted_twice_puts_its_credit_on_once(server: Meterline) -> None:
    """A double click or a resent form carries the key its page was rendered with: the
    second post answers as the first and adds nothing, as an API retry would."""
    account = server.new_account(name=f"Twice {secrets.token_hex(3)}", billing_mode="prepaid")
    client, _ = _sign_in(server, ADMIN_TOKEN)
    page = client.get(f"/console/accounts/{account['id']}").text
    form = re.search(r'id="new-credit">(.*?)</form>', page, re.S)
    assert form is not None
    hidden = dict(re.findall(r'name="(csrf_token|idempotency_key)" value="([^"]+)"', form[1]))
    assert set(hidden) == {"csrf_token", "idempotency_key"}
    posted = {**hidden, "amount_usd": "7.25", "kind": "purchase"}
    answers = [client.post(f"/console/accounts/{account['id']}/credits", data=posted) for _ in "ab"]
    assert [a.status_code for a in answers] == [303, 303]
    changed = client.post(
        f"/console/accounts/{account['id']}/credits", data={**posted, "amount_usd": "8"}
    )
    assert changed.status_code == 409  # the same key for another credit: refused, not added
    client.close()
    with server.admin() as api:
        balance = api.get(f"/billing/accounts/{account['id']}/balance").json()
    assert [g["amount_usd"] for g in balance["grants"]] == ["7.250000000000"]
    assert Decimal(balance["balance_usd"]) == Decimal("7.25")


def test_a_quote_accepted_in_the_console_holds_its_price_against_the_budget(
    server: Meterline,
) -> None:
    """As through the API: a budget that cannot pay the fixed price opens no task (429)."""
    model = f"mock-console-quote-{uuid.uuid4().hex[:6]}"
    account = server.new_account(monthly_budget_usd="0.03")
    with server.admin() as api:
        api.post(
            "/billing/prices",
            json={"model": model, "input_usd_per_mtok": "1000", "output_usd_per_mtok": "1000"},
        ).raise_for_status()
        quote = api.post(
            "/billing/quotes",
            json={
                "account_id": account["id"],
                "task_type": "console",
                "model": model,
                "prompt_tokens": 10,
                "max_completion_tokens": 20,
            },
        ).json()
    assert Decimal(quote["price_usd"]) > Decimal("0.03")
    client, _ = _sign_in(server, ADMIN_TOKEN)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/quotes").text)
    assert token is not None
    refused = client.post(
        f"/console/quotes/{quote['id']}/accept",
        data={"task_id": "console-over-budget", "csrf_token": token.group(1)},
    )
    client.close()
    assert refused.status_code == 429
    with server.admin() as api:
        task = api.get(
            "/billing/tasks/console-over-budget", params={"account_id": str(account["id"])}
        )
    assert task.status_code == 404

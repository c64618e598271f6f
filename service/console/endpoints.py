"""The console's pages and forms. HTTP only: read the request, call the billing services with
the signed-in `Principal`, render. The navigation follows the order of the `@page`s below.

To add a page: one `@page("/path", "Label")` function here and one template in `templates/`.
A form that changes money calls the API's own once-per-key function (`add_credit_once`,
`adjust_once`, `credit_note_once`) with the key its page was rendered with (`once()` in the
template).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from fastapi import Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from pricing.invoice import BillingPeriod, InvoiceStatus, TaskStatus
from service.accounts import service as accounts
from service.accounts.schemas import AccountCreate, AccountOut, AccountUpdate, KeyOut
from service.adjustments import service as adjustments
from service.adjustments.endpoints import adjust_once
from service.adjustments.schemas import AdjustmentCreate
from service.console import service, sessions
from service.console.charts import daily_chart
from service.console.pages import (
    BlankIsNone,
    ChosenPeriod,
    Form,
    Operator,
    Posted,
    Viewer,
    error_page,
    optional_uuid,
    page,
    read_form,
    redirect,
    render,
    router,
)
from service.credits import service as credits
from service.credits.endpoints import add_credit_once
from service.credits.schemas import CreditCreate
from service.db.models import BillingMode
from service.db.session import after_commit
from service.deps import Budgets, Config, Engine, Guard, Keys, Prices, Session, UsageCache
from service.errors import Unauthorized
from service.invoices import service as invoices
from service.invoices.endpoints import credit_note_once
from service.invoices.pdf import Issuer
from service.invoices.schemas import (
    CreditNoteCreate,
    InvoiceCreate,
    InvoiceVoid,
    invoice_out,
)
from service.prices import service as price_service
from service.prices.schemas import PriceCreate, PriceOut
from service.provider_costs import service as provider_costs
from service.provider_costs.schemas import ProviderCostCreate, ProviderCostOut
from service.quotes import service as quotes
from service.quotes.schemas import QuoteAccept, QuoteCreate
from service.rate_cards import service as rate_cards
from service.rate_cards.schemas import RateCardCreate, RateCardVersionCreate
from service.reports.endpoints import MEDIA_TYPES
from service.reports.margin.service import margin_report
from service.reports.schemas import ReportFormat
from service.reports.service import export_monthly, unpriced_report
from service.schemas import Period
from service.tasks import service as tasks
from service.tasks.repository import TaskFilter
from service.tasks.schemas import TaskComplete
from service.webhooks import service as webhooks
from service.webhooks.events import EventType
from service.webhooks.schemas import WebhookCreate, WebhookUpdate

Text = Annotated[str | None, Query(max_length=256)]
CardId = Annotated[int, Path(ge=1, le=2**63 - 1)]
TRANSACTIONS_PAGE = 100
# Lists that grow without bound are read a page at a time, by the API's keyset cursor.
PAGE = 50


def _now() -> datetime:
    return datetime.now(UTC)


def _recent_periods(count: int = 12) -> list[str]:
    current = BillingPeriod.of(_now())
    return [str(current.shifted(-i)) for i in range(count)]


async def _account_choices(session: Session, viewer: Viewer) -> list[AccountOut]:
    """Accounts an operator's filter and forms may name (the first 200)."""
    if not viewer.principal.is_admin:
        return []
    return (await accounts.list_accounts(session, 200, None)).data


# -- sign-in ------------------------------------------------------------------------------


def _sign_in_page(request: Request, status_code: int = 200, error: str | None = None) -> Response:
    token = sessions.new_form_token()
    response = render(
        request,
        "sign_in.html",
        status_code,
        error=error,
        form_token=token,
        next=request.query_params.get("next", "/console"),
    )
    response.set_cookie(
        sessions.SIGN_IN_COOKIE,
        token,
        max_age=3600,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@page("/sign-in")
async def sign_in_form(request: Request) -> Response:
    return _sign_in_page(request)


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request, session: Session, settings: Config) -> Response:
    form = await read_form(request)
    if not sessions.csrf_matches(
        request.cookies.get(sessions.SIGN_IN_COOKIE, ""), form.get("csrf_token")
    ):
        return error_page(request, 403, "The sign-in form expired; reload it and try again.")
    try:
        new = await sessions.sign_in(
            session,
            form.get("credential") or "",
            settings.admin_token,
            settings.console_session_ttl_s,
        )
    except Unauthorized:
        # The same answer for every wrong credential: unknown, revoked, expired or mistyped.
        return _sign_in_page(request, 401, "That token or key is not valid.")
    target = form.get("next") or "/console"
    if not target.startswith("/console"):
        target = "/console"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        sessions.COOKIE,
        new.token,
        max_age=settings.console_session_ttl_s,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(sessions.SIGN_IN_COOKIE, path="/console")
    return response


@router.post("/sign-out", response_class=HTMLResponse)
async def sign_out(session: Session, viewer: Viewer, _: Posted) -> Response:
    await sessions.sign_out(session, viewer)
    response = redirect("/console/sign-in")
    response.delete_cookie(sessions.COOKIE, path="/console")
    return response


# -- overview and usage -------------------------------------------------------------------


@page("", "Overview")
async def overview(
    request: Request,
    session: Session,
    viewer: Viewer,
    held: UsageCache,
    prices: Prices,
    budgets: Budgets,
) -> Response:
    now = _now()
    data = await service.overview(session, viewer.principal, now, held)
    balance = None
    if data.account is not None and data.account.billing_mode is BillingMode.PREPAID:
        # A prepaid account's limit is its credit: what is available is the figure to watch.
        balance = await credits.balance(
            session, viewer.principal, data.account.id, now, prices.book, budgets.credits_in_flight
        )
    chart = daily_chart(data.days, data.period)
    return render(request, "overview.html", o=data, chart=chart, balance=balance)


async def _explore(
    session: Session,
    viewer: Viewer,
    start: str | None,
    end: str | None,
    group: str | None,
    account_id: str | None,
    model: str | None,
) -> service.Exploration:
    """The usage explorer's rows for the page and its CSV alike, from the same query."""
    first, last = service.parse_range(start, end, _now().date())
    return await service.explore(
        session,
        viewer.principal,
        first,
        last,
        group or "day",
        optional_uuid(account_id, "query.account_id"),
        model,
    )


@page("/usage", "Usage")
async def usage(
    request: Request,
    session: Session,
    viewer: Viewer,
    start: Text = None,
    end: Text = None,
    group: Text = "day",
    account_id: Text = None,
    model: Text = None,
) -> Response:
    data = await _explore(session, viewer, start, end, group, account_id, model)
    chart = None
    if data.group == "day":
        chart = {
            "days": [str(r.row.day) for r in data.rows],
            "cost": [str(r.row.cost_usd) for r in data.rows],
            "requests": [r.row.requests for r in data.rows],
        }
    top = max((r.row.cost_usd for r in data.rows), default=0) or 1
    return render(
        request,
        "usage.html",
        u=data,
        chart=chart,
        top_cost=top,
        groups=service.explorer_groups(viewer.principal),
        account_choices=await _account_choices(session, viewer),
        csv_query=request.url.query,
    )


@router.get("/usage.csv")
async def usage_csv(
    session: Session,
    viewer: Viewer,
    start: Text = None,
    end: Text = None,
    group: Text = "day",
    account_id: Text = None,
    model: Text = None,
) -> Response:
    data = await _explore(session, viewer, start, end, group, account_id, model)
    name = f"meterline-usage-{data.start}-{data.end}-by-{data.group}.csv"
    return Response(
        service.usage_csv(data.rows),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# -- accounts and keys --------------------------------------------------------------------


@page("/accounts", "Accounts", operator_only=True)
async def account_list(
    request: Request, session: Session, viewer: Operator, cursor: Text = None
) -> Response:
    listed = await accounts.list_accounts(session, 50, cursor)
    return render(request, "accounts.html", page_=listed)


@router.post("/accounts", response_class=HTMLResponse)
async def create_account(session: Session, viewer: Operator, form: Posted) -> Response:
    data = AccountCreate.model_validate(
        {
            k: v
            for k, v in form.present("name", "tier", "billing_mode", "monthly_budget_usd").items()
            if v
        }
    )
    account = await accounts.create_account(session, data)
    return redirect(f"/console/accounts/{account.id}")


@page("/account", "Account", customer_only=True)
async def own_account(
    request: Request,
    session: Session,
    viewer: Viewer,
    prices: Prices,
    budgets: Budgets,
    tx_cursor: Text = None,
    keys_cursor: Text = None,
) -> Response:
    if viewer.principal.account_id is None:
        return redirect("/console/accounts")
    return await _account_page(
        request,
        session,
        viewer,
        prices,
        budgets,
        viewer.principal.account_id,
        tx_cursor=tx_cursor,
        keys_cursor=keys_cursor,
    )


async def _account_page(
    request: Request,
    session: Session,
    viewer: Viewer,
    prices: Prices,
    budgets: Budgets,
    account_id: uuid.UUID,
    new_key: Any = None,
    tx_cursor: str | None = None,
    keys_cursor: str | None = None,
) -> Response:
    principal = viewer.principal
    account = await accounts.get_account(session, principal, account_id)
    keys = await accounts.list_keys(session, principal, account_id, PAGE, keys_cursor)
    now = _now()
    balance = await credits.balance(
        session, principal, account_id, now, prices.book, budgets.credits_in_flight
    )
    transactions = await credits.transactions(
        session, principal, account_id, now, prices.book, TRANSACTIONS_PAGE, tx_cursor
    )
    # A rate card shows the operator's terms (list price, markup): never a customer's page.
    cards = await rate_cards.list_rate_cards(session) if principal.is_admin else []
    history = await rate_cards.assignments(session, account_id) if principal.is_admin else []
    return render(
        request,
        "account.html",
        account=await accounts.account_out(session, account),
        keys=keys,
        new_key=new_key,
        balance=balance,
        transactions=transactions,
        rate_cards={c.id: c for c in cards},
        assignments=history,
        now=now,
    )


@router.get("/accounts/{account_id}", response_class=HTMLResponse)
async def account_detail(
    request: Request,
    account_id: uuid.UUID,
    session: Session,
    viewer: Viewer,
    prices: Prices,
    budgets: Budgets,
    tx_cursor: Text = None,
    keys_cursor: Text = None,
) -> Response:
    return await _account_page(
        request,
        session,
        viewer,
        prices,
        budgets,
        account_id,
        tx_cursor=tx_cursor,
        keys_cursor=keys_cursor,
    )


@router.post("/accounts/{account_id}", response_class=HTMLResponse)
async def update_account(
    account_id: uuid.UUID, session: Session, viewer: Viewer, form: Posted
) -> Response:
    fields = (
        "name",
        "tier",
        "billing_mode",
        "monthly_budget_usd",
        "quote_margin",
        "failed_task_policy",
        "rate_limit_rpm",
        "rate_limit_tpm",
    )
    data = AccountUpdate.model_validate(form.present(*fields))
    await accounts.update_account(session, viewer.principal, account_id, data)
    return redirect(f"/console/accounts/{account_id}")


@router.post("/accounts/{account_id}/rate-card", response_class=HTMLResponse)
async def assign_rate_card(
    account_id: uuid.UUID, session: Session, viewer: Operator, form: Posted, prices: Prices
) -> Response:
    # A form of its own: saving the settings must not add an assignment ("list prices").
    data = AccountUpdate.model_validate(
        {
            "rate_card_id": form.get("rate_card_id"),
            "rate_card_effective_from": form.instant("effective_from"),
        }
    )
    await accounts.update_account(session, viewer.principal, account_id, data)
    after_commit(session, prices.refresh)  # as the API does
    return redirect(f"/console/accounts/{account_id}#rate-card")


@router.post("/accounts/{account_id}/credits", response_class=HTMLResponse)
async def add_credit(
    account_id: uuid.UUID,
    session: Session,
    viewer: Operator,
    form: Posted,
    settings: Config,
    budgets: Budgets,
) -> Response:
    fields = form.present("amount_usd", "kind", "priority", "reference")
    fields["expires_at"] = form.instant("expires_at")
    data = CreditCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    await add_credit_once(session, account_id, data, form.idempotency_key(), settings, budgets)
    return redirect(f"/console/accounts/{account_id}#credits")


@router.post("/credits/{grant_id}/void", response_class=HTMLResponse)
async def void_credit(
    grant_id: uuid.UUID,
    session: Session,
    viewer: Operator,
    prices: Prices,
    budgets: Budgets,
    _: Posted,
) -> Response:
    voided = await credits.void_credit(session, grant_id, _now(), prices.book)
    after_commit(session, lambda: budgets.credits_changed(voided.account_id))
    return redirect(f"/console/accounts/{voided.account_id}#credits")


@router.post("/accounts/{account_id}/adjustments", response_class=HTMLResponse)
async def adjust_account(
    account_id: uuid.UUID, session: Session, viewer: Operator, form: Posted
) -> Response:
    await accounts.get_account(session, viewer.principal, account_id)
    fields = {
        "amount_usd": form.get("amount_usd"),
        "reason": form.get("reason"),
        "occurred_at": form.instant("occurred_at"),
    }
    data = AdjustmentCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    adjusted = await adjust_once(session, account_id, data, form.idempotency_key())
    month = BillingPeriod.parse(adjusted.period)
    listed = await invoices.list_invoices(
        session, viewer.principal, account_id, month, "draft", 1, None
    )
    if listed.data:  # the draft that bills it: its line shows there once refreshed
        return redirect(f"/console/invoices/{listed.data[0].id}")
    return redirect(f"/console/invoices?account_id={account_id}")


@router.post("/accounts/{account_id}/keys", response_class=HTMLResponse)
async def create_key(
    request: Request,
    account_id: uuid.UUID,
    session: Session,
    viewer: Viewer,
    form: Posted,
    prices: Prices,
    budgets: Budgets,
) -> Response:
    created = await accounts.create_key(
        session, account_id, form.get("name"), None, viewer.principal
    )
    # Rendered, not redirected: this response is the only time the key is ever shown.
    return await _account_page(
        request, session, viewer, prices, budgets, account_id, new_key=created
    )


@router.post("/keys/{key_id}/revoke", response_class=HTMLResponse)
async def revoke_key(
    key_id: uuid.UUID, session: Session, viewer: Viewer, keys: Keys, _: Posted
) -> Response:
    key: KeyOut = await accounts.revoke_key(session, viewer.principal, key_id)
    after_commit(session, partial(keys.revoke, key.id))  # as the API does
    return redirect(f"/console/accounts/{key.account_id}")


# -- invoices -----------------------------------------------------------------------------


@page("/invoices", "Invoices")
async def invoice_list(
    request: Request,
    session: Session,
    viewer: Viewer,
    account_id: Text = None,
    period: ChosenPeriod = None,
    status: Annotated[InvoiceStatus | None, BlankIsNone] = None,
    cursor: Text = None,
) -> Response:
    listed = await invoices.list_invoices(
        session,
        viewer.principal,
        optional_uuid(account_id, "query.account_id"),
        period,
        status,
        50,
        cursor,
    )
    choices = await _account_choices(session, viewer)
    ids = [i.account_id for i in listed.data]
    names = await accounts.accounts_by_id(session, viewer.principal, ids)
    return render(
        request,
        "invoices.html",
        page_=listed,
        names={k: v.name for k, v in names.items()},
        account_choices=choices,
        periods=_recent_periods(),
        filters={"account_id": account_id, "period": period and str(period), "status": status},
    )


@router.post("/invoices", response_class=HTMLResponse)
async def generate_invoice(session: Session, viewer: Operator, form: Posted) -> Response:
    account_id = optional_uuid(form.get("account_id"), "body.account_id")
    if account_id is None:
        return redirect("/console/invoices")
    data = InvoiceCreate.model_validate({"account_id": account_id, "period": form.get("period")})
    invoice, _ = await invoices.generate_one(session, data.account_id, data.period)
    return redirect(f"/console/invoices/{invoice.id}")


@router.get("/invoices/{invoice_id}", response_class=HTMLResponse)
async def invoice_detail(
    request: Request, invoice_id: uuid.UUID, session: Session, viewer: Viewer
) -> Response:
    invoice = invoice_out(await invoices.get_for(session, viewer.principal, invoice_id))
    account = await accounts.get_account(session, viewer.principal, invoice.account_id)
    # The invoice bills adjustments as one line; the reasons of its month's are listed.
    month = BillingPeriod.parse(invoice.period)
    adjusted = await adjustments.adjustments_in(session, invoice.account_id, month)
    return render(request, "invoice.html", invoice=invoice, account=account, adjusted=adjusted)


@router.get("/invoices/{invoice_id}/pdf")
async def invoice_pdf(
    invoice_id: uuid.UUID, session: Session, viewer: Viewer, settings: Config
) -> Response:
    issuer = Issuer.from_settings(settings)
    document, filename = await invoices.invoice_document(
        session, viewer.principal, invoice_id, issuer
    )
    return Response(
        document,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/invoices/{invoice_id}/finalize", response_class=HTMLResponse)
async def finalize_invoice(
    invoice_id: uuid.UUID, session: Session, viewer: Operator, _: Posted
) -> Response:
    await invoices.finalize(session, invoice_id)
    return redirect(f"/console/invoices/{invoice_id}")


@router.post("/invoices/{invoice_id}/void", response_class=HTMLResponse)
async def void_invoice(
    invoice_id: uuid.UUID, session: Session, viewer: Operator, form: Posted
) -> Response:
    data = InvoiceVoid.model_validate({"reason": form.get("reason") or ""})
    await invoices.void(session, invoice_id, data.reason)
    return redirect(f"/console/invoices/{invoice_id}")


@router.post("/invoices/{invoice_id}/credit-notes", response_class=HTMLResponse)
async def issue_credit_note(
    invoice_id: uuid.UUID, session: Session, viewer: Operator, form: Posted
) -> Response:
    data = CreditNoteCreate.model_validate(
        {k: v for k, v in form.present("amount_usd", "reason").items() if v is not None}
    )
    await credit_note_once(session, invoice_id, data, form.idempotency_key())
    return redirect(f"/console/invoices/{invoice_id}#credit-notes")


# -- tasks and quotes ---------------------------------------------------------------------


@page("/tasks", "Tasks")
async def task_list(
    request: Request,
    session: Session,
    viewer: Viewer,
    account_id: Text = None,
    status: Annotated[TaskStatus | None, BlankIsNone] = None,
    task_type: Text = None,
    model: Text = None,
    quoted: Annotated[str | None, Query(pattern=r"^(yes|no)?$")] = None,
    cursor: Text = None,
) -> Response:
    where = TaskFilter(
        account_id=optional_uuid(account_id, "query.account_id"),
        status=status,
        task_type=task_type,
        model=model,
        quoted={"yes": True, "no": False}.get(quoted or ""),
    )
    listed = await tasks.list_tasks(session, viewer.principal, where, 50, cursor)
    return render(
        request,
        "tasks.html",
        page_=listed,
        account_choices=await _account_choices(session, viewer),
        filters={
            "account_id": account_id,
            "status": status,
            "task_type": task_type,
            "model": model,
            "quoted": quoted,
        },
    )


@router.post("/tasks/complete", response_class=HTMLResponse)
async def complete_task(session: Session, viewer: Operator, form: Posted, guard: Guard) -> Response:
    data = TaskComplete.model_validate({"outcome": form.get("outcome")})
    await tasks.complete_task(
        session,
        guard,
        viewer.principal,
        form.get("task_id") or "",
        optional_uuid(form.get("account_id"), "body.account_id"),
        data.outcome,
    )
    back = form.get("back") or ""
    return redirect(back if back.startswith("/console/") else "/console/tasks")


@page("/quotes", "Quotes")
async def quote_form(request: Request, session: Session, viewer: Viewer) -> Response:
    return render(
        request, "quotes.html", quote=None, account_choices=await _account_choices(session, viewer)
    )


@router.post("/quotes", response_class=HTMLResponse)
async def create_quote(
    request: Request,
    session: Session,
    viewer: Viewer,
    form: Posted,
    settings: Config,
    prices: Prices,
) -> Response:
    fields = form.present(
        "account_id", "task_type", "model", "prompt_tokens", "max_completion_tokens"
    )
    data = QuoteCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    quote = await quotes.create_quote(session, settings, prices.book, viewer.principal, data)
    return render(
        request, "quotes.html", quote=quote, account_choices=await _account_choices(session, viewer)
    )


@router.post("/quotes/{quote_id}/accept", response_class=HTMLResponse)
async def accept_quote(
    quote_id: uuid.UUID,
    session: Session,
    viewer: Viewer,
    form: Posted,
    settings: Config,
    guard: Guard,
    budgets: Budgets,
) -> Response:
    data = QuoteAccept.model_validate({"task_id": form.get("task_id")})
    # As in the API: the fixed price is held against the budget, or nothing is accepted.
    async with budgets.quote_acceptance(session, quote_id):
        task = await quotes.accept_quote(session, settings, guard, viewer.principal, quote_id, data)
    return redirect(f"/console/tasks?status=open&task_type={task.task_type or ''}")


# -- reports ------------------------------------------------------------------------------


@page("/reports", "Reports")
async def reports(
    request: Request,
    session: Session,
    viewer: Viewer,
    period: ChosenPeriod = None,
) -> Response:
    chosen = period or BillingPeriod.of(_now())
    margin = None
    if viewer.principal.is_admin:
        margin = await margin_report(session, chosen, None)
    unpriced = await unpriced_report(session, chosen, viewer.principal.scope(None))
    top = max((max(r.revenue_usd, r.cost_usd) for r in (margin.rows if margin else [])), default=0)
    return render(
        request,
        "reports.html",
        period=str(chosen),
        periods=_recent_periods(),
        margin=margin,
        margin_top=top or 1,
        unpriced=unpriced,
    )


@router.get("/reports/monthly")
async def monthly_export(
    viewer: Viewer,
    engine: Engine,
    period: Annotated[Period, Query()],
    fmt: Annotated[ReportFormat, Query(alias="format")] = "csv",
) -> Response:
    account_id = viewer.principal.scope(None)
    suffix = f"-{account_id}" if account_id else ""
    return StreamingResponse(
        export_monthly(engine, period, fmt, account_id),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="meterline-{period}{suffix}.{fmt}"'},
    )


# -- prices -------------------------------------------------------------------------------


@page("/prices", "Prices")
async def price_list(
    request: Request, session: Session, viewer: Viewer, model: Text = None
) -> Response:
    versions = await price_service.list_prices(session, model, _now())
    costs = []
    if viewer.principal.is_admin:  # what upstreams charge is the operator's business only
        costs = [
            ProviderCostOut.model_validate(v)
            for v in await provider_costs.list_costs(session, None, model)
        ]
    return render(
        request,
        "prices.html",
        prices=[PriceOut.model_validate(v) for v in versions],
        costs=costs,
        model=model,
        now=_now(),
    )


PRICE_FIELDS = ("model", "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok")


def _price_fields(form: Form, *extra: str) -> dict[str, str]:
    fields = form.present(*PRICE_FIELDS, *extra)
    fields["effective_from"] = form.instant("effective_from")
    return {k: v for k, v in fields.items() if v is not None}


@router.post("/prices", response_class=HTMLResponse)
async def add_price(session: Session, viewer: Operator, form: Posted, prices: Prices) -> Response:
    data = PriceCreate.model_validate(_price_fields(form))
    await price_service.add_price(session, data)
    after_commit(session, prices.refresh)  # as the API does
    return redirect(f"/console/prices?model={data.model}")


@router.post("/provider-costs", response_class=HTMLResponse)
async def add_provider_cost(
    session: Session, viewer: Operator, form: Posted, prices: Prices
) -> Response:
    data = ProviderCostCreate.model_validate(_price_fields(form, "provider"))
    await provider_costs.add_cost(session, data)
    after_commit(session, prices.refresh)  # as the API does
    return redirect(f"/console/prices?model={data.model}#provider-costs")


# -- rate cards ---------------------------------------------------------------------------


def _rate_card_terms(form: Form) -> dict[str, Any]:
    """A version's fields from its form: the explicit rates are lines of a text box."""
    fields: dict[str, Any] = {
        **form.present("markup_pct", "markup_basis"),
        "effective_from": form.instant("effective_from"),
        "rates": service.parse_rates(form.get("rates") or ""),
    }
    return {k: v for k, v in fields.items() if v is not None}


@page("/rate-cards", "Rate cards", operator_only=True)
async def rate_card_list(request: Request, session: Session, viewer: Operator) -> Response:
    cards = await rate_cards.list_rate_cards(session)
    return render(request, "rate_cards.html", cards=cards, now=_now())


@router.post("/rate-cards", response_class=HTMLResponse)
async def create_rate_card(
    session: Session, viewer: Operator, form: Posted, prices: Prices
) -> Response:
    fields = {**form.present("name", "description"), **_rate_card_terms(form)}
    data = RateCardCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    card = await rate_cards.create_rate_card(session, data)
    after_commit(session, prices.refresh)  # as the API does
    return redirect(f"/console/rate-cards/{card.id}")


@router.get("/rate-cards/{rate_card_id}", response_class=HTMLResponse)
async def rate_card_detail(
    request: Request, rate_card_id: CardId, session: Session, viewer: Operator
) -> Response:
    card = await rate_cards.get_rate_card(session, rate_card_id)
    return render(request, "rate_card.html", card=card, now=_now())


@router.post("/rate-cards/{rate_card_id}/versions", response_class=HTMLResponse)
async def add_rate_card_version(
    rate_card_id: CardId, session: Session, viewer: Operator, form: Posted, prices: Prices
) -> Response:
    data = RateCardVersionCreate.model_validate(_rate_card_terms(form))
    await rate_cards.add_version(session, rate_card_id, data)
    after_commit(session, prices.refresh)  # as the API does
    return redirect(f"/console/rate-cards/{rate_card_id}")


# -- webhooks -----------------------------------------------------------------------------


async def _webhooks_page(
    request: Request,
    session: Session,
    status_code: int = 200,
    created: Any = None,
    cursor: str | None = None,
) -> Response:
    listed = await webhooks.list_endpoints(session, PAGE, cursor)
    return render(
        request,
        "webhooks.html",
        status_code,
        page_=listed,
        event_types=list(EventType),
        created=created,
    )


@page("/webhooks", "Webhooks", operator_only=True)
async def webhook_list(
    request: Request, session: Session, viewer: Operator, cursor: Text = None
) -> Response:
    return await _webhooks_page(request, session, cursor=cursor)


@router.post("/webhooks", response_class=HTMLResponse)
async def create_webhook(
    request: Request, session: Session, viewer: Operator, form: Posted, settings: Config
) -> Response:
    fields = {"url": form.get("url"), "events": form.every("events")}
    if form.get("description"):
        fields["description"] = form.get("description")
    data = WebhookCreate.model_validate(fields)
    created = await webhooks.create_endpoint(session, data, settings.webhooks_allow_private)
    # Rendered, not redirected: this response is the only time the secret is ever shown.
    return await _webhooks_page(request, session, 201, created)


@router.get("/webhooks/{webhook_id}", response_class=HTMLResponse)
async def webhook_detail(
    request: Request,
    webhook_id: uuid.UUID,
    session: Session,
    viewer: Operator,
    cursor: Text = None,
) -> Response:
    endpoint = await webhooks.get_endpoint(session, webhook_id)
    deliveries = await webhooks.list_deliveries(session, webhook_id, 50, cursor)
    return render(
        request,
        "webhook.html",
        endpoint=endpoint,
        page_=deliveries,
        event_types=list(EventType),
    )


@router.post("/webhooks/{webhook_id}", response_class=HTMLResponse)
async def edit_webhook(
    webhook_id: uuid.UUID, session: Session, viewer: Operator, form: Posted, settings: Config
) -> Response:
    # The whole form is sent: an unticked box is "disabled", a blank description clears it.
    data = WebhookUpdate.model_validate(
        {
            "url": form.get("url") or "",
            "events": form.every("events"),
            "description": form.get("description"),
            "enabled": form.get("enabled") == "true",
        }
    )
    await webhooks.update_endpoint(session, webhook_id, data, settings.webhooks_allow_private)
    return redirect(f"/console/webhooks/{webhook_id}")


@router.post("/webhooks/{webhook_id}/enabled", response_class=HTMLResponse)
async def enable_webhook(
    webhook_id: uuid.UUID, session: Session, viewer: Operator, form: Posted, settings: Config
) -> Response:
    data = WebhookUpdate.model_validate({"enabled": form.get("enabled")})
    await webhooks.update_endpoint(session, webhook_id, data, settings.webhooks_allow_private)
    return redirect("/console/webhooks")


@router.post("/webhooks/{webhook_id}/delete", response_class=HTMLResponse)
async def delete_webhook(
    webhook_id: uuid.UUID, session: Session, viewer: Operator, _: Posted
) -> Response:
    await webhooks.delete_endpoint(session, webhook_id)
    return redirect("/console/webhooks")


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/retry", response_class=HTMLResponse)
async def retry_delivery(
    webhook_id: uuid.UUID, delivery_id: uuid.UUID, session: Session, viewer: Operator, _: Posted
) -> Response:
    await webhooks.retry_delivery(session, webhook_id, delivery_id)
    return redirect(f"/console/webhooks/{webhook_id}")

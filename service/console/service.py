"""What the console's pages show, assembled from the billing API's own service functions.

Nothing here queries the database itself: usage comes from `service.usage.service` (the
functions behind `GET /billing/usage`), accounts and keys from `service.accounts.service`,
always with the signed-in `Principal`, so a page shows exactly what the API would answer.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import BillingPeriod
from service.accounts import service as accounts
from service.auth.principal import Principal
from service.db.models import Account, ApiKey
from service.errors import Unprocessable
from service.parts import HeldBreakdowns
from service.reports.service import text_cell
from service.usage import service as usage
from service.usage.repository import UsageFilter
from service.usage.schemas import GroupBy, UsageGroup, UsageReport, UsageTotals

# Groups the usage explorer offers, with their labels; `account` is the operator's only.
EXPLORER_GROUPS: dict[str, str] = {
    "day": "Day",
    "model": "Model",
    "key": "API key",
    "task_type": "Task type",
    "provider": "Provider",
    "status": "Status",
    "account": "Account",
}
TOP = 5
MAX_GROUPS = 10_000
# Text a client chose (model names, task ids…): a spreadsheet must not run it.
TEXT_FIELDS = frozenset({"model", "task_id", "task_type", "provider", "label"})
# What a usage row is shown as: a key's name, an account's name, a model…
LabelOf = Callable[[UsageGroup], str]
GROUP_FIELDS = (
    "day",
    "month",
    "account_id",
    "model",
    "key_id",
    "task_id",
    "task_type",
    "provider",
    "status_code",
)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _cost(row: UsageGroup) -> Decimal:
    return row.cost_usd


def _sum(rows: Sequence[UsageGroup]) -> UsageGroup:
    """Totals of `rows`, exactly (integers and Decimals)."""
    return UsageGroup(
        requests=sum(r.requests for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        total_tokens=sum(r.total_tokens for r in rows),
        cached_tokens=sum(r.cached_tokens for r in rows),
        reasoning_tokens=sum(r.reasoning_tokens for r in rows),
        cost_usd=sum((r.cost_usd for r in rows), Decimal(0)),
        unpriced_requests=sum(r.unpriced_requests for r in rows),
    )


def _top(rows: Sequence[UsageGroup], n: int = TOP) -> list[UsageGroup]:
    return sorted(rows, key=lambda r: (r.cost_usd, r.requests), reverse=True)[:n]


@dataclass
class Budget:
    limit_usd: Decimal
    spent_usd: Decimal

    @property
    def share(self) -> Decimal:
        return self.spent_usd / self.limit_usd if self.limit_usd else Decimal(1)


@dataclass
class Labelled:
    """A usage row with what a person recognises it by (a key's name, an account's name)."""

    row: UsageGroup
    label: str
    detail: str = ""
    budget: Budget | None = None


@dataclass
class DayPoint:
    day: date
    cost_usd: Decimal
    requests: int


@dataclass
class Overview:
    period: BillingPeriod
    totals: UsageGroup
    days: list[DayPoint]
    models: list[UsageGroup]
    keys: list[Labelled]
    accounts: list[Labelled] = field(default_factory=list)
    account: Account | None = None
    budget: Budget | None = None
    errors: list[UsageGroup] = field(default_factory=list)
    errors_since: date | None = None


def key_label(key: ApiKey | None, key_id: uuid.UUID | None) -> str:
    if key_id is None:
        return "no key"
    if key is None:
        return str(key_id)
    return f"{key.name} ({key.prefix}…)" if key.name else f"{key.prefix}…"


async def _report(
    session: AsyncSession,
    principal: Principal,
    start: datetime,
    end: datetime,
    group_by: list[GroupBy],
    account_id: uuid.UUID | None = None,
    model: str | None = None,
) -> UsageReport:
    where = await usage.scoped_filter(
        session,
        principal,
        account_id=account_id,
        key_id=None,
        task_id=None,
        model=model,
        start=start,
        end=end,
    )
    return await usage.usage_report(session, where, group_by, MAX_GROUPS)


def _days(period: BillingPeriod, rows: Sequence[UsageGroup], today: date) -> list[DayPoint]:
    """Every day of the month up to today (or the last day with usage), zero where nothing
    happened: a chart without gaps."""
    by_day = {r.day: r for r in rows if r.day is not None}
    last = max([today, *by_day]) if by_day else today
    points = []
    day = period.start.date()
    while day <= last and day < period.end.date():
        r = by_day.get(day)
        points.append(DayPoint(day, r.cost_usd if r else Decimal(0), r.requests if r else 0))
        day += timedelta(days=1)
    return points


async def _usage_filter(
    session: AsyncSession, principal: Principal, start: datetime, end: datetime
) -> UsageFilter:
    return await usage.scoped_filter(
        session,
        principal,
        account_id=None,
        key_id=None,
        task_id=None,
        model=None,
        start=start,
        end=end,
    )


async def overview(
    session: AsyncSession,
    principal: Principal,
    now: datetime,
    held: HeldBreakdowns | None = None,
) -> Overview:
    """This month so far: spend, requests, tokens, daily spend, top models, keys, accounts,
    budget use and the last week's errors.

    Every figure of the month comes from one pass over the daily rollup (held in memory
    between reloads: `held`) and one over the ledger rows recorded since it."""
    period = BillingPeriod.of(now)
    today = now.astimezone(UTC).date()
    where = await _usage_filter(session, principal, period.start, period.end)
    groupings: list[list[GroupBy]] = [["day"], ["model"], ["key"], ["day", "status", "model"]]
    if principal.is_admin:
        groupings.append(["account"])
    found = await usage.usage_breakdowns(session, where, groupings, held)
    days, models, all_keys, outcomes, *by_account = found
    key_rows = _top(all_keys)
    keys = await accounts.keys_by_id(
        session, principal, [r.key_id for r in key_rows if r.key_id is not None]
    )
    result = Overview(
        period=period,
        totals=_sum(days),
        days=_days(period, sorted(days, key=lambda r: r.day or date.min), today),
        models=_top(models),
        keys=[
            Labelled(r, key_label(keys.get(r.key_id) if r.key_id else None, r.key_id))
            for r in key_rows
        ],
    )
    if principal.is_admin:
        account_rows = _top(by_account[0])
        names = await accounts.accounts_by_id(
            session, principal, [r.account_id for r in account_rows if r.account_id]
        )
        for r in account_rows:
            account = names.get(r.account_id) if r.account_id else None
            budget = account.monthly_budget_usd if account else None
            result.accounts.append(
                Labelled(
                    r,
                    account.name if account else str(r.account_id),
                    str(r.account_id),
                    Budget(budget, r.cost_usd) if budget is not None else None,
                )
            )
    else:
        assert principal.account_id is not None
        result.account = await accounts.get_account(session, principal, principal.account_id)
        if result.account.monthly_budget_usd is not None:
            result.budget = Budget(result.account.monthly_budget_usd, result.totals.cost_usd)
    # Whole UTC days (the daily rollup answers): today and the six before it, which in a
    # month's first days reach back into the month before.
    result.errors_since = today - timedelta(days=6)
    if result.errors_since < period.start.date():
        before = await _usage_filter(
            session, principal, midnight(result.errors_since), period.start
        )
        (earlier,) = await usage.usage_breakdowns(
            session, before, [["day", "status", "model"]], held
        )
        outcomes = [*earlier, *outcomes]
    failed = [
        r
        for r in outcomes
        if r.status_code is not None
        and r.status_code >= 400
        and r.day is not None
        and result.errors_since <= r.day <= today
    ]
    result.errors = sorted(failed, key=lambda r: (r.day, r.requests), reverse=True)[:10]
    return result


# -- the usage explorer ----------------------------------------------------------------


@dataclass
class Exploration:
    start: date
    end: date  # inclusive, as a person reads a range of days
    group: str
    rows: list[Labelled]
    totals: UsageGroup
    has_more: bool
    account_id: uuid.UUID | None
    model: str | None


def explorer_groups(principal: Principal) -> dict[str, str]:
    return {k: v for k, v in EXPLORER_GROUPS.items() if k != "account" or principal.is_admin}


def parse_range(start: str | None, end: str | None, today: date) -> tuple[date, date]:
    """Dates `YYYY-MM-DD` (UTC days, both inclusive); default: this month so far."""
    try:
        first = date.fromisoformat(start) if start else today.replace(day=1)
        last = date.fromisoformat(end) if end else today
    except ValueError:
        raise Unprocessable("dates are YYYY-MM-DD", param="query.start") from None
    if last < first:
        raise Unprocessable("the range ends before it starts", param="query.end")
    return first, last


async def explore(
    session: AsyncSession,
    principal: Principal,
    first: date,
    last: date,
    group: str,
    account_id: uuid.UUID | None,
    model: str | None,
) -> Exploration:
    groups = explorer_groups(principal)
    if group not in groups:
        raise Unprocessable(f"group by one of: {', '.join(groups)}", param="query.group")
    report = await _report(
        session,
        principal,
        midnight(first),
        midnight(last + timedelta(days=1)),
        usage.parse_group_by(group),
        account_id=account_id,
        model=model,
    )
    rows = report.data if group in ("day", "status") else _top(report.data, MAX_GROUPS)
    labels = await _labels(session, principal, group, rows)
    return Exploration(
        start=first,
        end=last,
        group=group,
        rows=[Labelled(r, labels(r)) for r in rows],
        totals=_sum(report.data),
        has_more=report.has_more,
        account_id=account_id,
        model=model,
    )


async def _labels(
    session: AsyncSession, principal: Principal, group: str, rows: Sequence[UsageGroup]
) -> LabelOf:
    if group == "key":
        keys = await accounts.keys_by_id(session, principal, [r.key_id for r in rows if r.key_id])
        return lambda r: key_label(keys.get(r.key_id) if r.key_id else None, r.key_id)
    if group == "account":
        found = await accounts.accounts_by_id(
            session, principal, [r.account_id for r in rows if r.account_id]
        )
        return lambda r: found[r.account_id].name if r.account_id in found else str(r.account_id)
    field_name = {"status": "status_code"}.get(group, group)

    def plain(r: UsageGroup) -> str:
        value = getattr(r, field_name)
        return "—" if value is None else str(value)

    return plain


def _plain(value: object) -> str:
    return "" if value is None else str(value)


def usage_csv(rows: Sequence[Labelled]) -> str:
    """The explorer's table as CSV: the fields and values of `GET /billing/usage`, plus the
    label a person reads (key or account name)."""
    out = io.StringIO()
    data = [r.row.model_dump(mode="json", exclude_unset=True) for r in rows]
    groups = [c for c in GROUP_FIELDS if data and c in data[0]]
    columns = [*groups, "label", *UsageTotals.model_fields]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for labelled, row in zip(rows, data, strict=True):
        cells = {**row, "label": labelled.label}
        writer.writerow(
            text_cell(cells.get(c)) if c in TEXT_FIELDS else _plain(cells.get(c)) for c in columns
        )
    return out.getvalue()


# -- rate cards --------------------------------------------------------------------------

RATE_FIELDS = ("model", "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok")


def parse_rates(text: str) -> list[dict[str, str]]:
    """A rate card's explicit rates as typed in its form, one model a line:
    `model input output [cached_input]` (USD per 1M tokens, spaces or commas between).
    The API's schema then reads each value as it reads JSON."""
    rates = []
    for number, line in enumerate(text.splitlines(), start=1):
        cells = [c for c in line.replace(",", " ").split() if c]
        if not cells:
            continue
        if len(cells) not in (3, 4):
            raise Unprocessable(
                f"rates, line {number}: write `model input output` or"
                " `model input output cached_input`",
                param="body.rates",
            )
        rates.append(dict(zip(RATE_FIELDS, cells, strict=False)))
    return rates

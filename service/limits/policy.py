"""Which limits apply to a request, money as integer nano-USD, and the calendar of budgets.

No I/O here: the stores count, this module decides what to count and how to say no.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from service.auth.key_cache import KeyLimits
from service.errors import MeterlineError, RateLimited
from service.settings import Settings

# Budget counters hold integer nano-USD: exact for every cost the ledger can hold at the
# nine decimals that matter, and addable atomically by Redis (INCRBY) without a float.
NANO = Decimal(1_000_000_000)
WINDOW_S = 60


def to_nano_up(amount: Decimal) -> int:
    """USD → nano-USD rounded up: a reservation or a charge is never smaller than the cost."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def to_nano_down(amount: Decimal) -> int:
    """USD → nano-USD rounded down: a budget is never larger than the one configured."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_FLOOR))


def from_nano(amount: int) -> Decimal:
    return Decimal(amount) / NANO


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter a request is checked against: `limit` per window (or per month)."""

    scope: str  # "account" or "key"
    owner: uuid.UUID
    limit: int


@dataclass(frozen=True, slots=True)
class AppliedLimits:
    requests: tuple[Limit, ...]
    tokens: tuple[Limit, ...]
    budgets: tuple[Limit, ...]  # nano-USD per month

    @property
    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.budgets)


def tier_defaults(settings: Settings, tier: str) -> tuple[int | None, int | None]:
    """(requests, tokens) per minute of a tier; an unknown tier gets the basic one."""
    if tier == "pro":
        return settings.tier_pro_rpm, settings.tier_pro_tpm
    if tier == "custom":
        return settings.tier_custom_rpm, settings.tier_custom_tpm
    return settings.tier_basic_rpm, settings.tier_basic_tpm


def applied_limits(settings: Settings, row: KeyLimits) -> AppliedLimits:
    """The account's limits (its own, else its tier's) and the key's own, when it has any."""
    tier_rpm, tier_tpm = tier_defaults(settings, row.tier)
    account_rpm = row.account_rpm if row.account_rpm is not None else tier_rpm
    account_tpm = row.account_tpm if row.account_tpm is not None else tier_tpm
    requests = []
    tokens = []
    budgets = []
    if account_rpm is not None:
        requests.append(Limit("account", row.account_id, account_rpm))
    if row.key_rpm is not None:
        requests.append(Limit("key", row.key_id, row.key_rpm))
    if account_tpm is not None:
        tokens.append(Limit("account", row.account_id, account_tpm))
    if row.key_tpm is not None:
        tokens.append(Limit("key", row.key_id, row.key_tpm))
    if row.account_budget_usd is not None:
        budgets.append(Limit("account", row.account_id, to_nano_down(row.account_budget_usd)))
    if row.key_budget_usd is not None:
        budgets.append(Limit("key", row.key_id, to_nano_down(row.key_budget_usd)))
    return AppliedLimits(tuple(requests), tuple(tokens), tuple(budgets))


def duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `12s`, `1m0s`."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class BudgetExhausted(MeterlineError):
    """OpenAI's answer when an account is out of credit: 429 `insufficient_quota`."""

    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    description = (
        "The monthly budget cannot pay it (the message says what was spent and held);"
        " `Retry-After` counts down to the next month."
    )
    documented_headers = {"Retry-After": "integer"}


def budget_error(
    limit: Limit, spent: int, reserved: int, amount: int, resets_at: datetime
) -> BudgetExhausted:
    remaining = max(limit.limit - spent - reserved, 0)
    what = f"monthly budget of {limit.scope} {limit.owner}"
    reset = resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if remaining == 0:
        detail = "is exhausted"
    else:
        detail = (
            f"cannot cover this request: it may cost up to {from_nano(amount)} USD and "
            f"{from_nano(remaining)} USD remain"
        )
    message = (
        f"The {what} ({from_nano(limit.limit)} USD) {detail} "
        f"({from_nano(spent)} USD spent, {from_nano(reserved)} USD held by requests in "
        f"flight). It resets at {reset}."
    )
    retry_after = max(math.ceil((resets_at - datetime.now(UTC)).total_seconds()), 1)
    return BudgetExhausted(message, headers={"retry-after": str(retry_after)})


class BudgetUnavailable(MeterlineError):
    """A budget whose spend is not known yet (never synced from the ledger): 503, retry."""

    status_code = 503
    type = "api_error"
    code = "budget_unavailable"
    description = (
        "The budget's spend cannot be read from the ledger now: retry after `Retry-After` seconds."
    )
    documented_headers = {"Retry-After": "integer"}


# A client told to retry comes back after this long (the OpenAI SDKs honour Retry-After).
UNAVAILABLE_RETRY_S = 2


# Why a budget cannot be checked: its spend comes from the ledger, its counters from Redis.
LEDGER_UNREACHABLE = "what it has spent this month is read from the ledger, which is unreachable"
COUNTERS_UNREACHABLE = "its counters are kept in Redis, which did not answer"


def budget_unavailable(limit: Limit, why: str = LEDGER_UNREACHABLE) -> BudgetUnavailable:
    message = (
        f"The monthly budget of {limit.scope} {limit.owner} cannot be checked right now: "
        f"{why}. Nothing was sent; try again shortly."
    )
    return BudgetUnavailable(message, headers={"retry-after": str(UNAVAILABLE_RETRY_S)})


def rate_error(kind: str, limit: Limit, used: int, cost: int, reset_s: float) -> RateLimited:
    noun = "requests" if kind == "requests" else "tokens"
    if cost > limit.limit:
        message = (
            f"Request too large for the {noun} per minute limit of {limit.scope} "
            f"{limit.owner}: it needs {cost} {noun}, the limit is {limit.limit}."
        )
    else:
        message = (
            f"Rate limit reached for {limit.scope} {limit.owner}: {limit.limit} {noun} per "
            f"minute, {used} used. Try again in {duration(reset_s)}."
        )
    return RateLimited(message)


class InsufficientCredits(MeterlineError):
    """A prepaid account whose credits cannot pay the request: 402, not worth retrying."""

    status_code = 402
    type = "insufficient_credits"
    code = "insufficient_credits"
    description = (
        "The account is prepaid and its credits cannot pay this request (the message says"
        " what is left and held); buy credits, then try again."
    )


def credit_error(
    account_id: uuid.UUID, limit: int, spent: int, reserved: int, amount: int
) -> InsufficientCredits:
    """`limit - spent` is what the credits hold now (see `Limits._credit_limit`)."""
    balance = max(limit - spent, 0)
    available = max(balance - reserved, 0)
    if available == 0:
        detail = "has no credit available"
    else:
        detail = (
            f"cannot pay this request: it may cost up to {from_nano(amount)} USD and "
            f"{from_nano(available)} USD are available"
        )
    message = (
        f"Prepaid account {account_id} {detail} (balance {from_nano(balance)} USD, "
        f"{from_nano(reserved)} USD held by requests in flight). Add credits to continue."
    )
    return InsufficientCredits(message, headers={"x-should-retry": "false"})


def credits_unavailable(account_id: uuid.UUID, why: str = LEDGER_UNREACHABLE) -> BudgetUnavailable:
    message = (
        f"The credit balance of prepaid account {account_id} cannot be checked right now: "
        f"{why.replace('this month', 'since its first credit')}. Nothing was sent; try again "
        "shortly."
    )
    return BudgetUnavailable(message, headers={"retry-after": str(UNAVAILABLE_RETRY_S)})

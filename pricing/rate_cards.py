"""What a customer pays and what the operator pays for the same tokens.

Three tables, each versioned by `effective_from` like list prices (`pricing.prices`):

- **list prices**: the one public price table (a `PriceBook`);
- **provider costs**: what each upstream charges the operator, per provider and model (an
  exact id or a glob), one `PriceBook` per provider: the same shape as a list price;
- **rate cards**: named plans; a version holds a markup over provider cost or over list
  price, and explicit per-model rates that win over the markup. An account is assigned a
  rate card from an instant on (or none: the list price).

`Tariff.customer_price` is the one answer to "what does this account pay for this model at
this instant": the proxy prices requests with it, invoices price unpriced rows with it, and
anything ranking models by an account's own price must ask it too.

A marked-up rate is rounded to the 6 decimals of any stored rate (half away from zero): a
rate card publishes $/M rates like a price table, and a row's cost is then its tokens times
those rates, exact to 12 decimals like every other ledger cost.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from pricing.cost import TokenUsage, usage_costs
from pricing.price_table import MAX_RATE, RATE_STEP, PriceTableError
from pricing.prices import BEGINNING_OF_TIME, Price, PriceBook, PriceSegment

HUNDRED = Decimal(100)
# A markup may take the price down to zero, never below it.
MIN_MARKUP_PCT = Decimal(-100)
# NUMERIC(9, 4): up to 99,999.9999 %.
MAX_MARKUP_PCT = Decimal("99999.9999")
MARKUP_STEP = Decimal("0.0001")


class MarkupBasis(StrEnum):
    """What a rate card's markup is applied to."""

    PROVIDER_COST = "provider_cost"
    LIST_PRICE = "list_price"


@dataclass(frozen=True, slots=True)
class RateCardTerms:
    """A rate card's terms from `effective_from` on, until its next version starts."""

    rate_card_id: int
    effective_from: datetime
    markup_pct: Decimal
    markup_basis: MarkupBasis
    # Explicit rates per model (exact id or glob; their `effective_from` is ignored): they
    # win over the markup.
    rates: tuple[Price, ...] = ()
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class RateCardAssignment:
    """From `effective_from` on, `account_id` pays by `rate_card_id` (None: list prices)."""

    account_id: uuid.UUID
    rate_card_id: int | None
    effective_from: datetime


@dataclass(frozen=True, slots=True)
class CustomerPrice:
    """The rates an account pays for a model at an instant, and what they came from.

    `price` holds the rates charged (None: unpriced, never $0); `list_price` is the list
    version in force (kept on the ledger row as `price_version_id`); `rate_card` is the
    version the account's rate card had then (None: no rate card, the list price is
    charged); `provider_cost` is the upstream's cost then (None: unknown).
    """

    price: Price | None
    list_price: Price | None
    rate_card: RateCardTerms | None
    provider_cost: Price | None


@dataclass(slots=True)
class Charge:
    """The two exact figures of one ledger row and the versions they were computed with."""

    cost_usd: Decimal | None
    price_version_id: int | None
    provider_cost_usd: Decimal | None
    provider_cost_version_id: int | None
    rate_card_version_id: int | None


def validate_markup(markup_pct: Decimal) -> Decimal:
    """A markup in percent: at least -100 (free), at most 4 decimals; returned unchanged."""
    if not markup_pct.is_finite() or not MIN_MARKUP_PCT <= markup_pct <= MAX_MARKUP_PCT:
        raise PriceTableError(f"markup_pct must be from {MIN_MARKUP_PCT} to {MAX_MARKUP_PCT}")
    if markup_pct.quantize(MARKUP_STEP) != markup_pct:
        raise PriceTableError("markup_pct has more than 4 decimal places")
    return markup_pct


def marked_up(base: Price, markup_pct: Decimal) -> Price:
    """`base`'s rates times (1 + markup_pct / 100), each rounded to a stored rate's 6 decimals."""
    factor = 1 + markup_pct / HUNDRED

    def rate(value: Decimal) -> Decimal:
        return min((value * factor).quantize(RATE_STEP, rounding=ROUND_HALF_UP), MAX_RATE)

    cached = base.cached_input_usd_per_mtok
    return replace(
        base,
        input_usd_per_mtok=rate(base.input_usd_per_mtok),
        output_usd_per_mtok=rate(base.output_usd_per_mtok),
        cached_input_usd_per_mtok=None if cached is None else rate(cached),
        version_id=None,
    )


@dataclass
class _Card:
    versions: list[RateCardTerms] = field(default_factory=list)
    starts: list[datetime] = field(default_factory=list)
    # Each version's explicit rates as a book (exact id over globs, the longest glob first).
    rates: list[PriceBook] = field(default_factory=list)


def _timeline(items: list[datetime], at: datetime) -> int:
    """Index of the last start <= `at` in sorted `items`, or -1."""
    return bisect.bisect_right(items, at) - 1


def _around(items: list[datetime], at: datetime) -> tuple[datetime | None, datetime | None]:
    """The span between the starts of sorted `items` that holds `at`."""
    index = bisect.bisect_right(items, at)
    return (
        items[index - 1] if index else None,
        items[index] if index < len(items) else None,
    )


class Tariff:
    """List prices, provider costs, rate cards and their assignments: answers, without I/O,
    what an account pays and what the operator pays for usage at an instant."""

    def __init__(
        self,
        list_prices: PriceBook,
        provider_costs: Mapping[str, PriceBook] | None = None,
        rate_cards: Iterable[RateCardTerms] = (),
        assignments: Iterable[RateCardAssignment] = (),
    ) -> None:
        self.list_prices = list_prices
        self.provider_costs = dict(provider_costs or {})
        self._cards: dict[int, _Card] = {}
        for version in sorted(rate_cards, key=lambda v: v.effective_from):
            card = self._cards.setdefault(version.rate_card_id, _Card())
            card.versions.append(version)
            card.starts.append(version.effective_from)
            rates = (replace(p, effective_from=BEGINNING_OF_TIME) for p in version.rates)
            card.rates.append(PriceBook(rates))
        self._assignments: dict[uuid.UUID, tuple[list[datetime], list[int | None]]] = {}
        for a in sorted(assignments, key=lambda a: a.effective_from):
            starts, cards = self._assignments.setdefault(a.account_id, ([], []))
            starts.append(a.effective_from)
            cards.append(a.rate_card_id)

    def _card_at(self, account_id: uuid.UUID, at: datetime) -> tuple[_Card, int] | None:
        assigned = self._assignments.get(account_id)
        if assigned is None:
            return None
        index = _timeline(assigned[0], at)
        card_id = assigned[1][index] if index >= 0 else None
        card = self._cards.get(card_id) if card_id is not None else None
        if card is None:
            return None
        index = _timeline(card.starts, at)
        return (card, index) if index >= 0 else None

    def unchanged_span(
        self, account_id: uuid.UUID, at: datetime
    ) -> tuple[datetime | None, datetime | None]:
        """The span `[start, end)` around `at` in which nothing `customer_price` reads for
        `account_id` changes: no list price or provider cost version starts, nor the
        account's rate-card assignment or a version of its card. None: unbounded."""
        spans = [self.list_prices.unchanged_span(at)]
        spans += [book.unchanged_span(at) for book in self.provider_costs.values()]
        assigned = self._assignments.get(account_id)
        if assigned is not None:
            spans.append(_around(assigned[0], at))
            index = _timeline(assigned[0], at)
            card_id = assigned[1][index] if index >= 0 else None
            card = self._cards.get(card_id) if card_id is not None else None
            if card is not None:  # the card assigned all through the span
                spans.append(_around(card.starts, at))
        starts = [start for start, _ in spans if start is not None]
        ends = [end for _, end in spans if end is not None]
        return (max(starts) if starts else None, min(ends) if ends else None)

    def rate_card_of(self, account_id: uuid.UUID, at: datetime) -> RateCardTerms | None:
        """The version of the rate card `account_id` is assigned at `at`, if any."""
        found = self._card_at(account_id, at)
        return None if found is None else found[0].versions[found[1]]

    def has_rate_card(self, account_id: uuid.UUID) -> bool:
        """Whether `account_id` was ever assigned a rate card."""
        assigned = self._assignments.get(account_id)
        return assigned is not None and any(c is not None for c in assigned[1])

    def provider_cost(self, provider: str | None, model: str, at: datetime) -> Price | None:
        """What `provider` charges for `model` at `at`; None when unknown (never zero)."""
        book = self.provider_costs.get(provider) if provider is not None else None
        return book.price_for(model, at) if book is not None else None

    def customer_price(
        self, account_id: uuid.UUID, model: str, at: datetime, provider: str | None = None
    ) -> CustomerPrice:
        """What `account_id` pays for `model` at `at` (served by `provider`, whose cost a
        markup over provider cost applies to). Without a rate card: the list price."""
        listed = self.list_prices.price_for(model, at)
        cost = self.provider_cost(provider, model, at)
        found = self._card_at(account_id, at) if self._assignments else None
        if found is None:
            return CustomerPrice(listed, listed, None, cost)
        card, index = found
        version = card.versions[index]
        explicit = card.rates[index].price_for(model, at)
        if explicit is not None:
            charged: Price | None = replace(explicit, version_id=None)
        else:
            base = cost if version.markup_basis is MarkupBasis.PROVIDER_COST else listed
            charged = None if base is None else marked_up(base, version.markup_pct)
        return CustomerPrice(charged, listed, version, cost)

    def charge(
        self,
        account_id: uuid.UUID,
        model: str,
        at: datetime,
        provider: str | None,
        usage: TokenUsage,
    ) -> Charge:
        """Both exact figures of a ledger row for `usage`, with the versions used (the
        proxy's path: one call per request)."""
        if account_id in self._assignments:
            price = self.customer_price(account_id, model, at, provider)
            charged, listed, cost = price.price, price.list_price, price.provider_cost
            card = price.rate_card
        else:  # no rate card ever: the list price, as `customer_price` answers it
            listed = charged = self.list_prices.price_for(model, at)
            cost, card = self.provider_cost(provider, model, at), None
        cost_usd, provider_cost_usd = usage_costs(usage, charged, cost)
        return Charge(
            cost_usd=cost_usd,
            price_version_id=None if listed is None else listed.version_id,
            provider_cost_usd=provider_cost_usd,
            provider_cost_version_id=None if cost is None else cost.version_id,
            rate_card_version_id=None if card is None else card.version_id,
        )

    def customer_segments(self, account_id: uuid.UUID, model: str) -> list[PriceSegment]:
        """The timeline of what `account_id` pays for `model` with no provider known (a
        markup over provider cost then prices nothing): consecutive spans, each with the
        rates then charged, cut wherever a list price, a rate-card version or an assignment
        of the account starts. For rows stored unpriced, repriced on a draft."""
        cuts = {s.start for s in self.list_prices.segments(model) if s.start is not None}
        starts, cards = self._assignments.get(account_id, ([], []))
        cuts |= set(starts)
        for card_id in {c for c in cards if c is not None}:
            if card_id in self._cards:
                cuts |= set(self._cards[card_id].starts)
        spans: list[PriceSegment] = []
        bounds: list[datetime | None] = [None, *sorted(cuts)]
        for index, start in enumerate(bounds):
            end = bounds[index + 1] if index + 1 < len(bounds) else None
            price = None if start is None else self.customer_price(account_id, model, start).price
            if spans and spans[-1].price == price:
                spans[-1] = PriceSegment(spans[-1].start, end, price)
            else:
                spans.append(PriceSegment(start, end, price))
        return spans

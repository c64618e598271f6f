"""Price versions and the lookup of the price in force for a model at an instant."""

from __future__ import annotations

import bisect
import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase

from pricing.money import to_money

# The default table's prices apply to all history: rows recorded before any price existed
# are priced by it, not left unpriced.
BEGINNING_OF_TIME = datetime(1970, 1, 1, tzinfo=UTC)
# The first instant Meterline cannot bill: the end of 9999-11, the last UTC month whose end
# (the first instant of the next month) a datetime can still hold.
END_OF_TIME = datetime(9999, 12, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1,000,000 tokens for `model` (an exact id or a glob) from `effective_from` on."""

    model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    effective_from: datetime
    cached_input_usd_per_mtok: Decimal | None = None
    version_id: int | None = None

    @property
    def is_pattern(self) -> bool:
        return any(c in self.model for c in "*?[")


class PriceBook:
    """All price versions; answers "what did `model` cost at `at`?" without I/O.

    An exact model id wins over patterns; among patterns, the longest (most specific) one
    that matches wins. Within one id or pattern, the latest version with
    `effective_from <= at` is in force.

    A book never changes (a new price makes a new book), so its answers are remembered per
    model over one span of time in which no version starts: pricing a request is then a
    dict lookup. The span is the one around the instant asked when the memo was last
    filled, and only a later instant moves it on. An instant before the span — a stream
    that began before a new version came into force and ended after a newer request moved
    the memo past it — is looked up afresh: every row is priced by the version in force at
    its own `occurred_at`.
    """

    def __init__(self, prices: Iterable[Price]) -> None:
        by_model: dict[str, list[Price]] = {}
        for price in prices:
            by_model.setdefault(price.model, []).append(price)
        self._versions = {m: sorted(v, key=lambda p: p.effective_from) for m, v in by_model.items()}
        self._starts = {m: [p.effective_from for p in v] for m, v in self._versions.items()}
        self._every_start = sorted({start for starts in self._starts.values() for start in starts})
        self._patterns = sorted(
            (m for m, v in self._versions.items() if v[0].is_pattern), key=len, reverse=True
        )
        # (start, end, prices) of the memo's span, replaced whole: a reader never sees the
        # prices of one span with the bounds of another.
        self._memo: tuple[datetime | None, datetime | None, dict[str, Price | None]] | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._versions.values())

    def _in_force(self, key: str, at: datetime) -> Price | None:
        index = bisect.bisect_right(self._starts[key], at)
        return self._versions[key][index - 1] if index else None

    def price_for(self, model: str, at: datetime) -> Price | None:
        """The price in force for `model` at `at`, or None if the model is unpriced then."""
        memo = self._memo
        if memo is None or (memo[1] is not None and at >= memo[1]):
            memo = self._memo = (*self.unchanged_span(at), {})
        elif memo[0] is not None and at < memo[0]:
            return self._look_up(model, at)
        prices = memo[2]
        try:
            return prices[model]
        except KeyError:
            price = prices[model] = self._look_up(model, at)
            return price

    def _look_up(self, model: str, at: datetime) -> Price | None:
        if model in self._versions and not self._versions[model][0].is_pattern:
            exact = self._in_force(model, at)
            if exact is not None:
                return exact
        for pattern in self._patterns:
            if fnmatchcase(model, pattern):
                price = self._in_force(pattern, at)
                if price is not None:
                    return price
        return None

    def unchanged_span(self, at: datetime) -> tuple[datetime | None, datetime | None]:
        """The span `[start, end)` around `at` in which no version of any model starts.

        No model's price changes within it, so a price looked up at `at` is the price at
        every instant of the span. None: unbounded on that side.
        """
        index = bisect.bisect_right(self._every_start, at)
        start = self._every_start[index - 1] if index else None
        end = self._every_start[index] if index < len(self._every_start) else None
        return start, end

    def versions(self) -> list[Price]:
        """Every version, grouped by model or pattern, oldest first within each."""
        return [p for v in self._versions.values() for p in v]

    def in_force(self, at: datetime) -> list[Price]:
        """For each model id and pattern, the version in force at `at` (if one has started)."""
        current = (self._in_force(key, at) for key in self._versions)
        return [price for price in current if price is not None]

    def segments(self, model: str) -> list[PriceSegment]:
        """The whole timeline of `model` as consecutive spans, each with the price then in force.

        The price of a model can only change at an `effective_from` of a version that may
        apply to it (its exact id or a pattern matching it), so the timeline is cut there.
        The first span starts at None (the beginning of time), the last ends at None; a
        span whose `price` is None is time in which the model had no price.
        """
        keys = [k for k in self._versions if k == model or fnmatchcase(model, k)]
        starts = sorted({start for key in keys for start in self._starts[key]})
        spans: list[PriceSegment] = []
        bounds: list[datetime | None] = [None, *starts]
        for index, start in enumerate(bounds):
            end = bounds[index + 1] if index + 1 < len(bounds) else None
            price = None if start is None else self._look_up(model, start)
            if spans and spans[-1].price == price:
                spans[-1] = PriceSegment(spans[-1].start, end, price)
            else:
                spans.append(PriceSegment(start, end, price))
        return spans


@dataclass(frozen=True, slots=True)
class PriceSegment:
    """`price` is in force for a model from `start` (inclusive) to `end` (exclusive)."""

    start: datetime | None
    end: datetime | None
    price: Price | None

    def contains(self, at: datetime) -> bool:
        """Whether the instant `at` falls in this span."""
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)


def parse_list_prices(text: str, effective_from: datetime = BEGINNING_OF_TIME) -> list[Price]:
    """Parse a provider's list (`model,…,usd_per_million_tokens,…`): one price for both sides."""
    prices = []
    for row in csv.DictReader(io.StringIO(text)):
        rate = to_money(row["usd_per_million_tokens"].strip())
        prices.append(Price(row["model"].strip(), rate, rate, effective_from))
    return prices

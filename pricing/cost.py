"""The exact cost of one usage record."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pricing.money import MILLION, exact
from pricing.prices import Price


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    # Part of `prompt_tokens` served from the provider's cache.
    cached_tokens: int = 0


def countable_cached_tokens(usage: TokenUsage) -> int:
    """The cached tokens that can be priced apart: never negative, never more than the prompt.

    The invoice query applies the same clamp to each ledger row before summing, which is
    what makes `totals_cost` of the sums equal the sum of every row's `usage_cost`.
    """
    return min(max(usage.cached_tokens, 0), usage.prompt_tokens)


def usage_cost(usage: TokenUsage, price: Price) -> Decimal:
    """Exact USD cost, unrounded. Cached input is priced apart only when a cached price exists."""
    return totals_cost(
        TokenUsage(usage.prompt_tokens, usage.completion_tokens, countable_cached_tokens(usage)),
        price,
    )


def totals_cost(totals: TokenUsage, price: Price) -> Decimal:
    """Exact USD cost of summed usage whose `cached_tokens` were clamped row by row.

    Cost is linear in the token counts, so for rows r1…rn priced at one `price`,
    `totals_cost(sum of rows with cached clamped per row) == sum(usage_cost(ri))`, exactly:
    Decimal arithmetic here never rounds (a rate has 6 decimals, the result at most 12).
    """
    with exact():
        return _cost(totals, price)


def usage_costs(
    usage: TokenUsage, first: Price | None, second: Price | None
) -> tuple[Decimal | None, Decimal | None]:
    """`usage_cost` at two prices (None: no price, no cost) in one exact context: the two
    figures of one ledger row, on the proxy's path, where entering a context costs."""
    totals = TokenUsage(
        usage.prompt_tokens, usage.completion_tokens, countable_cached_tokens(usage)
    )
    with exact():
        return (
            None if first is None else _cost(totals, first),
            None if second is None else _cost(totals, second),
        )


def _cost(totals: TokenUsage, price: Price) -> Decimal:
    # Within an `exact()` context.
    cached = totals.cached_tokens if price.cached_input_usd_per_mtok is not None else 0
    fresh = totals.prompt_tokens - cached
    micro_usd = (
        fresh * price.input_usd_per_mtok
        + cached * (price.cached_input_usd_per_mtok or Decimal(0))
        + totals.completion_tokens * price.output_usd_per_mtok
    )
    return micro_usd / MILLION

"""The exact cost of one usage record."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pricing.money import MILLION
from pricing.prices import Price


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    # Part of `prompt_tokens` served from the provider's cache.
    cached_tokens: int = 0


def usage_cost(usage: TokenUsage, price: Price) -> Decimal:
    """Exact USD cost, unrounded. Cached input is priced apart only when a cached price exists."""
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    if price.cached_input_usd_per_mtok is None:
        cached = 0
    fresh = usage.prompt_tokens - cached
    micro_usd = (
        fresh * price.input_usd_per_mtok
        + cached * (price.cached_input_usd_per_mtok or Decimal(0))
        + usage.completion_tokens * price.output_usd_per_mtok
    )
    return micro_usd / MILLION

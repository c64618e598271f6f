"""What a request's budget reservation pays for: exact nano-USD rates per token.

The tokens a request may use are estimated in `service.tokens.estimate`; these turn them
into nano-USD and back.
"""

from __future__ import annotations

from decimal import Decimal

from pricing.prices import Price


def nano_per_token(price: Price) -> tuple[Decimal, Decimal]:
    """(prompt, completion) list price in nano-USD per token, exact: a list price is linear
    in tokens, so a worst case is `ceil(tokens * rate)` summed, never below its cost."""
    return price.input_usd_per_mtok * 1000, price.output_usd_per_mtok * 1000


def affordable_completion(price: Price, prompt_nano: int, granted_nano: int, n: int) -> int:
    """Completion tokens per choice that `granted_nano` pays once the prompt is paid for.

    `c` tokens per choice cost `c * n * rate` nano-USD, so the prompt's cost plus theirs,
    rounded up to a nano-USD, never exceeds `granted_nano`.
    """
    rate = nano_per_token(price)[1]
    left = granted_nano - prompt_nano
    if left <= 0 or n <= 0:
        return 0
    if rate <= 0:
        return 2**31 - 1
    return int(Decimal(left) / (rate * n))

"""Fixed-price task quotes: a quantile of past costs (or an estimate) plus a margin.

A quote's cost basis is either *history* — the `confidence` quantile of the actual costs of
an account's completed tasks of one type on one model — or, with too little history, an
*estimate*: the prompt's tokens plus the whole completion budget at the model's list price.
The price is that basis plus the margin, rounded up to the cent, so a fixed price never
comes out below the cost it was derived from.

The quantile is the discrete one (Postgres' `percentile_disc`): the smallest past cost `c`
such that at least `confidence` of the sample cost `c` or less. It is always a cost that
actually occurred, so no interpolation (and no float) is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from enum import StrEnum

from pricing.cost import TokenUsage, usage_cost
from pricing.money import round_up_cents
from pricing.prices import Price

# Exact costs are kept to 12 decimal places (NUMERIC(24, 12)); statistics of them too.
COST_QUANTUM = Decimal("1E-12")
ONE = Decimal(1)


class QuoteBasis(StrEnum):
    """What a quote's cost basis was drawn from: past tasks, or the request's own tokens."""

    HISTORY = "history"
    ESTIMATE = "estimate"


class CostSource(StrEnum):
    """Whose cost an estimate's tokens were priced at: what the upstream charges the operator
    (the operator's risk, used where known), else the list price."""

    PROVIDER_COST = "provider_cost"
    LIST_PRICE = "list_price"


def validate_confidence(confidence: Decimal) -> Decimal:
    """A confidence is a share strictly between 0 and 1 (0.9 = the 90th percentile)."""
    if not Decimal(0) < confidence < ONE:
        raise ValueError(f"confidence must be between 0 and 1 exclusive, got {confidence}")
    return confidence


def quantile_rank(sample_size: int, confidence: Decimal) -> int:
    """1-based rank of the `confidence` quantile in a sorted sample: ceil(confidence * n).

    Computed in exact decimal arithmetic, so 0.9 of 100 is rank 90, never 91.
    """
    if sample_size < 1:
        raise ValueError("a quantile needs at least one value")
    validate_confidence(confidence)
    rank = int((confidence * sample_size).to_integral_value(rounding=ROUND_CEILING))
    return min(max(rank, 1), sample_size)


def quantile(costs: Sequence[Decimal], confidence: Decimal) -> Decimal:
    """The discrete `confidence` quantile of `costs` (Postgres `percentile_disc` semantics)."""
    ordered = sorted(costs)
    return ordered[quantile_rank(len(ordered), confidence) - 1]


@dataclass(frozen=True, slots=True)
class BucketPosition:
    """Where the quantile sits in a histogram of sorted, non-overlapping cost buckets."""

    bucket: int
    rank_in_bucket: int  # 1-based, counting from the bucket's cheapest cost
    bucket_size: int

    @property
    def rank_from_top(self) -> int:
        """1-based rank counting from the bucket's dearest cost (walk the shorter way)."""
        return self.bucket_size - self.rank_in_bucket + 1


def locate_rank(buckets: Sequence[tuple[int, int]], rank: int) -> BucketPosition:
    """Find the bucket holding the `rank`-th smallest cost.

    `buckets` are `(bucket, count)` pairs whose buckets are ordered like the costs they hold
    (every cost of a lower bucket is below every cost of a higher one); they need not be
    sorted on input. `rank` is 1-based and at most the total count.
    """
    seen = 0
    for bucket, count in sorted(buckets):
        if count <= 0:
            continue
        if seen + count >= rank:
            return BucketPosition(bucket, rank - seen, count)
        seen += count
    raise ValueError(f"rank {rank} is beyond the {seen} costs in the buckets")


def mean_cost(total_cost: Decimal, sample_size: int) -> Decimal:
    """The average cost, kept to the 12 decimal places of an exact cost."""
    if sample_size < 1:
        raise ValueError("a mean needs at least one value")
    return (total_cost / sample_size).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def estimate_cost(prompt_tokens: int, max_completion_tokens: int, price: Price) -> Decimal:
    """Upper-bound cost of one call: the prompt plus the full completion budget at `price`."""
    if prompt_tokens < 0 or max_completion_tokens < 0:
        raise ValueError("token counts must not be negative")
    return usage_cost(TokenUsage(prompt_tokens, max_completion_tokens), price)


def quote_price(cost_basis: Decimal, margin: Decimal) -> Decimal:
    """The fixed price: `cost_basis * (1 + margin)`, rounded up to the cent (never below cost)."""
    if cost_basis < 0:
        raise ValueError("a cost basis must not be negative")
    if margin < 0:
        raise ValueError("a margin must not be negative")
    return round_up_cents(cost_basis * (ONE + margin))


def cost_cap(price: Decimal, multiple: Decimal) -> Decimal:
    """The actual cost at which a quoted task stops accepting requests (`multiple` * price)."""
    if multiple <= 0:
        raise ValueError("the cap multiple must be positive")
    return price * multiple


@dataclass(frozen=True, slots=True)
class Margin:
    amount: Decimal  # revenue - cost, exact
    percent: Decimal | None  # of revenue, to 0.01 %; None without revenue


def margin(revenue: Decimal, cost: Decimal) -> Margin:
    """What fixed-price revenue kept over the actual token cost, in USD and as % of revenue."""
    amount = revenue - cost
    if revenue == 0:
        return Margin(amount, None)
    percent = (amount * 100 / revenue).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return Margin(amount, percent)


def share(part: int, whole: int) -> Decimal | None:
    """`part / whole` to four decimal places (a calibration share); None for an empty whole."""
    if whole == 0:
        return None
    return (Decimal(part) / whole).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)

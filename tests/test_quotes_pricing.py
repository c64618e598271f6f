"""pricing/quote.py: the quantile, its location in a bucketed histogram, the price, the margin."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricing.prices import Price
from pricing.quote import (
    cost_cap,
    estimate_cost,
    locate_rank,
    margin,
    mean_cost,
    quantile,
    quantile_rank,
    quote_price,
    share,
)

costs = st.lists(
    st.decimals(min_value=0, max_value=1000, places=12, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)
confidences = st.decimals(min_value="0.0001", max_value="0.9999", places=4)


def test_rank_is_exact_where_float_would_slip() -> None:
    # 0.9 x 100 must be rank 90 (float arithmetic may round it up to 91).
    assert quantile_rank(100, Decimal("0.9")) == 90
    assert quantile_rank(10, Decimal("0.7")) == 7
    assert quantile_rank(3, Decimal("0.5")) == 2
    assert quantile_rank(1, Decimal("0.0001")) == 1


def test_quantile_of_one_to_a_hundred() -> None:
    values = [Decimal(i) for i in range(100, 0, -1)]
    assert quantile(values, Decimal("0.9")) == 90
    assert quantile(values, Decimal("0.5")) == 50
    assert quantile(values, Decimal("0.95")) == 95
    assert quantile(values, Decimal("0.901")) == 91


@given(costs, confidences)
def test_quantile_is_the_smallest_cost_covering_the_confidence(
    values: list[Decimal], confidence: Decimal
) -> None:
    q = quantile(values, confidence)
    assert q in values
    covered = sum(1 for v in values if v <= q)
    assert Decimal(covered) >= confidence * len(values)
    below = sum(1 for v in values if v < q)
    assert Decimal(below) < confidence * len(values)


@given(costs, confidences, st.integers(min_value=1, max_value=64))
def test_locating_through_buckets_finds_the_same_quantile(
    values: list[Decimal], confidence: Decimal, resolution: int
) -> None:
    """Any bucketing that is ordered like the costs leads to the very same cost."""

    def bucket(c: Decimal) -> int:
        return -32768 if c <= 0 else math.floor(c.ln() * resolution)

    histogram: dict[int, list[Decimal]] = {}
    for v in values:
        histogram.setdefault(bucket(v), []).append(v)
    rank = quantile_rank(len(values), confidence)
    position = locate_rank([(b, len(vs)) for b, vs in histogram.items()], rank)
    inside = sorted(histogram[position.bucket])
    assert position.bucket_size == len(inside)
    from_bottom = inside[position.rank_in_bucket - 1]
    from_top = sorted(inside, reverse=True)[position.rank_from_top - 1]
    assert from_bottom == from_top == quantile(values, confidence)


def test_locate_rank_refuses_a_rank_beyond_the_sample() -> None:
    with pytest.raises(ValueError):
        locate_rank([(1, 2), (2, 3)], 6)
    assert locate_rank([(2, 3), (1, 2), (5, 0)], 3).bucket == 2


@given(
    st.decimals(min_value=0, max_value=10_000, places=12),
    st.decimals(min_value=0, max_value=5, places=4),
)
def test_price_covers_cost_plus_margin_by_less_than_a_cent(cost: Decimal, m: Decimal) -> None:
    price = quote_price(cost, m)
    assert price == price.quantize(Decimal("0.01"))
    assert cost * (1 + m) <= price < cost * (1 + m) + Decimal("0.01")


def test_price_rounds_up_never_down() -> None:
    assert quote_price(Decimal("0.0100001"), Decimal("0")) == Decimal("0.02")
    assert quote_price(Decimal("1.00"), Decimal("0.20")) == Decimal("1.20")
    assert quote_price(Decimal("0"), Decimal("0.20")) == Decimal("0.00")
    with pytest.raises(ValueError):
        quote_price(Decimal("-1"), Decimal("0.2"))


def test_estimate_is_prompt_plus_full_budget_at_list_price() -> None:
    price = Price("m", Decimal("0.40"), Decimal("1.20"), datetime(2020, 1, 1, tzinfo=UTC))
    # 1,000 prompt tokens at $0.40/M + 2,000 completion tokens at $1.20/M.
    assert estimate_cost(1000, 2000, price) == Decimal("0.0028")


def test_mean_cap_margin_share() -> None:
    assert mean_cost(Decimal("1"), 3) == Decimal("0.333333333333")
    assert cost_cap(Decimal("1.25"), Decimal("3")) == Decimal("3.75")
    kept = margin(Decimal("12.00"), Decimal("9.00"))
    assert (kept.amount, kept.percent) == (Decimal("3.00"), Decimal("25.00"))
    assert margin(Decimal("0"), Decimal("2")).percent is None
    assert share(9, 10) == Decimal("0.9000")
    assert share(0, 0) is None

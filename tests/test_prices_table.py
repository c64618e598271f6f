"""Price tables as text and the price timeline of a model (pure)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.money import round_cents
from pricing.price_table import PriceTableError, format_price_table, parse_price_table
from pricing.prices import Price, PriceBook
from service.prices.repository import default_prices

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)
rates = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)
models = st.sampled_from(["meta-llama/*", "deepseek-ai/DeepSeek-V3", "a/b,c", 'q"uote', "ü/*"])
instants = st.integers(0, 10**9).map(
    lambda s: datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.builds(
            Price,
            model=models,
            input_usd_per_mtok=rates,
            output_usd_per_mtok=rates,
            effective_from=instants,
            cached_input_usd_per_mtok=st.none() | rates,
        ),
        max_size=8,
        unique_by=lambda p: (p.model, p.effective_from),
    ),
    st.sampled_from(["csv", "yaml"]),
)
def test_export_then_import_gives_back_the_same_versions(prices: list[Price], fmt: str) -> None:
    text = format_price_table(prices, fmt)  # type: ignore[arg-type]
    back = parse_price_table(text, fmt, default_effective_from=NOW)  # type: ignore[arg-type]
    key = lambda p: (p.model, p.effective_from)  # noqa: E731
    assert sorted(back, key=key) == sorted(prices, key=key)


def test_yaml_numbers_are_read_from_their_text_never_through_a_float() -> None:
    text = """
prices:
  - model: acme/*
    input_usd_per_mtok: 0.1
    output_usd_per_mtok: 0.3
    effective_from: 2026-01-01
  - model: acme/fast
    usd_per_mtok: 2
"""
    first, second = parse_price_table(text, "yaml", default_effective_from=NOW)
    assert (first.input_usd_per_mtok, first.output_usd_per_mtok) == (
        Decimal("0.1"),
        Decimal("0.3"),
    )
    assert first.effective_from == datetime(2026, 1, 1, tzinfo=UTC)
    assert (second.input_usd_per_mtok, second.output_usd_per_mtok) == (Decimal(2), Decimal(2))
    assert second.effective_from == NOW


def test_a_providers_list_with_one_price_is_read_for_input_and_output() -> None:
    text = "model,context_tokens,usd_per_million_tokens,endpoint\nx/y,1024,0.40,chat\n"
    (price,) = parse_price_table(text, "csv", default_effective_from=NOW)
    assert price.input_usd_per_mtok == price.output_usd_per_mtok == Decimal("0.40")
    assert price.cached_input_usd_per_mtok is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model,input_usd_per_mtok,output_usd_per_mtok\nm,0.1234567,1\n", "6 decimal places"),
        ("model,input_usd_per_mtok,output_usd_per_mtok\nm,-1,1\n", "non-negative"),
        ("model,input_usd_per_mtok,output_usd_per_mtok\nm,abc,1\n", "not a number"),
        ("model,input_usd_per_mtok,output_usd_per_mtok\nm,1,\n", "required"),
        ("model,input_usd_per_mtok,output_usd_per_mtok,effective_from\nm,1,1,soon\n", "RFC 3339"),
        # Postgres would store it as -infinity, which reads back as a naive datetime.
        ("model,input_usd_per_mtok,output_usd_per_mtok,effective_from\nm,1,1,0001-01-01\n", "1970"),
        ("name,price\nm,1\n", "`model` column"),
    ],
)
def test_a_bad_csv_table_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(PriceTableError, match=message):
        parse_price_table(text, "csv", default_effective_from=NOW)


def test_bad_yaml_is_refused() -> None:
    with pytest.raises(PriceTableError, match="entry 1"):
        parse_price_table("- model: m\n  input_usd_per_mtok: .inf\n", "yaml", NOW)
    with pytest.raises(PriceTableError, match="list of prices"):
        parse_price_table("prices: 3\n", "yaml", NOW)


def test_the_shipped_list_is_hyperbolics() -> None:
    prices = {p.model: p for p in default_prices()}
    v3 = prices["deepseek-ai/DeepSeek-V3"]
    assert v3.input_usd_per_mtok == v3.output_usd_per_mtok == Decimal("0.25")
    assert len(prices) > 10


versions = st.lists(
    st.builds(
        Price,
        model=st.sampled_from(["acme/big", "acme/*", "acme/b*", "*"]),
        input_usd_per_mtok=rates,
        output_usd_per_mtok=rates,
        effective_from=st.integers(0, 100).map(lambda h: NOW + timedelta(hours=h)),
        version_id=st.integers(1, 10**6),
    ),
    max_size=10,
    unique_by=lambda p: (p.model, p.effective_from),
)


@settings(max_examples=200, deadline=None)
@given(versions, st.lists(st.integers(-5, 110), max_size=20))
def test_the_timeline_of_a_model_agrees_with_the_lookup_at_every_instant(
    prices: list[Price], hours: list[int]
) -> None:
    book = PriceBook(prices)
    spans = book.segments("acme/big")
    assert spans[0].start is None and spans[-1].end is None
    assert all(a.end == b.start for a, b in itertools.pairwise(spans))
    for h in hours:
        at = NOW + timedelta(hours=h)
        (span,) = [s for s in spans if s.contains(at)]
        assert span.price == book.price_for("acme/big", at)


@settings(max_examples=200, deadline=None)
@given(versions, st.lists(st.integers(-5, 110), max_size=30))
def test_the_books_memo_answers_as_a_fresh_lookup_in_any_order_of_instants(
    prices: list[Price], hours: list[int]
) -> None:
    # Requests are priced when they finish, by the instant they began: a long stream asks
    # for an earlier instant after shorter, later requests did.
    book = PriceBook(prices)
    for h in hours:
        at = NOW + timedelta(hours=h)
        for model in ("acme/big", "acme/small"):
            # A new book has remembered nothing: its answer is the lookup itself.
            assert book.price_for(model, at) == PriceBook(prices).price_for(model, at)
        start, end = book.unchanged_span(at)
        assert (start is None or start <= at) and (end is None or at < end)
        # No version starts inside the span, so no price can change within it.
        inside = [
            p
            for p in prices
            if (start is None or start < p.effective_from)
            and (end is None or p.effective_from < end)
        ]
        assert inside == []


def test_a_stream_begun_before_a_new_version_keeps_the_old_price_after_the_memo_moved_on() -> None:
    switch = NOW + timedelta(hours=1)
    old = Price("acme/big", Decimal(1), Decimal(1), NOW, version_id=1)
    new = Price("acme/big", Decimal(5), Decimal(5), switch, version_id=2)
    book = PriceBook([old, new])
    stream_began = switch - timedelta(seconds=1)
    assert book.price_for("acme/big", stream_began) == old
    # A request at the switch moves the memo on; then the stream ends and is priced.
    assert book.price_for("acme/big", switch) == new
    assert book.price_for("acme/big", stream_began) == old
    assert book.price_for("acme/big", switch + timedelta(seconds=1)) == new


def test_an_exact_id_wins_over_patterns_and_the_longest_pattern_over_shorter_ones() -> None:
    book = PriceBook(
        [
            Price("acme/*", Decimal(1), Decimal(1), NOW, version_id=1),
            Price("acme/big*", Decimal(2), Decimal(2), NOW, version_id=2),
            Price("acme/big-1", Decimal(3), Decimal(3), NOW + timedelta(days=1), version_id=3),
        ]
    )
    assert book.price_for("acme/big-1", NOW).version_id == 2  # type: ignore[union-attr]
    later = NOW + timedelta(days=2)
    assert book.price_for("acme/big-1", later).version_id == 3  # type: ignore[union-attr]
    assert book.price_for("acme/small", later).version_id == 1  # type: ignore[union-attr]
    assert book.price_for("other/x", later) is None
    assert book.price_for("acme/small", NOW - timedelta(seconds=1)) is None


def test_rounding_is_half_away_from_zero() -> None:
    assert round_cents(Decimal("0.005")) == Decimal("0.01")
    assert round_cents(Decimal("-0.005")) == Decimal("-0.01")
    assert round_cents(Decimal("0.004999999999")) == Decimal("0.00")
    assert round_cents(Decimal("1234567890.125")) == Decimal("1234567890.13")

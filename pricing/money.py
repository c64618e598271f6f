"""Money as `Decimal`, and the one rounding rule of an invoice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal, Inexact, localcontext

CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)


@contextmanager
def exact() -> Iterator[None]:
    """Decimal arithmetic that raises instead of rounding: sums and products of money stay exact.

    The default context keeps 28 significant digits and would round silently beyond them.
    """
    with localcontext() as context:
        context.prec = 60
        context.traps[Inexact] = True
        yield


def to_money(value: Decimal | int | str) -> Decimal:
    """Accept money only in exact forms; a float here would already have lost precision."""
    if isinstance(value, float):
        raise TypeError("money must not be a float")
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"money must be finite, got {value!r}")
    return amount


def round_cents(amount: Decimal) -> Decimal:
    """Round to cents, half away from zero (Decimal's ROUND_HALF_UP): 0.005 → 0.01, -0.005 → -0.01.

    Called once per invoice line and nowhere else.
    """
    return amount.quantize(CENT, context=Context(prec=60, rounding=ROUND_HALF_UP))


def round_up_cents(amount: Decimal) -> Decimal:
    """Round up to the next cent: a fixed price must never come out below its cost basis."""
    return amount.quantize(CENT, rounding=ROUND_CEILING)


def format_usd(amount: Decimal, cents: bool = False) -> str:
    """Money as text for people: exact by default, `1234.567800` → `1,234.5678` (zeros past
    the cents dropped, never a digit), or rounded half away from zero to the cent for a
    figure labelled as rounded (`cents=True`). Display only: invoices use `round_cents`."""
    if cents:
        amount = amount.quantize(CENT, context=Context(prec=60, rounding=ROUND_HALF_UP))
    elif amount != amount.quantize(CENT, context=Context(prec=60)):
        text = format(amount, "f").rstrip("0")
        whole, _, fraction = text.partition(".")
        return f"{int(whole):,}.{fraction}" if whole != "-0" else f"-0.{fraction}"
    else:
        amount = amount.quantize(CENT, context=Context(prec=60))
    return f"{amount:,.2f}"

"""Price tables as text: CSV and YAML, read and written without losing a digit.

CSV columns: `model,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,
effective_from` (the last two may be empty or absent). A provider's list with one price per
model (`usd_per_million_tokens`, as in Hyperbolic's published table) is accepted too: that
price is used for input and output alike.

YAML: a list of mappings with the same keys, bare or under `prices:`. Numbers are read from
their text (never through a float), so `0.1` in a file is exactly `Decimal("0.1")`.

`effective_from` is RFC 3339; a date alone means midnight UTC, and a time without an offset
is taken as UTC. When a row has none, the caller's default applies (an import uses "now").
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import yaml

from pricing.prices import BEGINNING_OF_TIME, END_OF_TIME, Price

TableFormat = Literal["csv", "yaml"]

COLUMNS = (
    "model",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cached_input_usd_per_mtok",
    "effective_from",
)
# The scale of a stored rate (NUMERIC(18, 6)): a rate with more decimals would be rounded
# silently by the database, so it is refused here instead.
RATE_DECIMALS = 6
RATE_STEP = Decimal(1).scaleb(-RATE_DECIMALS)
MAX_RATE = Decimal(10) ** 12
MAX_MODEL_LENGTH = 256


class PriceTableError(ValueError):
    """A price table that cannot be read; the message names the offending entry."""


def validate_price(price: Price) -> Price:
    """Check a version against what can be stored exactly; returns it unchanged or raises."""
    if not price.model or len(price.model) > MAX_MODEL_LENGTH or price.model != price.model.strip():
        raise PriceTableError(f"model must be 1-{MAX_MODEL_LENGTH} characters without padding")
    if price.effective_from.tzinfo is None:
        raise PriceTableError("effective_from must carry a UTC offset")
    if not BEGINNING_OF_TIME <= price.effective_from < END_OF_TIME:
        # Outside, a datetime cannot hold the end of its month (and Postgres would store the
        # first instant of year 1 as -infinity).
        raise PriceTableError("effective_from must be from 1970-01-01 to 9999-11-30 (UTC)")
    rates = {
        "input_usd_per_mtok": price.input_usd_per_mtok,
        "output_usd_per_mtok": price.output_usd_per_mtok,
        "cached_input_usd_per_mtok": price.cached_input_usd_per_mtok,
    }
    for name, rate in rates.items():
        if rate is None:
            continue
        if not rate.is_finite() or rate < 0 or rate >= MAX_RATE:
            raise PriceTableError(f"{name} must be a non-negative amount below {MAX_RATE}")
        if rate.quantize(RATE_STEP) != rate:
            raise PriceTableError(f"{name} has more than {RATE_DECIMALS} decimal places: {rate}")
    return price


def parse_price_table(
    text: str, table_format: TableFormat, default_effective_from: datetime
) -> list[Price]:
    """Read a CSV or YAML price table into price versions (validated, in file order)."""
    entries = _csv_entries(text) if table_format == "csv" else _yaml_entries(text)
    prices = []
    for number, entry in enumerate(entries, start=1):
        try:
            prices.append(validate_price(_price(entry, default_effective_from)))
        except PriceTableError as exc:
            raise PriceTableError(f"entry {number}: {exc}") from None
    return prices


def format_price_table(prices: Iterable[Price], table_format: TableFormat) -> str:
    """Write versions as CSV or YAML that `parse_price_table` reads back to the same versions."""
    ordered = sorted(prices, key=lambda p: (p.model, p.effective_from))
    rows = [
        {
            "model": p.model,
            "input_usd_per_mtok": format_rate(p.input_usd_per_mtok),
            "output_usd_per_mtok": format_rate(p.output_usd_per_mtok),
            "cached_input_usd_per_mtok": (
                None
                if p.cached_input_usd_per_mtok is None
                else format_rate(p.cached_input_usd_per_mtok)
            ),
            "effective_from": format_instant(p.effective_from),
        }
        for p in ordered
    ]
    if table_format == "yaml":
        return yaml.safe_dump({"prices": rows}, sort_keys=False, allow_unicode=True)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def format_rate(rate: Decimal) -> str:
    """A rate as plain decimal text without trailing zeros (`0.400000` → `0.4`, never `4E-1`)."""
    return format(rate.normalize(), "f")


def format_instant(at: datetime) -> str:
    """RFC 3339 in UTC with a `Z`."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_instant(value: object) -> datetime:
    """RFC 3339 text (or a date) → an aware UTC datetime; no offset means UTC."""
    if isinstance(value, datetime):
        at = value
    elif isinstance(value, date):
        at = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.strip())
        except ValueError:
            raise PriceTableError(f"effective_from is not an RFC 3339 time: {value!r}") from None
    else:
        raise PriceTableError(f"effective_from is not an RFC 3339 time: {value!r}")
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def _rate(entry: Mapping[str, Any], name: str) -> Decimal | None:
    value = entry.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float | bool):
        raise PriceTableError(f"{name} must be written as a decimal number")
    try:
        rate = Decimal(str(value).strip())
    except InvalidOperation:
        raise PriceTableError(f"{name} is not a number: {value!r}") from None
    return rate


def _price(entry: Mapping[str, Any], default_effective_from: datetime) -> Price:
    if not isinstance(entry, Mapping):
        raise PriceTableError("each price must be a mapping of the table's columns")
    model = entry.get("model")
    if not isinstance(model, str):
        raise PriceTableError("model is required")
    single = _rate(entry, "usd_per_million_tokens")
    if single is None:
        single = _rate(entry, "usd_per_mtok")
    input_rate = _rate(entry, "input_usd_per_mtok")
    output_rate = _rate(entry, "output_usd_per_mtok")
    input_rate = input_rate if input_rate is not None else single
    output_rate = output_rate if output_rate is not None else single
    if input_rate is None or output_rate is None:
        raise PriceTableError(f"{model}: input_usd_per_mtok and output_usd_per_mtok are required")
    raw_from = entry.get("effective_from")
    empty = raw_from is None or (isinstance(raw_from, str) and not raw_from.strip())
    return Price(
        model=model.strip(),
        input_usd_per_mtok=input_rate,
        output_usd_per_mtok=output_rate,
        cached_input_usd_per_mtok=_rate(entry, "cached_input_usd_per_mtok"),
        effective_from=default_effective_from if empty else parse_instant(raw_from),
    )


def _csv_entries(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    if reader.fieldnames is None or "model" not in reader.fieldnames:
        raise PriceTableError("a CSV price table needs a header row with a `model` column")
    return [dict(row) for row in reader if any((v or "").strip() for v in row.values())]


class _ExactLoader(yaml.SafeLoader):
    """YAML without floats or implicit timestamps: both are kept as their text."""


def _as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _as_text)
_ExactLoader.add_constructor("tag:yaml.org,2002:timestamp", _as_text)


def _yaml_entries(text: str) -> list[Any]:
    try:
        document = yaml.load(text, Loader=_ExactLoader)  # noqa: S506 (a safe loader subclass)
    except yaml.YAMLError as exc:
        raise PriceTableError(f"not valid YAML: {exc}") from None
    if isinstance(document, Mapping):
        document = document.get("prices")
    if document is None:
        return []
    if not isinstance(document, list):
        raise PriceTableError("a YAML price table is a list of prices (optionally under `prices:`)")
    return document

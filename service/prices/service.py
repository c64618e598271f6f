"""Price versions: list, add, look up and import.

A version is never edited: a new price is a new version with a later `effective_from`.
Adding one never touches the ledger (rows keep the cost and version stored when they were
written) nor a finalized invoice (its lines are stored). What a version with a past
`effective_from` does change: rows stored without a price are priced by it on the next
draft, for the part of them that occurred after it took effect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.price_table import TableFormat, parse_price_table
from pricing.prices import Price, PriceBook
from service.db.models import PriceVersion, ProviderCostVersion
from service.errors import Conflict, NotFound
from service.prices.repository import PriceRepository, to_price
from service.prices.schemas import PriceCreate

log = logging.getLogger("meterline.prices")


# A stored version of rates: a list price, or a provider cost.
V = TypeVar("V", bound=PriceVersion | ProviderCostVersion)
V_co = TypeVar("V_co", bound=PriceVersion | ProviderCostVersion, covariant=True)


class VersionStore(Protocol[V_co]):
    """Where versions of one table live: list prices, or one provider's costs."""

    async def find(self, model: str, effective_from: datetime) -> V_co | None: ...
    async def add(self, price: Price, source: str) -> V_co: ...


@dataclass
class ImportResult(Generic[V]):
    added: list[V] = field(default_factory=list)
    unchanged: int = 0


def _same_rates(version: PriceVersion | ProviderCostVersion, price: Price) -> bool:
    return (
        version.input_usd_per_mtok == price.input_usd_per_mtok
        and version.output_usd_per_mtok == price.output_usd_per_mtok
        and version.cached_input_usd_per_mtok == price.cached_input_usd_per_mtok
    )


async def list_prices(
    session: AsyncSession, model: str | None = None, at: datetime | None = None
) -> list[PriceVersion]:
    """Every version (of one model id or pattern if given); with `at`, only those in force."""
    versions = await PriceRepository(session).versions(model)
    if at is None:
        return versions
    in_force = {p.version_id for p in PriceBook(to_price(v) for v in versions).in_force(at)}
    return [v for v in versions if v.id in in_force]


class UnpricedModel(NotFound):
    code = "unpriced_model"
    description = "No price version prices the model at that instant."


class PriceVersionExists(Conflict):
    code = "price_version_exists"
    description = "A version of the model from the same instant exists with other rates."


async def lookup(session: AsyncSession, model: str, at: datetime) -> PriceVersion:
    """The version that prices `model` (a concrete id) at `at`, through exact ids and globs."""
    repository = PriceRepository(session)
    price = PriceBook(await repository.all_prices()).price_for(model, at)
    if price is None or price.version_id is None:
        raise UnpricedModel(f"no price for {model} at {at.isoformat()}")
    return (await repository.versions(ids=[price.version_id]))[0]


async def add_price(session: AsyncSession, data: PriceCreate) -> tuple[PriceVersion, bool]:
    """Add a version; True when new. The same version again is accepted and returned as is;
    other rates for an existing (model, effective_from) are a 409."""
    return await add_version(PriceRepository(session), version_of(data), "prices")


def version_of(data: PriceCreate) -> Price:
    """The version a request describes (no `effective_from`: from now on)."""
    return Price(
        model=data.model,
        input_usd_per_mtok=data.input_usd_per_mtok,
        output_usd_per_mtok=data.output_usd_per_mtok,
        cached_input_usd_per_mtok=data.cached_input_usd_per_mtok,
        effective_from=(data.effective_from or datetime.now(UTC)).astimezone(UTC),
    )


async def add_version(store: VersionStore[V], price: Price, table: str) -> tuple[V, bool]:
    """Add one version from the API; True when new. The same version again is returned as
    is; other rates for an existing (model, effective_from) are a 409."""
    result = await import_versions(store, [price], "api", table)
    if result.added:
        return result.added[0], True
    existing = await store.find(price.model, price.effective_from)
    assert existing is not None
    return existing, False


async def import_prices(
    session: AsyncSession, prices: list[Price], source: str
) -> ImportResult[PriceVersion]:
    """Add the list-price versions not present yet, all or nothing (see `import_versions`)."""
    return await import_versions(PriceRepository(session), prices, source, "prices")


async def import_versions(
    repository: VersionStore[V], prices: list[Price], source: str, table: str
) -> ImportResult[V]:
    """Add the versions not present yet, all or nothing: a version that exists with other
    rates (same model and `effective_from`) refuses the whole import with a 409."""
    result: ImportResult[V] = ImportResult()
    conflicts = []
    seen: dict[tuple[str, datetime], Price] = {}
    for price in prices:
        key = (price.model, price.effective_from)
        if key in seen:
            if seen[key] != price:
                conflicts.append(f"{price.model} from {price.effective_from.isoformat()}")
            continue
        seen[key] = price
        existing = await repository.find(*key)
        if existing is None:
            result.added.append(await repository.add(price, source))
        elif _same_rates(existing, price):
            result.unchanged += 1
        else:
            conflicts.append(f"{price.model} from {price.effective_from.isoformat()}")
    if conflicts:
        raise PriceVersionExists(
            "a version with other rates already exists for: "
            + "; ".join(conflicts[:10])
            + ". Versions are never edited: give the new price a later effective_from"
        )
    log.info(
        "event=versions_imported table=%s source=%s added=%d unchanged=%d",
        table,
        source,
        len(result.added),
        result.unchanged,
    )
    return result


async def import_table(
    session: AsyncSession, text: str, table_format: TableFormat, source: str = "import"
) -> ImportResult[PriceVersion]:
    """Read a CSV or YAML table (rows without `effective_from` take effect now) and import it."""
    prices = parse_price_table(text, table_format, default_effective_from=datetime.now(UTC))
    return await import_prices(session, prices, source)

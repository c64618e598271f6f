"""Provider costs: what each upstream charges the operator, per provider and model.

Versioned exactly like list prices (`service.prices.service`: the same import rules, the
same lookup, exact id over globs): a version is never edited, and a new one never touches a
ledger row, which keeps the provider cost (or NULL, unknown) it was written with.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.price_table import TableFormat, parse_price_table
from pricing.prices import BEGINNING_OF_TIME, PriceBook
from service.db.models import ProviderCostVersion
from service.prices.service import ImportResult, add_version, import_versions, version_of
from service.provider_costs.repository import ProviderCostRepository, ProviderCostStore
from service.provider_costs.schemas import ProviderCostCreate
from service.providers.config import Provider

log = logging.getLogger("meterline.provider_costs")


async def list_costs(
    session: AsyncSession, provider: str | None = None, model: str | None = None
) -> list[ProviderCostVersion]:
    return await ProviderCostRepository(session).versions(provider, model)


async def cost_books(session: AsyncSession) -> dict[str, PriceBook]:
    """Each provider's costs as a book (the lookup of list prices)."""
    costs = await ProviderCostRepository(session).all_costs()
    return {provider: PriceBook(versions) for provider, versions in costs.items()}


async def add_cost(
    session: AsyncSession, data: ProviderCostCreate
) -> tuple[ProviderCostVersion, bool]:
    """Add a version; True when new. The same version again is returned as is; other rates
    for an existing (provider, model, effective_from) are a 409."""
    return await add_version(
        ProviderCostStore(session, data.provider), version_of(data), "provider_costs"
    )


async def import_table(
    session: AsyncSession,
    provider: str,
    text: str,
    table_format: TableFormat,
    source: str = "import",
) -> ImportResult[ProviderCostVersion]:
    """Read a CSV or YAML cost table (a price table's format) for one provider, all or
    nothing; rows without `effective_from` take effect now."""
    costs = parse_price_table(text, table_format, default_effective_from=datetime.now(UTC))
    return await import_versions(
        ProviderCostStore(session, provider), costs, source, "provider_costs"
    )


def _file_format(path: Path) -> TableFormat:
    return "yaml" if path.suffix.lower() in (".yaml", ".yml") else "csv"


async def seed_provider_costs(
    sessions: async_sessionmaker[AsyncSession], providers: list[Provider]
) -> None:
    """Load each provider's default cost table named in the providers file: the versions
    not stored yet (a row without `effective_from` applies to all history)."""
    for provider in providers:
        if provider.cost_table is None:
            continue
        path = Path(provider.cost_table)
        text = await asyncio.to_thread(path.read_text)
        costs = parse_price_table(text, _file_format(path), BEGINNING_OF_TIME)
        async with sessions() as session, session.begin():
            added = await ProviderCostRepository(session).insert_missing(
                provider.name, costs, source="providers_file"
            )
        log.info("event=provider_costs_loaded provider=%s versions=%d", provider.name, added)

"""One ledger row in memory, as the proxy makes it and the writer stores or spools it."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

import orjson

from pricing.invoice import BillingPeriod


def new_request_id() -> str:
    """`req_` + 32 hex digits laid out like a UUIDv7: sortable by creation time (ms).

    48 bits of Unix milliseconds then 80 random bits; ids made in the same millisecond
    differ by their random part, and a replay of a row keeps its id.
    """
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class UsageSource(StrEnum):
    """Where a row's token counts come from."""

    UPSTREAM = "upstream"  # the provider's `usage`
    ESTIMATED = "estimated"  # counted by Meterline's tokenizer (no usage, or an unusable one)
    NONE = "none"  # nothing to count (a refusal before the upstream answered)


class LedgerKind(StrEnum):
    """A ledger row is a request's usage, or a correction (the ledger is never edited)."""

    USAGE = "usage"
    ADJUSTMENT = "adjustment"


class BatchSource(StrEnum):
    """How a quarantined row reached the writer: a live batch, or a replay of the spool."""

    LIVE = "live"
    REPLAY = "replay"


@dataclass(slots=True)
class LedgerRecord:
    """The outcome of one proxied request; mirrors `UsageRecord` (service/db/models.py)."""

    request_id: str
    occurred_at: datetime  # UTC, fixed in memory when the request arrived
    account_id: uuid.UUID
    key_id: uuid.UUID | None
    task_id: str | None
    task_type: str | None
    endpoint: str  # chat | completions | embeddings
    requested_model: str
    upstream_model: str | None
    provider: str | None
    stream: bool
    status_code: int
    error_code: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_source: str  # a UsageSource (the proxy's `Usage.source` writes it as text)
    latency_ms: int | None
    ttft_ms: int | None
    cost_usd: Decimal | None  # exact; None = unpriced, never a silent $0
    price_version_id: int | None
    kind: LedgerKind = LedgerKind.USAGE
    # Why the provider's usage claim is implausible (`service.proxy.usage`); None when it is not.
    usage_flag: str | None = None
    # What the upstream charged the operator, exact; None = unknown, never a silent $0.
    provider_cost_usd: Decimal | None = None
    provider_cost_version_id: int | None = None
    # The account's rate-card version `cost_usd` was computed by; None: the list price.
    rate_card_version_id: int | None = None

    def to_json(self) -> bytes:
        # orjson writes the dataclass, UUIDs and datetimes itself (it is on the hot path:
        # the journal). `str` covers the rest: the cost, a Decimal, becomes a string (money
        # never passes through float), and ids read by asyncpg, its own UUID subclass.
        return orjson.dumps(self, default=str)

    @classmethod
    def from_json(cls, raw: bytes) -> LedgerRecord:
        data = orjson.loads(raw)
        data["occurred_at"] = datetime.fromisoformat(data["occurred_at"])
        data["account_id"] = uuid.UUID(data["account_id"])
        if data["key_id"] is not None:
            data["key_id"] = uuid.UUID(data["key_id"])
        for money in ("cost_usd", "provider_cost_usd"):
            if data.get(money) is not None:
                data[money] = Decimal(data[money])
        return cls(**data)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LedgerRecord))


# C0 and C1 control characters, NUL among them (Postgres text cannot hold it at all): the
# one definition, for the texts the proxy stores and those the billing API accepts.
CONTROL_CHARACTERS = r"\x00-\x1f\x7f-\x9f"
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


def storable_text(text: str, limit: int) -> str:
    """A text from outside (a provider's model name or error code) as the ledger stores it:
    control characters written as visible `\\xNN` escapes, then cut to `limit` characters.
    A NUL would make Postgres refuse the row, and with it its whole batch."""
    if _CONTROL.search(text) is not None:
        text = _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
    return text[:limit]


def months_of(lines: Iterable[bytes]) -> set[BillingPeriod]:
    """Partition months of JSON lines (replays: the lines' records are not in memory)."""
    return {
        BillingPeriod.of(datetime.fromisoformat(orjson.loads(line)["occurred_at"]))
        for line in lines
    }

"""OpenAI's organization usage and costs APIs over the ledger: buckets of a fixed width from
`start_time`, each with one result per group, paged by buckets.

Projects are accounts (`project_id` is the account id) and API keys are Meterline keys;
OpenAI's users, batches and service tiers have no counterpart here, so they are null.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.principal import Principal
from service.errors import Unprocessable
from service.openai_usage.repository import BucketQuery, bucket_sums

# bucket_width → (seconds, default limit, largest limit), as OpenAI documents them.
WIDTHS: dict[str, tuple[int, int, int]] = {
    "1m": (60, 60, 1440),
    "1h": (3600, 24, 168),
    "1d": (86400, 7, 31),
}
COSTS_LIMITS = (7, 180)  # costs come in days only
LATEST_INSTANT = 253402300799  # 9999-12-31T23:59:59Z: a datetime holds no later second

COMPLETIONS_GROUPS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")
EMBEDDINGS_GROUPS = ("project_id", "user_id", "api_key_id", "model")
COSTS_GROUPS = ("project_id", "line_item")
# The groups answered from the ledger; the others are always null.
LEDGER_GROUPS = frozenset({"project_id", "api_key_id", "model", "line_item"})


@dataclass(frozen=True, slots=True)
class Report:
    """One page of an OpenAI usage or costs report, before it is written as JSON."""

    object: str  # the result's `object`
    endpoints: tuple[str, ...]
    groups: tuple[str, ...]  # what the report may be grouped by


COMPLETIONS = Report(
    "organization.usage.completions.result", ("chat", "completions"), COMPLETIONS_GROUPS
)
EMBEDDINGS = Report("organization.usage.embeddings.result", ("embeddings",), EMBEDDINGS_GROUPS)
COSTS = Report("organization.costs.result", ("chat", "completions", "embeddings"), COSTS_GROUPS)


def instant(value: int, param: str) -> datetime:
    if not 0 <= value <= LATEST_INSTANT:
        raise Unprocessable(f"{param}: Unix seconds between 0 and {LATEST_INSTANT}", param=param)
    return datetime.fromtimestamp(value, UTC)


def now_or(end_time: int | None) -> datetime:
    return datetime.now(UTC) if end_time is None else instant(end_time, "query.end_time")


def parse_groups(report: Report, names: Sequence[str]) -> tuple[str, ...]:
    """`group_by` as repeated parameters or comma-separated, each known name once."""
    parsed = [part.strip() for name in names for part in name.split(",") if part.strip()]
    unknown = [name for name in parsed if name not in report.groups]
    if unknown:
        raise Unprocessable(
            f"query.group_by: unknown group {', '.join(map(repr, unknown))};"
            f" use any of {', '.join(report.groups)}",
            param="query.group_by",
        )
    return tuple(dict.fromkeys(parsed))


def _page_token(bucket: int) -> str:
    return "page_" + base64.urlsafe_b64encode(f"bucket:{bucket}".encode()).decode()


def _first_bucket(page: str | None) -> int:
    if page is None:
        return 0
    try:
        kind, _, index = (
            base64.urlsafe_b64decode(page.removeprefix("page_")).decode().partition(":")
        )
        if kind == "bucket" and index.isdigit() and len(index) < 12:
            return int(index)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise Unprocessable("query.page: not a page this API returned", param="query.page")


async def report_page(
    session: AsyncSession,
    caller: Principal,
    report: Report,
    *,
    start: datetime,
    end: datetime,
    width_s: int,
    limit: int,
    page: str | None,
    group_by: tuple[str, ...],
    account_ids: Sequence[uuid.UUID],
    key_ids: Sequence[uuid.UUID],
    models: Sequence[str],
) -> dict[str, Any]:
    """The buckets of one page (empty ones included, as OpenAI answers), `has_more` and the
    token of the next page."""
    if end <= start:
        raise Unprocessable("query.end_time: must be after start_time", param="query.end_time")
    if not caller.is_admin:  # a customer key reads its own account, as everywhere
        for account_id in account_ids:
            caller.require_account(account_id)
        account_ids = [caller.account_id]  # type: ignore[list-item]
    buckets = math.ceil((end - start).total_seconds() / width_s)
    first = _first_bucket(page)
    last = min(first + limit, buckets)  # exclusive
    page_start = start + timedelta(seconds=first * width_s)
    page_end = min(end, start + timedelta(seconds=last * width_s))
    query = BucketQuery(
        origin=start,
        start=page_start,
        end=page_end,
        width_s=width_s,
        endpoints=report.endpoints,
        account_ids=account_ids,
        key_ids=key_ids,
        models=models,
        group_by=[name for name in group_by if name in LEDGER_GROUPS],
    )
    rows = await bucket_sums(session, query) if page_start < page_end else []
    results: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        results[int(row["bucket"])].append(_result(report, row, group_by))
    data = [
        {
            "object": "bucket",
            "start_time": int((start + timedelta(seconds=i * width_s)).timestamp()),
            "end_time": int(min(end, start + timedelta(seconds=(i + 1) * width_s)).timestamp()),
            "results": results.get(i, []),
        }
        for i in range(first, last)
    ]
    more = last < buckets
    return {
        "object": "page",
        "data": data,
        "has_more": more,
        "next_page": _page_token(last) if more else None,
    }


def _result(report: Report, row: dict[str, Any], group_by: tuple[str, ...]) -> dict[str, Any]:
    grouped = {
        name: (str(row[name]) if row.get(name) is not None else None) if name in group_by else None
        for name in report.groups
    }
    if report is COSTS:
        return {
            "object": report.object,
            "amount": {"value": Decimal(row["cost_usd"]), "currency": "usd"},
            **grouped,
        }
    counts: dict[str, Any] = {"input_tokens": int(row["input_tokens"])}
    if report is COMPLETIONS:
        counts |= {
            "output_tokens": int(row["output_tokens"]),
            "input_cached_tokens": int(row["input_cached_tokens"]),
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
        }
    return {
        "object": report.object,
        **counts,
        "num_model_requests": int(row["requests"]),
        **grouped,
    }


def exact_json(value: Any) -> bytes:
    """JSON with every Decimal written as the number it is (never through a float), as
    OpenAI's `amount.value` is a JSON number."""
    if isinstance(value, Decimal):
        return format(value, "f").encode()
    if isinstance(value, dict):
        items = (json.dumps(k).encode() + b":" + exact_json(v) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(exact_json(v) for v in value) + b"]"
    return json.dumps(value).encode()

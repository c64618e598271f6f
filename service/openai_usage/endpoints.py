"""`GET /v1/organization/usage/{completions,embeddings}` and `GET /v1/organization/costs`:
OpenAI's usage and costs APIs, so tools written for them read Meterline unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.deps import Caller, Session
from service.errors import API_ERRORS, Unprocessable, errors
from service.openai_usage import service
from service.openai_usage.service import (
    COMPLETIONS,
    COSTS,
    COSTS_LIMITS,
    EMBEDDINGS,
    WIDTHS,
    Report,
)
from service.schemas import Text

router = APIRouter(
    prefix="/v1/organization", tags=["OpenAI usage API"], responses=errors(*API_ERRORS)
)

StartTime = Annotated[
    int, Query(description="Unix seconds, inclusive: the first bucket starts here.")
]
EndTime = Annotated[int | None, Query(description="Unix seconds, exclusive (default: now).")]
Width = Annotated[str, Query(pattern="^(1m|1h|1d)$", description="`1m`, `1h` or `1d`.")]
Limit = Annotated[int | None, Query(ge=1, description="Buckets per page (OpenAI's defaults).")]
Page = Annotated[Text | None, Query(max_length=200, description="`next_page` of the last page.")]
GroupBy = Annotated[list[Text], Query(description="Repeated or comma-separated.")]
ProjectIds = Annotated[list[uuid.UUID], Query(description="Accounts.")]
KeyIds = Annotated[list[uuid.UUID], Query(description="Meterline keys.")]
Models = Annotated[list[Text], Query(description="Models asked for.")]


def _group_by(request: Request, report: Report, group_by: list[str]) -> tuple[str, ...]:
    # Some clients send arrays as `group_by[]=…`.
    return service.parse_groups(report, [*group_by, *request.query_params.getlist("group_by[]")])


def _limit(limit: int | None, default: int, largest: int) -> int:
    if limit is None:
        return default
    if limit > largest:
        raise Unprocessable(
            f"query.limit: at most {largest} for this bucket width", param="query.limit"
        )
    return limit


def _usage_endpoint(report: Report, doc: str) -> Callable[..., Awaitable[Response]]:
    """The endpoint of one usage report: completions and embeddings take the same query."""

    async def usage(
        request: Request,
        session: Session,
        caller: Caller,
        start_time: StartTime,
        end_time: EndTime = None,
        bucket_width: Width = "1d",
        limit: Limit = None,
        page: Page = None,
        group_by: GroupBy = [],  # noqa: B006 (FastAPI copies query defaults)
        project_ids: ProjectIds = [],  # noqa: B006
        api_key_ids: KeyIds = [],  # noqa: B006
        models: Models = [],  # noqa: B006
    ) -> Response:
        width_s, default, largest = WIDTHS[bucket_width]
        body = await service.report_page(
            session,
            caller,
            report,
            start=service.instant(start_time, "query.start_time"),
            end=service.now_or(end_time),
            width_s=width_s,
            limit=_limit(limit, default, largest),
            page=page,
            group_by=_group_by(request, report, group_by),
            account_ids=project_ids,
            key_ids=api_key_ids,
            models=models,
        )
        return Response(service.exact_json(body), media_type="application/json")

    usage.__doc__ = doc
    return usage


router.get("/usage/completions", name="completions_usage")(
    _usage_endpoint(
        COMPLETIONS,
        "Chat and text completions: tokens and requests per bucket, as OpenAI's\n"
        "`/v1/organization/usage/completions` answers (projects are accounts).",
    )
)
router.get("/usage/embeddings", name="embeddings_usage")(
    _usage_endpoint(
        EMBEDDINGS,
        "Embeddings: input tokens and requests per bucket, as OpenAI's\n"
        "`/v1/organization/usage/embeddings` answers.",
    )
)


@router.get("/costs")
async def costs(
    request: Request,
    session: Session,
    caller: Caller,
    start_time: StartTime,
    end_time: EndTime = None,
    bucket_width: Annotated[str, Query(pattern="^1d$", description="Only `1d`.")] = "1d",
    limit: Limit = None,
    page: Page = None,
    group_by: GroupBy = [],  # noqa: B006
    project_ids: ProjectIds = [],  # noqa: B006
) -> Response:
    """What was charged per day (exact `cost_usd` sums; `line_item` is the model), as
    OpenAI's `/v1/organization/costs` answers. Unpriced usage adds nothing until priced."""
    width_s = WIDTHS[bucket_width][0]
    body = await service.report_page(
        session,
        caller,
        COSTS,
        start=service.instant(start_time, "query.start_time"),
        end=service.now_or(end_time),
        width_s=width_s,
        limit=_limit(limit, *COSTS_LIMITS),
        page=page,
        group_by=_group_by(request, COSTS, group_by),
        account_ids=project_ids,
        key_ids=[],
        models=[],
    )
    return Response(service.exact_json(body), media_type="application/json")

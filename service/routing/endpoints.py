"""`GET /billing/routing/stats`: the live statistics routing ranks candidates by (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import Admin, RoutingFigures
from service.errors import API_ERRORS, errors
from service.routing.schemas import RoutingStatsPage

router = APIRouter(prefix="/billing/routing", tags=["routing"], responses=errors(*API_ERRORS))


@router.get("/stats", response_model=RoutingStatsPage)
async def routing_stats(figures: RoutingFigures, admin: Admin) -> RoutingStatsPage:
    """Per (provider, model): the error rate, time to first byte and total latency this
    worker routes by (every worker's merged, with Redis), and each provider's run of
    failures and cooldown (this worker's own)."""
    return RoutingStatsPage.model_validate(figures.report())

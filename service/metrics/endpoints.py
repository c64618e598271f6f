from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.metrics.registry import exposition

router = APIRouter(tags=["metrics"])


# A plain function: FastAPI runs it in a thread, so merging the workers' files never
# blocks the event loop that serves the proxy.
@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

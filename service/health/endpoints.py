from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text

from service.runtime import get_runtime

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    # The proxy keeps serving while Postgres is down (usage is spooled), so a database outage
    # degrades health rather than failing it.
    try:
        async with get_runtime(request).engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        database = "ok"
    except Exception:  # any failure to reach the database means the same thing here
        database = "unavailable"
    return Health(status="ok" if database == "ok" else "degraded", database=database)

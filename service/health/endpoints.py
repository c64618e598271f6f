from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from service.db.repository import ping
from service.deps import Engine

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


@router.get("/healthz", response_model=Health)
async def healthz(engine: Engine) -> Health:
    # The proxy keeps serving while Postgres is down (usage is spooled), so a database outage
    # degrades health rather than failing it.
    try:
        async with engine.connect() as connection:
            await ping(connection)
        database = "ok"
    except Exception:  # any failure to reach the database means the same thing here
        database = "unavailable"
    return Health(status="ok" if database == "ok" else "degraded", database=database)

"""The request-scoped session: services never commit, the request boundary does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from service.runtime import get_runtime


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with get_runtime(request).sessions() as session:
        yield session
        await session.commit()


# "function" scope: the commit runs before the response is sent, so a client never sees a
# success (a revoked key, a finalized invoice) that is not yet durable — or that then fails.
Session = Annotated[AsyncSession, Depends(get_session, scope="function")]

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


Session = Annotated[AsyncSession, Depends(get_session)]

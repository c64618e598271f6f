"""Effects that wait for a transaction to commit: held on its session, run after the commit.

Services never commit; the request (or job) boundary does. What must follow a commit and
only a commit — this worker forgetting a key just revoked, pricing with a version just
added — is registered on the session with `after_commit` and run by `commit`, which every
boundary uses (the billing API's session dependency, `transaction` for jobs and the CLI).
A session that fails is discarded with its effects: they never run for a rollback.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

Effect = Callable[[], Awaitable[None] | None]

_AFTER_COMMIT = "meterline.after_commit"


def after_commit(session: AsyncSession, effect: Effect) -> None:
    """Run `effect` (a function or a coroutine function) once `session` has committed."""
    session.info.setdefault(_AFTER_COMMIT, []).append(effect)


async def commit(session: AsyncSession) -> None:
    """Commit, then run the effects registered on the session, in their order."""
    await session.commit()
    effects: list[Effect] = session.info.pop(_AFTER_COMMIT, [])
    for effect in effects:
        result = effect()
        if inspect.isawaitable(result):
            await result

"""The HTTP side of a webhook delivery: aiohttp, with the resolver that connects to public
addresses only (`destinations.py` says why).

A module of its own because aiohttp costs each worker 9.5 MB of memory (measured): the
sender imports it when a worker first has a delivery to make, not at start-up.
"""

from __future__ import annotations

import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from service.settings import Settings
from service.webhooks.destinations import is_forbidden


class PublicResolver(AbstractResolver):
    """aiohttp's resolution, keeping only public addresses (none left: refused)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not is_forbidden(r["host"])]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


class DeliveryClient:
    """One worker's connections to webhook destinations."""

    def __init__(self, settings: Settings) -> None:
        timeout = aiohttp.ClientTimeout(
            total=settings.webhook_timeout_s, connect=min(settings.webhook_timeout_s, 5.0)
        )
        resolver = None if settings.webhooks_allow_private else PublicResolver()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, resolver=resolver),
            timeout=timeout,
            trust_env=False,  # no proxy from the environment: the destination is checked
            headers={"user-agent": "Meterline-Webhooks/1"},
        )

    async def post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, str | None]:
        """The status the destination answered with, or None and why there was no answer.
        Redirects are not followed: a 3xx is the answer."""
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return response.status, None
        except TimeoutError:
            return None, "timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]

    async def close(self) -> None:
        await self._session.close()

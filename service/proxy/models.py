"""`GET /v1/models`: the models the providers file routes, as OpenAI lists them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from service.providers.config import Provider
from service.providers.router import ProviderRouter
from service.proxy.upstream import UpstreamClient

# How long a listing is served before the providers are asked again.
_CACHE_S = 60


class ModelList:
    """Models named in the providers file, plus those each provider lists and routes to
    itself (patterns cannot be enumerated otherwise)."""

    def __init__(self, router: ProviderRouter, upstream: UpstreamClient) -> None:
        self.router = router
        self.upstream = upstream
        self._cached: tuple[float, list[dict[str, Any]]] | None = None

    async def data(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < _CACHE_S:
            return self._cached[1]
        found: dict[str, str] = {m: p.name for m, p in self.router.exact_models()}
        listed = await asyncio.gather(
            *(self._provider_models(p) for p in self.router.providers), return_exceptions=True
        )
        for provider, models in zip(self.router.providers, listed, strict=True):
            if isinstance(models, BaseException):
                continue
            for model in models:
                if model not in found and self.router.route(model) is provider:
                    found[model] = provider.name
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": owner}
            for m, owner in sorted(found.items())
        ]
        self._cached = (now, data)
        return data

    async def _provider_models(self, provider: Provider) -> list[str]:
        headers = self.upstream.headers_for(provider, stream=False)
        response = await asyncio.wait_for(
            self.upstream.send("GET", provider.url("models"), None, headers), 5
        )
        try:
            data = orjson.loads(await response.read())
        finally:
            response.release()
        return [
            str(m["id"])
            for m in (data.get("data") or [] if isinstance(data, dict) else [])
            if isinstance(m, dict) and "id" in m
        ]

"""Which providers serve a model: every provider with a matching glob, in file order (the
first is preferred; the others are where a failed attempt goes next)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from service.providers.config import Provider

_CACHE_LIMIT = 10_000


def is_pattern(model: str) -> bool:
    return any(c in model for c in "*?[")


class ProviderRouter:
    def __init__(self, providers: list[Provider]) -> None:
        self.providers = providers
        # Requests name a handful of models; matching globs once per model keeps routing O(1).
        self._routes: dict[str, tuple[Provider, ...]] = {}

    def route_all(self, model: str) -> tuple[Provider, ...]:
        """The providers of `model`, in file order (empty: no provider serves it)."""
        try:
            return self._routes[model]
        except KeyError:
            pass
        found = tuple(p for p in self.providers if any(fnmatchcase(model, pat) for pat in p.models))
        if len(self._routes) < _CACHE_LIMIT:  # unknown names must not grow memory forever
            self._routes[model] = found
        return found

    def route(self, model: str) -> Provider | None:
        """The preferred provider of `model`."""
        found = self.route_all(model)
        return found[0] if found else None

    def exact_models(self) -> list[tuple[str, Provider]]:
        """Models the file names literally (not by a pattern), each with its provider."""
        seen: dict[str, Provider] = {}
        for provider in self.providers:
            for model in provider.models:
                if not is_pattern(model) and self.route(model) is provider:
                    seen.setdefault(model, provider)
        return list(seen.items())

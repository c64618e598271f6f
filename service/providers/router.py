"""Which provider serves a model: the first provider (in file order) with a matching glob."""

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
        self._routes: dict[str, Provider | None] = {}

    def route(self, model: str) -> Provider | None:
        try:
            return self._routes[model]
        except KeyError:
            pass
        found = next(
            (p for p in self.providers if any(fnmatchcase(model, pat) for pat in p.models)),
            None,
        )
        if len(self._routes) < _CACHE_LIMIT:  # unknown names must not grow memory forever
            self._routes[model] = found
        return found

    def exact_models(self) -> list[tuple[str, Provider]]:
        """Models the file names literally (not by a pattern), each with its provider."""
        seen: dict[str, Provider] = {}
        for provider in self.providers:
            for model in provider.models:
                if not is_pattern(model) and self.route(model) is provider:
                    seen.setdefault(model, provider)
        return list(seen.items())

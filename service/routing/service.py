"""Which (model, provider) a request is sent to first, and where it goes if that fails.

A model name goes to the providers serving it in file order (a cooled-down provider last).
A model object (service/routing/schemas.py) names candidates, or means every priced model
some provider serves; they are filtered in a fixed order (exclude_llms, served by a
provider, priced, max_input_cost, max_output_cost, the quoted task's model) and each
(model, provider) left is scored:

    score = w_price·price + w_error·error_rate + w_start·ttft + w_end·latency

each term normalized over the candidates to [0, 1] (0 the best of them, 1 the worst; a
term that is the same for all counts 0). `price` is input plus output USD per 1M tokens at
the account's price; the others are the live statistics (service/routing/stats.py), and a
route with no statistics yet counts as good as the best and wins a tie (so it gets
measured). The lowest score is tried first; other ties keep the order of `llms`, then the
file's. Prices are compared as Decimals; only the normalized terms, which are ranks and
never money, are floats.

A ranking holds for `RANKING_TTL_S` while nothing that may reorder the routes at once
happens (`RoutingStats.generation`: a failure, the success that ends a failure streak, a
route's first figures, a seed, the other workers' figures): a busy model object is
ranked a hundred times a second, not on every request, and what drifts meanwhile (a
latency, an error rate fading) counts from the next ranking.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.prices import BEGINNING_OF_TIME, Price
from pricing.rate_cards import Tariff
from service.errors import BadRequest
from service.parts import LivePrices
from service.providers.config import Provider
from service.providers.router import ProviderRouter, is_pattern
from service.routing.repository import RoutingRepository
from service.routing.schemas import ModelSpec
from service.routing.stats import RouteFigures, RouteKey, RoutingStats

# The model a quoted task is bound to, if a request on it (account, task id, at) is covered.
QuotedModel = Callable[[uuid.UUID, str, datetime], str | None]


class NoModelMatches(BadRequest):
    code = "no_model_matches"
    description = "No candidate of the model object is left after its filters."


@dataclass(frozen=True, slots=True)
class Candidate:
    model: str
    provider: Provider


@dataclass(frozen=True, slots=True)
class Route:
    """The candidates in the order they are tried, and the most any of them may cost (what
    budgets reserve, so a fallback never spends past a reservation)."""

    candidates: tuple[Candidate, ...]
    costliest: Price | None


def _weigh(scores: list[float], weight: float, values: Sequence[float | None]) -> None:
    """Add to each score `weight` times its value's place between the best of `values` (0)
    and the worst (1); an unknown value counts as the best, and so does every value when
    all are the same."""
    known = [v for v in values if v is not None]
    if not known:
        return
    low = min(known)
    span = max(known) - low
    if span <= 0:
        return
    for i, v in enumerate(values):
        if v is not None:
            scores[i] += weight * (v - low) / span


def costliest(prices: Sequence[Price]) -> Price | None:
    """A price at least as high as each of `prices`, input and output each at their most."""
    if not prices:
        return None
    if len(prices) == 1:
        return prices[0]
    return Price(
        model="|".join(p.model for p in prices),
        input_usd_per_mtok=max(p.input_usd_per_mtok for p in prices),
        output_usd_per_mtok=max(p.output_usd_per_mtok for p in prices),
        effective_from=BEGINNING_OF_TIME,
    )


@dataclass(frozen=True, slots=True)
class _Ranking:
    """A ranking's route, the statistics' generation it was made at, and until when it holds."""

    route: Route
    generation: int
    until: float  # the router's clock


# How long a ranking is kept while the statistics' generation stays the same.
RANKING_TTL_S = 0.01
# Filtered candidates kept per (model object, account, quoted model): at most this many.
KEPT_ROUTES = 4096
# The routes kept per filtered candidates (one per order its candidates were tried in): at
# most this many.
KEPT_ORDERS = 64


@dataclass(frozen=True, slots=True)
class _Filtered:
    """The candidates a model object's filters left and their prices, which hold for as
    long as the tariff they were read from is the one in force and `[start, end)` holds
    the request's instant: no price, cost or rate card changes for the account within it.
    Which providers serve a model never changes in a process, so the (model, provider)
    routes and their price terms are worked out here once; the order they are tried in
    (live statistics, cooldowns) is worked out on every request."""

    tariff: Tariff
    listed: tuple[str, ...]
    start: datetime | None
    end: datetime | None
    prices: dict[str, Price]
    # Every (model, provider) route of the candidates, models in `llms` order, each
    # model's providers in the file's (a cooled-down one goes last by the ranking itself).
    routes: tuple[Candidate, ...]
    keys: tuple[RouteKey, ...]  # each route's (provider, model), what statistics are keyed by
    providers: tuple[str, ...]  # the routes' providers, each once
    # Each route's price term (0 the cheapest of the models, 1 the dearest); None: all the
    # same price, a term that counts 0.
    price_terms: tuple[float, ...] | None
    # The route of each order the candidates were tried in (indices into `routes`), its
    # costliest price worked out once: the ranking is all a request computes.
    orders: dict[tuple[int, ...], Route]
    # The last ranking (none before the first).
    ranking: list[_Ranking]

    @classmethod
    def of(
        cls,
        tariff: Tariff,
        listed: tuple[str, ...],
        span: tuple[datetime | None, datetime | None],
        prices: dict[str, Price],
        routes: tuple[Candidate, ...],
    ) -> _Filtered:
        sums = {m: p.input_usd_per_mtok + p.output_usd_per_mtok for m, p in prices.items()}
        terms = None
        if sums:
            low = min(sums.values())
            span_usd = max(sums.values()) - low
            if span_usd > 0:
                by_model = {m: float((v - low) / span_usd) for m, v in sums.items()}
                terms = tuple(by_model[c.model] for c in routes)
        return cls(
            tariff,
            listed,
            span[0],
            span[1],
            prices,
            routes,
            tuple((c.provider.name, c.model) for c in routes),
            tuple(dict.fromkeys(c.provider.name for c in routes)),
            terms,
            {},
            [],
        )


class ModelRouter:
    def __init__(
        self,
        providers: ProviderRouter,
        prices: LivePrices,
        stats: RoutingStats,
        max_attempts: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.providers = providers
        self.clock = clock
        self.prices = prices
        self.stats = stats
        self.max_attempts = max_attempts
        # Concrete models the providers list (GET /v1/models), beside the file's and the
        # price table's exact ids: what "every priced model some provider serves" draws on.
        self.listed_models: tuple[str, ...] = ()
        self._quoted_model: QuotedModel = lambda _a, _t, _at: None
        self._kept: dict[tuple[ModelSpec, uuid.UUID, str | None], _Filtered] = {}

    def follow_quotes(self, quoted_model: QuotedModel) -> None:
        """Requests on a quoted task route only to the model it was quoted for."""
        self._quoted_model = quoted_model

    def price(self, account_id: uuid.UUID, model: str, at: datetime) -> Price | None:
        """What `account_id` pays for `model` at `at` (its rate card's price, or the list
        price: `Tariff.customer_price`), the one price lookup of routing. A markup over
        provider cost may make it differ by provider: then the dearest of the providers
        serving it, so a filter or a reservation holds whichever serves."""
        return self._price(account_id, model, at, self.providers.route_all(model))

    def _price(
        self,
        account_id: uuid.UUID,
        model: str,
        at: datetime,
        serving: Sequence[Provider],
    ) -> Price | None:
        tariff = self.prices.tariff
        if len(serving) == 1:  # the common case: one provider, one lookup
            return tariff.customer_price(account_id, model, at, serving[0].name).price
        found = [tariff.customer_price(account_id, model, at, p.name).price for p in serving]
        if not serving:
            found = [tariff.customer_price(account_id, model, at).price]
        known = [p for p in found if p is not None]
        return costliest(known) if known else None

    # -- a model name ---------------------------------------------------------------------

    def serving(self, model: str) -> tuple[Provider, ...]:
        """The configured providers of `model` in the order tried: the file's, with those
        cooling down last. Empty: none is configured (or none serves it)."""
        found = self.providers.route_all(model)
        if len(found) == 1:  # the common case, as cheap as before routing existed
            return found if found[0].configured else ()
        usable = [p for p in found if p.configured]
        cooled = [p for p in usable if self.stats.cooled(p.name)]
        if cooled:
            usable = [p for p in usable if p not in cooled] + cooled
        return tuple(usable)

    # -- a model object -------------------------------------------------------------------

    def catalog(self, at: datetime) -> list[str]:
        """Every priced model some provider serves, by name."""
        names = dict.fromkeys(m for m, _ in self.providers.exact_models())
        names.update(dict.fromkeys(self.listed_models))
        names.update(dict.fromkeys(p.model for p in self.prices.book.in_force(at)))
        return [m for m in names if not is_pattern(m)]

    def choose(
        self, spec: ModelSpec, account_id: uuid.UUID, task_id: str | None, at: datetime
    ) -> Route:
        """The candidates of `spec` in the order tried (at most `max_attempts`), or a 400
        `no_model_matches` naming the filter that removed the last one."""
        quoted = self._quoted_model(account_id, task_id, at) if task_id else None
        key = (spec, account_id, quoted)
        kept = self._kept.get(key)
        tariff = self.prices.tariff
        if (
            kept is None
            or kept.tariff is not tariff
            or kept.listed is not self.listed_models
            or (kept.start is not None and at < kept.start)
            or (kept.end is not None and at >= kept.end)
        ):
            names, prices = self._filtered(spec, account_id, task_id, quoted, at)
            if len(self._kept) >= KEPT_ROUTES:
                self._kept.clear()
            # What `serving` gives, bar its cooldown order: the ranking puts those last.
            routes = tuple(
                Candidate(m, p) for m in names for p in self.providers.route_all(m) if p.configured
            )
            kept = self._kept[key] = _Filtered.of(
                tariff,
                self.listed_models,
                tariff.unchanged_span(account_id, at),
                prices,
                routes,
            )
        now, generation = self.clock(), self.stats.generation
        if kept.ranking:
            last = kept.ranking[0]
            if last.generation == generation and now < last.until:
                return last.route
        order = self._ranked(kept, spec.weights)[: self.max_attempts]
        route = kept.orders.get(order)
        if route is None:
            if len(kept.orders) >= KEPT_ORDERS:
                kept.orders.clear()
            candidates = tuple(kept.routes[i] for i in order)
            models = dict.fromkeys(c.model for c in candidates)
            route = kept.orders[order] = Route(
                candidates, costliest([kept.prices[m] for m in models])
            )
        kept.ranking[:] = [_Ranking(route, generation, now + RANKING_TTL_S)]
        return route

    def _filtered(
        self,
        spec: ModelSpec,
        account_id: uuid.UUID,
        task_id: str | None,
        quoted: str | None,
        at: datetime,
    ) -> tuple[list[str], dict[str, Price]]:
        """The candidates `spec`'s filters leave, with their prices."""
        names = list(spec.llms) if spec.llms is not None else self.catalog(at)
        if not names:
            raise NoModelMatches(
                "model.llms is empty" if spec.llms is not None else "no model is priced",
                param="model.llms",
            )
        prices: dict[str, Price] = {}

        def priced(model: str) -> bool:
            price = self._price(account_id, model, at, self.providers.route_all(model))
            if price is not None:
                prices[model] = price
            return price is not None

        filters: list[tuple[str, str, Callable[[str], bool]]] = []
        if spec.exclude_llms:
            excluded = spec.exclude_llms
            filters.append(
                (
                    "model.exclude_llms",
                    "exclude_llms",
                    lambda m: not any(m == x or fnmatchcase(m, x) for x in excluded),
                )
            )
        filters.append(("model", "no provider serves it", lambda m: bool(self.serving(m))))
        filters.append(("model", "no price", priced))
        if spec.max_input_cost is not None:
            cap_in = spec.max_input_cost
            filters.append(
                (
                    "model.max_input_cost",
                    f"max_input_cost {cap_in} USD per 1M input tokens",
                    lambda m: prices[m].input_usd_per_mtok <= cap_in,
                )
            )
        if spec.max_output_cost is not None:
            cap_out = spec.max_output_cost
            filters.append(
                (
                    "model.max_output_cost",
                    f"max_output_cost {cap_out} USD per 1M output tokens",
                    lambda m: prices[m].output_usd_per_mtok <= cap_out,
                )
            )
        if quoted is not None:
            filters.append(
                (
                    "x-task-id",
                    f"task {task_id!r} being quoted for {quoted!r}",
                    lambda m: m == quoted,
                )
            )
        for param, what, keep in filters:
            left = [m for m in names if keep(m)]
            if not left:
                raise NoModelMatches(
                    f"No candidate model is left: {what} removed the last of"
                    f" {', '.join(names[:8])}{'…' if len(names) > 8 else ''}.",
                    param=param,
                )
            names = left
        return names, {m: prices[m] for m in names}

    def _ranked(
        self, kept: _Filtered, weights: tuple[float, float, float, float]
    ) -> tuple[int, ...]:
        """The order `kept`'s routes are tried in now, as indices into `kept.routes`.

        On every routed request, so each step is skipped when it cannot change the order:
        a term not weighed, an error term when no route has an error rate, the cooldown
        order when no provider has cooled down."""
        count = len(kept.routes)
        if count <= 1:
            return tuple(range(count))
        w_price, w_error, w_start, w_end = weights
        figures = list(map(self.stats.view.get, kept.keys))
        terms = kept.price_terms
        # A term not weighed is not computed.
        scores = [w_price * t for t in terms] if w_price and terms is not None else [0.0] * count
        # Not measured yet: no error seen (so it gets tried). All without errors: a term
        # that counts 0, faded or not.
        if w_error and any(f.error_rate for f in figures if f is not None):
            now = time.time()
            _weigh(scores, w_error, [f.error_at(now) if f else 0.0 for f in figures])
        if w_start:
            _weigh(scores, w_start, [f.ttft_ms if f else None for f in figures])
        if w_end:
            _weigh(scores, w_end, [f.latency_ms if f else None for f in figures])
        # A cooled-down provider's routes go last; ties go to a route not measured yet, so
        # every candidate gets measured, then keep the order of `llms`, then the file's.
        cooled: set[str] = set()
        if self.stats.cooling():
            cooled = {p for p in kept.providers if self.stats.cooled(p)}
        if not cooled and None not in figures:  # the usual case: by score, a stable sort
            return tuple(sorted(range(count), key=scores.__getitem__))
        last = [c.provider.name in cooled for c in kept.routes]
        measured = [f is not None for f in figures]
        ranks = sorted(zip(last, scores, measured, range(count), strict=True))
        return tuple(r[3] for r in ranks)


# The ledger's attempts that seed a new process's statistics.
SEED_WINDOW = timedelta(minutes=15)


async def seed_stats(
    stats: RoutingStats, sessions: async_sessionmaker[AsyncSession], now: datetime
) -> int:
    """Start `stats` from the ledger's last `SEED_WINDOW` of attempts; the routes seeded."""
    async with sessions() as session:
        routes = await RoutingRepository(session).recent_routes(now - SEED_WINDOW)
    for route in routes:
        figures = RouteFigures(
            float(route.attempts),
            route.error_rate,
            route.ttft_ms,
            route.latency_ms,
            route.last.timestamp(),
        )
        stats.seed((route.provider, route.model), figures)
    return len(routes)

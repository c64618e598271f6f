"""What the proxy knows about a request, and the hooks other parts plug into it.

Hooks are declared once, by name, in the order they run (service/runtime.py); each has two
steps, both optional, and no hook costs anything unless declared:

- **admit** — run after authentication and routing, before anything is forwarded. It gets
  the `RequestContext`; it may raise a `MeterlineError` (429 budget or rate limit, 409
  task closed, …), which the proxy returns in OpenAI's error shape without forwarding, or
  return a reservation, kept in `ctx.reservations` under the hook's name.
- **settle** — called once per admitted request with the final ledger record (tokens and
  cost known), after the response has been sent, and with the hook's own reservation;
  with `None` for the record when a later hook refused the request, so earlier
  reservations can be released, and `None` for the reservation when this hook's admit
  never ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from pricing.prices import Price
from service.ledger.record import LedgerRecord
from service.providers.config import Provider
from service.routing.service import Candidate


@dataclass(slots=True)
class RequestContext:
    request_id: str
    occurred_at: datetime
    account_id: uuid.UUID
    key_id: uuid.UUID
    key_prefix: str  # as the billing API lists it (never the key)
    endpoint: str  # chat | completions | embeddings
    model: str  # the model of the attempt under way (a model object's chosen candidate)
    task_id: str | None
    task_type: str | None
    body: dict[str, Any]  # the parsed request body, as the client sent it
    raw_body: bytes
    stream: bool
    provider: Provider  # the provider of the attempt under way
    # Where the request goes should this attempt fail before the client got a byte, in order
    # (service/routing), and how many attempts were made so far (this one included).
    fallbacks: tuple[Candidate, ...] = ()
    attempts: int = 1
    attempt_started: float = 0.0  # time.perf_counter() when the attempt under way began
    # The client sent a model object: each attempt sends its candidate's name as `model`.
    routed: bool = False
    # The most any candidate may cost (a model object's), which budgets reserve; None: the
    # price of `model`.
    costliest: Price | None = None
    # What each hook's admit returned (a reservation, or None), under the hook's name.
    reservations: dict[str, object] = field(default_factory=dict)
    # Headers admission hooks add to the forwarded response (x-ratelimit-*: Meterline's own
    # limits, which replace the provider's limits on its shared key).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Set by the budget admission (service/limits): the `max_tokens` the upstream request is
    # capped to (the client set no limit), and the completion tokens the reservation pays
    # for (a stream generating more is cut). None: neither applies.
    max_tokens_cap: int | None = None
    completion_allowance: int | None = None
    # Set once the settlement hooks have run (exactly once per admitted request).
    settled: bool = False


Held = TypeVar("Held")


@dataclass(frozen=True, slots=True)
class Hook(Generic[Held]):
    """A part that takes part in every request: `admit` may hold something for it, which
    `settle` gets back (None when `admit` did not run)."""

    admit: Callable[[RequestContext], Awaitable[Held]] | None = None
    settle: Callable[[RequestContext, LedgerRecord | None, Held | None], Awaitable[None]] | None = (
        None
    )


# The hooks by name, in the order they run (admission and settlement alike).
ProxyHooks = dict[str, Hook[Any]]

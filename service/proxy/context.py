"""What the proxy knows about a request, and the hooks other parts plug into it.

Two extension points, both empty (and free) unless something registers:

- **admission** — run after authentication and routing, before anything is forwarded.
  Each hook gets the `RequestContext`; it may raise a `MeterlineError` (429 budget or
  rate limit, 409 task closed, …), which the proxy returns in OpenAI's error shape
  without forwarding, or return a reservation object, kept in `ctx.reservations`.
- **settlement** — called once per admitted request with the final ledger record
  (tokens and cost known), after the response has been sent; with `None` when a later
  admission hook refused the request, so earlier reservations can be released.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.ledger.record import LedgerRecord
from service.providers.config import Provider


@dataclass(slots=True)
class RequestContext:
    request_id: str
    occurred_at: datetime
    account_id: uuid.UUID
    key_id: uuid.UUID
    key_prefix: str  # as the billing API lists it (never the key)
    endpoint: str  # chat | completions | embeddings
    model: str
    task_id: str | None
    task_type: str | None
    body: dict[str, Any]  # the parsed request body, as the client sent it
    raw_body: bytes
    stream: bool
    provider: Provider
    # One entry per admission hook, in order: what it returned (a reservation, or None).
    reservations: list[object] = field(default_factory=list)
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


Admission = Callable[[RequestContext], Awaitable[object | None]]
Settlement = Callable[[RequestContext, LedgerRecord | None], Awaitable[None]]


@dataclass
class ProxyHooks:
    admission: list[Admission] = field(default_factory=list)
    settlement: list[Settlement] = field(default_factory=list)

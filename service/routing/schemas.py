"""The model object a request may send instead of a model name, and the statistics' shape.

    {"llms": ["a", "b"], "exclude_llms": ["openai/*"], "max_input_cost": "0.50",
     "max_output_cost": "1.00", "weights": {"price": 1, "error": 1, "start_latency": 1,
     "end_latency": 1}}

Infuzu's API takes the same object. Costs are USD per 1,000,000 tokens, the unit of
Meterline's price table, at the price this account pays (its rate card, else the list
price); a decimal string or a JSON number. The object is read by hand, not by pydantic: it
is on the proxy's path, and each refusal names the field the way the client sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel, Field

from service.errors import BadRequest

MAX_LLMS = 64
WEIGHTS = ("price", "error", "start_latency", "end_latency")
_FIELDS = frozenset({"llms", "exclude_llms", "max_input_cost", "max_output_cost", "weights"})


@dataclass(frozen=True, slots=True)
class ModelSpec:
    llms: tuple[str, ...] | None  # None: every priced model some provider serves
    exclude_llms: tuple[str, ...]  # exact ids or glob patterns
    max_input_cost: Decimal | None
    max_output_cost: Decimal | None
    weights: tuple[float, float, float, float]  # in the order of WEIGHTS


def _invalid(message: str, param: str) -> BadRequest:
    return BadRequest(message, code="invalid_model", param=param)


def _names(raw: Any, param: str, max_length: int) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_LLMS:
        raise _invalid(f"{param} must be an array of at most {MAX_LLMS} model names", param)
    if not all(isinstance(m, str) and 0 < len(m) <= max_length for m in raw):
        raise _invalid(
            f"each of {param} must be a model name of 1 to {max_length} characters", param
        )
    return tuple(dict.fromkeys(raw))  # duplicates once, in the order given


def _cost(raw: Any, param: str) -> Decimal | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise _invalid(f"{param} must be a decimal string or a number (USD per 1M tokens)", param)
    try:
        # A JSON number arrives as a float: its shortest repr is the decimal the client wrote.
        value = Decimal(raw if isinstance(raw, str) else repr(raw))
    except InvalidOperation:
        raise _invalid(f"{param} must be a decimal (USD per 1M tokens)", param) from None
    if not value.is_finite() or value < 0:
        raise _invalid(f"{param} must be a non-negative decimal (USD per 1M tokens)", param)
    return value


def _weights(raw: Any) -> tuple[float, float, float, float]:
    if raw is None:
        return (1.0, 1.0, 1.0, 1.0)
    if not isinstance(raw, dict) or not set(raw) <= set(WEIGHTS):
        raise _invalid(
            f"model.weights must be an object with keys among {', '.join(WEIGHTS)}", "model.weights"
        )
    values = []
    for name in WEIGHTS:
        value = raw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
            raise _invalid(
                f"model.weights.{name} must be a non-negative number", f"model.weights.{name}"
            )
        values.append(float(value))
    return (values[0], values[1], values[2], values[3])


def parse_model_spec(raw: dict[str, Any], max_length: int) -> ModelSpec:
    """The model object of a request, or a 400 naming the field that is wrong.

    A client sends the same object request after request: it is read once per distinct
    text (a bounded memo; a refusal is not remembered, so it is raised each time)."""
    return _parsed(orjson.dumps(raw), max_length)


@lru_cache(maxsize=1024)
def _parsed(text: bytes, max_length: int) -> ModelSpec:
    return _read_model_spec(orjson.loads(text), max_length)


def _read_model_spec(raw: dict[str, Any], max_length: int) -> ModelSpec:
    unknown = set(raw) - _FIELDS
    if unknown:
        raise _invalid(
            f"model has unknown fields {', '.join(sorted(unknown))};"
            f" it takes {', '.join(sorted(_FIELDS))}",
            "model",
        )
    llms = raw.get("llms")
    return ModelSpec(
        llms=None if llms is None else _names(llms, "model.llms", max_length),
        exclude_llms=_names(raw.get("exclude_llms") or [], "model.exclude_llms", max_length),
        max_input_cost=_cost(raw.get("max_input_cost"), "model.max_input_cost"),
        max_output_cost=_cost(raw.get("max_output_cost"), "model.max_output_cost"),
        weights=_weights(raw.get("weights")),
    )


# -- GET /billing/routing/stats -------------------------------------------------------------


class RouteStats(BaseModel):
    provider: str
    model: str
    samples: float = Field(description="Observations behind the figures (decayed, all workers).")
    error_rate: float = Field(
        description="Share of attempts that failed (connect error, timeout, 429, 5xx)."
    )
    ttft_ms: float | None = Field(description="Time to first byte of the answer (EWMA).")
    latency_ms: float | None = Field(description="Time to the end of the answer (EWMA).")


class ProviderHealth(BaseModel):
    provider: str
    consecutive_failures: int
    cooled_down_until: str | None = Field(description="RFC 3339 UTC; None: not cooled down.")


class RoutingStatsPage(BaseModel):
    worker: str = Field(description="The process that answered (each keeps its own view).")
    shared: bool = Field(description="Whether the figures merge every worker's through Redis.")
    data: list[RouteStats]
    providers: list[ProviderHealth]

"""A provider's `usage` object, read as a claim: what of it can be billed, and what looks wrong.

Providers send what they send: counts as strings, floats, negatives, `1e30`, booleans.
A field that is not a non-negative integer is *missing*, never zero: the proxy estimates
it with its tokenizer and the row says `usage_source = "estimated"`. Counts that are
well-formed but implausible (more completion tokens than the request allowed, or more
than any request uses) are stored as claimed and flagged (`usage_flag`), so that an
operator reviews them before they reach a finalized invoice.

The usage of an answer is read here too: from a whole body (`usage_of_body`), or from a
stream's claim and text (`claimed_usage`), and estimated where the provider said nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from service.ledger.record import storable_text
from service.proxy.context import RequestContext
from service.tokens import estimate

# Beyond this a number is not a token count (a trillion tokens in one request); it is
# treated as missing. Kept far below bigint's range, so sums of rows cannot overflow.
MAX_TOKEN_COUNT = 10**12
# More tokens than any model's context in one field: stored as claimed, but flagged.
PLAUSIBLE_TOKEN_COUNT = 100_000_000

FLAG_COMPLETION_OVER_LIMIT = "completion_over_limit"
FLAG_IMPLAUSIBLE_COUNT = "implausible_count"
# Texts longer than this are counted off the event loop.
_THREAD_TOKENIZE_CHARS = 50_000


def token_count(value: Any) -> int | None:
    """`value` if it is a usable count (a non-negative integer, not a bool), else None."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    reasoning: int = 0
    source: str = "none"
    flag: str | None = None


@dataclass(slots=True)
class UsageClaim:
    """The provider's usage, field by field; None where a count is missing or unusable."""

    prompt: int | None
    completion: int | None
    total: int | None
    cached: int
    reasoning: int
    clean: bool  # every field present was usable

    @classmethod
    def read(cls, raw: Mapping[str, Any], endpoint: str) -> UsageClaim | None:
        """None when the object claims nothing at all (no positive prompt or total count):
        a usage of zeros is a provider that did not count, not a free request."""
        prompt = token_count(raw.get("prompt_tokens"))
        total = token_count(raw.get("total_tokens"))
        if not prompt and not total:
            return None
        clean = _usable_or_absent(raw, "prompt_tokens") and _usable_or_absent(raw, "total_tokens")
        completion = token_count(raw.get("completion_tokens"))
        if raw.get("completion_tokens") is None:
            # Absent: embeddings have none; others may report only the total.
            if endpoint == "embeddings":
                completion = 0
            elif prompt is not None and total is not None and total >= prompt:
                completion = total - prompt
        elif completion is None:
            clean = False
        cached, cached_ok = _detail(raw, "prompt_tokens_details", "cached_tokens")
        reasoning, reasoning_ok = _detail(raw, "completion_tokens_details", "reasoning_tokens")
        return cls(
            prompt, completion, total, cached, reasoning, clean and cached_ok and reasoning_ok
        )

    @property
    def complete(self) -> bool:
        return self.prompt is not None and self.completion is not None

    def usage(self, estimate: Usage | None = None) -> Usage:
        """The billable usage: the claim, its missing counts taken from `estimate`."""
        if self.prompt is not None and self.completion is not None:
            total = self.total or self.prompt + self.completion
            source = "upstream" if self.clean else "estimated"
            return Usage(self.prompt, self.completion, total, self.cached, self.reasoning, source)
        assert estimate is not None, "an incomplete claim needs an estimate"
        prompt = self.prompt if self.prompt is not None else estimate.prompt
        completion = self.completion if self.completion is not None else estimate.completion
        return Usage(
            prompt, completion, prompt + completion, self.cached, self.reasoning, "estimated"
        )


def _usable_or_absent(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name)
    return value is None or token_count(value) is not None


def _detail(raw: Mapping[str, Any], group: str, name: str) -> tuple[int, bool]:
    """A count inside `*_tokens_details`: (its value or 0, whether it was usable or absent)."""
    details = raw.get(group)
    if details is None:
        return 0, True
    if not isinstance(details, Mapping):
        return 0, False
    value = details.get(name)
    count = token_count(value)
    return count or 0, value is None or count is not None


def flag_of(usage: Usage, claim: UsageClaim | None, body: dict[str, Any]) -> str | None:
    """Why the provider's claimed counts in `usage` are implausible, or None.

    Only claimed counts are judged: what Meterline estimated itself is what it saw.
    """
    if claim is None:
        return None
    # What the request allowed over all its choices, as budgets reserve it (0: no bound).
    limit = estimate.completion_tokens(body, default=0)
    if claim.completion is not None and limit and usage.completion > limit:
        return FLAG_COMPLETION_OVER_LIMIT
    claimed = (claim.prompt, claim.completion, claim.total, claim.cached, claim.reasoning)
    if any(v is not None and v > PLAUSIBLE_TOKEN_COUNT for v in claimed):
        return FLAG_IMPLAUSIBLE_COUNT
    return None


# -- the usage of an answer ------------------------------------------------------------


async def usage_of_body(ctx: RequestContext, raw: bytes) -> tuple[Usage, str | None]:
    """The usage of a whole successful answer, and the model the provider says it used."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        return await estimated_usage(ctx, ""), None
    model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
    usage = await claimed_usage(
        ctx, parsed.get("usage"), lambda: estimate.completion_text_of_body(parsed)
    )
    return usage, model


async def claimed_usage(
    ctx: RequestContext, raw: object, completion_text: Callable[[], str]
) -> Usage:
    """The provider's usage where it is usable, the rest estimated; flagged if implausible."""
    claim = UsageClaim.read(raw, ctx.endpoint) if isinstance(raw, dict) else None
    if claim is not None and claim.complete:
        usage = claim.usage()
    else:
        guess = await estimated_usage(ctx, completion_text())
        usage = claim.usage(guess) if claim is not None else guess
    usage.flag = flag_of(usage, claim, ctx.body)
    return usage


async def estimated_usage(ctx: RequestContext, completion: str) -> Usage:
    await estimate.ready()
    prompt_text = estimate.prompt_text(ctx.body)
    if len(prompt_text) + len(completion) > _THREAD_TOKENIZE_CHARS:
        prompt, generated = await asyncio.to_thread(
            lambda: (estimate.count_tokens(prompt_text), estimate.count_tokens(completion))
        )
    else:
        prompt = estimate.count_tokens(prompt_text)
        generated = estimate.count_tokens(completion)
    return Usage(prompt, generated, prompt + generated, 0, 0, "estimated")


def error_code(raw: bytes, status: int) -> str:
    """The provider's own error code when its body says one, else `upstream_<status>`."""
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            for field in ("code", "type"):
                if isinstance(error.get(field), str) and error[field]:
                    return storable_text(error[field], 64)
    return f"upstream_{status}"

"""What a request may cost before it is sent: its prompt's tokens and its completion budget.

Used only for accounts with a budget or a token limit, so the tokenizer stays off the hot
path of everyone else. The prompt is counted with the same offline tokenizer as the
usage estimates; past `_SAMPLE_CHARS` the count is extrapolated from a sample, so a
megabyte prompt costs the event loop milliseconds, not a second.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from pricing.cost import TokenUsage, usage_cost
from pricing.prices import Price
from service.proxy.tokens import content_text, count_tokens

_SAMPLE_CHARS = 64 * 1024
# Role markers and separators OpenAI's chat format adds around each message.
_PER_MESSAGE = 4


def count_text(text: str) -> int:
    if len(text) <= _SAMPLE_CHARS:
        return count_tokens(text)
    sample = text[:_SAMPLE_CHARS]
    return math.ceil(count_tokens(sample) * len(text) / len(sample))


def _prompt_items(value: Any) -> tuple[list[str], int]:
    """Strings to tokenize, and tokens already given as ids (`[[1, 2], [3]]` or `[1, 2]`)."""
    if isinstance(value, str):
        return [value], 0
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return [], len(value)
        texts: list[str] = []
        ids = 0
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, list):
                ids += len(item)
        return texts, ids
    return [], 0


def prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of the prompt of a chat, completions or embeddings body (an estimate)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE + count_text(content_text(message.get("content")))
            calls = message.get("tool_calls")
            if calls:
                total += count_text(str(calls))
        tools = body.get("tools")
        if tools:
            total += count_text(str(tools))
        return total
    texts, ids = _prompt_items(body.get("prompt", body.get("input")))
    return ids + sum(count_text(text) for text in texts)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def completion_tokens(body: dict[str, Any], default: int) -> int:
    """The most completion tokens the request allows (`default` when it sets no bound)."""
    if "messages" not in body and "prompt" not in body:
        return 0  # embeddings generate nothing
    limit = _positive_int(body.get("max_completion_tokens")) or _positive_int(
        body.get("max_tokens")
    )
    choices = _positive_int(body.get("n")) or 1
    return (limit or default) * choices


def worst_case_cost(price: Price | None, prompt: int, completion: int) -> Decimal:
    """List price of the prompt plus the whole completion budget; 0 for an unpriced model."""
    if price is None:
        return Decimal(0)
    return usage_cost(TokenUsage(prompt_tokens=prompt, completion_tokens=completion), price)

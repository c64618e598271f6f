"""Signatures as the Standard Webhooks specification defines them, so its verifiers accept them.

The secret is `whsec_` + base64 of random bytes; the signed content is
`{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 with the decoded secret, sent as
`webhook-signature: v1,<base64>`. The timestamp is the attempt's (the receiver checks it
is recent, against replays); the id is the event's, stable across attempts (the receiver
deduplicates by it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
_SECRET_BYTES = 24


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
        "content-type": "application/json",
    }

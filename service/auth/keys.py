"""Customer API keys: `ml-` + 43 url-safe characters (256 random bits); only a hash is kept."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "ml-"
# What a list shows of a key: enough to tell keys apart, far too little to guess one.
DISPLAY_PREFIX_LENGTH = 11


@dataclass(frozen=True, slots=True)
class NewKey:
    plaintext: str
    prefix: str
    key_hash: bytes


def hash_key(plaintext: str) -> bytes:
    # A key carries 256 random bits, so a plain SHA-256 resists brute force; no salt needed,
    # and the hash can be looked up directly.
    return hashlib.sha256(plaintext.encode()).digest()


def generate_key() -> NewKey:
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(plaintext, plaintext[:DISPLAY_PREFIX_LENGTH], hash_key(plaintext))


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 35 <= len(value) <= 128

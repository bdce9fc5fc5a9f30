"""API keys: generated with 32 random bytes, stored as a SHA-256 hash, compared in constant time.

A key reads ``memos_<prefix>_<secret>``. The prefix is its public handle (used to
revoke it and to find its row); the secret never leaves the response that shows it.
A fast hash is right here: the secret has 256 bits of entropy, so there is
nothing for a slow, salted hash to protect against.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_SCHEME = "memos"
PREFIX_BYTES = 6
SECRET_BYTES = 32


def generate_key() -> tuple[str, str]:
    """A new key and its prefix."""
    prefix = secrets.token_hex(PREFIX_BYTES)
    return f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}", prefix


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, or None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or len(parts[1]) != 2 * PREFIX_BYTES:
        return None
    return parts[1]


_SECRET_IN_TEXT = re.compile(rf"\b({KEY_SCHEME}_[0-9a-f]{{{2 * PREFIX_BYTES}}}_)[A-Za-z0-9_-]+")


def redact_keys(text: str) -> str:
    """``text`` with the secret of every key in it cut off (its prefix stays, to say which key it was)."""
    return _SECRET_IN_TEXT.sub(r"\1...", text)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_matches(key: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)

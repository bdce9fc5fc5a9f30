"""Opaque cursors for keyset pagination: base64url of a small JSON list of sort keys."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from memos.errors import Invalid

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Page(msgspec.Struct, Generic[T]):
    """A page of a list; pass ``next_cursor`` back as ``?cursor=`` for the next one (null: no more)."""

    items: list[T]
    next_cursor: str | None


def encode_cursor(keys: list[Any]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(keys)).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    """The sort keys inside ``cursor``; a cursor this server did not hand out is a 422 on ``cursor``."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        keys = msgspec.json.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Invalid.field("cursor", "not a cursor this server handed out") from None
    if not isinstance(keys, list) or len(keys) != arity:
        raise Invalid.field("cursor", "not a cursor this server handed out")
    return keys


def encode_keyset(created_at: datetime, row_id: uuid.UUID) -> str:
    """A cursor for lists ordered by (created_at, id)."""
    return encode_cursor([created_at.isoformat(), str(row_id)])


def decode_keyset(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    keys = decode_cursor(cursor, 2)
    if keys is None:
        return None
    try:
        return datetime.fromisoformat(str(keys[0])), uuid.UUID(str(keys[1]))
    except ValueError:
        raise Invalid.field("cursor", "not a cursor this server handed out") from None

"""Opaque cursors for keyset pagination: base64url of a small JSON list, ``[list tag, *sort keys]``.

The tag names the list a cursor pages (``list_tag``): a cursor handed out by one list (``GET /v1/cubes``) and
sent to another (``GET /v1/agents``, or the memories of another cube) is a 422 on ``cursor``, not a page that
starts at a position of some other list. Cursors are not signed: a well-formed cursor is a position in its
list and nothing more. Every list applies the caller's scope in its query whatever the cursor says, so a
hand-made one only chooses where the page starts; it reaches nothing the caller could not list anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from memos.errors import Invalid

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

NOT_ISSUED = "not a cursor this server handed out"
OTHER_LIST = (
    "a cursor of another list, or from a memos release whose cursors did not name their list: "
    "ask for the first page again (without cursor)"
)


class Page(msgspec.Struct, Generic[T]):
    """A page of a list; pass ``next_cursor`` back as ``?cursor=`` for the next one (null: no more)."""

    items: list[T]
    next_cursor: str | None


def list_tag(name: str, parent: uuid.UUID | None = None) -> str:
    """The tag of a list, carried by its cursors: the list's name and the resource whose children it lists
    (the cube of ``memories``, the memory of ``versions``). Eight characters, whatever the parent."""
    raw = name if parent is None else f"{name}/{parent}"
    return base64.urlsafe_b64encode(hashlib.blake2s(raw.encode(), digest_size=6).digest()).decode()


def encode_cursor(keys: list[Any], of: str | None = None) -> str:
    """A cursor of the list tagged ``of`` (``list_tag``); without a tag, the untagged form of older releases."""
    payload = keys if of is None else [of, *keys]
    return base64.urlsafe_b64encode(msgspec.json.encode(payload)).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int, of: str) -> list[Any] | None:
    """The sort keys inside ``cursor``, a cursor of the list tagged ``of``.

    A cursor this server did not hand out (not base64url JSON, not a list of the right length), or one of
    another list, is a 422 on ``cursor``. Untagged cursors (issued before cursors carried their list) are
    refused as cursors of another list.
    """
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        keys = msgspec.json.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Invalid.field("cursor", NOT_ISSUED) from None
    if not isinstance(keys, list):
        raise Invalid.field("cursor", NOT_ISSUED)
    if len(keys) == arity + 1 and keys[0] == of:
        return keys[1:]
    tagged = bool(keys) and isinstance(keys[0], str) and len(keys[0]) == len(of)
    raise Invalid.field("cursor", OTHER_LIST if tagged or len(keys) == arity else NOT_ISSUED)


def encode_keyset(created_at: datetime, row_id: uuid.UUID | str, of: str) -> str:
    """A cursor for lists ordered by (created_at, id); ``of``: the list's tag (``list_tag``)."""
    return encode_cursor([created_at.isoformat(), str(row_id)], of)


def decode_keyset(cursor: str | None, of: str) -> tuple[datetime, uuid.UUID] | None:
    keys = decode_text_keyset(cursor, of)
    if keys is None:
        return None
    try:
        return keys[0], uuid.UUID(keys[1])
    except ValueError:
        raise Invalid.field("cursor", NOT_ISSUED) from None


def decode_text_keyset(cursor: str | None, of: str) -> tuple[datetime, str] | None:
    """A cursor of a list ordered by (created_at, a text key): an API key's prefix."""
    keys = decode_cursor(cursor, 2, of)
    if keys is None:
        return None
    if not isinstance(keys[1], str) or "\x00" in keys[1]:  # Postgres refuses a NUL in text: a 422 naming no field
        raise Invalid.field("cursor", NOT_ISSUED)
    try:
        return datetime.fromisoformat(str(keys[0])), keys[1]
    except ValueError:
        raise Invalid.field("cursor", NOT_ISSUED) from None

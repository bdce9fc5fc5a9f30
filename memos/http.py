"""Small HTTP helpers the controllers share: ids from paths, ETags, If-Match."""

from __future__ import annotations

import uuid
from typing import Annotated, TypeVar

from litestar import Response
from litestar.params import HeaderParameter, QueryParameter

from memos.errors import NotFound, PreconditionFailed
from memos.memories.schemas import Memory
from memos.pagination import DEFAULT_LIMIT, MAX_LIMIT

Limit = Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description=f"page size (default {DEFAULT_LIMIT})")]
Cursor = Annotated[str | None, QueryParameter(max_length=512, description="next_cursor of the previous page")]
_IF_MATCH = 'The version you read, as its ETag ("3"), or * for any'
IfMatch = Annotated[str | None, HeaderParameter(name="If-Match", description=_IF_MATCH)]
# Documented as required, yet optional to Litestar: a missing one reaches the handler, which answers 428
# (RFC 6585) instead of Litestar's generic validation error.
RequiredIfMatch = Annotated[str | None, HeaderParameter(name="If-Match", description=_IF_MATCH, required=True)]


def parse_id(value: str, what: str) -> uuid.UUID:
    """A path id; anything that is not a UUID names nothing, so it is a 404 like an unknown id."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None


def etag(version: int) -> str:
    return f'"{version}"'


T = TypeVar("T")


def created(body: T, location: str, headers: dict[str, str] | None = None) -> Response[T]:
    """201 with ``Location`` naming where ``body`` is read again (RFC 9110 15.3.2)."""
    return Response(body, status_code=201, headers={**(headers or {}), "Location": location})


def memory_response(memory: Memory, status_code: int = 200) -> Response[Memory]:
    """A memory with its ``ETag``; a created one (201) also says where it is read: ``/v1/memories/{id}``."""
    headers = {"ETag": etag(memory.version)}
    if status_code == 201:
        return created(memory, f"/v1/memories/{memory.id}", headers)
    return Response(memory, status_code=status_code, headers=headers)


def parse_if_match(header: str | None) -> frozenset[int] | None:
    """The versions an ``If-Match`` header names (any of them matches: RFC 9110 13.1.1); None when absent or ``*``."""
    if header is None:
        return None
    value = header.strip()
    if value == "*":
        return None
    # A list ("3", "4"): a client that read the memory twice, or holds several copies. An ETag of this server
    # is digits, so a comma only ever separates tags. "*" is a whole header, never an item of a list.
    return frozenset(_version(item.strip()) for item in value.split(","))


def _version(value: str) -> int:
    # The forms api.md lists are "3", W/"3" and a bare 3: quotes come in a pair (strip('"') took the
    # unbalanced '"1' for version 1), and a weak ETag is always quoted.
    weak = value.startswith("W/")
    value = value.removeprefix("W/")
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        value = value[1:-1]
    elif weak:
        raise PreconditionFailed('If-Match must be an ETag this server sent, like "3"')
    # isascii(): str.isdigit() also accepts digits like "²" that int() refuses.
    if not (value.isascii() and value.isdigit()):
        raise PreconditionFailed('If-Match must be an ETag this server sent, like "3"')
    return int(value)

"""Request and response bodies of the cache endpoints (API.md "Semantic cache")."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.spec import OpenAPIType, Schema

from memos.memories.schemas import Ttl
from memos.semcache.guards import GUARD_NAMES
from memos.semcache.policy import (
    MAX_CATEGORIES,
    MAX_CATEGORY_NAME,
    MAX_ENTRIES_LIMIT,
    MAX_TTL_SECONDS,
    NAME_SPACE,
    THRESHOLD_CEILING,
    THRESHOLD_FLOOR,
    ContextPolicy,
)
from memos.validation import VISIBLE

MAX_CONTEXT_TURNS = 50
MAX_CONTEXT_BYTES = 64 * 1024
MAX_QUERY_CHARS = 8000
"""A cached or looked-up query's most characters: the guards read every query a lookup compares."""

# VISIBLE: a query of zero-width spaces was embedded and looked up (the service refused only whitespace; a review).
Query = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_QUERY_CHARS, pattern=VISIBLE)]
Answer = Annotated[str, msgspec.Meta(min_length=1)]
Category = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CATEGORY_NAME)]


class TurnIn(msgspec.Struct, forbid_unknown_fields=True):
    """One earlier turn of the conversation, with its speaker."""

    role: Literal["user", "assistant", "system"]
    content: str


Context = list[str | TurnIn]
"""The turns before the query, oldest first: plain strings (taken to alternate, the newest being the
assistant's) or ``{role, content}`` objects."""


def context_limit_error(context: Sequence[object]) -> str | None:
    """Why a context (a request's, or a response memory's ``metadata.context``) is over the cache's limits.

    ``None`` within them. Turns are strings or ``{role, content}`` objects (or :class:`TurnIn`); text that is not
    a string is not counted (such a context is never served). Every path that writes a cached answer applies
    this: a lookup compares the stored context with its own, so its size is the lookup's cost.
    """
    if len(context) > MAX_CONTEXT_TURNS:
        return f"at most {MAX_CONTEXT_TURNS} turns, not {len(context)}"
    size = 0
    for turn in context:
        content = turn.get("content") if isinstance(turn, Mapping) else getattr(turn, "content", turn)
        if isinstance(content, str):
            size += len(content.encode())
    if size > MAX_CONTEXT_BYTES:
        return f"at most {MAX_CONTEXT_BYTES} bytes of text, not {size}"
    return None


def cached_answer_problems(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where a response memory's metadata is over the cache's limits, as (key under ``metadata``, why): its
    ``query`` and its ``context`` are read by every lookup that compares the entry. Applied on every path that
    makes one current (create, batch, PATCH, restore, bundle import)."""
    problems: list[tuple[str, str]] = []
    query = metadata.get("query")
    if isinstance(query, str) and len(query) > MAX_QUERY_CHARS:
        problems.append(("query", f"at most {MAX_QUERY_CHARS} characters, not {len(query)}"))
    context = metadata.get("context")
    if isinstance(context, list) and (over := context_limit_error(context)) is not None:
        problems.append(("context", over))
    return problems


class LookupIn(msgspec.Struct, forbid_unknown_fields=True):
    cube_id: uuid.UUID
    query: Query
    category: Category | None = None
    """Default: the cube's default category."""
    context: Context | None = None


class LookupOut(msgspec.Struct):
    hit: bool
    threshold: float
    """The similarity threshold that applied (to the served entry, or to the nearest one on a miss); the lookup's
    category's when the nearest entry was refused for its category, before any similarity test."""
    took_ms: float
    reason: str
    """Why it hit or missed: the threshold, the guard or the context check that decided."""
    category: str
    via: str
    """``index`` (the in-memory ANN index) or ``database`` (pgvector, while the cube's index is being built)."""
    memory_id: uuid.UUID | None = None
    response: str | None = None
    similarity: float | None = None
    """On a hit, the served entry's; on a miss, the nearest examined entry's (when there was one)."""
    version: int | None = None


class StoreIn(msgspec.Struct, forbid_unknown_fields=True):
    cube_id: uuid.UUID
    query: Query
    response: Answer
    category: Category | None = None
    context: Context | None = None
    ttl_seconds: Ttl | None = None
    """The entry expires after this long, whatever its category's TTL says (the shorter applies)."""


class FeedbackIn(msgspec.Struct, forbid_unknown_fields=True):
    memory_id: uuid.UUID
    query: Query
    """The query the entry was served for."""
    correct: bool
    scope: Literal["category", "entry"] = "category"
    """``category``: a wrong hit raises the category's threshold and the entry's own; ``entry``: the entry's only."""


class Invalidated(msgspec.Struct):
    invalidated: int


class ConfigIn(msgspec.Struct, forbid_unknown_fields=True):
    cube_id: uuid.UUID
    default: Category | None = None
    """The category of requests that name none (default: ``default``)."""
    categories: dict[str, Any] = msgspec.field(default_factory=dict)
    """Per category: ``threshold``, ``ttl_seconds``, ``context`` (auto|strict|ignore), ``context_threshold``,
    ``min_threshold``, ``max_threshold``, ``disabled_guards``, ``max_entries``. Left out: the built-in defaults.
    Checked field by field; a bad one is a 422 naming it (``categories.code.threshold``)."""


class ConfigOut(msgspec.Struct):
    cube_id: uuid.UUID
    default: str
    categories: dict[str, dict[str, Any]]
    """Every category in effect, with all its settings (configured values over the built-in defaults)."""
    configured: dict[str, Any]
    """The configuration as it was last written (``{}``: the built-in defaults)."""
    updated_at: datetime | None


class CategoryStats(msgspec.Struct):
    category: str
    entries: int
    """Live entries (active, not expired by their own ``ttl_seconds``)."""
    hits: int
    misses: int
    hit_rate: float | None
    false_hits: int
    """Wrong hits reported through feedback."""
    correct_hits: int
    """Correct hits reported through feedback."""
    evicted: int
    """Entries the quota evicted."""
    threshold: float | None
    """The threshold in force now (feedback moves it within [min_threshold, max_threshold]); null for a
    category that entries name (written through the memories API) but the cube does not configure."""
    configured_threshold: float | None
    ttl_seconds: int | None
    max_entries: int | None
    context: str | None


class StatsOut(msgspec.Struct):
    cube_id: uuid.UUID
    default: str
    entries: int
    categories: list[CategoryStats]
    index: str
    """``ready``, ``building`` or ``cold`` (not loaded in this process)."""


# A category name: no NUL (Postgres text cannot hold it), and something besides NAME_SPACE (the same class
# in any regex engine: written out, not \s).
_NOT_NAME = "".join(f"\\u{ord(c):04x}" for c in "\x00" + NAME_SPACE)
_NAME_PATTERN = f"^[^\\u0000]*[^{_NOT_NAME}][^\\u0000]*$"


def categories_schema() -> Schema:
    """What ``ConfigIn.categories`` accepts, for the OpenAPI document (the type above says only "an object"):
    names of 1-64 characters with one that is not a space, each category's known fields with their ranges.
    Three rules stay outside any schema, since they relate fields or the cube's state: ``min_threshold`` <=
    ``threshold`` <= ``max_threshold``, ``default`` naming a category, and at most ``MAX_CATEGORIES`` with the
    built-in ones."""
    similarity = Schema(type=OpenAPIType.NUMBER, minimum=THRESHOLD_FLOOR, maximum=THRESHOLD_CEILING)
    category = Schema(
        type=OpenAPIType.OBJECT,
        additional_properties=False,
        properties={
            "threshold": similarity,
            "context_threshold": similarity,
            "min_threshold": similarity,
            "max_threshold": similarity,
            "ttl_seconds": Schema(
                one_of=[
                    Schema(type=OpenAPIType.INTEGER, minimum=1, maximum=MAX_TTL_SECONDS),
                    Schema(type=OpenAPIType.NULL),
                ]
            ),
            "max_entries": Schema(
                one_of=[
                    Schema(type=OpenAPIType.INTEGER, minimum=1, maximum=MAX_ENTRIES_LIMIT),
                    Schema(type=OpenAPIType.NULL),
                ]
            ),
            "context": Schema(type=OpenAPIType.STRING, enum=[p.value for p in ContextPolicy]),
            "disabled_guards": Schema(
                type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING, enum=sorted(GUARD_NAMES))
            ),
        },
    )
    return Schema(
        type=OpenAPIType.OBJECT,
        # No NUL anywhere (Postgres text cannot hold it), and not only spaces.
        max_properties=MAX_CATEGORIES,
        property_names=Schema(
            type=OpenAPIType.STRING, min_length=1, max_length=MAX_CATEGORY_NAME, pattern=_NAME_PATTERN
        ),
        additional_properties=category,
    )

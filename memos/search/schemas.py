"""Request and response bodies of ``POST /v1/search``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from memos.memories.schemas import Memory, Tags
from memos.validation import VISIBLE

MAX_K = 200

Mode = Literal["vector", "text", "hybrid", "graph"]
Query = Annotated[str, msgspec.Meta(min_length=1, max_length=4000, pattern=VISIBLE)]


# An empty cube_ids, kinds or states can match nothing: it is a caller's mistake, not the default (an empty
# states was read as ["active"], an empty kinds as any kind), so it is a 422 naming the field.
class SearchRequest(msgspec.Struct, forbid_unknown_fields=True):
    query: Query
    cube_ids: Annotated[list[uuid.UUID], msgspec.Meta(min_length=1, max_length=100)] | None = None
    """Cubes to search; default: every cube the caller may read."""
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_K)] = 10
    mode: Mode = "hybrid"
    kinds: Annotated[list[Literal["plaintext", "response", "activation"]], msgspec.Meta(min_length=1)] | None = None
    tags: Tags | None = None  # as a memory's: an empty tag matches nothing (it was accepted)
    """Every listed tag must be present (an empty list requires none, as leaving it out does)."""
    filters: dict[str, Any] | None = None
    """Metadata that must match exactly (JSON containment)."""
    since: datetime | None = None
    """Event time (metadata.time) at or after; memories without one use their creation time."""
    until: datetime | None = None
    states: Annotated[list[Literal["active", "archived", "deleted"]], msgspec.Meta(min_length=1)] | None = None
    """Default: active only."""
    diversity: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """0 = rank by relevance only; towards 1 = prefer results unlike the ones already chosen (graph mode)."""


class SearchResult(msgspec.Struct):
    memory: Memory
    score: float
    via: str
    """Why it was chosen: vector, text, text+vector, or graph:<edge><-<memory id it was reached from>."""


class SearchResponse(msgspec.Struct):
    results: list[SearchResult]
    took_ms: float

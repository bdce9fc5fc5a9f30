"""Typed bodies: what the server returns (decoded with msgspec) and the few structured inputs.

Response types mirror the server's DTOs (docs/api.md). Fields a newer server adds are ignored when
decoding, so an older client keeps working. IDs are UUID strings; times are timezone-aware datetimes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

import msgspec

T = TypeVar("T")

Kind = Literal["plaintext", "response"]
State = Literal["active", "archived", "deleted"]
SettableState = Literal["active", "archived"]
"""What an update may set: a memory is deleted with DELETE, never by a PATCH."""
Mode = Literal["vector", "text", "hybrid", "graph"]
Access = Literal["read", "write"]
Role = Literal["agent", "admin"]


class Page(msgspec.Struct, Generic[T], frozen=True):
    """One page of a list; pass ``next_cursor`` as ``cursor=`` to continue from it (``None``: the last page)."""

    items: list[T]
    next_cursor: str | None


# --- identity -----------------------------------------------------------------------------------


class TenantCreated(msgspec.Struct, frozen=True):
    id: str
    name: str
    admin_agent_id: str
    admin_key: str
    """Shown once: the server keeps only its hash."""


class AgentCreated(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    api_key: str
    """Shown once: the server keeps only its hash."""


class Agent(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    tenant_id: str
    created_at: datetime


class Me(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str
    tenant_id: str


class KeyCreated(msgspec.Struct, frozen=True):
    api_key: str
    prefix: str
    """The key's public handle: ``agents.revoke_key(prefix)`` revokes it."""


class ApiKey(msgspec.Struct, frozen=True):
    """A key as ``agents.list_keys`` shows it: its prefix and dates, never its secret."""

    prefix: str
    agent_id: str
    created_at: datetime
    revoked_at: datetime | None
    """None while the key works."""


# --- cubes --------------------------------------------------------------------------------------


class CubeStats(msgspec.Struct, frozen=True):
    memories: int
    activations: int


class Cube(msgspec.Struct, frozen=True):
    id: str
    name: str
    description: str
    metadata: dict[str, Any]
    owner_agent_id: str
    created_at: datetime
    updated_at: datetime
    stats: CubeStats
    access: str
    """What the caller may do here: ``"manage"`` (owner, tenant admin), ``"write"`` or ``"read"``."""


class Grant(msgspec.Struct, frozen=True):
    cube_id: str
    agent_id: str
    access: str


# --- memories -----------------------------------------------------------------------------------


class Memory(msgspec.Struct, frozen=True):
    id: str
    cube_id: str
    kind: str
    state: str
    version: int
    """Pass it as ``if_version=`` to update this memory."""
    content: str | None
    """``None`` once purged."""
    metadata: dict[str, Any]
    tags: list[str]
    provenance: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    created_by: str
    heat: float


class Version(msgspec.Struct, frozen=True):
    memory_id: str
    version: int
    op: str
    """``create``, ``update``, ``restore`` or ``delete``."""
    state: str
    content: str | None
    metadata: dict[str, Any]
    tags: list[str]
    provenance: dict[str, Any]
    content_sha256: str | None
    created_at: datetime
    created_by: str


class Link(msgspec.Struct, frozen=True):
    id: str
    from_id: str
    to_id: str
    type: str
    weight: float
    created_at: datetime


class ProvenanceNode(msgspec.Struct, frozen=True):
    memory_id: str
    kind: str
    state: str
    version: int
    depth: int
    """Negative for ancestors, 0 for the memory asked about, positive for descendants."""


class ProvenanceEdge(msgspec.Struct, frozen=True):
    from_id: str
    to_id: str
    to_version: int | None
    """``from_id`` was derived from version ``to_version`` of ``to_id``."""


class ProvenanceGraph(msgspec.Struct, frozen=True):
    nodes: list[ProvenanceNode]
    edges: list[ProvenanceEdge]


# --- search -------------------------------------------------------------------------------------


class SearchResult(msgspec.Struct, frozen=True):
    memory: Memory
    score: float
    via: str
    """Why it was chosen: ``vector``, ``text``, ``text+vector`` or ``graph:<edge><-<seed memory id>``."""


class SearchResponse(msgspec.Struct, frozen=True):
    results: list[SearchResult]
    took_ms: float


# --- KV activations and generation --------------------------------------------------------------


class Model(msgspec.Struct, frozen=True):
    """A causal LM the server is configured with (``MEMOS_MODELS``).

    One whose files do not load is listed with ``status`` ``unavailable`` and the ``reason``; the fields only a
    load can tell (fingerprint, shape, RoPE) are then ``None``."""

    name: str
    fingerprint: str | None
    layers: int | None
    kv_heads: int | None
    head_dim: int | None
    dtype: str
    device: str
    kv_bytes_per_token: int | None
    rope_shiftable: bool | None
    status: str = "ready"
    """``ready`` or ``unavailable`` (requests that need it answer 503)."""
    reason: str | None = None
    """Why it is unavailable; ``None`` when ready."""


class Activation(msgspec.Struct, frozen=True):
    """A memory's KV cache for one model, stored as a ``memos-kv/1`` file."""

    id: str
    """The id of the memory of kind ``activation`` that stands for it."""
    memory_id: str
    source_version: int
    model: str
    fingerprint: str
    tokens: int
    dtype: str
    bytes: int
    sha256: str
    tier: str
    """``device``, ``host`` or ``store``: where the server keeps it now."""
    stale: bool
    """The source memory changed since: this KV is not injected any more."""
    corrupt: bool
    hits: int
    created_at: datetime
    last_used_at: datetime | None


class Generation(msgspec.Struct, frozen=True):
    """An answer generated on top of memories, and what it cost."""

    text: str
    ttft_ms: float
    total_ms: float
    prefill_tokens: int
    reused_tokens: int
    activations_used: list[str]
    token_ids: list[int]
    memory_ids: list[str]
    fallback: str | None = None


class TierState(msgspec.Struct, frozen=True):
    """A KV tier: ``device``, ``host`` or ``store`` (the blob store, no budget of its own)."""

    name: str
    budget_bytes: int | None
    used_bytes: int
    items: int
    hit_rate: float | None


class HotMemory(msgspec.Struct, frozen=True):
    memory_id: str
    heat: float
    tier: str | None
    """The nearest tier holding the memory's KV; None without an activation."""


class SchedulerState(msgspec.Struct, frozen=True):
    """What ``GET /v1/scheduler`` shows: tiers, the build queue, the hottest memories the caller can read."""

    tiers: list[TierState]
    queue: int
    hot: list[HotMemory]


class Pin(msgspec.Struct, frozen=True):
    """A memory's KV for a model held in a tier (``store``: the pin lifted)."""

    memory_id: str
    model: str
    tier: str
    activation_id: str | None
    bytes: int


# --- inputs -------------------------------------------------------------------------------------


class DerivedFrom(msgspec.Struct, frozen=True, omit_defaults=True):
    """A source of a memory; ``version`` defaults (server side) to the source's current version."""

    memory_id: str
    version: int | None = None


class Provenance(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Where a memory came from. A plain dict with the same keys works too."""

    source: str | None = None
    derived_from: list[DerivedFrom] | None = None
    agent: str | None = None
    model: str | None = None
    note: str | None = None


class LinkIn(msgspec.Struct, frozen=True, omit_defaults=True):
    """A typed edge to write with a new memory (``memories.add(..., links=[LinkIn(to, "supports")])``)."""

    to: str
    type: str
    weight: float | None = None


class MemoryIn(msgspec.Struct, frozen=True, kw_only=True):
    """One item of ``memories.add_many``: the same fields as ``memories.add``."""

    content: str
    kind: Kind = "plaintext"
    metadata: dict[str, Any] | None = None
    tags: list[str] | None = None
    provenance: Provenance | dict[str, Any] | None = None
    links: list[LinkIn | dict[str, Any]] | None = None
    ttl_seconds: int | timedelta | None = None
    """Seconds, or a ``timedelta`` (rounded up to whole seconds)."""


# --- semantic cache -----------------------------------------------------------------------------


class Turn(msgspec.Struct, frozen=True):
    """One earlier turn of a conversation, for a cache ``context`` (plain strings work too)."""

    role: Literal["user", "assistant", "system"]
    content: str


class CacheLookup(msgspec.Struct, frozen=True):
    """The answer to ``cache.lookup``: a cached response, or a miss, and why."""

    hit: bool
    threshold: float
    took_ms: float
    reason: str
    """Why it hit or missed: the threshold, the guard or the context check that decided."""
    category: str
    via: str
    """``index`` (in-memory) or ``database`` (while the cube's index is being built)."""
    memory_id: str | None = None
    response: str | None = None
    similarity: float | None = None
    version: int | None = None


class CacheCategoryStats(msgspec.Struct, frozen=True):
    category: str
    entries: int
    hits: int
    misses: int
    hit_rate: float | None
    false_hits: int
    correct_hits: int
    evicted: int
    threshold: float | None
    """The threshold in force now (feedback moves it)."""
    configured_threshold: float | None
    ttl_seconds: int | None
    max_entries: int | None
    context: str | None


class CacheStats(msgspec.Struct, frozen=True):
    cube_id: str
    default: str
    entries: int
    categories: list[CacheCategoryStats]
    index: str


class CacheConfig(msgspec.Struct, frozen=True):
    cube_id: str
    default: str
    categories: dict[str, dict[str, Any]]
    """Every category in effect, with all its settings."""
    configured: dict[str, Any]
    """The configuration as last written (``{}``: the built-in defaults)."""
    updated_at: datetime | None

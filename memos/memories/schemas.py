"""Request and response bodies of the memory endpoints (API.md "Memories")."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from memos.validation import LINK_TYPE, NON_BLANK

MAX_BATCH = 1000
MAX_TAGS = 64
MAX_VERSION = 2**31 - 1
"""Versions are a Postgres ``integer``; a larger number names no version (and must not reach the database)."""

# A memory of spaces has nothing to embed or find, and api.md's errors table promised a 422 for it (found in review).
Content = Annotated[str, msgspec.Meta(min_length=1, pattern=NON_BLANK)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=MAX_TAGS)]
LinkType = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=LINK_TYPE)]
Ttl = Annotated[int, msgspec.Meta(ge=1, le=10 * 365 * 24 * 3600)]
ShortText = Annotated[str, msgspec.Meta(max_length=2000)]
VersionNumber = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]

Kind = Literal["plaintext", "response"]
State = Literal["active", "archived", "deleted"]


class DerivedFrom(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    memory_id: uuid.UUID
    version: VersionNumber | None = None
    """Defaults to the source's current version at write time."""


class Provenance(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    source: ShortText | None = None
    derived_from: Annotated[list[DerivedFrom], msgspec.Meta(max_length=100)] = msgspec.field(default_factory=list)
    agent: ShortText | None = None
    model: ShortText | None = None
    note: ShortText | None = None


class LinkIn(msgspec.Struct, forbid_unknown_fields=True):
    to: uuid.UUID
    type: LinkType
    weight: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 1.0


class MemoryIn(msgspec.Struct, forbid_unknown_fields=True):
    kind: Kind
    content: Content
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    tags: Tags = msgspec.field(default_factory=list)
    provenance: Provenance = msgspec.field(default_factory=Provenance)
    links: Annotated[list[LinkIn], msgspec.Meta(max_length=100)] = msgspec.field(default_factory=list)
    ttl_seconds: Ttl | None = None


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[list[MemoryIn], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class MemoryPatch(msgspec.Struct, forbid_unknown_fields=True):
    content: Content | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    tags: Tags | msgspec.UnsetType = msgspec.UNSET
    provenance: Provenance | msgspec.UnsetType = msgspec.UNSET
    state: Literal["active", "archived"] | msgspec.UnsetType = msgspec.UNSET
    """Archive a memory (kept, not returned by default) or make it active again."""
    ttl_seconds: Ttl | msgspec.UnsetType | None = msgspec.UNSET
    """Seconds from now until the memory expires; null clears the expiry."""


class RestoreIn(msgspec.Struct, forbid_unknown_fields=True):
    version: VersionNumber


class Memory(msgspec.Struct):
    id: uuid.UUID
    cube_id: uuid.UUID
    kind: str
    state: str
    version: int
    content: str | None
    """null once purged."""
    metadata: dict[str, Any]
    tags: list[str]
    provenance: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    created_by: uuid.UUID
    heat: float


class MemoryList(msgspec.Struct):
    items: list[Memory]


class Version(msgspec.Struct):
    memory_id: uuid.UUID
    version: int
    op: str
    state: str
    content: str | None
    metadata: dict[str, Any]
    tags: list[str]
    provenance: dict[str, Any]
    content_sha256: str | None
    created_at: datetime
    created_by: uuid.UUID


class Link(msgspec.Struct):
    id: uuid.UUID
    from_id: uuid.UUID
    to_id: uuid.UUID
    type: str
    weight: float
    created_at: datetime


class ProvenanceNode(msgspec.Struct):
    memory_id: uuid.UUID
    kind: str
    state: str
    version: int
    depth: int
    """Negative for ancestors, 0 for the memory asked about, positive for descendants."""


class ProvenanceEdge(msgspec.Struct):
    from_id: uuid.UUID
    to_id: uuid.UUID
    to_version: int | None
    """``from_id`` was derived from version ``to_version`` of ``to_id``."""


class ProvenanceGraph(msgspec.Struct):
    nodes: list[ProvenanceNode]
    edges: list[ProvenanceEdge]

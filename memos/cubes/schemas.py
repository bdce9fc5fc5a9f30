"""Request and response bodies of the cube endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from memos.validation import VISIBLE

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=VISIBLE)]
Description = Annotated[str, msgspec.Meta(max_length=10_000)]


class CubeIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    description: Description = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class CubePatch(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class CubeStats(msgspec.Struct):
    memories: int
    activations: int


class Cube(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    metadata: dict[str, Any]
    owner_agent_id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    stats: CubeStats
    access: str
    """What the caller may do here: "manage" (owner, tenant admin), "write" or "read"."""


class GrantIn(msgspec.Struct, forbid_unknown_fields=True):
    access: Literal["read", "write"]


class Grant(msgspec.Struct):
    cube_id: uuid.UUID
    agent_id: uuid.UUID
    access: str

"""Request and response bodies of the identity endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from memos.validation import VISIBLE

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=VISIBLE)]


class TenantIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name


class TenantCreated(msgspec.Struct):
    id: uuid.UUID
    name: str
    admin_agent_id: uuid.UUID
    admin_key: str
    """Shown once: only its hash is kept."""


class AgentIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    role: Literal["agent", "admin"] = "agent"


class AgentCreated(msgspec.Struct):
    id: uuid.UUID
    name: str
    role: str
    api_key: str
    """Shown once: only its hash is kept."""


class Agent(msgspec.Struct):
    id: uuid.UUID
    name: str
    role: str
    tenant_id: uuid.UUID
    created_at: datetime


class Me(msgspec.Struct):
    id: uuid.UUID
    name: str
    role: str
    tenant_id: uuid.UUID


class KeyCreated(msgspec.Struct):
    api_key: str
    prefix: str


class ApiKey(msgspec.Struct):
    """A key as listings show it: its public prefix and dates, never its secret or hash."""

    prefix: str
    agent_id: uuid.UUID
    created_at: datetime
    revoked_at: datetime | None
    """Null while the key works."""

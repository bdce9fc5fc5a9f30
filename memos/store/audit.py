"""The audit log: one row per change, written inside the change's own transaction."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.models import audit_log


class Actor(Protocol):
    """Whoever made the change (``identity.Principal`` fits); store/ does not import identity/."""

    @property
    def actor(self) -> str: ...

    @property
    def tenant_id(self) -> uuid.UUID | None: ...


async def record(
    conn: AsyncConnection,
    principal: Actor,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str,
    *,
    tenant_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        insert(audit_log).values(
            tenant_id=tenant_id or principal.tenant_id,
            actor=principal.actor,
            action=action,
            target_type=target_type,
            target_id=str(target_id),
            detail=detail or {},
        )
    )

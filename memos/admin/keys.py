"""``memos admin keys``: API keys seen and managed by the operator, from the machine the service runs on.

For what the REST API cannot do for itself: a tenant whose every admin key is lost (``issue`` a new one for
an admin agent), a leaked key to revoke at once whatever tenant it is in, and an overview of the keys that
exist. Keys are shown by prefix only; a new key is shown once, and its hash is all that is stored. Each
change writes an audit row in the key's tenant, by the operator.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, func, or_, select, update

from memos.admin import AdminError
from memos.identity.keys import PREFIX_BYTES, key_prefix
from memos.identity.principal import OPERATOR
from memos.identity.service import issue_key
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import agents, api_keys, tenants


class KeyToolError(AdminError):
    """No such agent, tenant or live key."""


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    prefix: str
    tenant: str
    agent_id: uuid.UUID
    agent: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


@dataclasses.dataclass(frozen=True)
class Issued:
    key: str
    prefix: str
    agent: str
    tenant: str


_KEYS = (
    select(
        api_keys.c.prefix,
        tenants.c.name.label("tenant"),
        agents.c.id.label("agent_id"),
        agents.c.name.label("agent"),
        agents.c.role,
        api_keys.c.created_at,
        api_keys.c.revoked_at,
    )
    .select_from(api_keys.join(agents, agents.c.id == api_keys.c.agent_id))
    .join(tenants, tenants.c.id == agents.c.tenant_id)
    .order_by(tenants.c.name, agents.c.name, api_keys.c.created_at)
)
"""Every key as ``KeyInfo`` reads it (``list_keys`` and ``revoke`` filter it)."""


async def list_keys(db: Database, tenant: str | None = None, *, revoked: bool = False) -> list[KeyInfo]:
    """Keys by tenant, agent and age; ``tenant`` is a tenant's id or name; revoked keys only with ``revoked``."""
    query = _KEYS
    if tenant is not None:
        query = query.where(_tenant_is(tenant))
    if not revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    async with db.read() as conn:
        if tenant is not None and await conn.scalar(select(tenants.c.id).where(_tenant_is(tenant))) is None:
            raise KeyToolError(f"no tenant {tenant!r} (give its id or its name)")
        return [KeyInfo(**r._mapping) for r in await conn.execute(query)]


def _tenant_is(tenant: str) -> ColumnElement[bool]:
    try:
        return or_(tenants.c.id == uuid.UUID(tenant), tenants.c.name == tenant)
    except ValueError:
        return tenants.c.name == tenant


async def issue(db: Database, agent_id: uuid.UUID) -> Issued:
    """A new key for the agent; its other keys stay valid until revoked."""
    async with db.transaction() as conn:
        found = (
            await conn.execute(
                select(agents.c.name, agents.c.tenant_id, tenants.c.name.label("tenant"))
                .select_from(agents.join(tenants, tenants.c.id == agents.c.tenant_id))
                .where(agents.c.id == agent_id)
            )
        ).one_or_none()
        if found is None:
            raise KeyToolError(f"no agent {agent_id}")
        key = await issue_key(conn, agent_id)
        prefix = key_prefix(key)
        assert prefix is not None
        await record(
            conn,
            OPERATOR,
            "key.create",
            "api_key",
            prefix,
            tenant_id=found.tenant_id,
            detail={"agent_id": str(agent_id), "by": "memos admin keys issue"},
        )
    return Issued(key=key, prefix=prefix, agent=found.name, tenant=found.tenant)


async def revoke(db: Database, prefix: str) -> KeyInfo:
    """Revoke the live key with this prefix, or this whole key (any tenant's); the revoked key."""
    # A whole key works too (its prefix is taken); what was typed is never repeated: it may be a secret.
    prefix = key_prefix(prefix) or prefix
    if len(prefix) != 2 * PREFIX_BYTES or not all(c in "0123456789abcdef" for c in prefix):
        raise KeyToolError(f"not a key prefix ({2 * PREFIX_BYTES} hex digits, as `keys list` shows) nor a key")
    async with db.transaction() as conn:
        revoked = (
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=func.now())
                .returning(api_keys.c.agent_id)
            )
        ).one_or_none()
        if revoked is None:
            raise KeyToolError(f"no live key with prefix {prefix}")
        tenant_id = await conn.scalar(select(agents.c.tenant_id).where(agents.c.id == revoked.agent_id))
        await record(
            conn,
            OPERATOR,
            "key.revoke",
            "api_key",
            prefix,
            tenant_id=tenant_id,
            detail={"agent_id": str(revoked.agent_id), "by": "memos admin keys revoke"},
        )
        return KeyInfo(**(await conn.execute(_KEYS.where(api_keys.c.prefix == prefix))).one()._mapping)

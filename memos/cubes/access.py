"""Who may do what in a cube: the one place the sharing rules live.

manage: the owner and the tenant's admins (everything, grants included);
write/read: agents holding a grant. Anyone else does not see the cube (404).
"""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any, Literal

from sqlalchemy import Select, Uuid, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.errors import Forbidden, NotFound
from memos.identity.principal import Principal
from memos.store.db import driver_sql
from memos.store.models import cube_grants, cubes

Access = Literal["read", "write", "manage"]
_RANK: dict[str, int] = {"read": 1, "write": 2, "manage": 3}


def access_of(principal: Principal, owner_agent_id: uuid.UUID, grant: str | None) -> Access | None:
    """What ``principal`` may do in a cube of its tenant, given the cube's owner and its grant row."""
    if principal.is_admin or owner_agent_id == principal.agent_id:
        return "manage"
    if grant == "write":
        return "write"
    if grant == "read":
        return "read"
    return None


def require(access: Access, needed: Access, what: str = "cube") -> None:
    if _RANK[access] < _RANK[needed]:
        raise Forbidden(f"this {what} is shared with you for {access} only; {needed} access is needed")


async def cube_access(conn: AsyncConnection, principal: Principal, cube_id: uuid.UUID, needed: Access) -> Access:
    """The caller's access to a live cube, at least ``needed`` (403 if less), or 404 if it cannot see it.

    Writers take a share lock on the cube row and managers an exclusive one, so a cube cannot be
    deleted between a writer's check and its commit (the delete's tombstoning would miss the new rows).
    """
    tenant_id, agent_id = principal.tenant_member()
    params = {"cube": cube_id, "tenant": tenant_id, "agent": agent_id}
    row = (await conn.exec_driver_sql(_access_sql(needed), params)).first()
    access = None if row is None else access_of(principal, row.owner_agent_id, row.access)
    if row is not None and needed != "read":
        access = await locked_access(conn, principal, cube_id, row.owner_agent_id, access)
    if access is None:
        raise NotFound("no such cube")
    require(access, needed)
    return access


@cache
def _access_sql(needed: Access) -> str:
    """``cube_access``'s statement as text, compiled once per level (built on every call, it cost a write about
    0.5-1 ms of the event loop). Writers take a share lock on the cube row and managers an exclusive one."""
    agent = bindparam("agent", type_=Uuid())
    query = (
        select(cubes.c.owner_agent_id, cube_grants.c.access)
        .select_from(cubes)
        .outerjoin(cube_grants, and_(cube_grants.c.cube_id == cubes.c.id, cube_grants.c.agent_id == agent))
        .where(
            cubes.c.id == bindparam("cube", type_=Uuid()),
            cubes.c.tenant_id == bindparam("tenant", type_=Uuid()),
            cubes.c.deleted_at.is_(None),
        )
    )
    if needed == "write":
        query = query.with_for_update(read=True, of=cubes)
    elif needed == "manage":
        query = query.with_for_update(of=cubes)
    return driver_sql(query)


async def locked_access(
    conn: AsyncConnection, principal: Principal, cube_id: uuid.UUID, owner_agent_id: uuid.UUID, access: Access | None
) -> Access | None:
    """``access`` (read with the cube row locked, in the same statement) made current: a grant may have been
    revoked while that statement waited for the lock, and Postgres then re-checks only the locked row, not the
    grant joined to it, so a write went through on a revoked grant after the revoke had answered 204 (found
    in review). An owner's or an admin's access rests on the locked row itself; a grantee's is read again,
    after the lock, from a snapshot that holds the revoke."""
    if access is None or access == "manage":
        return access
    _, agent_id = principal.tenant_member()
    fresh = (
        await conn.execute(
            select(cube_grants.c.access).where(cube_grants.c.cube_id == cube_id, cube_grants.c.agent_id == agent_id)
        )
    ).scalar_one_or_none()
    return access_of(principal, owner_agent_id, fresh)


def readable_cube_ids(principal: Principal) -> Select[Any]:
    """A subquery of the ids of every live cube the caller may read."""
    tenant_id, agent_id = principal.tenant_member()
    return _readable(tenant_id, agent_id, principal.is_admin)


@cache
def readable_cube_ids_sql(admin: bool) -> str:
    """``readable_cube_ids`` as SQL text, for statements written out as text: the same rule, with
    ``%(tenant)s`` and ``%(agent)s`` placeholders (pass ``Principal.tenant_member()``)."""
    return driver_sql(_readable(bindparam("tenant", type_=Uuid()), bindparam("agent", type_=Uuid()), admin))


def _readable(tenant: Any, agent: Any, admin: bool) -> Select[Any]:
    query = select(cubes.c.id).where(cubes.c.tenant_id == tenant, cubes.c.deleted_at.is_(None))
    if admin:
        return query
    granted = select(cube_grants.c.cube_id).where(cube_grants.c.agent_id == agent)
    return query.where(or_(cubes.c.owner_agent_id == agent, cubes.c.id.in_(granted)))

"""MemCubes: create, list, read, update, tombstone, and share by grant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
from sqlalchemy import Row, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError

from memos.cubes import schemas
from memos.cubes.access import access_of, cube_access
from memos.errors import Conflict, Invalid, NotFound
from memos.identity.principal import Principal
from memos.memories.versioning import tombstone_cube_memories
from memos.pagination import Page, decode_keyset, encode_keyset, list_tag
from memos.search.graphs import CubeGraphs
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import agents, cube_grants, cubes, memories
from memos.validation import reject_nul

CUBES = list_tag("cubes")
"""The tag of ``GET /v1/cubes``'s cursors."""


def _count(kind_is_activation: bool) -> Any:
    kind_filter = memories.c.kind == "activation" if kind_is_activation else memories.c.kind != "activation"
    return (
        select(func.count())
        .where(memories.c.cube_id == cubes.c.id, memories.c.state != "deleted", kind_filter)
        .scalar_subquery()
    )


class CubeListener(Protocol):
    """Something holding per-cube or per-memory state in memory (the semantic cache's index, the scheduler's
    heat), told when a cube goes, with the memories its deletion deleted."""

    def drop(self, cube_id: uuid.UUID, memory_ids: Sequence[uuid.UUID]) -> None: ...


class CubeService:
    def __init__(self, db: Database, graphs: CubeGraphs, listeners: Sequence[CubeListener] = ()) -> None:
        self.db = db
        self.graphs = graphs
        self.listeners = list(listeners)

    def _select(self, principal: Principal) -> Any:
        _, agent_id = principal.tenant_member()
        return (
            select(
                cubes,
                cube_grants.c.access.label("grant"),
                _count(False).label("n_memories"),
                _count(True).label("n_activations"),
            )
            .select_from(cubes)
            .outerjoin(cube_grants, and_(cube_grants.c.cube_id == cubes.c.id, cube_grants.c.agent_id == agent_id))
            .where(cubes.c.tenant_id == principal.tenant_id, cubes.c.deleted_at.is_(None))
        )

    @staticmethod
    def _dto(principal: Principal, row: Row[Any]) -> schemas.Cube:
        access = access_of(principal, row.owner_agent_id, row.grant)
        assert access is not None
        return schemas.Cube(
            id=row.id,
            name=row.name,
            description=row.description,
            metadata=row.metadata,
            owner_agent_id=row.owner_agent_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            stats=schemas.CubeStats(memories=row.n_memories, activations=row.n_activations),
            access=access,
        )

    async def create(self, principal: Principal, body: schemas.CubeIn) -> schemas.Cube:
        tenant_id, agent_id = principal.tenant_member()
        for name, value in msgspec.structs.asdict(body).items():
            reject_nul(value, name)
        cube_id = uuid.uuid4()
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    insert(cubes).values(
                        id=cube_id,
                        tenant_id=tenant_id,
                        name=body.name,
                        description=body.description,
                        metadata=body.metadata,
                        owner_agent_id=agent_id,
                    )
                )
                await record(conn, principal, "cube.create", "cube", cube_id)
        except IntegrityError:
            raise Conflict(f"a cube named {body.name!r} already exists in this tenant") from None
        return await self.get(principal, cube_id)

    async def get(self, principal: Principal, cube_id: uuid.UUID) -> schemas.Cube:
        async with self.db.read() as conn:
            row = (await conn.execute(self._select(principal).where(cubes.c.id == cube_id))).first()
        if row is None or access_of(principal, row.owner_agent_id, row.grant) is None:
            raise NotFound("no such cube")
        return self._dto(principal, row)

    async def list(self, principal: Principal, limit: int, cursor: str | None) -> Page[schemas.Cube]:
        after = decode_keyset(cursor, CUBES)
        query = self._select(principal)
        if not principal.is_admin:
            query = query.where(or_(cubes.c.owner_agent_id == principal.agent_id, cube_grants.c.access.is_not(None)))
        if after is not None:
            query = query.where(func.row(cubes.c.created_at, cubes.c.id) > func.row(*after))
        query = query.order_by(cubes.c.created_at, cubes.c.id).limit(limit + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_keyset(rows[-1].created_at, rows[-1].id, CUBES) if more else None
        return Page(items=[self._dto(principal, r) for r in rows], next_cursor=next_cursor)

    async def update(self, principal: Principal, cube_id: uuid.UUID, body: schemas.CubePatch) -> schemas.Cube:
        changes = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not msgspec.UNSET}
        for name, value in changes.items():
            reject_nul(value, name)
        try:
            async with self.db.transaction() as conn:
                # Checked even when nothing changes: an empty PATCH must not answer where a real one is refused.
                await cube_access(conn, principal, cube_id, "manage")
                if changes:
                    await conn.execute(
                        update(cubes).where(cubes.c.id == cube_id).values(**changes, updated_at=func.now())
                    )
                    await record(conn, principal, "cube.update", "cube", cube_id, detail={"fields": sorted(changes)})
        except IntegrityError:
            raise Conflict(f"a cube named {changes.get('name')!r} already exists in this tenant") from None
        return await self.get(principal, cube_id)

    async def delete(self, principal: Principal, cube_id: uuid.UUID) -> None:
        """Tombstone the cube and every memory in it (each gets a ``delete`` version; history is kept)."""
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, cube_id, "manage")
            await conn.execute(update(cubes).where(cubes.c.id == cube_id).values(deleted_at=func.now()))
            deleted = await tombstone_cube_memories(conn, cube_id, principal)
            await record(conn, principal, "cube.delete", "cube", cube_id, detail={"memories": len(deleted)})
        self.graphs.drop(cube_id)
        for listener in self.listeners:
            listener.drop(cube_id, deleted)

    async def grant(
        self, principal: Principal, cube_id: uuid.UUID, agent_id: uuid.UUID, body: schemas.GrantIn
    ) -> schemas.Grant:
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, cube_id, "manage")
            target = (
                await conn.execute(
                    select(agents.c.id, cubes.c.owner_agent_id)
                    .select_from(agents)
                    .join(cubes, cubes.c.id == cube_id)
                    .where(agents.c.id == agent_id, agents.c.tenant_id == principal.tenant_id)
                )
            ).first()
            if target is None:
                raise NotFound("no such agent")
            if target.owner_agent_id == agent_id:
                raise Invalid.field("agent_id", "the owner of a cube already has full access to it")
            stmt = pg_insert(cube_grants).values(cube_id=cube_id, agent_id=agent_id, access=body.access)
            await conn.execute(
                stmt.on_conflict_do_update(index_elements=["cube_id", "agent_id"], set_={"access": body.access})
            )
            await record(
                conn,
                principal,
                "cube.grant",
                "cube",
                cube_id,
                detail={"agent_id": str(agent_id), "access": body.access},
            )
        return schemas.Grant(cube_id=cube_id, agent_id=agent_id, access=body.access)

    async def revoke(self, principal: Principal, cube_id: uuid.UUID, agent_id: uuid.UUID) -> None:
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, cube_id, "manage")
            result = await conn.execute(
                delete(cube_grants).where(cube_grants.c.cube_id == cube_id, cube_grants.c.agent_id == agent_id)
            )
            if result.rowcount == 0:
                raise NotFound("this agent has no grant on this cube")
            await record(conn, principal, "cube.revoke", "cube", cube_id, detail={"agent_id": str(agent_id)})

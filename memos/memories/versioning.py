"""Writing versions: the only code that changes ``memories`` and ``memory_versions``.

Every change is an immutable version row plus the current-state update, in the
caller's transaction. A new version is claimed with a compare-and-set on the
current version (``WHERE version = :expected``): of two writers holding the same
version, exactly one wins; the other sees no row and gets 412. The primary key
(memory_id, version) makes a duplicate impossible even if that guard were gone.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.audit import Actor
from memos.store.models import memories, memory_versions

# The columns a version row copies from the current state.
_SNAPSHOT = (
    "state",
    "content",
    "metadata",
    "tags",
    "provenance",
    "content_sha256",
    "expires_at",
    "embedding",
    "embedding_model",
    "event_time",
)


def content_sha256(content: str | None) -> str | None:
    return None if content is None else hashlib.sha256(content.encode()).hexdigest()


async def insert_new(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[Row[Any]]:
    """Insert brand-new memories (version 1) and their ``create`` version rows."""
    inserted = (await conn.execute(insert(memories).returning(memories), list(rows))).all()
    # The version rows are copied inside Postgres: the vectors do not travel back as text a second time.
    columns = ["memory_id", "version", "op", "created_at", "created_by", *_SNAPSHOT]
    source = select(
        memories.c.id,
        literal(1),
        literal("create"),
        memories.c.created_at,
        memories.c.created_by,
        *[memories.c[c] for c in _SNAPSHOT],
    ).where(memories.c.id.in_([r.id for r in inserted]))
    await conn.execute(insert(memory_versions).from_select(columns, source))
    # RETURNING comes back in insert order for a single multi-row INSERT.
    return list(inserted)


async def write_version(
    conn: AsyncConnection,
    memory_id: uuid.UUID,
    expected_version: int,
    op: str,
    actor: Actor,
    values: dict[str, Any],
) -> Row[Any] | None:
    """Make version ``expected_version + 1`` with ``values`` applied; None if the version moved on."""
    if "content" in values:
        values = {**values, "content_sha256": content_sha256(values["content"])}
    row: Row[Any] | None = (
        await conn.execute(
            update(memories)
            .where(memories.c.id == memory_id, memories.c.version == expected_version)
            .values(**values, version=memories.c.version + 1, updated_at=_statement_time())
            .returning(memories)
        )
    ).first()
    if row is None:
        return None
    await conn.execute(
        insert(memory_versions).values(  # the version row mirrors the state just written
            memory_id=row.id,
            version=row.version,
            op=op,
            created_at=row.updated_at,
            created_by=_actor_uuid(actor, row.created_by),
            **{c: getattr(row, c) for c in _SNAPSHOT},
        )
    )
    return row


async def tombstone_cube_memories(conn: AsyncConnection, cube_id: uuid.UUID, actor: Actor) -> int:
    """Give every live memory of a cube a ``delete`` version, in one statement (no race window)."""
    return len(await tombstone_where(conn, actor, memories.c.cube_id == cube_id))


async def tombstone_where(conn: AsyncConnection, actor: Actor, *conditions: Any) -> list[uuid.UUID]:
    """Give every not-yet-deleted memory matching ``conditions`` a ``delete`` version, in one statement.

    Returns the ids it deleted. Used for a cube's deletion and for the cache's invalidation and eviction.
    """
    bumped = (
        update(memories)
        .where(*conditions, memories.c.state != "deleted")
        .values(state="deleted", version=memories.c.version + 1, updated_at=_statement_time())
        .returning(memories.c.id, memories.c.version, memories.c.updated_at, *[memories.c[c] for c in _SNAPSHOT])
        .cte("bumped")
    )
    actor_id = _actor_uuid(actor, None)
    columns = ["memory_id", "version", "op", "created_at", "created_by", *_SNAPSHOT]
    source = select(
        bumped.c.id,
        bumped.c.version,
        literal("delete"),
        bumped.c.updated_at,
        literal(actor_id, memory_versions.c.created_by.type),
        *[bumped.c[c] for c in _SNAPSHOT],
    )
    result = await conn.execute(
        insert(memory_versions).from_select(columns, source).returning(memory_versions.c.memory_id)
    )
    return [r.memory_id for r in result]


def _statement_time() -> Any:
    # clock_timestamp() would differ between the rows of one change; the statement's own time does not.
    return func.statement_timestamp()


def _actor_uuid(actor: Actor, fallback: uuid.UUID | None) -> uuid.UUID:
    try:
        return uuid.UUID(actor.actor)
    except ValueError:
        # The operator has no agent id; attribute to the memory's creator (operator writes are not exposed today).
        assert fallback is not None
        return fallback

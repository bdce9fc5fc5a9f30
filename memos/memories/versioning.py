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

import numpy as np
from psycopg.types.json import Jsonb
from sqlalchemy import Row, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.arrays import Float4Array, vector_at
from memos.store.audit import Actor
from memos.store.models import MEMORY_ROW, memories, memory_versions

# The columns a version row copies from the current state (memos/admin/bundle.py checks a bundle by them too).
SNAPSHOT = (
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


# One statement for any number of new memories: the rows travel as one array per column, so the SQL text
# never changes (psycopg parses it once per connection instead of re-splitting a statement that grows with
# the batch: half the Python time of a 21-row create went there), the vectors travel as one binary float4[]
# (not 384 decimal strings a row), the version rows are copied inside Postgres, and only the embedding's
# binary form comes back (``vec``), not its text. Column lists are written out: tests/test_versioning.py
# checks them against the table.
_INSERT_NEW = f"""
WITH new AS (
    INSERT INTO memories (
        id, tenant_id, cube_id, kind, state, version, content, metadata, tags, provenance,
        content_sha256, expires_at, created_by, embedding, embedding_model, event_time, ann
    )
    SELECT
        u.id, u.tenant_id, u.cube_id, u.kind, u.state, u.version, u.content, u.metadata,
        ARRAY(SELECT jsonb_array_elements_text(u.tags)), u.provenance, u.content_sha256, u.expires_at,
        u.created_by,
        CASE WHEN u.slot IS NULL THEN NULL
             ELSE {vector_at("u.slot")} END,
        u.embedding_model, u.event_time, %(ann)s::bool AND u.slot IS NOT NULL
    FROM unnest(
        %(id)s::uuid[], %(tenant_id)s::uuid[], %(cube_id)s::uuid[], %(kind)s::text[], %(state)s::text[],
        %(version)s::int4[], %(content)s::text[], %(metadata)s::jsonb[], %(tags)s::jsonb[],
        %(provenance)s::jsonb[], %(content_sha256)s::text[], %(expires_at)s::timestamptz[],
        %(created_by)s::uuid[], %(slot)s::int4[], %(embedding_model)s::text[], %(event_time)s::timestamptz[]
    ) WITH ORDINALITY AS u(
        id, tenant_id, cube_id, kind, state, version, content, metadata, tags, provenance,
        content_sha256, expires_at, created_by, slot, embedding_model, event_time, ord
    )
    ORDER BY u.ord
    RETURNING *
), versions AS (
    INSERT INTO memory_versions (
        memory_id, version, op, created_at, created_by, state, content, metadata, tags, provenance,
        content_sha256, expires_at, embedding, embedding_model, event_time
    )
    SELECT
        id, 1, 'create', created_at, created_by, state, content, metadata, tags, provenance,
        content_sha256, expires_at, embedding, embedding_model, event_time
    FROM new
)
SELECT
    id, tenant_id, cube_id, kind, state, version, content, metadata, tags, provenance, content_sha256,
    created_at, updated_at, expires_at, created_by, heat, purged_at, embedding_model, event_time, ann,
    vector_send(embedding) AS vec
FROM new
"""  # noqa: S608 (a constant fragment from store/arrays.py is formatted in)

_COLUMNS = ("id", "tenant_id", "cube_id", "kind", "version", "created_by", *(c for c in SNAPSHOT if c != "embedding"))
"""The values a new row is given (plus its ``embedding``); the rest come from column defaults."""


async def insert_new(conn: AsyncConnection, rows: Sequence[dict[str, Any]], *, indexed: bool = False) -> list[Row[Any]]:
    """Insert brand-new memories (version 1) and their ``create`` version rows, in one statement.

    Each row gives ``_COLUMNS`` and ``embedding`` (a vector or None). ``indexed``: the rows with an
    embedding go into the HNSW index (their cube is past ``memos.memories.ann.EXACT_CUBE_MAX``).
    Returns the rows as written, in the order given, with every column but ``embedding`` and ``tsv``, and
    ``vec``: the embedding in pgvector's binary form (``memos.store.arrays.decode_vector`` reads it), None
    without one.
    """
    params: dict[str, Any] = {name: [row[name] for row in rows] for name in _COLUMNS}
    for name in ("metadata", "provenance", "tags"):
        params[name] = [Jsonb(value) for value in params[name]]
    vectors = [row["embedding"] for row in rows if row["embedding"] is not None]
    slots, next_slot = [], 1
    for row in rows:
        slots.append(None if row["embedding"] is None else next_slot)
        next_slot += row["embedding"] is not None
    matrix = np.asarray(vectors, dtype=np.float32) if vectors else np.zeros((0, 0), dtype=np.float32)
    params.update(slot=slots, vectors=Float4Array(matrix), dims=int(matrix.shape[1]), ann=indexed)
    result = await conn.exec_driver_sql(_INSERT_NEW, params)
    by_id = {r.id: r for r in result}
    # RETURNING's order is not promised: put the rows back in the order given.
    return [by_id[row["id"]] for row in rows]


# A new embedding for each of many memories, as one new version each (op ``update``: the stored value
# changed, nothing a client wrote did), claimed with the same compare-and-set as write_version. The vectors
# travel as one binary float4[] as in _INSERT_NEW; the version rows are copied from the updated rows, their
# author is the memory's creator (the operator has no agent id: the audit log names the operator).
_NEW_EMBEDDINGS = f"""
WITH u AS (
    SELECT * FROM unnest(%(id)s::uuid[], %(version)s::int4[]) WITH ORDINALITY AS u(id, version, slot)
), bumped AS (
    UPDATE memories m SET
        embedding = {vector_at("u.slot")},
        embedding_model = %(model)s, version = m.version + 1, updated_at = statement_timestamp()
    FROM u
    -- purged: a purge of a deleted memory writes no version, and its text must not come back as a vector
    WHERE m.id = u.id AND m.version = u.version AND m.purged_at IS NULL
    RETURNING m.id, m.version, m.updated_at, m.created_by, {", ".join(f"m.{c}" for c in SNAPSHOT)}
), versions AS (
    INSERT INTO memory_versions (memory_id, version, op, created_at, created_by, {", ".join(SNAPSHOT)})
    SELECT id, version, 'update', updated_at, created_by, {", ".join(SNAPSHOT)} FROM bumped
)
SELECT id FROM bumped
"""  # noqa: S608 (only column names from SNAPSHOT are formatted in)


async def write_embeddings(
    conn: AsyncConnection, expected: Sequence[tuple[uuid.UUID, int]], vectors: np.ndarray, model: str
) -> set[uuid.UUID]:
    """Give each ``(memory id, expected version)`` its row of ``vectors`` (embedded by ``model``) as a new version.

    Returns the ids written; a memory whose version moved on, or that was purged meanwhile, is left as it is (not
    in the result).
    """
    if not expected:
        return set()
    matrix = np.asarray(vectors, dtype=np.float32)
    params = {
        "id": [memory_id for memory_id, _ in expected],
        "version": [version for _, version in expected],
        "vectors": Float4Array(matrix),
        "dims": int(matrix.shape[1]),
        "model": model,
    }
    return {row.id for row in await conn.exec_driver_sql(_NEW_EMBEDDINGS, params)}


async def write_version(
    conn: AsyncConnection,
    memory_id: uuid.UUID,
    expected_version: int,
    op: str,
    actor: Actor,
    values: dict[str, Any],
) -> Row[Any] | None:
    """Make version ``expected_version + 1`` with ``values`` applied; None if the version moved on or the memory
    was purged meanwhile (a purge of a deleted memory writes no version: without the second condition a restore
    that read the row before the purge committed wrote the purged text back, found in review)."""
    if "content" in values:
        values = {**values, "content_sha256": content_sha256(values["content"])}
    row: Row[Any] | None = (
        await conn.execute(
            update(memories)
            .where(memories.c.id == memory_id, memories.c.version == expected_version, memories.c.purged_at.is_(None))
            .values(**values, version=memories.c.version + 1, updated_at=_statement_time())
            .returning(*MEMORY_ROW)
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
            **{c: getattr(row, c) for c in SNAPSHOT},
        )
    )
    return row


async def tombstone_cube_memories(conn: AsyncConnection, cube_id: uuid.UUID, actor: Actor) -> list[uuid.UUID]:
    """Give every live memory of a cube a ``delete`` version, in one statement (no race window); their ids."""
    return await tombstone_where(conn, actor, memories.c.cube_id == cube_id)


async def tombstone_where(conn: AsyncConnection, actor: Actor, *conditions: Any) -> list[uuid.UUID]:
    """Give every not-yet-deleted memory matching ``conditions`` a ``delete`` version, in one statement.

    Returns the ids it deleted. Used for a cube's deletion and for the cache's invalidation and eviction.
    """
    bumped = (
        update(memories)
        .where(*conditions, memories.c.state != "deleted")
        .values(state="deleted", version=memories.c.version + 1, updated_at=_statement_time())
        .returning(memories.c.id, memories.c.version, memories.c.updated_at, *[memories.c[c] for c in SNAPSHOT])
        .cte("bumped")
    )
    actor_id = _actor_uuid(actor, None)
    columns = ["memory_id", "version", "op", "created_at", "created_by", *SNAPSHOT]
    source = select(
        bumped.c.id,
        bumped.c.version,
        literal("delete"),
        bumped.c.updated_at,
        literal(actor_id, memory_versions.c.created_by.type),
        *[bumped.c[c] for c in SNAPSHOT],
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

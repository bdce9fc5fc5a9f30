"""The cache's SQL: reading its response memories, its configuration and counters, quotas and eviction.

Everything here takes a connection from the caller, so the service decides what shares a transaction.
Embeddings travel as pgvector's binary form (``vector_send``): decoding 100k of them is a ``frombuffer``
per row, not a text parse.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Row, Text, and_, cast, func, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.identity.principal import Principal
from memos.semcache.context import context_sha256
from memos.semcache.policy import DEFAULT_POLICY, CachePolicy, PolicyError, parse_policy
from memos.store.arrays import Float4Array, vector_at
from memos.store.models import (
    cache_categories,
    cache_configs,
    cache_entries,
    cache_policy_revisions,
    cube_grants,
    cubes,
    memories,
)

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

EVICTION_HALF_LIFE_SECONDS = 24 * 3600
"""An entry's value is its hits + 1, halved for every day since it was last used (stored or hit)."""

ENTRY_COLUMNS = (
    memories.c.id,
    memories.c.version,
    memories.c.state,
    memories.c.kind,
    memories.c.metadata,
    memories.c.created_at,
    memories.c.expires_at,
    func.vector_send(memories.c.embedding).label("vec"),
    memories.c.embedding_model,
    cache_entries.c.context_sha256,
    func.vector_send(cache_entries.c.context_embedding).label("cvec"),
    cache_entries.c.threshold,
)
_ENTRY_FROM = memories.outerjoin(cache_entries, cache_entries.c.memory_id == memories.c.id)


_CONTEXT_EMBEDDINGS = f"""
UPDATE cache_entries c
SET context_embedding = {vector_at("u.slot")}, context_sha256 = u.sha, updated_at = now()
FROM unnest(%(id)s::uuid[], %(sha)s::text[]) WITH ORDINALITY AS u(id, sha, slot)
WHERE c.memory_id = u.id
"""  # noqa: S608 (a constant fragment from store/arrays.py is formatted in)


async def write_context_embeddings(conn: AsyncConnection, contexts: Mapping[uuid.UUID, tuple[str, Vector]]) -> None:
    """Give each entry (by memory id) the embedding of its context text, and that text's hash (a re-embedding)."""
    if not contexts:
        return
    matrix = np.stack([np.asarray(vector, dtype=np.float32) for _, vector in contexts.values()])
    params = {
        "id": list(contexts),
        "sha": [context_sha256(text) for text, _ in contexts.values()],
        "vectors": Float4Array(matrix),
        "dims": int(matrix.shape[1]),
    }
    await conn.exec_driver_sql(_CONTEXT_EMBEDDINGS, params)


def _live() -> Any:
    return and_(
        memories.c.kind == "response",
        memories.c.state == "active",
        memories.c.embedding.is_not(None),
        or_(memories.c.expires_at.is_(None), memories.c.expires_at > func.now()),
    )


def _servable(model: str) -> Any:
    """Live, and embedded by the ``model`` that embeds the queries: another model's vectors are in another
    space, and compared with a query they mean nothing."""
    return and_(_live(), memories.c.embedding_model == model)


def category_is(category: str, default: str) -> Any:
    """Entries of ``category``; entries that name no category belong to the cube's default one."""
    named = memories.c.metadata["category"].astext
    if category == default:
        return or_(named == category, named.is_(None))
    return named == category


# -- policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    policy: CachePolicy
    configured: dict[str, Any]
    updated_at: datetime | None
    """The configuration's last write."""
    revision: int
    """The policy's revision when it was read (read first: the policy is at least that new)."""


def build_policy(configured: Mapping[str, Any] | None, adapted: Iterable[Any]) -> CachePolicy:
    """The configured policy with the thresholds feedback moved (kept within each category's bounds)."""
    try:
        policy = parse_policy(configured or None)
    except PolicyError as exc:  # written valid; only a later code change could make it invalid
        log.error("a stored cache configuration no longer parses; using the defaults", extra={"error": str(exc)})
        policy = DEFAULT_POLICY
    for row in adapted:
        current = policy.categories.get(row.category)
        if current is None:
            continue
        threshold = current.threshold
        if row.threshold is not None:
            threshold = min(max(float(row.threshold), current.min_threshold), current.max_threshold)
        policy = policy.with_category(replace(current, threshold=threshold, false_hit_floor=float(row.false_hit_floor)))
    return policy


async def load_policy(conn: AsyncConnection, cube_id: uuid.UUID) -> PolicyRecord:
    # The revision before the rows: a change committing in between makes the policy newer than its number (reloaded
    # once more later), never older (kept for good).
    revision = await policy_revision(conn, cube_id)
    config = (
        await conn.execute(
            select(cache_configs.c.config, cache_configs.c.updated_at).where(cache_configs.c.cube_id == cube_id)
        )
    ).first()
    adapted = (
        await conn.execute(
            select(
                cache_categories.c.category,
                cache_categories.c.threshold,
                cache_categories.c.false_hit_floor,
                cache_categories.c.updated_at,
            ).where(cache_categories.c.cube_id == cube_id)
        )
    ).all()
    configured: dict[str, Any] = dict(config.config) if config is not None else {}
    return PolicyRecord(
        policy=build_policy(configured, adapted),
        configured=configured,
        updated_at=None if config is None else config.updated_at,
        revision=revision,
    )


def policy_revision_of(cube_id: Any) -> Any:
    """The cube's cache policy revision: 0 until its first change (configuration, feedback or a reset)."""
    stored = select(cache_policy_revisions.c.revision).where(cache_policy_revisions.c.cube_id == cube_id)
    return func.coalesce(stored.scalar_subquery(), 0)


async def policy_revision(conn: AsyncConnection, cube_id: uuid.UUID) -> int:
    return int((await conn.execute(select(policy_revision_of(cube_id)))).scalar_one())


async def policy_changed(conn: AsyncConnection, cube_id: uuid.UUID) -> None:
    """Count a change to the cube's cache policy, in the transaction that makes it, after its other locks.

    Every process holds the policy in memory and reloads it when the stored revision passes its own. The row's
    lock is held until the commit, so revisions follow commits. The cue was the newest ``updated_at``, a
    transaction's start: a change that committed after a newer one was never seen, and a process decided with
    the old threshold until the next change (found in a multi-process review).
    """
    stmt = pg_insert(cache_policy_revisions).values(cube_id=cube_id, revision=1)
    await conn.execute(
        stmt.on_conflict_do_update(index_elements=["cube_id"], set_={"revision": cache_policy_revisions.c.revision + 1})
    )


# -- entries -----------------------------------------------------------------------------------------


async def live_entries(conn: AsyncConnection, cube_id: uuid.UUID, model: str, batch: int = 5000) -> list[Any]:
    """Every servable entry of a cube (``_servable``: live, embedded by ``model``), streamed in batches so a big
    cube does not stall the event loop."""
    result = await conn.stream(
        select(*ENTRY_COLUMNS).select_from(_ENTRY_FROM).where(memories.c.cube_id == cube_id, _servable(model))
    )
    rows: list[Any] = []
    async for part in result.partitions(batch):
        rows.extend(part)
    return rows


async def changed_entries(conn: AsyncConnection, cube_id: uuid.UUID, since: datetime) -> list[Any]:
    """Response memories of a cube written since ``since``, whatever their state (the catch-up of an index)."""
    query = (
        select(*ENTRY_COLUMNS)
        .select_from(_ENTRY_FROM)
        .where(memories.c.cube_id == cube_id, memories.c.kind == "response", memories.c.updated_at > since)
    )
    return list((await conn.execute(query)).all())


async def entry_row(conn: AsyncConnection, memory_id: uuid.UUID) -> Any:
    query = select(*ENTRY_COLUMNS).select_from(_ENTRY_FROM).where(memories.c.id == memory_id)
    return (await conn.execute(query)).first()


_HNSW = text(
    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '64', true)"
)


async def nearest_entries(conn: AsyncConnection, cube_id: uuid.UUID, vector: Vector, k: int, model: str) -> list[Any]:
    """The ``k`` servable entries nearest ``vector`` (embedded by ``model``) by pgvector, among those ``model``
    embedded (the path while a cube's index is built).

    Needs a transaction: the HNSW settings are transaction-local.
    """
    await conn.execute(_HNSW)
    distance = memories.c.embedding.cosine_distance(vector)
    query = (
        select(*ENTRY_COLUMNS, memories.c.content, (1 - distance).label("similarity"))
        .select_from(_ENTRY_FROM)
        .where(memories.c.cube_id == cube_id, _servable(model))
        .order_by(distance)
        .limit(k)
    )
    return list((await conn.execute(query)).all())


async def check_and_fetch(
    conn: AsyncConnection, principal: Principal, cube_id: uuid.UUID, memory_id: uuid.UUID | None
) -> Row[Any] | None:
    """One round trip: the caller's standing in the cube, the cube's cache policy revision and, when given, the
    entry's current state, answer and threshold.

    ``None`` when the cube is not the caller's tenant's or is deleted. The entry columns are NULL when
    it is not in that cube.
    """
    tenant_id, agent_id = principal.tenant_member()
    query: Any = (
        select(
            cubes.c.owner_agent_id,
            cube_grants.c.access.label("grant"),
            # What a decision rests on besides the entry: another process may have changed the policy since this
            # one read it.
            policy_revision_of(cubes.c.id).label("policy_revision"),
        )
        .select_from(cubes)
        .outerjoin(cube_grants, and_(cube_grants.c.cube_id == cubes.c.id, cube_grants.c.agent_id == agent_id))
        .where(cubes.c.id == cube_id, cubes.c.tenant_id == tenant_id, cubes.c.deleted_at.is_(None))
    )
    if memory_id is not None:
        entry = memories.alias("m")
        query = (
            query.add_columns(
                entry.c.version,
                entry.c.state,
                entry.c.kind,
                entry.c.content,
                or_(entry.c.expires_at.is_(None), entry.c.expires_at > func.now()).label("fresh"),
                # The entry's feedback threshold, which another process (or a re-added entry) may hold older.
                cache_entries.c.threshold.label("entry_threshold"),
            )
            .outerjoin(entry, and_(entry.c.id == memory_id, entry.c.cube_id == cubes.c.id))
            .outerjoin(cache_entries, cache_entries.c.memory_id == entry.c.id)
        )
    return (await conn.execute(query)).first()


# -- quotas ------------------------------------------------------------------------------------------


async def lock_category(conn: AsyncConnection, cube_id: uuid.UUID, category: str) -> None:
    """Hold the (cube, category) quota lock until the transaction ends: a transaction-scoped advisory lock."""
    key = func.hashtextextended(func.concat(cast(cube_id, Text), ":", category), 0)
    await conn.execute(select(func.pg_advisory_xact_lock(key)))


async def count_live(conn: AsyncConnection, cube_id: uuid.UUID, category: str, default: str) -> int:
    query = select(func.count()).where(memories.c.cube_id == cube_id, _live(), category_is(category, default))
    return int((await conn.execute(query)).scalar_one())


async def least_valuable(
    conn: AsyncConnection,
    cube_id: uuid.UUID,
    category: str,
    default: str,
    ttl_seconds: int | None,
    count: int,
    keep: uuid.UUID,
) -> list[uuid.UUID]:
    """The ``count`` entries of a category worth least: expired ones first, then cold and old ones.

    Value = (hits + 1) x 0.5 ^ (days since last use), last use being the last hit or else the store.
    """
    last_use = func.coalesce(cache_entries.c.last_hit_at, memories.c.created_at)
    age = func.extract("epoch", func.now() - last_use)
    value = (func.coalesce(cache_entries.c.hits, 0) + 1) * func.power(0.5, age / EVICTION_HALF_LIFE_SECONDS)
    expired = or_(memories.c.expires_at <= func.now(), literal(False))
    if ttl_seconds is not None:
        expired = or_(expired, memories.c.created_at <= func.now() - func.make_interval(0, 0, 0, 0, 0, 0, ttl_seconds))
    query = (
        select(memories.c.id)
        .select_from(_ENTRY_FROM)
        .where(
            memories.c.cube_id == cube_id,
            memories.c.kind == "response",
            memories.c.state == "active",
            memories.c.id != keep,
            category_is(category, default),
        )
        .order_by(func.coalesce(expired, False).desc(), value, memories.c.created_at, memories.c.id)
        .limit(count)
    )
    return [r.id for r in await conn.execute(query)]


async def category_counts(conn: AsyncConnection, cube_id: uuid.UUID, default: str) -> dict[str, int]:
    name = func.coalesce(memories.c.metadata["category"].astext, default)
    rows = await conn.execute(
        select(name.label("category"), func.count()).where(memories.c.cube_id == cube_id, _live()).group_by(name)
    )
    return {r.category: int(r[1]) for r in rows}


async def category_counters(conn: AsyncConnection, cube_id: uuid.UUID) -> dict[str, Row[Any]]:
    rows = await conn.execute(select(cache_categories).where(cache_categories.c.cube_id == cube_id))
    return {r.category: r for r in rows}


async def add_evicted(conn: AsyncConnection, cube_id: uuid.UUID, category: str, count: int) -> None:
    stmt = pg_insert(cache_categories).values(cube_id=cube_id, category=category, evicted=count)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["cube_id", "category"], set_={"evicted": cache_categories.c.evicted + count}
        )
    )


# -- counters ----------------------------------------------------------------------------------------


async def flush_counters(
    conn: AsyncConnection,
    categories: Mapping[tuple[uuid.UUID, str], tuple[int, int]],
    entries: Mapping[uuid.UUID, tuple[uuid.UUID, int, datetime]],
) -> None:
    """Add hit and miss counts to the category rows and hit counts and last-hit times to the entry rows."""
    if categories:
        stmt = pg_insert(cache_categories)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["cube_id", "category"],
                set_={
                    "hits": cache_categories.c.hits + stmt.excluded.hits,
                    "misses": cache_categories.c.misses + stmt.excluded.misses,
                },
            ),
            [
                {"cube_id": cube, "category": category, "hits": hits, "misses": misses}
                for (cube, category), (hits, misses) in categories.items()
            ],
        )
    if entries:
        # Entries of memories since removed (a whole cube purged with its tenant) are skipped, not an error.
        alive = {r.id for r in await conn.execute(select(memories.c.id).where(memories.c.id.in_(list(entries))))}
        values = [
            {"memory_id": memory_id, "cube_id": cube, "hits": hits, "last_hit_at": at}
            for memory_id, (cube, hits, at) in entries.items()
            if memory_id in alive
        ]
        if values:
            stmt = pg_insert(cache_entries)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["memory_id"],
                    set_={
                        "hits": cache_entries.c.hits + stmt.excluded.hits,
                        "last_hit_at": func.greatest(cache_entries.c.last_hit_at, stmt.excluded.last_hit_at),
                    },
                ),
                values,
            )


async def reset_adapted(conn: AsyncConnection, cube_id: uuid.UUID, categories: Iterable[str]) -> None:
    names = list(categories)
    if names:
        await conn.execute(
            update(cache_categories)
            .where(cache_categories.c.cube_id == cube_id, cache_categories.c.category.in_(names))
            .values(threshold=None, false_hit_floor=0.0, updated_at=func.now())
        )

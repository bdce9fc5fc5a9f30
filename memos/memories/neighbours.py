"""``knn`` links: at write time each new or re-embedded memory is linked to its nearest neighbours in its cube.

Two ways to find them, with the same answer. Postgres (``_KNN_SQL``): the cube's memories outside the HNSW
index are read once, each new memory is ranked against them exactly, and, in an indexed cube, HNSW ranks
those in the index. A batch of ``n`` into a cube of ``c`` costs ``n x c`` distances: a 520-memory LoCoMo
conversation sent as one batch into an empty cube spent 168 ms in the statement on the 2-core box (measured
with its earlier form, which read the table again per memory). In Python (``_exact_in_python``), for a batch
of ``BATCH_IN_PYTHON`` or more into a cube that is not indexed (at most ``EXACT_CUBE_MAX`` embedded
memories): one statement returns the cube's ids and vectors as one binary value (about 4 ms), numpy finds
every new memory's neighbours in one matrix product, and one statement writes the links (the same
conversation: 4 + 54 ms, most of it the links' own inserts). For a session-sized batch (about 20 memories
into a few hundred) the statement is a little cheaper: through the API, ranking every LoCoMo session batch in
numpy was 7 % slower, and gave 0.769 against 0.785 of the raw embedder's throughput on 2026-12-06 (both
measured against the statement's earlier form), so it stays there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.arrays import decode_id_vectors

KNN_LINK = "knn"
"""System links to a memory's semantic nearest neighbours in its cube, written by memos itself."""
KNN_NEIGHBOURS = 5
KNN_FLOOR = 0.5
"""Cosine similarity below which two memories are not neighbours (all-MiniLM: unrelated texts sit near 0.1)."""
BATCH_IN_PYTHON = 64
"""New memories in one write from which, in a cube outside the index, their neighbours are found in Python."""

LinkEdge = tuple[uuid.UUID, uuid.UUID, str, float]
"""(from, to, type, weight), as the cube's graph takes it."""


def _knn_sql(indexed: bool) -> TextClause:
    """Write ``knn`` links from each of ``ids`` to its nearest neighbours in its cube: an exact scan of the
    cube's memories outside the HNSW index and, if the cube is ``indexed`` (``memos.memories.ann``), HNSW
    over those in it.

    The exact part reads the cube's rows once (``exact``, materialized: id, vector, model) and each new
    memory scans that: a lateral scan of the table itself fetched every row of the cube again for each new
    memory (rows are wide: content, metadata and a 1.5 KB vector, about three to a page), and its plan
    depended on the table's statistics. A LoCoMo session into a cube of 660: 7.9-9.2 ms -> 6.3-7.5 ms for
    the statement once the table was analyzed; through the API, LoCoMo sessions one batch at a time went
    from 0.57-0.79 of the raw embedder's throughput to a steady 0.73-0.78 (2-core AMD box, 2026-12-06,
    decisions 78)."""
    near_exact = """
            SELECT e.id, e.embedding <=> n.embedding AS distance FROM exact e
            WHERE e.id <> n.id AND e.embedding_model = n.embedding_model
            ORDER BY e.embedding <=> n.embedding LIMIT :k"""
    sets = near_exact
    if indexed:
        near_ann = """
            SELECT m.id, m.embedding <=> n.embedding AS distance FROM memories m
            WHERE m.cube_id = n.cube_id AND m.id <> n.id AND m.state = 'active' AND m.embedding IS NOT NULL
                AND m.embedding_model = n.embedding_model AND m.ann
            ORDER BY m.embedding <=> n.embedding LIMIT :k"""
        sets = f"({near_exact}\n        ) UNION ALL ({near_ann}\n        )"
    # Constant fragments only (which sets to read); every value is a bound parameter. A zero vector's cosine
    # distance is NaN, which Postgres sorts above every number: it would pass the floor, so it is ruled out.
    # Not indexed, the exact part reads every embedded memory of the cube, ``ann`` or not: the index mover may
    # have moved some into HNSW since the caller read the cube's state, and a write racing it got no knn links
    # to them (found in a concurrency review).
    outside = " AND NOT ann" if indexed else ""
    sql = f"""
    WITH exact AS MATERIALIZED (
        SELECT id, embedding, embedding_model FROM memories
        WHERE cube_id = :cube AND state = 'active' AND embedding IS NOT NULL{outside}
    )
    INSERT INTO memory_links (id, tenant_id, from_id, to_id, type, weight, created_by)
    SELECT gen_random_uuid(), n.tenant_id, n.id, nb.id, 'knn', 1 - nb.distance, :actor
    FROM memories n
    CROSS JOIN LATERAL (
        SELECT id, distance FROM ({sets}
        ) AS found
        ORDER BY distance LIMIT :k
    ) nb
    WHERE n.id = ANY(:ids) AND n.cube_id = :cube AND n.embedding IS NOT NULL AND nb.distance <> 'NaN'
        AND 1 - nb.distance >= :floor
    ON CONFLICT (from_id, to_id, type) DO UPDATE SET weight = EXCLUDED.weight
    RETURNING from_id, to_id, weight
    """  # noqa: S608
    return text(sql)


_KNN_SQL = {indexed: _knn_sql(indexed) for indexed in (False, True)}


# The set the lateral scan reads in a cube outside the index, as one value: each memory's id (16 bytes) and
# its vector's binary form (``vector_send``: int16 dimensions, int16 unused, big-endian float32s), end to end.
# Every embedded memory of the cube, ``ann`` or not, as in _knn_sql: the index mover may be moving them meanwhile.
_CUBE_VECTORS = text(
    """
    SELECT string_agg(uuid_send(id) || vector_send(embedding), ''::bytea) AS packed
    FROM memories
    WHERE cube_id = :cube AND state = 'active' AND embedding IS NOT NULL
        AND embedding_model IN (SELECT embedding_model FROM memories WHERE id = ANY(:ids))
    """
)
_WRITE_LINKS = text(
    """
    INSERT INTO memory_links (id, tenant_id, from_id, to_id, type, weight, created_by)
    SELECT gen_random_uuid(), :tenant, u.from_id, u.to_id, 'knn', u.weight, :actor
    FROM unnest(CAST(:from_ids AS uuid[]), CAST(:to_ids AS uuid[]), CAST(:weights AS float8[]))
        AS u(from_id, to_id, weight)
    ON CONFLICT (from_id, to_id, type) DO UPDATE SET weight = EXCLUDED.weight
    """
)


async def link_neighbours(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    actor: uuid.UUID,
    cube_id: uuid.UUID,
    ids: Sequence[uuid.UUID],
    *,
    indexed: bool,
) -> list[LinkEdge]:
    """Write ``knn`` links from each of ``ids`` (memories of ``cube_id``) to its nearest neighbours; the links.
    An id outside ``cube_id`` gets none (no caller passes one: a memory never changes cube).

    ``indexed``: the cube has memories in the HNSW index (``memos.memories.ann``)."""
    if not indexed and len(ids) >= BATCH_IN_PYTHON:
        return await _exact_in_python(conn, tenant_id, actor, cube_id, ids)
    # Iterative HNSW scans are on for every connection (store/db.py): no setting to make here.
    params = {"ids": list(ids), "cube": cube_id, "actor": actor, "k": KNN_NEIGHBOURS, "floor": KNN_FLOOR}
    rows = await conn.execute(_KNN_SQL[indexed], params)
    return [(r.from_id, r.to_id, KNN_LINK, float(r.weight)) for r in rows]


async def _exact_in_python(
    conn: AsyncConnection, tenant_id: uuid.UUID, actor: uuid.UUID, cube_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> list[LinkEdge]:
    # Only vectors of the new memories' model (one model: a batch is embedded in one call).
    packed = (await conn.execute(_CUBE_VECTORS, {"cube": cube_id, "ids": list(ids)})).scalar_one()
    # Off the event loop: a 1000-memory batch into a cube near EXACT_CUBE_MAX is a product of 1000 x 3000
    # vectors (tens of ms); numpy releases the GIL for it.
    found = [] if packed is None else await asyncio.to_thread(nearest, packed, ids)
    if found:
        await conn.execute(
            _WRITE_LINKS,
            {
                "tenant": tenant_id,
                "actor": actor,
                "from_ids": [link[0] for link in found],
                "to_ids": [link[1] for link in found],
                "weights": [link[3] for link in found],
            },
        )
    return found


def nearest(
    packed: bytes, ids: Sequence[uuid.UUID], k: int = KNN_NEIGHBOURS, floor: float = KNN_FLOOR
) -> list[LinkEdge]:
    """Each of ``ids``' ``k`` nearest others by cosine similarity among the memories in ``packed``, those at
    ``floor`` or above, best first.

    ``packed``: each memory's id as 16 bytes, then its vector in pgvector's binary form, end to end (all of
    one width). An id that is not in ``packed`` (no embedding) gets no links, as in the lateral scan."""
    keys, matrix = decode_id_vectors(packed)  # matrix: [cube, dims]
    position = {key: i for i, key in enumerate(keys)}
    sources = [memory_id for memory_id in ids if memory_id.bytes in position]
    if not sources or len(keys) < 2:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        # A zero vector has no direction: its similarities are NaN and fail the floor (pgvector's <=> gives NaN).
        unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    rows = np.array([position[memory_id.bytes] for memory_id in sources], dtype=np.intp)
    similarity = unit[rows] @ unit.T  # [sources, cube]: a small product (BLAS runs on one thread, memos/blas.py)
    similarity[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
    take = min(k, len(keys) - 1)
    best = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
    links: list[LinkEdge] = []
    for source, row, candidates in zip(sources, similarity, best, strict=True):
        for j in candidates[np.argsort(-row[candidates], kind="stable")]:
            weight = float(row[j])
            if weight >= floor:  # NaN fails too
                # float32 rounding can put identical texts at 1.0000002; pgvector's cosine stops at 1.
                links.append((source, uuid.UUID(bytes=keys[j]), KNN_LINK, min(weight, 1.0)))
    return links

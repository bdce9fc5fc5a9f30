"""Search: pgvector (semantic), Postgres full text (lexical), their fusion, and graph-augmented retrieval.

Every mode is scoped the same way: the caller's tenant, the cubes it may read,
then the request's filters. Graph mode starts from hybrid candidates.
"""

from __future__ import annotations

import asyncio
import time
import typing
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.errors import FieldError, NotFound
from memos.graph.memgraph import MemoryGraph, combine, scale_seeds
from memos.graph.select import mmr
from memos.identity.principal import Principal
from memos.memories.service import Accesses, to_dto
from memos.search import schemas, statements
from memos.search.embedding import EmbeddingService
from memos.search.graphs import CubeGraphs
from memos.search.indexing import embedding_text
from memos.search.lexical import (
    POSTINGS_BUDGET,
    LexicalStats,
    bm25,
    discriminating,
    parse_lexemes,
    tsquery_literal,
)
from memos.store.arrays import Float4Array, decode_vector
from memos.store.db import Database
from memos.validation import reject_nul, unique_tags

DENSE_WEIGHT = 0.5
"""Hybrid score = DENSE_WEIGHT * scaled cosine + (1 - DENSE_WEIGHT) * scaled BM25: equal say, no tuning."""

GRAPH_SEEDS = 30
"""Graph mode starts PageRank from this many of the best hybrid candidates (3 x k when that is more)."""
GRAPH_FINALISTS = 30
"""Graph mode ranks at least this many memories (3 x k when that is more): MMR picks the k among them."""
GRAPH_HOPS = 2
GRAPH_MAX_NODES = 2000
"""The neighbourhood PageRank runs over: memory hops from the seeds, and at most this many nodes in all."""
GRAPH_MAX_SCAN = 40_000
"""And at most this many adjacency entries read to gather it, and as many to collect its edges: a cube
whose memories carry hundreds of links each cannot hold the event loop (a LoCoMo search reads a few
thousand)."""
FILTER_WALKS = 2
"""A filtered graph search gathers its neighbourhood at most this many times, each without the memories the
filters refused so far (each walk and its check cost about 5 ms at 100k)."""
GRAPH_SEED_WEIGHT = 0.6
"""A memory's graph score = this x its scaled seed score + the rest x the PageRank inflow it received."""

GRAPH_BUILDING = "graph-building:"
"""Graph mode's ``via`` prefix while a searched cube's graph is still building: the result is hybrid's."""

_HNSW_EF = text("SELECT set_config('hnsw.ef_search', :ef, true)")
HNSW_DEFAULT_EF = 40
"""pgvector's default ``hnsw.ef_search``: a pool this small needs no setting of its own."""


@dataclass
class Candidate:
    id: uuid.UUID
    cube_id: uuid.UUID
    dense: float = 0.0
    lexical: float = 0.0
    score: float = 0.0
    via: set[str] = field(default_factory=set)
    lexical_tf: dict[str, int] = field(default_factory=dict)
    """How often each query lexeme occurs in the memory, for BM25."""
    length: int = 1
    """The memory's number of distinct lexemes."""
    vec: bytes | None = None
    """From the text leg: the memory's embedding (pgvector's binary form), for its cosine to the query."""
    model: str | None = None
    """The model that made ``vec``."""


class SearchService:
    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        graphs: CubeGraphs | None = None,
        pool: int | None = None,
        graph_wait: float = 1.0,
    ) -> None:
        self.db = db
        self.embedder = embedder
        self.pool = pool
        self.graph_wait = graph_wait
        self.graphs = graphs or CubeGraphs(db)
        self.lexical = LexicalStats(connect=db.read)
        self.on_access: Accesses | None = None
        """Told which memories a search returned, the first weighing most (the scheduler's heat)."""

    async def close(self) -> None:
        await self.lexical.close()
        await self.graphs.close()

    async def search(self, principal: Principal, req: schemas.SearchRequest) -> schemas.SearchResponse:
        started = time.perf_counter()
        principal.tenant_member()
        reject_nul(req.query, "query")
        reject_nul(req.filters, "filters")
        reject_nul(req.tags, "tags")
        # Never under k: a smaller pool would cut the results short of k while more memories match.
        pool = max(req.k, self.pool or (req.k if req.mode == "vector" else min(max(req.k * 4, 40), 400)))
        # The query embeds in the worker thread while the scope, the word statistics and the text leg's
        # candidates come from Postgres: none of them needs the query vector. With a text leg Postgres keeps
        # a core busy meanwhile, so the query embeds on one thread (two would wait for each other's core).
        embedding = (
            asyncio.ensure_future(
                self.embedder.embed_query(
                    embedding_text("plaintext", req.query, {}), threads=None if req.mode == "vector" else 1
                )
            )
            if req.mode != "text"
            else None
        )
        found: dict[uuid.UUID, Candidate] = {}
        try:
            # One connection for the whole search (a checkout is a round trip: the pool pings it).
            async with self.db.read() as conn:
                cubes, indexed, lexemes = await self._scope_and_lexemes(conn, principal, req)
                where = self._filters(req, cubes, indexed)
                if lexemes:
                    idf, avg_length, share, docs = await self.lexical.idf(conn, cubes, lexemes)
                    lookup = discriminating(share, docs=docs)
                    await self._text(conn, where, lookup, lexemes, pool, found, vectors=embedding is not None)
                query_vector = await embedding if embedding is not None else None
                if query_vector is not None:
                    cosines(query_vector, self.embedder.model, found.values())
                    await self._vector(conn, where, query_vector, pool, found, lexemes)
                if lexemes:
                    for cand in found.values():
                        cand.lexical = bm25(cand.lexical_tf, idf, avg_length, cand.length)
                ranked = self._rank(req, list(found.values()))
                if req.mode != "graph":
                    top = ranked[: req.k]
                    rows = await self._rows(conn, [c.id for c in top], where.params["states"])
        finally:
            if embedding is not None and not embedding.done():
                embedding.cancel()
        if req.mode == "graph":
            # Built (or fetched) without holding a connection: a cold cube's build can take a while.
            graphs: dict[uuid.UUID, MemoryGraph] = {}
            seeds = ranked[: max(req.k * 3, GRAPH_SEEDS)]
            for cube_id in dict.fromkeys(c.cube_id for c in seeds):
                graph = await self.graphs.get_within(cube_id, self.graph_wait, principal.tenant_id)
                if graph is not None:
                    graphs[cube_id] = graph
            async with self.db.read() as conn:
                if len(graphs) < len({c.cube_id for c in seeds}):
                    # A graph is still building: the hybrid ranking answers meanwhile, and says so.
                    for cand in ranked:
                        cand.via = {GRAPH_BUILDING + "+".join(sorted(cand.via))}
                else:
                    ranked = await self._graph(conn, req, where, ranked, graphs)
                top = ranked[: req.k]
                rows = await self._rows(conn, [c.id for c in top], where.params["states"])
        results = [
            schemas.SearchResult(memory=to_dto(rows[c.id]), score=round(c.score, 6), via="+".join(sorted(c.via)))
            for c in top
            if c.id in rows
        ]
        if self.on_access is not None and results:
            self.on_access(principal.tenant_id, [(r.memory.id, 1.0 / (rank + 1)) for rank, r in enumerate(results)])
        return schemas.SearchResponse(results=results, took_ms=round((time.perf_counter() - started) * 1000, 3))

    # -- scope -----------------------------------------------------------------------------------------

    async def _scope_and_lexemes(
        self, conn: AsyncConnection, principal: Principal, req: schemas.SearchRequest
    ) -> tuple[list[uuid.UUID], list[uuid.UUID], list[str]]:
        """The cubes the search covers, those of them with memories in the HNSW index, and the query's
        lexemes, read in one round trip."""
        tenant_id, agent_id = principal.tenant_member()
        sql = statements.scope_and_lexemes(principal.is_admin, lexemes=req.mode != "vector")
        # NFKC as the indexed text is (migration 0013): "finance" finds it written with the U+FB01 ligature, "ABC"
        # finds it in full-width letters. Not on a database that is not UTF8, whose column is of the text as written.
        query = unicodedata.normalize("NFKC", req.query) if self.db.utf8 else req.query
        row = (await conn.exec_driver_sql(sql, {"tenant": tenant_id, "agent": agent_id, "query": query})).one()
        readable_ids, lexemes = row.cubes, parse_lexemes(row.lexemes)
        allowed: list[uuid.UUID] = list(readable_ids or [])
        indexed: list[uuid.UUID] = list(row.indexed or [])
        if req.cube_ids is None:
            return allowed, indexed, lexemes
        for i, cube_id in enumerate(req.cube_ids):
            if cube_id not in allowed:
                raise NotFound(f"cube_ids[{i}]: no such cube", errors=[FieldError(f"cube_ids[{i}]", "no such cube")])
        cubes = list(dict.fromkeys(req.cube_ids))
        return cubes, [c for c in indexed if c in cubes], lexemes

    def _filters(
        self, req: schemas.SearchRequest, cubes: list[uuid.UUID], indexed: list[uuid.UUID]
    ) -> statements.Scope:
        states: list[str] = ["active"] if req.states is None else list(req.states)  # the schema refuses []
        tags = None if req.tags is None else unique_tags(req.tags)
        return statements.Scope.of(cubes, indexed, states, req.kinds, tags, req.filters, req.since, req.until)

    # -- the two legs: each returns both signals, so fusion compares like with like -------------------------

    async def _text(
        self,
        conn: AsyncConnection,
        where: statements.Scope,
        lookup: list[str],
        lexemes: list[str],
        limit: int,
        found: dict[uuid.UUID, Candidate],
        vectors: bool,
    ) -> None:
        """Memories with any of the ``lookup`` words are candidates; BM25 then scores them on all ``lexemes``,
        exactly like the vector leg's candidates. With ``vectors`` their embeddings come too, for their cosine
        once the query vector exists (``cosines``: the leg runs before it does)."""
        if not lookup:
            return
        # At most POSTINGS_BUDGET matching memories are ranked: ranking reads each one's tsvector, and a
        # query whose rarest word is in thousands of memories would otherwise rank all of them.
        params = {
            **where.params,
            "words": " | ".join(tsquery_literal(w) for w in lookup),
            "lexemes": lexemes,
            "budget": POSTINGS_BUDGET,
            "limit": limit,
        }
        for r in await conn.exec_driver_sql(statements.text_leg(where.shape, vectors), params):
            cand = found.setdefault(r.id, _candidate(r))
            cand.via.add("text")
            cand.vec, cand.model = r.vec, r.embedding_model

    async def _vector(
        self,
        conn: AsyncConnection,
        where: statements.Scope,
        vector: np.ndarray,
        limit: int,
        found: dict[uuid.UUID, Candidate],
        lexemes: list[str],
    ) -> None:
        """HNSW top ``limit`` with their cosine and, with ``lexemes``, their term counts."""
        sql = statements.vector_leg(where.shape, lexical=bool(lexemes), indexed=where.indexed)
        params = {
            **where.params,
            "vec": Float4Array(vector),
            "model": self.embedder.model,
            "lexemes": lexemes,
            "limit": limit,
        }
        ef = max(HNSW_DEFAULT_EF, min(1000, limit))
        if ef == HNSW_DEFAULT_EF:
            # The connection's own settings do (iterative scans are on for every connection: store/db.py).
            rows = (await conn.exec_driver_sql(sql, params)).all()
        else:
            # A bigger pool needs a bigger ef_search: set for this statement alone, on this same connection.
            rows = await _with_ef_search(conn, ef, sql, params)
        for r in rows:
            cand = found.get(r.id)
            if cand is None:
                cand = found[r.id] = _candidate(r)
            cand.dense = 1.0 - float(r.distance)
            cand.via.add("vector")

    async def _rows(self, conn: AsyncConnection, ids: list[uuid.UUID], states: Sequence[str]) -> dict[uuid.UUID, Any]:
        """The winners' full rows, those still in ``states`` and not expired: only they leave the database whole."""
        params = {"ids": ids, "states": list(states)}
        return {r.id: r for r in await conn.exec_driver_sql(statements.ROWS, params)}

    # -- ranking ---------------------------------------------------------------------------------------

    def _rank(self, req: schemas.SearchRequest, cands: list[Candidate]) -> list[Candidate]:
        if req.mode == "vector":
            for c in cands:
                c.score = c.dense
            cands = [c for c in cands if "vector" in c.via]
        elif req.mode == "text":
            for c in cands:
                c.score = c.lexical
            cands = [c for c in cands if c.lexical > 0]
        else:
            fuse(cands)
        return sorted(cands, key=lambda c: (-c.score, str(c.id)))

    async def _graph(
        self,
        conn: AsyncConnection,
        req: schemas.SearchRequest,
        where: statements.Scope,
        ranked: list[Candidate],
        graphs: dict[uuid.UUID, MemoryGraph],
    ) -> list[Candidate]:
        """Personalized PageRank from the best candidates over their graph neighbourhood, then MMR.

        The seeds' fused scores, scaled once over all of them, weigh their restarts. Each cube's graph
        gathers its own seeds' neighbourhood; PageRank then runs over all of them at once (the graphs share
        no edge), so one scale ranks the memories of every cube. It runs on the event loop: the graphs
        change there too, and a neighbourhood is bounded (``GRAPH_MAX_NODES`` nodes a cube, gathered and
        joined reading ``GRAPH_MAX_SCAN`` adjacency entries at most). The walk and PageRank pass only
        through memories that could be results themselves (scope, filters, expiry).
        """
        by_id = {c.id: c for c in ranked}
        seeds = scale_seeds({c.id: c.score for c in ranked[: max(req.k * 3, GRAPH_SEEDS)]})
        starts: dict[uuid.UUID, dict[Any, float]] = {}
        for cube_id in graphs:
            mine = {m: s for m, s in seeds.items() if by_id[typing.cast(uuid.UUID, m)].cube_id == cube_id}
            if mine:
                starts[cube_id] = mine
        # The walk and PageRank pass only through memories that could be results themselves. The graphs
        # know which memories have expired (and hold active memories only), so a request without filters
        # needs no query for that. With filters, one statement checks every memory the neighbourhood
        # reached (the candidates passed them already); when some fail, the neighbourhood is gathered
        # again without them, so no rank flows through them and no ``via`` names them. Memories the graph
        # gained meanwhile (writes while the statement ran) were not checked: that second walk leaves them
        # out too.
        now = time.time()
        filtered = bool(where.shape) or "active" not in where.params["states"]
        passed: dict[Any, uuid.UUID] = {}
        admit: set[Any] | None = None
        if filtered:
            # Who the walk reaches (the neighbourhood alone: its edges are only worth gathering for the walk
            # that counts, 2-3 ms of a filtered graph search at 100k), checked in SQL. When some fail, the
            # neighbourhood is gathered again around them, once more (FILTER_WALKS): the memories they had
            # crowded out (a memory keeps its heaviest neighbours, the walk its first 2,000) are reached and
            # checked too. With the first walk's passes alone, a linked memory that passed the filter was
            # missed behind heavier ones that failed (found in review).
            failed: set[Any] = set()
            checked: set[Any] = set(by_id)
            for _ in range(FILTER_WALKS):
                around = None if not failed else _Except(failed)
                walks = [
                    graphs[cube_id].reach(
                        mine, GRAPH_HOPS, GRAPH_MAX_NODES, max_scan=GRAPH_MAX_SCAN, admit=around, now=now
                    )
                    for cube_id, mine in starts.items()
                ]
                unchecked = list(dict.fromkeys(m for memories in walks for m in memories if m not in checked))
                if not unchecked:
                    break
                params = {**where.params, "ids": unchecked}
                now_passed = {
                    r.id: r.cube_id for r in await conn.exec_driver_sql(statements.within(where.shape), params)
                }
                passed.update(now_passed)
                checked.update(unchecked)
                if len(now_passed) == len(unchecked):
                    break
                failed.update(m for m in unchecked if m not in now_passed)
            if failed:
                admit = set(by_id).union(passed)
        parts = {
            cube_id: graphs[cube_id].spread(
                mine, GRAPH_HOPS, GRAPH_MAX_NODES, max_scan=GRAPH_MAX_SCAN, admit=admit, now=now
            )
            for cube_id, mine in starts.items()
        }
        expansions = combine(parts.values(), GRAPH_SEED_WEIGHT)
        # Enough for the k results and MMR's finalists. Without filters, the memories found only through the
        # graph are still checked in SQL before they can be results (a graph misses writes made by other
        # processes): best first, a chunk at a time (each twice the last), not the whole neighbourhood.
        want = max(req.k * 3, GRAPH_FINALISTS)
        ordered: list[Candidate] = []
        done, size = 0, 2 * want
        while len(ordered) < want and done < len(expansions):
            chunk = expansions[done : done + size]
            done, size = done + len(chunk), 2 * size
            if not filtered:
                reached = [e.id for e in chunk if e.id not in by_id]
                if reached:
                    params = {**where.params, "ids": reached}
                    for r in await conn.exec_driver_sql(statements.within(where.shape), params):
                        passed[r.id] = r.cube_id
            for e in chunk:
                memory_id = typing.cast(uuid.UUID, e.id)
                cand = by_id.get(memory_id)
                if cand is None:
                    home = passed.get(memory_id)
                    if home is None:
                        continue  # failed the check, or (filtered) not checked and so not reached: no result
                    cand = by_id[memory_id] = Candidate(id=memory_id, cube_id=home, via={e.via})
                cand.score = e.score
                ordered.append(cand)
        if req.diversity <= 0:
            return ordered
        head = ordered[:want]
        vectors = await self._vectors(conn, [c.id for c in head])
        picked = mmr([(c.id, c.score) for c in head], vectors, req.k, req.diversity)
        return [by_id[typing.cast(uuid.UUID, memory_id)] for memory_id, _ in picked]

    async def _vectors(self, conn: AsyncConnection, ids: list[uuid.UUID]) -> dict[Any, np.ndarray]:
        rows = await conn.exec_driver_sql(statements.VECTORS, {"ids": ids, "model": self.embedder.model})
        return {r.id: vector for r in rows if (vector := decode_vector(r.vec)) is not None}


async def _with_ef_search(conn: AsyncConnection, ef: int, sql: str, params: dict[str, Any]) -> list[Any]:
    """``sql``'s rows with ``hnsw.ef_search`` at ``ef``, on the search's own (autocommit) connection.

    Never on a second pooled connection: a search that holds one while it waits for another deadlocks the
    pool once enough searches run at once (each holds one, all wait POOL_TIMEOUT_S, then 503). The setting
    is ``SET LOCAL`` in an explicit transaction, so only that transaction sees it, and no connection goes
    back to the pool with it: the transaction ends here (COMMIT; a failed one rolls back). A cancelled
    statement makes SQLAlchemy invalidate the connection (it is closed, not pooled again); and a connection
    closed with a transaction still open is rolled back (psycopg sends ROLLBACK, autocommit or not), or
    discarded by the pool when that fails.
    """
    await conn.exec_driver_sql("BEGIN READ ONLY")
    try:
        await conn.execute(_HNSW_EF, {"ef": str(ef)})
        rows = list((await conn.exec_driver_sql(sql, params)).all())
    finally:
        if not conn.invalidated:
            # COMMIT, not ROLLBACK: psycopg forgets its prepared statements after a ROLLBACK.
            await conn.exec_driver_sql("COMMIT")
    return rows


def cosines(query: np.ndarray, model: str, cands: Iterable[Candidate]) -> None:
    """The text leg's candidates' cosine to the ``query`` vector, for those ``model`` (the query's) embedded;
    another model's vectors are in another space: they keep 0, as the vector leg never finds them."""
    for cand in cands:
        vector = decode_vector(cand.vec) if cand.model == model else None
        if vector is not None:
            norm = float(np.linalg.norm(vector)) * float(np.linalg.norm(query))
            # A zero vector has no direction: no similarity (pgvector's cosine would be NaN).
            cand.dense = float(np.dot(vector, query)) / norm if norm > 0 else 0.0


def _candidate(row: Any) -> Candidate:
    return Candidate(id=row.id, cube_id=row.cube_id, lexical_tf=row.tf or {}, length=int(row.doc_length or 1))


def fuse(cands: Sequence[Candidate]) -> None:
    """Score fusion: cosine scaled to [0, 1] over the candidates, BM25 divided by the best, weighted sum.

    Unlike rank fusion this keeps *how much* better one memory is, and both legs fetch both signals, so a
    memory found by one leg is still scored by the other.
    """
    if not cands:
        return
    dense = np.array([c.dense for c in cands])
    lexical = np.array([c.lexical for c in cands])
    span = dense.max() - dense.min()
    dense_scaled = (dense - dense.min()) / span if span > 0 else np.ones_like(dense)
    top = lexical.max()
    lexical_scaled = lexical / top if top > 0 else lexical
    for c, d, lx in zip(cands, dense_scaled, lexical_scaled, strict=True):
        c.score = float(DENSE_WEIGHT * d + (1 - DENSE_WEIGHT) * lx)


class _Except:
    """Every memory but ``refused``, as a walk's ``admit`` container."""

    __slots__ = ("refused",)

    def __init__(self, refused: set[Any]) -> None:
        self.refused = refused

    def __contains__(self, item: object) -> bool:
        return item not in self.refused

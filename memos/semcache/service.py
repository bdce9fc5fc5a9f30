"""The semantic cache's use cases: lookup, store, feedback, invalidate, stats and configuration.

Cached answers are ``response`` memories written through the memories service (validation,
versions, audit, the cube's write access), with the cache's own row beside each one (its context
embedding, its own threshold, its hit count). A lookup embeds the query (an LRU remembers exact
repeats), asks the cube's in-memory index for the nearest cached queries, lets
:func:`memos.semcache.decide.decide` verify them, and confirms the chosen entry against Postgres in
the same round trip as the access check. Hit and miss counts are kept in memory and added to
Postgres every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
from sqlalchemy import Row, and_, exists, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.cubes.access import Access, access_of, cube_access, require
from memos.errors import BeyondDatabaseLimit, Conflict, FieldError, Invalid, NotFound
from memos.identity.principal import Principal
from memos.memories import schemas as memory_schemas
from memos.memories.service import MemoryService
from memos.memories.versioning import tombstone_where
from memos.semcache import schemas, store
from memos.semcache.context import Turn, context_sha256, context_text
from memos.semcache.decide import Decision, decide
from memos.semcache.index import CacheIndexes, CubeState, Entry, entry_from_row, take_policy, turns_from
from memos.semcache.policy import (
    FALSE_HIT_MARGIN,
    THRESHOLD_CEILING,
    CachePolicy,
    CategoryPolicy,
    PolicyError,
    apply_feedback,
    category_json,
    parse_policy,
)
from memos.store.arrays import decode_vector
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import cache_categories, cache_configs, cache_entries, cube_grants, cubes, memories
from memos.validation import is_blank, reject_nul

log = logging.getLogger(__name__)

CANDIDATES = 16
"""Nearest cached queries a lookup examines; one refused by a guard falls through to the next."""
VERIFY_ATTEMPTS = 4
"""A candidate Postgres no longer confirms is dropped and the lookup decided again, at most this often."""
BUILD_WAIT_SECONDS = 0.05
"""How long a lookup waits for a cube's index build before answering from pgvector instead."""


def _now() -> float:
    return time.time()


def quota_margin(quota: int) -> int:
    """How far below its quota a category starts counting in Postgres at each store: 1 %, at least 1 (other
    processes' stores under way are not in this process's index yet)."""
    return max(1, quota // 100)


class SemCacheService:
    def __init__(
        self,
        db: Database,
        memories_service: MemoryService,
        indexes: CacheIndexes,
        *,
        flush_seconds: float = 5.0,
        build_wait: float = BUILD_WAIT_SECONDS,
    ) -> None:
        self.db = db
        self.build_wait = build_wait
        self.memories = memories_service
        self.indexes = indexes
        self.vectors = indexes.vectors
        self.flush_seconds = flush_seconds
        # Counters not yet in Postgres: (cube, category) -> [hits, misses]; entry -> (cube, hits, last hit).
        self._category_counts: dict[tuple[uuid.UUID, str], list[int]] = {}
        # Stores under way per (cube, category): the index counts committed entries only, and a burst of stores
        # that each saw room left went past the quota together (found in review).
        self._storing: dict[tuple[uuid.UUID, str], int] = {}
        self._entry_counts: dict[uuid.UUID, tuple[uuid.UUID, int, datetime]] = {}
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        try:
            await self.flush()
        except Exception:
            log.exception("the cache's last counter flush failed")
        await self.indexes.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except Exception:
                log.exception("flushing cache counters failed; they are kept for the next try")

    async def flush(self, cube_id: uuid.UUID | None = None) -> None:
        """Add the counters gathered in memory to Postgres (all cubes, or one)."""
        cats = {k: v for k, v in self._category_counts.items() if cube_id is None or k[0] == cube_id}
        ents = {k: v for k, v in self._entry_counts.items() if cube_id is None or v[0] == cube_id}
        if not cats and not ents:
            return
        for cat_key in cats:
            del self._category_counts[cat_key]
        for memory_id in ents:
            del self._entry_counts[memory_id]
        try:
            async with self.db.transaction() as conn:
                await store.flush_counters(conn, {k: (v[0], v[1]) for k, v in cats.items()}, ents)
        except Exception:
            # Put them back: counts must not be lost to a transient database error.
            for key, (hits, misses) in cats.items():
                counts = self._category_counts.setdefault(key, [0, 0])
                counts[0] += hits
                counts[1] += misses
            for memory_id, (cube, hits, at) in ents.items():
                _, more, last = self._entry_counts.get(memory_id, (cube, 0, at))
                self._entry_counts[memory_id] = (cube, hits + more, max(at, last))
            raise

    def _count(self, cube_id: uuid.UUID, category: str, hit: bool, memory_id: uuid.UUID | None) -> None:
        counts = self._category_counts.setdefault((cube_id, category), [0, 0])
        counts[0 if hit else 1] += 1
        if hit and memory_id is not None:
            _, hits, _ = self._entry_counts.get(memory_id, (cube_id, 0, datetime.now(UTC)))
            self._entry_counts[memory_id] = (cube_id, hits + 1, datetime.now(UTC))

    # -- shared checks ------------------------------------------------------------------------------

    async def _state(self, principal: Principal, cube_id: uuid.UUID, needed: Access = "read") -> CubeState:
        """The cube's cache state, after checking the caller's access, every time.

        The check comes before anything else the request would cause (embedding the query, building or
        searching the cube's index): a caller without access must get the 404 of an id that names
        nothing, as fast, and must not warm another tenant's index. It costs one indexed read.
        """
        async with self.db.read() as conn:
            row = await store.check_and_fetch(conn, principal, cube_id, None)
        access = None if row is None else access_of(principal, row.owner_agent_id, row.grant)
        if row is None or access is None:
            raise NotFound("no such cube")
        require(access, needed)
        tenant_id, _ = principal.tenant_member()
        state = await self.indexes.state(cube_id, tenant_id)
        if row.policy_revision > state.policy_revision:
            # Another process changed the policy (a configuration, feedback): every decision, store and quota
            # of this request uses the current one. Only hits re-checked it, and a lookup while the index was
            # building, a store's quota and a category's name went by the old one (a multi-process review).
            await self.indexes.reload_policy(cube_id)
        return state

    @staticmethod
    def _category(policy: CachePolicy, name: str | None) -> str:
        """The category a request names (or the cube's default); an unknown one is a 422 listing the known ones.

        Called after ``_state``, so the list is only shown to a caller who may read the cube.
        """
        if name is None:
            return policy.default
        if name in policy.categories:
            return name
        raise _unknown_category(policy, name)

    # -- lookup -------------------------------------------------------------------------------------

    async def lookup(self, principal: Principal, req: schemas.LookupIn) -> schemas.LookupOut:
        started = time.perf_counter()
        tenant_id, _ = principal.tenant_member()
        _check_query(req.query, "query")
        turns = _check_context(req.context)
        texts = [req.query] + ([context_text(turns)] if turns else [])
        # The caller's own texts embed while the access read runs: the two overlap instead of adding up. The
        # embedding depends on nothing but the request, so a caller without access learns nothing from it, and
        # the cube's index is still neither built nor searched before the check has passed.
        embedding = asyncio.ensure_future(self.vectors.embed(tenant_id, texts))
        embedding.add_done_callback(_retrieve)
        state = await self._state(principal, req.cube_id)
        category = self._category(state.policy, req.category)
        vectors = await embedding
        qvec, cvec = vectors[0], (vectors[1] if turns else None)
        index = await self.indexes.index(state, wait=self.build_wait)
        if index is None:
            decision, served = await self._lookup_database(principal, req, state, category, qvec, turns, cvec)
            via = "database"
        else:
            decision, served = await self._lookup_index(principal, req, state, category, qvec, turns, cvec)
            via = "index"
        hit = served is not None
        memory_id = uuid.UUID(decision.candidate_id) if hit and decision.candidate_id else None
        self._count(req.cube_id, category, hit, memory_id)
        threshold = decision.threshold if decision.threshold is not None else state.policy.category(category).threshold
        return schemas.LookupOut(
            hit=hit,
            threshold=round(threshold, 6),
            took_ms=round((time.perf_counter() - started) * 1000, 3),
            reason=decision.reason,
            category=category,
            via=via,
            memory_id=memory_id,
            response=served[0] if served is not None else None,
            similarity=None if decision.similarity is None else round(decision.similarity, 6),
            version=served[1] if served is not None else None,
        )

    async def _lookup_index(
        self,
        principal: Principal,
        req: schemas.LookupIn,
        state: CubeState,
        category: str,
        qvec: np.ndarray,
        turns: tuple[Turn, ...] | None,
        cvec: np.ndarray | None,
    ) -> tuple[Decision, tuple[str, int] | None]:
        for _ in range(VERIFY_ATTEMPTS):
            index = state.index
            if index is None:  # dropped meanwhile (the cube was deleted, or evicted from memory)
                break
            found = index.search(qvec, CANDIDATES)
            entries = {str(e.id): e for e, _ in found}
            decision = decide(
                req.query,
                qvec,
                [e.candidate(sim) for e, sim in found],
                state.policy,
                category=category,
                context=turns,
                context_vec=cvec,
                now=_now(),
            )
            chosen = entries.get(decision.candidate_id or "") if decision.hit else None
            if chosen is None:  # a miss serves nothing: _state has checked access already
                return decision, None
            async with self.db.read() as conn:
                # Confirms the entry and re-checks access (a grant revoked since _state) in one read.
                row = await store.check_and_fetch(conn, principal, req.cube_id, chosen.id)
            _require_read(principal, row)
            assert row is not None
            if row.policy_revision > state.policy_revision:
                # The policy changed in another process since this one read it (the catch-up runs only every
                # few seconds, and only once a lookup comes): decide again under the current one.
                await self.indexes.reload_policy(req.cube_id)
                continue
            if _confirmed(row, chosen):
                if row.entry_threshold != chosen.threshold:
                    # Feedback raised the entry's threshold elsewhere (another process, or before the entry left
                    # the index and came back through an archive or a restore): decide again with it.
                    chosen.threshold = row.entry_threshold
                    continue
                return decision, (row.content, row.version)
            # Postgres says otherwise (another process changed or removed it): drop it, catch up, decide again.
            index.remove(chosen.id)
            self.indexes.request_sync(state)
        # The index went away (the cube was deleted) or kept disagreeing with Postgres: a miss, if the caller
        # may still read the cube at all.
        async with self.db.read() as conn:
            _require_read(principal, await store.check_and_fetch(conn, principal, req.cube_id, None))
        miss = decide(req.query, qvec, [], state.policy, category=category)
        return replace(miss, reason="miss: the nearest entries changed while being checked"), None

    async def _lookup_database(
        self,
        principal: Principal,
        req: schemas.LookupIn,
        state: CubeState,
        category: str,
        qvec: np.ndarray,
        turns: tuple[Turn, ...] | None,
        cvec: np.ndarray | None,
    ) -> tuple[Decision, tuple[str, int] | None]:
        """The path while the cube's index is being built: pgvector finds the candidates, already current."""
        async with self.db.transaction() as conn:
            row = await store.check_and_fetch(conn, principal, req.cube_id, None)
            _require_read(principal, row)
            assert row is not None
            if row.policy_revision > state.policy_revision:  # changed since _state read it: this connection reads it
                take_policy(state, await store.load_policy(conn, req.cube_id))
            rows = await store.nearest_entries(conn, req.cube_id, qvec, CANDIDATES, self.vectors.embedder.model)
        entries: list[tuple[Entry, float, Row[Any]]] = []
        for r in rows:
            entry = entry_from_row(r, functools.partial(self.vectors.get, state.tenant_id))
            if entry is not None:
                entries.append((entry, float(r.similarity), r))
        decision = decide(
            req.query,
            qvec,
            [e.candidate(sim) for e, sim, _ in entries],
            state.policy,
            category=category,
            context=turns,
            context_vec=cvec,
            now=_now(),
        )
        if not decision.hit:
            return decision, None
        served = next(r for e, _, r in entries if str(e.id) == decision.candidate_id)
        return decision, (served.content, served.version)

    # -- store --------------------------------------------------------------------------------------

    async def store(self, principal: Principal, req: schemas.StoreIn) -> memory_schemas.Memory:
        principal.tenant_member()
        _check_query(req.query, "query")
        if not req.response.strip():
            raise Invalid.field("response", "the answer to cache must not be blank")
        reject_nul(req.response, "response")
        turns = _check_context(req.context)
        state = await self._state(principal, req.cube_id, "write")
        category = self._category(state.policy, req.category)
        policy = state.policy.category(category)
        ctx_text = context_text(turns) if turns else None
        vectors = await self.vectors.embed(state.tenant_id, [req.query] + ([ctx_text] if ctx_text else []))
        qvec, cvec = vectors[0], (vectors[1] if ctx_text else None)
        metadata: dict[str, Any] = {"query": req.query, "category": category}
        if req.context:
            metadata["context"] = msgspec.to_builtins(req.context)
        body = memory_schemas.MemoryIn(
            kind="response", content=req.response, metadata=metadata, ttl_seconds=req.ttl_seconds
        )
        quota = policy.max_entries
        index = state.index
        storing = (req.cube_id, category)
        self._storing[storing] = self._storing.get(storing, 0) + 1
        try:
            # Only a cube near its quota pays for a count: the index's count of committed entries, plus this
            # process's stores under way, plus a margin for other processes' (their stores reach this index later).
            near_quota = quota is not None and (
                index is None or index.count(category) + self._storing[storing] >= quota - quota_margin(quota)
            )
            if near_quota:
                await self.flush(req.cube_id)  # eviction ranks by hits: let it see the recent ones
            evicted: list[uuid.UUID] = []

            async def in_transaction(conn: AsyncConnection, rows: list[Row[Any]]) -> None:
                (row,) = rows
                await conn.execute(
                    pg_insert(cache_entries).values(
                        memory_id=row.id,
                        cube_id=req.cube_id,
                        context_sha256=None if ctx_text is None else context_sha256(ctx_text),
                        context_embedding=cvec,
                    )
                )
                if near_quota and quota is not None:
                    evicted.extend(
                        await self._enforce_quota(conn, principal, req.cube_id, state, policy, quota, row.id)
                    )

            try:
                memory = await self.memories.create(
                    principal, req.cube_id, body, vector=qvec, in_transaction=in_transaction
                )
            except BeyondDatabaseLimit as exc:  # the cached answer is the memory's content
                if exc.errors and exc.errors[0].field == "content":
                    raise BeyondDatabaseLimit.field("response", exc.errors[0].message) from exc
                raise
        finally:
            self._storing[storing] -= 1
            if not self._storing[storing]:
                del self._storing[storing]
        if evicted:
            self.memories.notify_removed(req.cube_id, evicted)
        return memory

    async def _enforce_quota(
        self,
        conn: AsyncConnection,
        principal: Principal,
        cube_id: uuid.UUID,
        state: CubeState,
        policy: CategoryPolicy,
        quota: int,
        new_id: uuid.UUID,
    ) -> list[uuid.UUID]:
        # One store at a time per category past this point (until commit): two that counted the same entries
        # would pick the same victim, the second evicting nothing, and both stay (found in review).
        await store.lock_category(conn, cube_id, policy.name)
        live = await store.count_live(conn, cube_id, policy.name, state.policy.default)
        if live <= quota:
            return []
        victims = await store.least_valuable(
            conn, cube_id, policy.name, state.policy.default, policy.ttl_seconds, live - quota, new_id
        )
        if not victims:
            return []
        gone = await tombstone_where(conn, principal, memories.c.id.in_(victims))
        await store.add_evicted(conn, cube_id, policy.name, len(gone))
        await record(
            conn, principal, "cache.evict", "cube", cube_id, detail={"category": policy.name, "count": len(gone)}
        )
        return gone

    # -- feedback -----------------------------------------------------------------------------------

    async def feedback(self, principal: Principal, req: schemas.FeedbackIn) -> None:
        """A served answer was right or wrong: move the category's threshold (and the entry's) accordingly."""
        tenant_id, agent_id = principal.tenant_member()
        _check_query(req.query, "query")
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(
                        memories.c.cube_id,
                        memories.c.kind,
                        memories.c.state,
                        memories.c.metadata,
                        func.vector_send(memories.c.embedding).label("vec"),
                        cubes.c.owner_agent_id,
                        cube_grants.c.access.label("grant"),
                        store.policy_revision_of(cubes.c.id).label("policy_revision"),
                    )
                    .select_from(memories)
                    .join(cubes, cubes.c.id == memories.c.cube_id)
                    .outerjoin(
                        cube_grants, and_(cube_grants.c.cube_id == cubes.c.id, cube_grants.c.agent_id == agent_id)
                    )
                    .where(
                        memories.c.id == req.memory_id,
                        memories.c.tenant_id == tenant_id,
                        cubes.c.deleted_at.is_(None),
                    )
                )
            ).first()
        access = None if row is None else access_of(principal, row.owner_agent_id, row.grant)
        if row is None or access is None or row.kind != "response":
            raise NotFound(
                "memory_id: no such cached answer", errors=[FieldError("memory_id", "no such cached answer")]
            )
        require(access, "write", "cached answer's cube")
        cached = decode_vector(row.vec)
        _check_feedable(row.state, purged=cached is None)
        assert cached is not None
        state = await self.indexes.state(row.cube_id, tenant_id)
        if row.policy_revision > state.policy_revision:
            # A category another process configured since this one read the policy was refused here as "not
            # configured" (found in review); the check under the locks below reads it from Postgres again.
            await self.indexes.reload_policy(row.cube_id)
        named = row.metadata.get("category")
        if isinstance(named, str) and named not in state.policy.categories:
            # Never served (semcache.md), and the policy's fallback would have moved the default category's
            # threshold for an entry that default lookups never see (found in review).
            raise _category_gone(named)
        category = state.policy.category(named if isinstance(named, str) else None)
        # after every refusal: a refused call costs no model pass
        (qvec,) = await self.vectors.embed(tenant_id, [req.query])
        similarity = max(-1.0, min(1.0, float(np.dot(cached, qvec))))
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, row.cube_id, "write")
            # The category's lock first (a store takes it before the rows it evicts): with no category row yet,
            # FOR UPDATE below locked nothing, and of two reports at once the second overwrote the first's raise
            # (0.98 back to 0.75; found in a concurrency review).
            await store.lock_category(conn, row.cube_id, category.name)
            # Again, locked: an invalidation that committed while the query embedded left this feedback moving the
            # category's threshold for a deleted entry (found in review: 0.75 -> 0.98 from one report).
            now = (
                await conn.execute(
                    select(memories.c.state, memories.c.purged_at)
                    .where(memories.c.id == req.memory_id)
                    .with_for_update(read=True)
                )
            ).one()
            _check_feedable(now.state, purged=now.purged_at is not None)
            # The category as Postgres holds it now, under its lock: with the threshold and bounds of this process's
            # copy, a report to a process that had not seen a new configuration wrote a threshold from the old one
            # (0.998 configured, 0.972 after a false-hit report; found in a multi-process review).
            fresh = (await store.load_policy(conn, row.cube_id)).policy.categories.get(category.name)
            if fresh is None:
                raise _category_gone(category.name)
            category = fresh
            moved = apply_feedback(category, similarity, correct=req.correct) if req.scope == "category" else category
            counter = cache_categories.c.correct_hits if req.correct else cache_categories.c.false_hits
            values: dict[str, Any] = {"updated_at": func.now(), counter.name: counter + 1}
            if moved != category:
                values.update(threshold=moved.threshold, false_hit_floor=moved.false_hit_floor)
            stmt = pg_insert(cache_categories).values(
                cube_id=row.cube_id,
                category=category.name,
                **{counter.name: 1},
                **(
                    {"threshold": moved.threshold, "false_hit_floor": moved.false_hit_floor}
                    if moved != category
                    else {}
                ),
            )
            await conn.execute(stmt.on_conflict_do_update(index_elements=["cube_id", "category"], set_=values))
            if moved != category:
                await store.policy_changed(conn, row.cube_id)
            entry_threshold = None
            if not req.correct:
                # This pair must stop hitting even where the category's ceiling stops below its similarity. The
                # entry's own question still gets its answer: wrong for that too, the entry is to be invalidated.
                entry_threshold = min(similarity + FALSE_HIT_MARGIN, THRESHOLD_CEILING)
                stmt = pg_insert(cache_entries).values(
                    memory_id=req.memory_id, cube_id=row.cube_id, threshold=entry_threshold, false_hits=1
                )
                result = await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["memory_id"],
                        set_={
                            "threshold": func.greatest(func.coalesce(cache_entries.c.threshold, 0), entry_threshold),
                            "false_hits": cache_entries.c.false_hits + 1,
                            "updated_at": func.now(),
                        },
                    ).returning(cache_entries.c.threshold)
                )
                entry_threshold = float(result.scalar_one())
            await record(
                conn,
                principal,
                "cache.feedback",
                "memory",
                req.memory_id,
                detail={"correct": req.correct, "similarity": round(similarity, 4), "threshold": moved.threshold},
            )
        await self.indexes.reload_policy(row.cube_id)
        if entry_threshold is not None:
            self.indexes.set_threshold(row.cube_id, req.memory_id, entry_threshold)

    # -- invalidate ---------------------------------------------------------------------------------

    async def invalidate(
        self, principal: Principal, cube_id: uuid.UUID, category: str | None, older_than: int | None
    ) -> int:
        """Delete (soft, a ``delete`` version each) a cube's cached answers, of one category or older than an age."""
        principal.tenant_member()
        if category is not None:
            reject_nul(category, "category")
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, cube_id, "write")
            # The policy as Postgres holds it, on this connection: a process's copy may be older (another process
            # configured the cube), and asking the index for it would take a second pooled connection while this
            # one is held (enough concurrent invalidations of cold cubes then waited on each other until the pool
            # timed out).
            policy = (await store.load_policy(conn, cube_id)).policy
            default = policy.default
            conditions = [memories.c.cube_id == cube_id, memories.c.kind == "response"]
            if category is not None:
                named = store.category_is(category, default)
                # An unknown category is a 422, as in a lookup (found in review: a typo answered
                # {"invalidated": 0}). Unknown means what stats do not list either: a category the cube no longer
                # configures still names the entries stored under it, and those can be invalidated by name.
                if category not in policy.categories and not await conn.scalar(
                    select(exists().where(*conditions, named, memories.c.state != "deleted"))
                ):
                    raise _unknown_category(policy, category)
                conditions.append(named)
            if older_than is not None:
                conditions.append(memories.c.created_at <= func.now() - timedelta(seconds=older_than))
            gone = await tombstone_where(conn, principal, *conditions)
            await record(
                conn,
                principal,
                "cache.invalidate",
                "cube",
                cube_id,
                detail={"category": category, "older_than": older_than, "count": len(gone)},
            )
        if gone:
            self.memories.notify_removed(cube_id, gone)
        return len(gone)

    # -- configuration ------------------------------------------------------------------------------

    async def get_config(self, principal: Principal, cube_id: uuid.UUID) -> schemas.ConfigOut:
        principal.tenant_member()
        async with self.db.read() as conn:
            await cube_access(conn, principal, cube_id, "read")
            record_ = await store.load_policy(conn, cube_id)
        return _config_out(cube_id, parse_policy(record_.configured or None), record_.configured, record_.updated_at)

    async def put_config(self, principal: Principal, req: schemas.ConfigIn) -> schemas.ConfigOut:
        """Replace a cube's category configuration (manage access). Adapted thresholds of categories whose
        threshold bounds changed start again from the new settings."""
        _, agent_id = principal.tenant_member()
        configured: dict[str, Any] = {"categories": req.categories}
        if req.default is not None:
            configured["default"] = req.default
        # Each part under its own name: one walk of the whole named "body.categories" (found in an API review).
        reject_nul(req.categories, "categories")
        reject_nul(req.default, "default")
        try:
            policy = parse_policy(configured)
        except PolicyError as exc:
            raise Invalid.field(exc.field, exc.message) from None
        async with self.db.transaction() as conn:
            await cube_access(conn, principal, req.cube_id, "manage")
            before = await store.load_policy(conn, req.cube_id)
            old = parse_policy(before.configured or None)
            stmt = pg_insert(cache_configs).values(cube_id=req.cube_id, config=configured, updated_by=agent_id)
            result = await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["cube_id"],
                    set_={"config": configured, "updated_by": agent_id, "updated_at": func.now()},
                ).returning(cache_configs.c.updated_at)
            )
            updated_at = result.scalar_one()
            changed = [
                name
                for name, cat in policy.categories.items()
                if name not in old.categories or _bounds(old.categories[name]) != _bounds(cat)
            ]
            await store.reset_adapted(conn, req.cube_id, changed)
            await store.policy_changed(conn, req.cube_id)
            await record(conn, principal, "cache.configure", "cube", req.cube_id, detail={"reset": changed})
        await self.indexes.reload_policy(req.cube_id)
        return _config_out(req.cube_id, policy, configured, updated_at)

    # -- stats --------------------------------------------------------------------------------------

    async def stats(self, principal: Principal, cube_id: uuid.UUID) -> schemas.StatsOut:
        principal.tenant_member()
        async with self.db.read() as conn:
            await cube_access(conn, principal, cube_id, "read")
            record_ = await store.load_policy(conn, cube_id)
            policy = record_.policy
            counts = await store.category_counts(conn, cube_id, policy.default)
            counters = await store.category_counters(conn, cube_id)
        configured = parse_policy(record_.configured or None)
        names = sorted(set(policy.categories) | set(counts) | set(counters))
        out = []
        for name in names:
            cat = policy.category(name) if name in policy.categories else None
            row = counters.get(name)
            pending = self._category_counts.get((cube_id, name), [0, 0])
            hits = (row.hits if row is not None else 0) + pending[0]
            misses = (row.misses if row is not None else 0) + pending[1]
            base = configured.category(name) if name in configured.categories else None
            out.append(
                schemas.CategoryStats(
                    category=name,
                    entries=counts.get(name, 0),
                    hits=hits,
                    misses=misses,
                    hit_rate=round(hits / (hits + misses), 6) if hits + misses else None,
                    false_hits=row.false_hits if row is not None else 0,
                    correct_hits=row.correct_hits if row is not None else 0,
                    evicted=row.evicted if row is not None else 0,
                    threshold=cat.threshold if cat is not None else None,
                    configured_threshold=base.threshold if base is not None else None,
                    ttl_seconds=cat.ttl_seconds if cat is not None else None,
                    max_entries=cat.max_entries if cat is not None else None,
                    context=cat.context.value if cat is not None else None,
                )
            )
        state = self.indexes.peek(cube_id)
        return schemas.StatsOut(
            cube_id=cube_id,
            default=policy.default,
            entries=sum(counts.values()),
            categories=out,
            index="cold" if state is None else state.index_state,
        )


# -- helpers ---------------------------------------------------------------------------------------------


def _unknown_category(policy: CachePolicy, name: str) -> Invalid:
    known = ", ".join(sorted(policy.categories))
    return Invalid.field("category", f"no category {name!r} in this cube (configured: {known})")


def _bounds(policy: CategoryPolicy) -> tuple[float, float, float]:
    return (policy.threshold, policy.min_threshold, policy.max_threshold)


def _config_out(
    cube_id: uuid.UUID, policy: CachePolicy, configured: dict[str, Any], updated_at: datetime | None
) -> schemas.ConfigOut:
    return schemas.ConfigOut(
        cube_id=cube_id,
        default=policy.default,
        categories={name: category_json(c) for name, c in sorted(policy.categories.items())},
        configured=configured,
        updated_at=updated_at,
    )


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome as seen: a request that failed its access check never awaits it."""
    if not task.cancelled():
        task.exception()


def _check_query(query: str, field: str) -> None:
    if is_blank(query):  # "\u200b" passed strip() and was embedded and looked up (found in review)
        raise Invalid.field(field, "must not be blank")
    reject_nul(query, field)


def _check_context(context: Sequence[str | schemas.TurnIn] | None) -> tuple[Turn, ...] | None:
    """The turns of a request's context; more than 50 turns or 64 KiB of text is a 422 naming ``context``."""
    if context is None:
        return None
    over = schemas.context_limit_error(context)
    if over is not None:
        raise Invalid.field("context", over)
    for i, turn in enumerate(context):
        reject_nul(turn if isinstance(turn, str) else turn.content, f"context[{i}]")
    return turns_from(list(context))


def _category_gone(named: str) -> Conflict:
    return Conflict(
        f"memory_id: this cached answer's category {named!r} is not configured in its cube; it is not "
        "served, so there is no feedback to take",
        errors=[FieldError("memory_id", f"category {named!r} is not configured")],
    )


def _require_read(principal: Principal, row: Row[Any] | None) -> None:
    if row is None or access_of(principal, row.owner_agent_id, row.grant) is None:
        raise NotFound("no such cube")


def _confirmed(row: Row[Any], entry: Entry) -> bool:
    """Postgres still holds this entry as the index saw it: active, not expired, same version."""
    return (
        row.kind == "response"
        and row.state == "active"
        and bool(row.fresh)
        and row.version == entry.version
        and row.content is not None
    )


def _check_feedable(state: str, *, purged: bool) -> None:
    """A deleted entry is never served (feedback on one moved its category's threshold, found in review); a purged
    one has no vector to compare the query with."""
    if state == "deleted":
        raise Conflict(
            "memory_id: this cached answer is deleted; it is not served, so there is no feedback to take",
            errors=[FieldError("memory_id", "this cached answer is deleted")],
        )
    if purged:
        raise Invalid.field("memory_id", "this cached answer was purged; there is nothing to compare with")

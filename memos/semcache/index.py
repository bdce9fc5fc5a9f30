"""The cache's in-memory side: an ANN index per cube mirrored from Postgres, and an LRU of embeddings.

Postgres is the source of truth. Each cube's index (usearch HNSW, cosine, float16 vectors) is built
from the cube's live response memories on first use, in a worker thread, and kept current by the
writes of this process (``memories_written`` / ``memories_removed`` / ``drop``, called after each
commit). Writes of other processes reach it through a catch-up read every few seconds. Nothing is
served from the index alone: the service re-reads a candidate's state (one primary-key lookup in the
same round trip as the access check) before it answers, so an index that lags can cost a hit, never
serve a deleted, invalidated or expired entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from memos.embed.errors import EmbedError
from memos.search.embedding import EmbeddingService
from memos.semcache import store
from memos.semcache.context import Turn, as_turns, context_sha256, context_text
from memos.semcache.decide import Candidate
from memos.semcache.policy import CachePolicy
from memos.semcache.schemas import MAX_QUERY_CHARS
from memos.sharing import fair_victim
from memos.store.arrays import decode_vector
from memos.store.db import Database, db_now

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

COMPACT_AFTER = 10_000
"""Removed keys an index may carry (at least, and at least twice its live entries) before it is rebuilt."""

SYNC_MARGIN = timedelta(seconds=10)
"""A catch-up re-reads this far back: a writer's ``updated_at`` is its statement's start, before its commit."""


# -- embeddings ------------------------------------------------------------------------------------------


class VectorLRU:
    """(tenant, text) -> embedding for the most recent texts: an exact repeat of a query (or a context) embeds once.

    Keyed by tenant: one process-wide LRU shared by text alone let an agent of one tenant tell, from a lookup's
    ``took_ms``, whether any other tenant had just asked an exact question (found in review). A tenant's
    entries now only ever speed up that tenant's own calls.
    """

    def __init__(self, embedder: EmbeddingService, maxsize: int) -> None:
        self.embedder = embedder
        self.maxsize = maxsize
        self._vectors: OrderedDict[tuple[uuid.UUID, str], Vector] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, tenant_id: uuid.UUID, text: str) -> Vector | None:
        key = (tenant_id, text)
        vector = self._vectors.get(key)
        if vector is not None:
            self._vectors.move_to_end(key)
        return vector

    def put(self, tenant_id: uuid.UUID, text: str, vector: Vector) -> None:
        key = (tenant_id, text)
        self._vectors[key] = vector
        self._vectors.move_to_end(key)
        while len(self._vectors) > self.maxsize:
            self._vectors.popitem(last=False)

    def discard(self, tenant_id: uuid.UUID, text: str) -> None:
        """Forget a text (a removed cached answer's question): a deleted entry's words are not kept here."""
        self._vectors.pop((tenant_id, text), None)

    def clear(self) -> None:
        self._vectors.clear()

    async def embed(self, tenant_id: uuid.UUID, texts: Sequence[str]) -> list[Vector]:
        """Embeddings of ``texts`` (L2-normalized float32) for one tenant, embedding only those it has not
        embedded lately, in one call."""
        found = [self.get(tenant_id, t) for t in texts]
        missing = list(dict.fromkeys(t for t, v in zip(texts, found, strict=True) if v is None))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            vectors = await self.embedder.embed(missing)
            for text, vector in zip(missing, vectors, strict=True):
                self.put(tenant_id, text, np.ascontiguousarray(vector, dtype=np.float32))
        out = []
        for text, vector in zip(texts, found, strict=True):
            resolved = vector if vector is not None else self._vectors.get((tenant_id, text))
            assert resolved is not None
            out.append(resolved)
        return out


def turns_from(raw: Any) -> tuple[Turn, ...] | None:
    """Turns from a stored or sent context: ``{role, content}`` objects, or plain strings.

    Plain strings carry no roles; a conversation before a user's query alternates and its newest
    turn is the assistant's, so roles are assigned backwards from the end. ``None`` for no context;
    ``ValueError`` for one that cannot be read.
    """
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ValueError("a context is a list of turns")
    items: list[Turn | Mapping[str, Any]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            role = "assistant" if (len(raw) - 1 - i) % 2 == 0 else "user"
            items.append(Turn(role, item))
        elif isinstance(item, Mapping):
            items.append(item)
        elif hasattr(item, "role") and hasattr(item, "content"):
            items.append(Turn(str(item.role), str(item.content)))
        else:
            raise ValueError(f"context[{i}] must be a string or a {{role, content}} object")
    turns = as_turns(items)
    return turns or None


# -- one cube's index ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """What the index knows of one cached answer: enough to decide, not the answer itself."""

    id: uuid.UUID
    version: int
    query: str
    category: str | None
    context: tuple[Turn, ...] | None
    context_vec: Vector | None
    created_at: float
    expires_at: float | None
    threshold: float | None

    def candidate(self, similarity: float) -> Candidate:
        return Candidate(
            id=str(self.id),
            query=self.query,
            category=self.category,
            context=self.context,
            context_vec=self.context_vec,
            created_at=self.created_at,
            expires_at=self.expires_at,
            threshold=self.threshold,
            similarity=similarity,
        )


def entry_from_row(row: Any, context_vectors: Callable[[str], Vector | None] | None = None) -> Entry | None:
    """An index entry from a row with the memory's columns (and, when joined, its ``cache_entries`` row).

    ``None`` for a row that cannot be served: no query (or one over ``MAX_QUERY_CHARS``), or a context that cannot
    be read. A context
    embedding counts only if it was made from the context the memory holds now (its hash matches);
    otherwise ``context_vectors`` (the embedding LRU) may know it, else the contexts are compared as text.
    """
    metadata = row.metadata or {}
    query = metadata.get("query")
    if not isinstance(query, str) or not query.strip() or len(query) > MAX_QUERY_CHARS:
        # Over the limit only if written through the memories API before it applied there: the guards read every
        # compared query, and no lookup (8,000 characters at most) asks a longer one.
        return None
    category = metadata.get("category")
    try:
        turns = turns_from(metadata.get("context"))
    except ValueError:
        return None
    context_vec: Vector | None = None
    if turns:
        text = context_text(turns)
        if getattr(row, "cvec", None) is not None and getattr(row, "context_sha256", None) == context_sha256(text):
            context_vec = decode_vector(row.cvec)
        elif context_vectors is not None:
            context_vec = context_vectors(text)
    return Entry(
        id=row.id,
        version=row.version,
        query=query,
        category=category if isinstance(category, str) else None,
        context=turns,
        context_vec=context_vec,
        created_at=row.created_at.timestamp(),
        expires_at=None if row.expires_at is None else row.expires_at.timestamp(),
        threshold=getattr(row, "threshold", None),
    )


class CubeIndex:
    """usearch HNSW over one cube's cached queries. Keys are small integers; entries map them back.

    Not thread-safe: after the build, only the event loop touches it.
    """

    def __init__(self, dims: int) -> None:
        from usearch.index import Index  # a compiled extension: loaded when the first cube is

        self.dims = dims
        # float16 halves the memory of float32 for similarities within 1e-4 of the exact ones (measured).
        self._index = Index(
            ndim=dims, metric="cos", dtype="f16", connectivity=16, expansion_add=64, expansion_search=64
        )
        self._entries: dict[int, Entry] = {}
        self._keys: dict[uuid.UUID, int] = {}
        self._next_key = 1
        self.removed = 0
        self.counts: Counter[str | None] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._keys

    def get(self, memory_id: uuid.UUID) -> Entry | None:
        key = self._keys.get(memory_id)
        return None if key is None else self._entries[key]

    def count(self, category: str | None) -> int:
        return self.counts[category]

    def add_many(self, entries: Sequence[Entry], vectors: Vector, threads: int = 0) -> None:
        """Bulk add (the build). Entries already present are replaced."""
        for entry in entries:
            self.remove(entry.id)
        keys = np.arange(self._next_key, self._next_key + len(entries), dtype=np.uint64)
        self._next_key += len(entries)
        if len(entries):
            self._index.add(keys, np.ascontiguousarray(vectors, dtype=np.float32), threads=threads)
        for key, entry in zip(keys.tolist(), entries, strict=True):
            self._entries[key] = entry
            self._keys[entry.id] = key
            self.counts[entry.category] += 1

    def upsert(self, entry: Entry, vector: Vector) -> None:
        self.add_many([entry], np.asarray(vector, dtype=np.float32).reshape(1, -1))

    def remove(self, memory_id: uuid.UUID) -> bool:
        key = self._keys.pop(memory_id, None)
        if key is None:
            return False
        entry = self._entries.pop(key)
        self.counts[entry.category] -= 1
        self._index.remove(key)
        self.removed += 1
        return True

    def search(self, vector: Vector, k: int) -> list[tuple[Entry, float]]:
        """Up to ``k`` entries nearest ``vector``, nearest first, with their cosine similarity."""
        if not self._entries:
            return []
        matches = self._index.search(np.asarray(vector, dtype=np.float32), min(k, len(self._entries)))
        out = []
        for key, distance in zip(matches.keys.tolist(), matches.distances.tolist(), strict=True):
            entry = self._entries.get(key)
            if entry is not None:
                out.append((entry, 1.0 - float(distance)))
        return out


# -- every cube this process knows -------------------------------------------------------------------------

Note = Callable[["CubeState", CubeIndex], None]


@dataclass(eq=False)
class CubeState:
    """What this process holds for one cube: its policy, and its index once built."""

    cube_id: uuid.UUID
    tenant_id: uuid.UUID
    """The cube's tenant: whose entries of the embedding LRU this cube's rows may use."""
    policy: CachePolicy
    policy_revision: int
    """The stored policy revision this ``policy`` is at least as new as."""
    index: CubeIndex | None = None
    building: asyncio.Task[None] | None = None
    pending: list[Note] = field(default_factory=list)
    synced_at: datetime | None = None
    """Postgres time up to which this index has seen the cube's writes."""
    next_sync: float = 0.0
    syncing: asyncio.Task[None] | None = None
    written_meanwhile: set[uuid.UUID] | None = None
    """While a catch-up reads Postgres: the memories this process wrote meanwhile, whose newer state its notes
    gave the index already (the catch-up's older rows for them are skipped)."""
    dropped: bool = False

    @property
    def index_state(self) -> str:
        if self.index is not None:
            return "ready"
        return "building" if self.building is not None else "cold"


def take_policy(state: CubeState, record: store.PolicyRecord) -> None:
    """``record`` as the state's policy, unless the state holds a newer one already (two reloads crossed)."""
    if record.revision >= state.policy_revision:
        state.policy, state.policy_revision = record.policy, record.revision


class CacheIndexes:
    """The per-cube states of this process: loaded on demand; past ``max_cubes``, the least recently used of a
    tenant holding more than its reserve is dropped (``memos.sharing``).

    It listens to memory writes (``memories_written``, ``memories_removed``) and cube deletions
    (``drop``), so this process's own writes reach its indexes as soon as they commit.
    """

    def __init__(
        self,
        db: Database,
        vectors: VectorLRU,
        *,
        max_cubes: int = 32,
        sync_seconds: float = 2.0,
        dims: int = 384,
    ) -> None:
        self.db = db
        self.vectors = vectors
        self.max_cubes = max_cubes
        self.sync_seconds = sync_seconds
        self.dims = dims
        self._states: OrderedDict[uuid.UUID, CubeState] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- states -------------------------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        """Cube states held, and the entries of their built indexes (for ``/metrics``)."""
        states = list(self._states.values())
        return len(states), sum(len(s.index) for s in states if s.index is not None)

    def peek(self, cube_id: uuid.UUID) -> CubeState | None:
        state = self._states.get(cube_id)
        if state is not None:
            self._states.move_to_end(cube_id)
        return state

    async def state(self, cube_id: uuid.UUID, tenant_id: uuid.UUID) -> CubeState:
        """The cube's state, loading its policy from Postgres the first time (callers check access first, so
        ``tenant_id``, the caller's, is the cube's)."""
        state = self.peek(cube_id)
        if state is not None:
            return state
        async with self.db.read() as conn:
            record = await store.load_policy(conn, cube_id)
        state = self.peek(cube_id)  # another task may have loaded it meanwhile
        if state is not None:
            return state
        state = CubeState(cube_id, tenant_id, record.policy, record.revision)
        self._states[cube_id] = state
        while len(self._states) > self.max_cubes:
            self._forget(
                self._states.pop(fair_victim(((c, s.tenant_id) for c, s in self._states.items()), self.max_cubes))
            )
        return state

    async def reload_policy(self, cube_id: uuid.UUID) -> None:
        """Re-read a cube's policy (after a configuration write or feedback, or seeing a newer revision)."""
        state = self._states.get(cube_id)
        if state is None:
            return
        async with self.db.read() as conn:
            record = await store.load_policy(conn, cube_id)
        take_policy(state, record)

    def _forget(self, state: CubeState) -> None:
        state.dropped = True
        state.index = None
        state.pending.clear()

    def drop(self, cube_id: uuid.UUID, memory_ids: Sequence[uuid.UUID] = ()) -> None:
        """The cube is gone (or must be reloaded): forget it; a build under way is discarded when it ends."""
        state = self._states.pop(cube_id, None)
        if state is not None:
            self._forget(state)

    # -- the index ----------------------------------------------------------------------------------

    async def index(self, state: CubeState, wait: float = 0.0) -> CubeIndex | None:
        """The cube's index if it is built; starts the build if not, and waits for it up to ``wait`` seconds."""
        if state.index is not None:
            self._maybe_sync(state)
            return state.index
        if state.building is None:
            state.building = self._spawn(self._build(state))
        if wait > 0:
            try:
                await asyncio.wait_for(asyncio.shield(state.building), timeout=wait)
            except TimeoutError:
                return None
        return state.index

    async def _build(self, state: CubeState) -> None:
        try:
            async with self.db.transaction() as conn:  # streaming needs a transaction (a server-side cursor)
                synced_at = await db_now(conn)
                rows = await store.live_entries(conn, state.cube_id, self.vectors.embedder.model)
            index = await asyncio.to_thread(self._build_index, rows)
            if state.dropped:
                return
            for note in state.pending:
                note(state, index)
            state.pending.clear()
            state.index = index
            state.synced_at = synced_at
            state.next_sync = time.monotonic() + self.sync_seconds
            log.info("cache index built", extra={"cube_id": str(state.cube_id), "entries": len(index)})
        except Exception:
            log.exception("building a cache index failed; lookups use pgvector until a retry succeeds")
        finally:
            state.building = None

    def _build_index(self, rows: Sequence[Any]) -> CubeIndex:
        index = CubeIndex(self.dims)
        entries: list[Entry] = []
        vectors: list[Vector] = []
        for row in rows:
            entry = entry_from_row(row)
            vector = decode_vector(row.vec)
            if entry is not None and vector is not None:
                entries.append(entry)
                vectors.append(vector)
        matrix = np.stack(vectors) if vectors else np.zeros((0, self.dims), dtype=np.float32)
        index.add_many(entries, matrix, threads=2)
        return index

    def _apply(self, cube_id: uuid.UUID, note: Note) -> None:
        state = self._states.get(cube_id)
        if state is None:
            return
        if state.index is not None:
            try:
                note(state, state.index)
            except Exception:
                # After the commit: the write stands and must not answer 500 for the index's sake; the index may
                # lack part of it, so it is loaded again on the cube's next lookup.
                log.exception("updating a cube's cache index failed; it is reloaded", extra={"cube_id": str(cube_id)})
                self.drop(cube_id)
                return
            self._maybe_compact(state)
        elif state.building is not None:
            state.pending.append(note)

    def _maybe_compact(self, state: CubeState) -> None:
        """HNSW keeps removed nodes in its graph: after many removals, rebuild from Postgres (pgvector meanwhile)."""
        index = state.index
        if index is not None and index.removed > max(COMPACT_AFTER, 2 * len(index)) and state.building is None:
            state.index = None
            state.building = self._spawn(self._build(state))

    def _upsert_rows(self, index: CubeIndex, rows: Iterable[Any], tenant_id: uuid.UUID) -> None:
        try:
            model: str | None = self.vectors.embedder.model
        except EmbedError:  # not loaded (an index exists only after a lookup, so not expected): keep the rows
            model = None
        for row in rows:
            if row.kind != "response":
                continue
            old = index.get(row.id)
            if old is not None and old.version >= row.version:
                continue
            vector = getattr(row, "vec", None)
            decoded = decode_vector(vector) if isinstance(vector, bytes) else None
            if decoded is None and getattr(row, "embedding", None) is not None:
                decoded = np.asarray(row.embedding, dtype=np.float32)
            live = (
                row.state == "active"
                and (row.expires_at is None or row.expires_at.timestamp() > time.time())
                # Embedded by another model (MEMOS_EMBED_MODEL changed): another vector space, not servable.
                and (model is None or getattr(row, "embedding_model", model) == model)
            )
            entry = entry_from_row(row, functools.partial(self.vectors.get, tenant_id)) if live else None
            if entry is None or decoded is None:
                index.remove(row.id)
                continue
            if old is not None and entry.threshold is None:
                entry.threshold = old.threshold  # the per-entry threshold lives beside the memory, not in it
            index.upsert(entry, decoded)

    def memories_written(self, cube_id: uuid.UUID, rows: Iterable[Any]) -> None:
        snapshot = [r for r in rows if r.kind == "response"]
        if snapshot:
            self._written_meanwhile(cube_id, [r.id for r in snapshot])
            self._apply(cube_id, lambda state, index: self._upsert_rows(index, snapshot, state.tenant_id))

    def memories_removed(self, cube_id: uuid.UUID, ids: Iterable[uuid.UUID]) -> None:
        gone = list(ids)
        self._written_meanwhile(cube_id, gone)

        def note(state: CubeState, index: CubeIndex) -> None:
            for memory_id in gone:
                entry = index.get(memory_id)
                if entry is not None:
                    # a deleted (or purged) answer's question and context leave the embedding LRU with it
                    self.vectors.discard(state.tenant_id, entry.query)
                    if entry.context:
                        self.vectors.discard(state.tenant_id, context_text(entry.context))
                index.remove(memory_id)

        self._apply(cube_id, note)

    def set_threshold(self, cube_id: uuid.UUID, memory_id: uuid.UUID, threshold: float) -> None:
        def note(_: CubeState, index: CubeIndex) -> None:
            entry = index.get(memory_id)
            if entry is not None:
                entry.threshold = threshold

        self._apply(cube_id, note)

    def _written_meanwhile(self, cube_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
        state = self._states.get(cube_id)
        if state is not None and state.written_meanwhile is not None:
            state.written_meanwhile.update(ids)

    # -- other processes' writes --------------------------------------------------------------------

    def _maybe_sync(self, state: CubeState) -> None:
        if state.syncing is not None or time.monotonic() < state.next_sync:
            return
        state.next_sync = time.monotonic() + self.sync_seconds
        state.syncing = self._spawn(self._sync(state))

    def request_sync(self, state: CubeState) -> None:
        """Catch up now (a lookup found the index behind Postgres)."""
        state.next_sync = 0.0
        self._maybe_sync(state)

    async def _sync(self, state: CubeState) -> None:
        try:
            if state.synced_at is None:
                return
            since = state.synced_at - SYNC_MARGIN
            state.written_meanwhile = set()
            async with self.db.read() as conn:
                now = await db_now(conn)
                rows = await store.changed_entries(conn, state.cube_id, since)
                revision = await store.policy_revision(conn, state.cube_id)
            if state.index is not None and not state.dropped:
                # A memory deleted or purged while the rows were read came back from them, its question held in
                # memory and counted against the quota until the next catch-up (a concurrency review): the
                # rows of memories this process wrote meanwhile are older than what their notes applied.
                newer = state.written_meanwhile
                self._upsert_rows(state.index, [r for r in rows if r.id not in newer], state.tenant_id)
                state.synced_at = now
            if revision > state.policy_revision:
                await self.reload_policy(state.cube_id)
        except Exception:
            log.exception("catching up a cache index failed; it retries at the next interval")
        finally:
            state.syncing = None
            state.written_meanwhile = None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down; errors were logged
                await task

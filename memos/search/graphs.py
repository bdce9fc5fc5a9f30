"""One in-memory ``MemoryGraph`` per cube: built from Postgres on first use, then kept current by writes.

The graph lives in this process only. It is built lazily (in a worker thread: entity extraction over a
big cube takes a while), bounded in node count, and the least recently used cubes are dropped when
too many are loaded. Writes that land while a cube is being built are replayed onto it afterwards.
Writes of other processes on the same database reach it through a catch-up read from Postgres, in the
background: every ``sync_seconds`` while graph searches use the graph, every ``COLD_SYNC_SECONDS`` after.

A write carrying much text extracts its entities in a worker thread too, so that it never holds up the event
loop; the cube's later writes wait behind it, and the graph takes every write in the order they came.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.graph.entities import entity_keys
from memos.graph.memgraph import EdgeKind, MemoryGraph
from memos.sharing import fair_victim
from memos.store.db import Database, db_now
from memos.store.models import memories, memory_links

# Link types written by users map onto the graph's edge kinds; provenance keeps its own kind.
_LINK_KIND = {"derived_from": EdgeKind.DERIVED_FROM, "knn": EdgeKind.KNN}


def edge_kind(link_type: str) -> tuple[EdgeKind, str | None]:
    """The graph's edge kind for a stored link's type, and its label: a user's link types all make ``link``
    edges, labelled with the type so that two links of different types between the same memories stay
    apart (the edge weighs the larger; deleting one leaves the other)."""
    kind = _LINK_KIND.get(link_type)
    return (kind, None) if kind is not None else (EdgeKind.LINK, link_type)


log = logging.getLogger(__name__)

OFF_LOOP_CHARS = 16_384
"""A write whose memories' texts add up to more than this many characters extracts their entities in a worker
thread. Extraction is linear in the text, at most a few microseconds a character: below this, it takes the
event loop for tens of milliseconds at worst."""

Note = Callable[[MemoryGraph], Awaitable[None] | None]
"""A write's change to a cube's graph: applied at once, or (when it returns an awaitable) over time, with the
cube's later notes waiting behind it."""


SYNC_MARGIN = timedelta(seconds=10)
"""A catch-up re-reads this far back: a row's ``created_at`` or ``updated_at`` is its transaction's or statement's
start, before its commit."""

SEEN_MAX = 50_000
"""Versions of its own writes a loaded graph remembers between catch-ups (``_Sync.seen``); past it, the graph
cannot tell them from other processes' writes and is rebuilt at its next use."""

CATCH_UP_MAX = 5_000
"""A catch-up finding more changed memories than this (and than half the graph) rebuilds the graph instead."""

WARM_SECONDS = 300.0
"""A graph a graph search used within this long catches up every ``sync_seconds`` in the background."""

COLD_SYNC_SECONDS = 30.0
"""A colder graph catches up this often (or at its next graph search): every loaded graph's catch-ups read a few
seconds' writes, never the backlog of a long idle spell."""

REMOVED = -1
"""``_Sync.seen``'s version for a memory this process deleted or purged (a catch-up reading it back, not active,
has nothing to apply)."""

# The versions of a cube's memories made or changed since a moment, or named: each arm has an index (created_at's,
# the partial index of changed memories of migration 0012, the primary key). The arms overlap. Versions first:
# most rows a catch-up reads back are at the version it has, and only the others' texts are read.
# Bounded (``limit``): past it, more memories changed than a catch-up applies (it rebuilds instead). Ordered by the
# indexed time: a generic plan (psycopg prepares a statement run often) took 45 ms on 100k memories without it,
# reading the cube rather than the index's few rows; 0.7 ms with it.
_CHANGED_MEMORIES = """
(SELECT id, version, state = 'active' AS active, 1 AS arm FROM memories
 WHERE cube_id = %(cube)s AND created_at > %(since)s ORDER BY created_at LIMIT %(limit)s)
UNION ALL
(SELECT id, version, state = 'active', 2 FROM memories
 WHERE cube_id = %(cube)s AND version > 1 AND updated_at > %(since)s ORDER BY updated_at LIMIT %(limit)s)
UNION ALL
SELECT id, version, state = 'active', 3 FROM memories WHERE cube_id = %(cube)s AND id = ANY(%(ids)s)
"""

_MEMORY_ROWS = """
SELECT id, state, version, content, metadata, expires_at FROM memories WHERE id = ANY(%(ids)s) AND cube_id = %(cube)s
"""

_EXISTING = "SELECT id FROM memories WHERE id = ANY(%(ids)s)"

# The links between active memories of the cube that touch the given memories.
_LINKS_TOUCHING = """
SELECT l.from_id, l.to_id, l.type, l.weight
FROM (
    SELECT id FROM memory_links WHERE from_id = ANY(%(ids)s)
    UNION
    SELECT id FROM memory_links WHERE to_id = ANY(%(ids)s)
) AS touching
JOIN memory_links l ON l.id = touching.id
JOIN memories s ON s.id = l.from_id
JOIN memories t ON t.id = l.to_id
WHERE s.cube_id = %(cube)s AND s.state = 'active' AND t.cube_id = %(cube)s AND t.state = 'active'
"""

# The links between active memories of the cube that its tenant wrote since a moment: ``POST .../links`` adds them on
# their own (knn links are only ever written with their memory, which the catch-up reads). Not bounded: every loaded
# graph catches up every few seconds, so this is a few seconds of one tenant's links. 'knn' is written out: a
# parameter there would not match the partial index's predicate under a generic plan.
_LINKS_SINCE = """
SELECT l.from_id, l.to_id, l.type, l.weight
FROM memory_links l
JOIN memories s ON s.id = l.from_id
JOIN memories t ON t.id = l.to_id
WHERE l.tenant_id = (SELECT tenant_id FROM cubes WHERE id = %(cube)s) AND l.type <> 'knn' AND l.created_at > %(since)s
  AND s.cube_id = %(cube)s AND s.state = 'active' AND t.cube_id = %(cube)s AND t.state = 'active'
"""


@dataclasses.dataclass(slots=True)
class _Sync:
    """Where a loaded graph stands against the writes of other processes."""

    graph: MemoryGraph
    read_at: datetime
    """The database's clock when the graph's memories were last read (its build, or the last catch-up)."""
    started_at: float = 0.0
    """When (``loop.time()``) the last catch-up started (or the graph was built)."""
    used_at: float = 0.0
    """When (``loop.time()``) a graph search last used the graph (``WARM_SECONDS``)."""
    task: asyncio.Task[None] | None = None
    touched: set[uuid.UUID] | None = None
    """While a catch-up reads: the memories this process's own writes changed meanwhile (their notes are at
    least as new as the rows read; they are read again next time)."""
    seen: dict[uuid.UUID, int] = dataclasses.field(default_factory=dict)
    """The version of each memory the last catch-up read, and of this process's writes since: a row read again at
    that version is not applied again."""
    overflow: bool = False
    """More own writes came than ``seen`` holds: the next catch-up rebuilds the graph instead."""
    retry: set[uuid.UUID] = dataclasses.field(default_factory=set)
    """Memories the last catch-up skipped (touched meanwhile): the next one reads them whatever their time."""

    def remember(self, versions: Iterable[tuple[uuid.UUID, int]]) -> None:
        """This process wrote these memories at these versions (``REMOVED``: deleted them). Bounded between two
        catch-ups: past ``SEEN_MAX`` the graph can no longer tell its own writes from others' and is rebuilt."""
        self.seen.update(versions)
        if len(self.seen) > SEEN_MAX:
            self.seen.clear()
            self.overflow = True


@dataclasses.dataclass(slots=True)
class _Queue:
    """The notes waiting behind a slow one (a big write's entity extraction) for one loaded graph."""

    graph: MemoryGraph
    notes: deque[Note] = dataclasses.field(default_factory=deque)


def node_fields(content: str | None, metadata: dict[str, Any], expires_at: datetime | None = None) -> dict[str, Any]:
    """What the graph needs to know about a memory: its text (for entities), its place in a session and
    when it expires (graph mode does not walk through an expired memory)."""
    speaker = metadata.get("speaker")
    session = metadata.get("session", metadata.get("thread"))
    turn = metadata.get("turn")
    return {
        "text": f"{speaker}: {content}" if isinstance(speaker, str) and content else content or "",
        "session": None if session is None else str(session),
        "turn": _turn(turn),
        "expires_at": None if expires_at is None else expires_at.timestamp(),
    }


_UPDATE_FAILED = "updating a cube's graph failed; it is rebuilt on next use"


def _turn(value: Any) -> float | None:
    """A turn number as the graph orders turns by; None for anything else. JSON bounds no integer's digits: one
    past float's range raised OverflowError on the write (a 500 after the commit) and in every build of the cube's
    graph, so its graph searches were 500s until the memory changed (found in a security review)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        turn = float(value)
    except OverflowError:
        return None
    return turn if math.isfinite(turn) else None


class CubeGraphs:
    def __init__(
        self,
        db: Database,
        *,
        max_cubes: int = 32,
        max_nodes: int = 100_000,
        max_links: int = 1_000_000,
        sync_seconds: float = 2.0,
    ) -> None:
        self.db = db
        self.max_cubes = max_cubes
        self.max_nodes = max_nodes
        self.max_links = max_links
        """Links a cube's graph holds at most (``MemoryGraph``'s ``max_links``); a build reads no more."""
        self.sync_seconds = sync_seconds
        """A warm graph catches up with other processes' writes this often (0: at every graph search, never in the
        background)."""
        self._syncs: dict[uuid.UUID, _Sync] = {}
        self._catching: set[asyncio.Task[None]] = set()
        self._sync_loop: asyncio.Task[None] | None = None
        self._graphs: OrderedDict[uuid.UUID, MemoryGraph] = OrderedDict()
        self._tenants: dict[uuid.UUID, uuid.UUID | None] = {}
        """The tenant of each cube whose graph is held, as the query that built it said (``fair_victim``)."""
        self._building: dict[uuid.UUID, asyncio.Future[MemoryGraph]] = {}
        self._pending: dict[uuid.UUID, list[Note]] = {}
        self._stale: set[uuid.UUID] = set()
        self._background: dict[uuid.UUID, asyncio.Task[MemoryGraph]] = {}
        self._queues: dict[uuid.UUID, _Queue] = {}
        self._drains: set[asyncio.Task[None]] = set()

    def sizes(self) -> tuple[int, int]:
        """Graphs held, and their nodes (for ``/metrics``)."""
        graphs = list(self._graphs.values())
        return len(graphs), sum(len(g) for g in graphs)

    async def get_within(
        self, cube_id: uuid.UUID, seconds: float, tenant_id: uuid.UUID | None = None
    ) -> MemoryGraph | None:
        """The cube's graph if it is loaded or builds within ``seconds``; else None, and it goes on building.
        ``tenant_id``: the cube's; past ``max_cubes`` the graph dropped is the least recently used of a tenant
        holding more than its reserve (``memos.sharing``).

        A big cube's first build takes a while (entity extraction over 100k memories: about 20 s on two
        cores); a query should not wait that long. The build carries on in a task of its own, and a later
        query finds the graph ready.
        """
        graph = self._graphs.get(cube_id)
        if graph is not None:
            self._graphs.move_to_end(cube_id)
            self._maybe_catch_up(cube_id)
            return graph
        task = self._background.get(cube_id)
        if task is None:
            task = asyncio.ensure_future(self.get(cube_id, tenant_id))
            self._background[cube_id] = task
            task.add_done_callback(lambda done: self._built(cube_id, done))
        try:
            # Shielded: this query giving up must not cancel the build.
            return await asyncio.wait_for(asyncio.shield(task), timeout=seconds)
        except TimeoutError:
            return None

    async def close(self) -> None:
        """Stop the background builds under way, and the writes waiting on an entity extraction (at shutdown,
        before the database goes).

        A build or an extraction already in its worker thread runs to its end there (a thread cannot be
        interrupted); nothing waits for it or keeps its result.
        """
        # Again until none is left: a write that lands while the others stop starts a drain of its own.
        loops = [self._sync_loop] if self._sync_loop is not None else []
        while tasks := [
            t for t in (*self._background.values(), *self._drains, *self._catching, *loops) if not t.done()
        ]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _built(self, cube_id: uuid.UUID, task: asyncio.Task[MemoryGraph]) -> None:
        if self._background.get(cube_id) is task:
            del self._background[cube_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failed build is retried by the next query, not logged as unretrieved

    async def get(self, cube_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> MemoryGraph:
        graph = self._graphs.get(cube_id)
        if graph is not None:
            self._graphs.move_to_end(cube_id)
            self._maybe_catch_up(cube_id)
            return graph
        building = self._building.get(cube_id)
        if building is not None:
            return await asyncio.shield(building)
        future: asyncio.Future[MemoryGraph] = asyncio.get_running_loop().create_future()
        self._building[cube_id] = future
        self._pending[cube_id] = []
        try:
            async with self.db.read() as conn:
                rows, links, read_at = await self._load(conn, cube_id)
            graph = await asyncio.to_thread(self._build, rows, links)
            pending = self._pending[cube_id]
            while pending:  # a slow note lets more writes land meanwhile: they queue up here, in order
                if (slow := pending.pop(0)(graph)) is not None:
                    await slow
            del self._pending[cube_id]
            if cube_id in self._stale:  # dropped while building: serve this query, rebuild next time
                self._stale.discard(cube_id)
                future.set_result(graph)
                return graph
            self._graphs[cube_id] = graph
            self._tenants[cube_id] = tenant_id
            # The first catch-up reads again what changed within the margin before the build's read: what the build
            # read at the same version is not applied twice.
            recent = {row.id: row.version for row in rows if row.updated_at > read_at - SYNC_MARGIN}
            now = self._now()
            self._syncs[cube_id] = _Sync(graph, read_at, started_at=now, used_at=now, seen=recent)
            self._start_sync_loop()
            while len(self._graphs) > self.max_cubes:
                self._forget(fair_victim(((c, self._tenants.get(c)) for c in self._graphs), self.max_cubes))
            future.set_result(graph)
            return graph
        except BaseException as exc:
            self._pending.pop(cube_id, None)
            future.set_exception(exc)
            future.exception()  # retrieved: other waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._building[cube_id]

    async def _load(self, conn: AsyncConnection, cube_id: uuid.UUID) -> tuple[list[Any], list[Any], datetime]:
        """The cube's active memories and the links between them, and the database's clock before they were read
        (where the first catch-up starts)."""
        read_at = await db_now(conn)
        rows = (
            await conn.execute(
                select(
                    memories.c.id,
                    memories.c.content,
                    memories.c.metadata,
                    memories.c.expires_at,
                    memories.c.version,
                    memories.c.updated_at,
                )
                .where(memories.c.cube_id == cube_id, memories.c.state == "active")
                .order_by(memories.c.created_at, memories.c.id)
                .limit(self.max_nodes)
            )
        ).all()
        # Only links between the cube's active memories (the graph's nodes) count against max_links: the links
        # of deleted or archived memories stay stored, and under a bare LIMIT they filled it (found in review).
        source, target = memories.alias("source"), memories.alias("target")
        query = (
            select(memory_links.c.from_id, memory_links.c.to_id, memory_links.c.type, memory_links.c.weight)
            .join(source, source.c.id == memory_links.c.from_id)
            .join(target, target.c.id == memory_links.c.to_id)
            .where(
                source.c.cube_id == cube_id,
                source.c.state == "active",
                target.c.cube_id == cube_id,
                target.c.state == "active",
            )
        )
        links = (await conn.execute(query.limit(self.max_links + 1))).all()
        if len(links) > self.max_links:
            # Past the bound: user links and provenance first, then the newest, the same ones in every rebuild.
            # (Within it the rows come as stored: an order by time would break the ties of links written by one
            # statement by their random ids, and with them the walk's ties, differently in every deployment.)
            order = (memory_links.c.type == EdgeKind.KNN.value, memory_links.c.created_at.desc(), memory_links.c.id)
            links = (await conn.execute(query.order_by(*order).limit(self.max_links))).all()
        return list(rows), list(links), read_at

    def _build(self, rows: Iterable[Any], links: Iterable[Any]) -> MemoryGraph:
        graph = MemoryGraph(max_nodes=self.max_nodes, max_links=self.max_links)
        for row in rows:
            graph.add_memory(row.id, **node_fields(row.content, row.metadata, row.expires_at))
        add_stored_links(graph, links)
        return graph

    # -- keeping loaded graphs current -------------------------------------------------------------------------

    def _apply(self, cube_id: uuid.UUID, note: Note, *, slow: bool = False) -> None:
        """Apply a note to the cube's loaded graph, or keep it for the graph being built. A ``slow`` note (it
        returns an awaitable) is applied in a task of its own, and the cube's next notes wait behind it."""
        graph = self._graphs.get(cube_id)
        if graph is None:
            if cube_id in self._pending:
                self._pending[cube_id].append(note)
            return
        queue = self._queues.get(cube_id)
        if queue is not None and queue.graph is graph:
            queue.notes.append(note)  # behind a slow note: the graph takes the cube's writes in order
        elif slow:
            queue = self._queues[cube_id] = _Queue(graph, deque([note]))
            task = asyncio.get_running_loop().create_task(self._drain(cube_id, queue))
            self._drains.add(task)
            task.add_done_callback(lambda done: self._drained(cube_id, queue, done))
        else:
            try:
                note(graph)
            except Exception:
                # After the commit: the write stands and must not answer 500 for its graph's sake. The graph may
                # lack part of it, so the next query rebuilds it.
                log.exception(_UPDATE_FAILED, extra={"cube_id": str(cube_id)})
                self.drop(cube_id)

    async def _drain(self, cube_id: uuid.UUID, queue: _Queue) -> None:
        """Apply the queued notes in order while the graph is still the cube's (it may be dropped meanwhile)."""
        ok = False
        try:
            while queue.notes and self._graphs.get(cube_id) is queue.graph:
                if (slow := queue.notes.popleft()(queue.graph)) is not None:
                    await slow
            ok = True
        except Exception:
            log.exception(_UPDATE_FAILED, extra={"cube_id": str(cube_id)})
        finally:
            self._end_queue(cube_id, queue, ok)  # at once: a note that comes next must not join a finished queue

    def _drained(self, cube_id: uuid.UUID, queue: _Queue, task: asyncio.Task[None]) -> None:
        self._drains.discard(task)
        if task.cancelled():  # perhaps before it started (at shutdown): then nothing above ended the queue
            self._end_queue(cube_id, queue, ok=False)

    def _end_queue(self, cube_id: uuid.UUID, queue: _Queue, ok: bool) -> None:
        if self._queues.get(cube_id) is queue:
            del self._queues[cube_id]
        if not ok and self._graphs.get(cube_id) is queue.graph:
            # It may lack part of a write (a note failed, or shutdown): the next query rebuilds it.
            self._forget(cube_id)

    async def settled(self) -> None:
        """Wait until the writes queued behind entity extractions in worker threads are in their graphs."""
        while self._drains:
            await asyncio.gather(*self._drains, return_exceptions=True)

    def memories_written(self, cube_id: uuid.UUID, rows: Iterable[Any]) -> None:
        """New or changed memories (rows with id, state, content, metadata, expires_at).

        When their texts add up to more than ``OFF_LOOP_CHARS``, their entities are extracted in a worker
        thread, one memory at a time, and the cube's later writes wait behind them (searches meanwhile see
        the graph as it was). While the thread reads the entity keys the graph holds (``known``), nothing
        changes the graph but removals (``_remove_at_once``), so it ends as if extraction had run on the event
        loop, or as if those removals had come first.
        """
        rows = list(rows)
        snapshot = [(r.id, r.state, r.content, r.metadata, r.expires_at) for r in rows]
        self._touch(cube_id, (memory_id for memory_id, *_ in snapshot))
        if (sync := self._syncs.get(cube_id)) is not None:
            # A catch-up reading these rows back at this version has nothing to apply.
            sync.remember((r.id, r.version) for r in rows if getattr(r, "version", None) is not None)
        note, slow = _memories_note(snapshot)
        self._remove_at_once(cube_id, [memory_id for memory_id, state, _, _, _ in snapshot if state != "active"])
        self._apply(cube_id, note, slow=slow)

    def memories_removed(self, cube_id: uuid.UUID, ids: Iterable[uuid.UUID]) -> None:
        """Deleted or purged memories leave the graph (with their edges)."""
        gone = list(ids)
        self._touch(cube_id, gone)
        if (sync := self._syncs.get(cube_id)) is not None:
            sync.remember((memory_id, REMOVED) for memory_id in gone)

        def note(graph: MemoryGraph) -> None:
            for memory_id in gone:
                graph.remove_memory(memory_id)

        self._remove_at_once(cube_id, gone)
        self._apply(cube_id, note)

    def _remove_at_once(self, cube_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
        """Memories that left the cube's active set leave its loaded graph now, even behind a slow note: queued,
        a deleted memory stayed in the graph while a big write's entities were extracted, and graph search walked
        through it and named it in ``via`` (found in review). The removal stays queued in its place too, in case
        a note before it adds one of them back. Only membership of the graph's entity keys is read meanwhile by
        the extraction (``known_entities``), which a removal may change: as if the deletion had come first."""
        graph = self._graphs.get(cube_id)
        queue = self._queues.get(cube_id)
        if ids and graph is not None and queue is not None and queue.graph is graph:
            for memory_id in ids:
                graph.remove_memory(memory_id)

    def links_written(self, cube_id: uuid.UUID, links: Iterable[tuple[uuid.UUID, uuid.UUID, str, float]]) -> None:
        snapshot = list(links)
        self._touch(cube_id, (end for a, b, _, _ in snapshot for end in (a, b)))

        def note(graph: MemoryGraph) -> None:
            for a, b, link_type, weight in snapshot:
                kind, label = edge_kind(link_type)
                graph.add_edge(a, b, kind, max(weight, 1e-6), label=label)

        self._apply(cube_id, note)

    def links_removed(self, cube_id: uuid.UUID, links: Iterable[tuple[uuid.UUID, uuid.UUID, str]]) -> None:
        snapshot = list(links)
        self._touch(cube_id, (end for a, b, _ in snapshot for end in (a, b)))

        def note(graph: MemoryGraph) -> None:
            for a, b, link_type in snapshot:
                kind, label = edge_kind(link_type)
                graph.remove_edge(a, b, kind, label=label)

        self._apply(cube_id, note)

    def drop(self, cube_id: uuid.UUID) -> None:
        """Forget a cube's graph (it is rebuilt on next use; the writes queued for it are dropped with it)."""
        self._forget(cube_id)
        if cube_id in self._building:
            self._stale.add(cube_id)

    def _forget(self, cube_id: uuid.UUID) -> None:
        self._graphs.pop(cube_id, None)
        self._tenants.pop(cube_id, None)
        self._syncs.pop(cube_id, None)  # a catch-up under way finds its graph gone and applies nothing

    # -- other processes' writes -----------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _touch(self, cube_id: uuid.UUID, ids: Iterable[uuid.UUID]) -> None:
        sync = self._syncs.get(cube_id)
        if sync is not None and sync.touched is not None:
            sync.touched.update(ids)

    def _maybe_catch_up(self, cube_id: uuid.UUID, *, searched: bool = True) -> asyncio.Task[None] | None:
        """Start a catch-up of the cube's loaded graph in the background, if none runs and it is time: every
        ``sync_seconds`` while graph searches use it, ``COLD_SYNC_SECONDS`` after. The catch-up under way, if any."""
        sync = self._syncs.get(cube_id)
        if sync is None:
            return None
        now = self._now()
        if searched:
            sync.used_at = now
        every = self.sync_seconds if now - sync.used_at <= WARM_SECONDS else max(self.sync_seconds, COLD_SYNC_SECONDS)
        if sync.task is None and now - sync.started_at >= every:
            sync.started_at = now
            sync.task = task = asyncio.get_running_loop().create_task(self._catch_up(cube_id, sync))
            self._catching.add(task)
            task.add_done_callback(self._catching.discard)
        return sync.task

    def _start_sync_loop(self) -> None:
        if self.sync_seconds > 0 and (self._sync_loop is None or self._sync_loop.done()):
            self._sync_loop = asyncio.get_running_loop().create_task(self._keep_graphs_current())

    async def _keep_graphs_current(self) -> None:
        """Catch up the loaded graphs that are due (``_maybe_catch_up``), one at a time (one pooled connection), until
        no graph is loaded."""
        while self._syncs:
            await asyncio.sleep(self.sync_seconds)
            for cube_id in list(self._syncs):
                task = self._maybe_catch_up(cube_id, searched=False)
                if task is not None:
                    await asyncio.wait([task])

    async def _catch_up(self, cube_id: uuid.UUID, sync: _Sync) -> None:
        """Read from Postgres the cube's memories made or changed since the graph's last read (by any process) and
        the links touching them or written since, then apply them in order with this process's own writes: a
        changed memory gets its node updated (or removed) and its links replaced by those stored."""
        retry, sync.retry = sync.retry, set()
        try:
            if sync.overflow:
                self.drop(cube_id)  # its own writes are no longer told apart: rebuilt at the next graph search
                return
            sync.touched = set()
            most = max(CATCH_UP_MAX, len(sync.graph) // 2)
            limit = most + len(sync.seen) + 1  # an arm this long has more than ``most`` memories not seen
            since = sync.read_at - SYNC_MARGIN
            params: dict[str, Any] = {"cube": cube_id, "since": since, "ids": list(retry), "limit": limit}
            async with self.db.read() as conn:
                read_at = await db_now(conn)
                rows = (await conn.exec_driver_sql(_CHANGED_MEMORIES, params)).all()
                if self._syncs.get(cube_id) is not sync:
                    return  # dropped meanwhile
                versions = {row.id: row.version for row in rows}
                # A memory read again for a retry is applied whatever its version: links of it were left out. One
                # this process removed and still not active has nothing to apply.
                changed = list(dict.fromkeys(row.id for row in rows if row.id in retry or not _applied(sync, row)))
                full = any(sum(row.arm == arm for row in rows) >= limit for arm in (1, 2))
                if full or len(changed) > most:
                    self.drop(cube_id)  # cheaper rebuilt than caught up; the next graph search starts the build
                    return
                fresh = (await conn.exec_driver_sql(_MEMORY_ROWS, {**params, "ids": changed})).all() if changed else []
                relinked = [row.id for row in fresh if row.state == "active"]
                links = list(await conn.exec_driver_sql(_LINKS_SINCE, params))
                if relinked:
                    links += await conn.exec_driver_sql(_LINKS_TOUCHING, {**params, "ids": relinked})
                # A purge deletes the activation memories made from its memory, rows and all: a catch-up never
                # reads them. They go with the memory they were derived from, if their rows are gone.
                gone = [row.id for row in fresh if row.state != "active"]
                derived: set[Any] = {
                    o for m in gone if m in sync.graph for o, kind, _ in sync.graph.edges(m) if kind == "derived_from"
                }
                if derived:
                    left = {row.id for row in await conn.exec_driver_sql(_EXISTING, {"ids": list(derived)})}
                    derived -= left
            if self._syncs.get(cube_id) is not sync:
                return
            touched = sync.touched
            # Skipped for now, read again next time: the memories this process wrote meanwhile, and the touched ends
            # of links left out (the other end's links were replaced without them).
            sync.retry.update(row.id for row in fresh if row.id in touched)
            sync.retry.update(end for x in links for end in (x.from_id, x.to_id) if end in touched)
            versions.update((row.id, row.version) for row in fresh)  # as applied (perhaps newer than first read)
            sync.seen = {i: version for i, version in versions.items() if i not in touched}
            sync.read_at = read_at
            applied = [row for row in fresh if row.id not in touched]
            kept = [x for x in links if x.from_id not in touched and x.to_id not in touched]
            if applied or kept or derived:
                self._apply_caught_up(cube_id, applied, kept, derived - touched)
        except Exception:
            sync.retry |= retry
            log.exception("catching up a cube's graph failed; the next catch-up tries again")
        finally:
            sync.touched = None
            sync.task = None

    def _apply_caught_up(self, cube_id: uuid.UUID, rows: list[Any], links: list[Any], gone: set[uuid.UUID]) -> None:
        snapshot = [(r.id, r.state, r.content, r.metadata, r.expires_at) for r in rows]
        snapshot.extend((memory_id, "deleted", None, {}, None) for memory_id in gone)
        write, slow = _memories_note(snapshot)
        relinked = [memory_id for memory_id, state, *_ in snapshot if state == "active"]

        def relink(graph: MemoryGraph) -> None:
            for memory_id in relinked:
                if memory_id in graph:
                    graph.clear_links(memory_id)
            add_stored_links(graph, links)

        async def slow_note(graph: MemoryGraph) -> None:
            written = write(graph)
            if written is not None:
                await written
            relink(graph)

        def note(graph: MemoryGraph) -> None:
            write(graph)
            relink(graph)

        self._remove_at_once(cube_id, [memory_id for memory_id, state, *_ in snapshot if state != "active"])
        self._apply(cube_id, slow_note if slow else note, slow=slow)


def _applied(sync: _Sync, row: Any) -> bool:
    """The graph has the memory of ``row`` (id, version, active) as it is: at that version, or removed by this
    process and still not active."""
    seen = sync.seen.get(row.id)
    return seen == row.version or (seen == REMOVED and not row.active)


def add_stored_links(graph: MemoryGraph, links: Iterable[Any]) -> None:
    """Stored links (rows with from_id, to_id, type, weight) as the graph's edges."""
    for link in links:
        kind, label = edge_kind(link.type)
        graph.add_edge(link.from_id, link.to_id, kind, max(link.weight, 1e-6), label=label)


def _memories_note(
    snapshot: list[tuple[uuid.UUID, str, str | None, dict[str, Any], datetime | None]],
) -> tuple[Note, bool]:
    """The note that puts memories (id, state, content, metadata, expires_at) in a graph, or takes them out, and
    whether it is slow: past ``OFF_LOOP_CHARS`` of text it extracts their entities in a worker thread, one memory
    at a time."""

    def note(graph: MemoryGraph) -> None:
        for memory_id, state, content, metadata, expires_at in snapshot:
            if state == "active":
                graph.add_memory(memory_id, **node_fields(content, metadata, expires_at))
            else:
                graph.remove_memory(memory_id)

    async def slow_note(graph: MemoryGraph) -> None:
        for memory_id, state, content, metadata, expires_at in snapshot:
            if state == "active":
                fields = node_fields(content, metadata, expires_at)
                keys = await asyncio.to_thread(entity_keys, fields.pop("text"), known=graph.known_entities)
                graph.add_memory(memory_id, entities=keys, **fields)
            else:
                graph.remove_memory(memory_id)

    size = sum(len(content) for _, state, content, _, _ in snapshot if state == "active" and content)
    return (slow_note, True) if size > OFF_LOOP_CHARS else (note, False)

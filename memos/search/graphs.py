"""One in-memory ``MemoryGraph`` per cube: built from Postgres on first use, then kept current by writes.

The graph lives in this process only. It is built lazily (in a worker thread: entity extraction over a
big cube takes a while), bounded in node count, and the least recently used cubes are dropped when
too many are loaded. Writes that land while a cube is being built are replayed onto it afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.graph.memgraph import EdgeKind, MemoryGraph
from memos.store.db import Database
from memos.store.models import memories, memory_links

# Link types written by users map onto the graph's edge kinds; provenance keeps its own kind.
_LINK_KIND = {"derived_from": EdgeKind.DERIVED_FROM, "knn": EdgeKind.KNN}

Note = Callable[[MemoryGraph], None]


def node_fields(content: str | None, metadata: dict[str, Any], expires_at: datetime | None = None) -> dict[str, Any]:
    """What the graph needs to know about a memory: its text (for entities), its place in a session and
    when it expires (graph mode does not walk through an expired memory)."""
    speaker = metadata.get("speaker")
    session = metadata.get("session", metadata.get("thread"))
    turn = metadata.get("turn")
    return {
        "text": f"{speaker}: {content}" if isinstance(speaker, str) and content else content or "",
        "session": None if session is None else str(session),
        "turn": float(turn) if isinstance(turn, int | float) and not isinstance(turn, bool) else None,
        "expires_at": None if expires_at is None else expires_at.timestamp(),
    }


class CubeGraphs:
    def __init__(self, db: Database, *, max_cubes: int = 32, max_nodes: int = 100_000) -> None:
        self.db = db
        self.max_cubes = max_cubes
        self.max_nodes = max_nodes
        self._graphs: OrderedDict[uuid.UUID, MemoryGraph] = OrderedDict()
        self._building: dict[uuid.UUID, asyncio.Future[MemoryGraph]] = {}
        self._pending: dict[uuid.UUID, list[Note]] = {}
        self._stale: set[uuid.UUID] = set()
        self._background: dict[uuid.UUID, asyncio.Task[MemoryGraph]] = {}

    def sizes(self) -> tuple[int, int]:
        """Graphs held, and their nodes (for ``/metrics``)."""
        graphs = list(self._graphs.values())
        return len(graphs), sum(len(g) for g in graphs)

    async def get_within(self, cube_id: uuid.UUID, seconds: float) -> MemoryGraph | None:
        """The cube's graph if it is loaded or builds within ``seconds``; else None, and it goes on building.

        A big cube's first build takes a while (entity extraction over 100k memories: about 20 s on two
        cores); a query should not wait that long. The build carries on in a task of its own, and a later
        query finds the graph ready.
        """
        graph = self._graphs.get(cube_id)
        if graph is not None:
            self._graphs.move_to_end(cube_id)
            return graph
        task = self._background.get(cube_id)
        if task is None:
            task = asyncio.ensure_future(self.get(cube_id))
            self._background[cube_id] = task
            task.add_done_callback(lambda done: self._built(cube_id, done))
        try:
            # Shielded: this query giving up must not cancel the build.
            return await asyncio.wait_for(asyncio.shield(task), timeout=seconds)
        except TimeoutError:
            return None

    async def close(self) -> None:
        """Stop the background builds under way (at shutdown, before the database goes).

        A build already in its worker thread runs to its end there (a thread cannot be interrupted);
        nothing waits for it or keeps its graph.
        """
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _built(self, cube_id: uuid.UUID, task: asyncio.Task[MemoryGraph]) -> None:
        if self._background.get(cube_id) is task:
            del self._background[cube_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failed build is retried by the next query, not logged as unretrieved

    async def get(self, cube_id: uuid.UUID) -> MemoryGraph:
        graph = self._graphs.get(cube_id)
        if graph is not None:
            self._graphs.move_to_end(cube_id)
            return graph
        building = self._building.get(cube_id)
        if building is not None:
            return await asyncio.shield(building)
        future: asyncio.Future[MemoryGraph] = asyncio.get_running_loop().create_future()
        self._building[cube_id] = future
        self._pending[cube_id] = []
        try:
            async with self.db.read() as conn:
                rows, links = await self._load(conn, cube_id)
            graph = await asyncio.to_thread(self._build, rows, links)
            for note in self._pending.pop(cube_id, []):
                note(graph)
            if cube_id in self._stale:  # dropped while building: serve this query, rebuild next time
                self._stale.discard(cube_id)
                future.set_result(graph)
                return graph
            self._graphs[cube_id] = graph
            while len(self._graphs) > self.max_cubes:
                self._graphs.popitem(last=False)
            future.set_result(graph)
            return graph
        except BaseException as exc:
            self._pending.pop(cube_id, None)
            future.set_exception(exc)
            future.exception()  # retrieved: other waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._building[cube_id]

    async def _load(self, conn: AsyncConnection, cube_id: uuid.UUID) -> tuple[list[Any], list[Any]]:
        rows = (
            await conn.execute(
                select(memories.c.id, memories.c.content, memories.c.metadata, memories.c.expires_at)
                .where(memories.c.cube_id == cube_id, memories.c.state == "active")
                .order_by(memories.c.created_at, memories.c.id)
                .limit(self.max_nodes)
            )
        ).all()
        links = (
            await conn.execute(
                select(memory_links.c.from_id, memory_links.c.to_id, memory_links.c.type, memory_links.c.weight)
                .join(memories, memories.c.id == memory_links.c.from_id)
                .where(memories.c.cube_id == cube_id)
            )
        ).all()
        return list(rows), list(links)

    def _build(self, rows: Iterable[Any], links: Iterable[Any]) -> MemoryGraph:
        graph = MemoryGraph(max_nodes=self.max_nodes)
        for row in rows:
            graph.add_memory(row.id, **node_fields(row.content, row.metadata, row.expires_at))
        for link in links:
            graph.add_edge(link.from_id, link.to_id, _LINK_KIND.get(link.type, EdgeKind.LINK), max(link.weight, 1e-6))
        return graph

    # -- keeping loaded graphs current -------------------------------------------------------------------------

    def _apply(self, cube_id: uuid.UUID, note: Note) -> None:
        graph = self._graphs.get(cube_id)
        if graph is not None:
            note(graph)
        elif cube_id in self._pending:
            self._pending[cube_id].append(note)

    def memories_written(self, cube_id: uuid.UUID, rows: Iterable[Any]) -> None:
        """New or changed memories (rows with id, state, content, metadata, expires_at)."""
        snapshot = [(r.id, r.state, r.content, r.metadata, r.expires_at) for r in rows]

        def note(graph: MemoryGraph) -> None:
            for memory_id, state, content, metadata, expires_at in snapshot:
                if state == "active":
                    graph.add_memory(memory_id, **node_fields(content, metadata, expires_at))
                else:
                    graph.remove_memory(memory_id)

        self._apply(cube_id, note)

    def memories_removed(self, cube_id: uuid.UUID, ids: Iterable[uuid.UUID]) -> None:
        """Deleted or purged memories leave the graph (with their edges)."""
        gone = list(ids)

        def note(graph: MemoryGraph) -> None:
            for memory_id in gone:
                graph.remove_memory(memory_id)

        self._apply(cube_id, note)

    def links_written(self, cube_id: uuid.UUID, links: Iterable[tuple[uuid.UUID, uuid.UUID, str, float]]) -> None:
        snapshot = list(links)

        def note(graph: MemoryGraph) -> None:
            for a, b, kind, weight in snapshot:
                graph.add_edge(a, b, _LINK_KIND.get(kind, EdgeKind.LINK), max(weight, 1e-6))

        self._apply(cube_id, note)

    def links_removed(self, cube_id: uuid.UUID, links: Iterable[tuple[uuid.UUID, uuid.UUID, str]]) -> None:
        snapshot = list(links)

        def note(graph: MemoryGraph) -> None:
            for a, b, kind in snapshot:
                graph.remove_edge(a, b, _LINK_KIND.get(kind, EdgeKind.LINK))

        self._apply(cube_id, note)

    def drop(self, cube_id: uuid.UUID) -> None:
        """Forget a cube's graph (it is rebuilt on next use)."""
        self._graphs.pop(cube_id, None)
        if cube_id in self._building:
            self._stale.add(cube_id)

"""Which memories sit in the HNSW index: those of cubes past ``EXACT_CUBE_MAX`` embedded memories.

Below that size a cube's nearest neighbours come from an exact scan of its rows (about 1.6 µs a row in
Postgres on the 2-core box: 3 ms for 2,000), which is exact and costs a write nothing, while keeping
HNSW up to date cost about 1 ms of Postgres CPU per memory written (most of a batch create's database
time). Past the size, the cube's memories move into the index in the background and its new memories
are written there. ``memories.ann`` marks a memory in the index (migration 0006). Search and the
write-time kNN links read both sets, so where a memory sits changes how fast it is found, never
whether: a write that races the move and lands outside is found all the same, and moved on the
cube's next write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.db import Database

log = logging.getLogger(__name__)

EXACT_CUBE_MAX = 2000
"""A cube with this many embedded memories moves them into the HNSW index (migration 0006 used 2000)."""

MOVE_CHUNK = 500
"""Memories moved into the index per transaction: each one is an HNSW insert, about 1 ms."""


def indexed_sql(cube: str) -> str:
    """SQL for "cube ``cube`` (an SQL expression) has memories in the HNSW index": one probe of a partial index."""
    return f"EXISTS (SELECT 1 FROM memories x WHERE x.cube_id = {cube} AND x.ann)"  # noqa: S608


# Constant fragments only; the cube is a bound parameter.
_INDEXED_SQL = f"SELECT {indexed_sql(':cube')} AS indexed"
_STATE_SQL = f"""
    SELECT {indexed_sql(":cube")} AS indexed,
           (SELECT count(*) FROM (
                SELECT 1 FROM memories WHERE cube_id = :cube AND NOT ann AND embedding IS NOT NULL LIMIT :most
            ) AS outside) AS outside
    """  # noqa: S608
_INDEXED = text(_INDEXED_SQL)
_STATE = text(_STATE_SQL)

_CUBE_LIVE = text("SELECT 1 FROM cubes WHERE id = :cube AND deleted_at IS NULL FOR SHARE")
_MOVE = text(
    """
    UPDATE memories SET ann = true
    WHERE id IN (
        SELECT id FROM memories WHERE cube_id = :cube AND NOT ann AND embedding IS NOT NULL LIMIT :chunk
    )
    """
)


@dataclasses.dataclass(frozen=True, slots=True)
class CubeIndexing:
    indexed: bool
    """The cube is past the size: its new memories go into the HNSW index."""
    outside: int
    """Its embedded memories outside the index, counted up to ``EXACT_CUBE_MAX``."""

    def move_after(self, written: int) -> bool:
        """Whether the cube's memories should move into the index once ``written`` embedded memories, written
        as this state said (inside the index if ``indexed``), have committed."""
        if self.indexed:
            return self.outside > 0
        return self.outside + written >= EXACT_CUBE_MAX


async def cube_indexing(conn: AsyncConnection, cube_id: uuid.UUID) -> CubeIndexing:
    """Whether the cube is past the size, and how many of its memories are outside the index (for a write)."""
    row = (await conn.execute(_STATE, {"cube": cube_id, "most": EXACT_CUBE_MAX})).one()
    return CubeIndexing(indexed=bool(row.indexed), outside=int(row.outside))


async def cube_indexed(conn: AsyncConnection, cube_id: uuid.UUID) -> bool:
    """Whether the cube is past the size (the knn links of a re-embedded memory), without counting."""
    return bool((await conn.execute(_INDEXED, {"cube": cube_id})).scalar_one())


class IndexMover:
    """Moves cubes' memories into the HNSW index in the background: one task per cube, cancelled on close."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}

    def schedule(self, cube_id: uuid.UUID) -> None:
        if cube_id in self._tasks:
            return
        task = asyncio.create_task(self._move(cube_id), name=f"ann-move-{cube_id}")
        self._tasks[cube_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(cube_id, None))

    async def wait(self) -> None:
        """Until every move scheduled so far has finished (tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _move(self, cube_id: uuid.UUID) -> None:
        moved = 0
        try:
            while True:
                # A transaction per chunk: row locks are short, and a failure keeps what already moved.
                async with self._db.transaction() as conn:
                    # The cube's row first, shared, as every write that locks memories takes it: a cube's deletion
                    # (the cube, then all its memories) would otherwise cross this chunk's row locks. A deleted
                    # cube has nothing left to move.
                    if (await conn.execute(_CUBE_LIVE, {"cube": cube_id})).first() is None:
                        break
                    count = (await conn.execute(_MOVE, {"cube": cube_id, "chunk": MOVE_CHUNK})).rowcount
                moved += count
                if count < MOVE_CHUNK:
                    break
        # Not a cancel (CancelledError is a BaseException): search still finds them outside; the cube's next
        # write tries again.
        except Exception as exc:
            log.warning(
                "moving a cube's memories into the HNSW index failed",
                extra={"cube_id": str(cube_id), "error": repr(exc)},
            )
            return
        log.info("cube memories moved into the HNSW index", extra={"cube_id": str(cube_id), "moved": moved})

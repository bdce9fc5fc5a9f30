"""Bulk loads for the scale benches: memories straight into Postgres by binary COPY, HNSW built once after.

Far faster than 100k writes through the API; the index is the schema's own (``memos.store.models``), so a
bench measures the same partial HNSW index (``memories.ann``, migration 0006) the service keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from memos.store.models import memories

COLUMNS = "id, tenant_id, cube_id, kind, state, version, content, metadata, created_by, embedding, embedding_model, ann"
_TYPES = ["uuid", "uuid", "uuid", "text", "text", "int4", "text", "jsonb", "uuid", "vector", "text", "bool"]
_HNSW = "ix_memories_embedding_hnsw"


def hnsw_ddl() -> str:
    """``CREATE INDEX`` for the memories' HNSW index, as the schema defines it."""
    (index,) = [i for i in memories.indexes if i.name == _HNSW]
    return str(CreateIndex(index).compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


def copy_memories(conn: psycopg.Connection[Any], rows: Iterable[Sequence[Any]], *, indexed: bool) -> None:
    """Write ``rows`` (every column of ``COLUMNS`` but ``ann``) with ``ann = indexed``, then rebuild the index.

    ``indexed``: the cube is past ``memos.memories.ann.EXACT_CUBE_MAX``, so its memories are in HNSW.
    ``conn`` must have pgvector's types registered and be in autocommit.
    """
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute(f"DROP INDEX IF EXISTS {_HNSW}")
    with conn.cursor().copy(f"COPY memories ({COLUMNS}) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row([*row, indexed])
    conn.execute(hnsw_ddl())
    # VACUUM as well: otherwise autovacuum's insert-triggered pass over the fresh rows runs during the
    # first timed queries (a steady-state service has long had its tables vacuumed).
    conn.execute("VACUUM (ANALYZE) memories")

"""Who may delete a stored KV file, and when: one protocol for the service and the admin tools.

A file is shared by every activation with the same KV, in any tenant, and it is written before the row
that refers to it. So "no row refers to it" is not enough to delete it: a build may have just written it
(or chosen to reuse it) and not committed its row yet. Both sides take a transaction-scoped Postgres
advisory lock named after the file:

- a writer (``claim``), in the transaction that inserts its row: the lock shared, then the file must be
  there; from then to its commit, nobody can delete the file, and after its commit its row refers to it;
- a deleter (``free``), per file: the lock exclusive, then no row may refer to it (and, for the orphan
  sweep, it must be older than the grace period), then the unlink, then the commit.

A writer that finds its file gone (freed between its choice and its insert) builds it again. This holds
across processes (the service, ``memos admin kv drop`` / ``gc`` beside it), since the lock is the
database's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.blobs import BlobNotFound, BlobStore
from memos.store.db import Database
from memos.store.models import activations


def lock_key(sha256: str) -> int:
    """The advisory lock of a file: its first 60 bits (a positive bigint; a clash only serializes two files)."""
    return int(sha256[:15], 16)


async def hold_exclusive(conn: AsyncConnection, sha256: str) -> None:
    """In a transaction that deletes or replaces file ``sha256``: no build can claim it until that commits."""
    await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(k)s)", {"k": lock_key(sha256)})


async def claim(conn: AsyncConnection, store: BlobStore, sha256: str) -> bool:
    """In the transaction about to refer to file ``sha256``: whether it is there, held until that commits."""
    await conn.exec_driver_sql("SELECT pg_advisory_xact_lock_shared(%(k)s)", {"k": lock_key(sha256)})
    return await asyncio.to_thread(store.exists, sha256)


async def unreferenced(conn: AsyncConnection, keys: Sequence[str]) -> list[str]:
    """Those of ``keys`` that no activation row refers to (in any tenant: identical KV is stored once)."""
    if not keys:
        return []
    used = {
        r.sha256
        for r in await conn.execute(select(activations.c.sha256).where(activations.c.sha256.in_(list(keys))).distinct())
    }
    return [key for key in dict.fromkeys(keys) if key not in used]


async def free(db: Database, store: BlobStore, keys: Sequence[str], *, older_than_s: float | None = None) -> list[str]:
    """Delete those of ``keys`` no row refers to (and, given ``older_than_s``, last written at least that
    long ago), each under its exclusive lock; the keys deleted."""
    freed: list[str] = []
    for key in dict.fromkeys(keys):
        async with db.transaction() as conn:
            await hold_exclusive(conn, key)
            if not await unreferenced(conn, [key]):
                continue
            try:
                if older_than_s is not None and (await asyncio.to_thread(store.age, key)) < older_than_s:
                    continue
            except BlobNotFound:  # gone already (another sweep, a purge)
                continue
            if await asyncio.to_thread(store.delete, key):
                freed.append(key)
    return freed

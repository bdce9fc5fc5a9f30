"""``memos admin gc``: give back the space nothing can use any more.

1. KV activations that are stale (their source memory has a newer version, or either side was deleted):
   they are never injected again, and each holds a file of tens of MB per thousand tokens. ``--keep-stale-kv``
   keeps them (their files stay downloadable).
2. Stored files no activation refers to (a build that failed after writing its file, a crash, a drop that
   raced a reuse), once older than the grace period: a build writes its file before its row, and a write
   restarts the file's age (``LocalBlobStore.put``), so a file a build is about to use is never taken.
3. Unfinished writes in the store's temp directory, older than the grace period.

Memories are never touched: deleted ones keep their history until a tenant admin purges them.
"""

from __future__ import annotations

import asyncio
import dataclasses

from sqlalchemy import select

from memos.activations import files
from memos.admin.kv import Dropped, drop
from memos.store.blobs import BlobStore
from memos.store.db import Database
from memos.store.models import activations

DEFAULT_GRACE_S = 3600.0
"""Unreferenced files younger than this are left alone: an hour is far longer than any build takes."""

PARTIAL_MIN_S = 600.0
"""Unfinished writes are left at least this long whatever ``--grace`` says: one may be a write in progress."""


@dataclasses.dataclass
class Collected:
    stale_kv: Dropped
    orphans: int = 0
    orphan_bytes: int = 0
    young_orphans: int = 0
    partial: int = 0


async def collect(
    db: Database,
    store: BlobStore,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    stale_kv: bool = True,
    dry_run: bool = False,
) -> Collected:
    dropped = await drop(db, store, stale_only=True, dry_run=dry_run) if stale_kv else Dropped()
    report = Collected(stale_kv=dropped)
    # Read after the drop: the files it freed are gone already, the rest it left are referenced.
    async with db.read() as conn:
        referenced = set((await conn.scalars(select(activations.c.sha256).distinct())).all())
    candidates = [b for b in await asyncio.to_thread(lambda: list(store.blobs())) if b.key not in referenced]
    old = [b for b in candidates if b.age_s >= grace_s]
    report.young_orphans = len(candidates) - len(old)
    if dry_run:
        report.orphans, report.orphan_bytes = len(old), sum(b.nbytes for b in old)
        # Counted as the real run would remove them: a dry run said 0 and the run then removed some (an operator).
        report.partial = await asyncio.to_thread(store.sweep_partial, max(grace_s, PARTIAL_MIN_S), dry_run=True)
        return report
    # Each checked again under its lock, age included (a put meanwhile makes it young again).
    freed = set(await files.free(db, store, [b.key for b in old], older_than_s=grace_s))
    report.orphans = len(freed)
    report.orphan_bytes = sum(b.nbytes for b in old if b.key in freed)
    report.partial = await asyncio.to_thread(store.sweep_partial, max(grace_s, PARTIAL_MIN_S))
    return report

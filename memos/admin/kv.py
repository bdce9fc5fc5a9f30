"""``memos admin kv``: what the stored KV activations are, by model, and dropping them (a model retired
from ``MEMOS_MODELS``, or KV that can never be injected again).

An activation is a memory of kind ``activation`` plus its ``activations`` row; dropping one deletes that
memory (its versions, links and row go with it by cascade) in one transaction, then frees the stored
files no activation refers to any more, as a purge does, under the locks of ``memos.activations.files``:
a build that chose one of those files to reuse, beside a drop, either keeps it or builds it again.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.activations import files
from memos.activations.freshness import STALE, is_fresh, is_stale, with_freshness
from memos.admin import require_cubes
from memos.identity.principal import OPERATOR
from memos.store.audit import record
from memos.store.blobs import BlobStore, is_key
from memos.store.db import Database
from memos.store.models import activations, memories


@dataclasses.dataclass
class ModelKV:
    """One model's stored activations (``bytes`` counts each activation; ``blob_bytes`` each file once)."""

    model: str
    activations: int = 0
    fresh: int = 0
    stale: int = 0
    corrupt: int = 0
    pinned: int = 0
    bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0


@dataclasses.dataclass
class Dropped:
    activations: int = 0
    blobs_freed: int = 0
    bytes_freed: int = 0
    by_model: dict[str, int] = dataclasses.field(default_factory=dict)
    bad_keys: list[str] = dataclasses.field(default_factory=list)
    """Recorded file keys of the dropped rows that are not blob keys (damage ``memos admin verify`` reports):
    no file of the store can be theirs, so none is freed for them."""


def _scoped(query: Any, cube_ids: Sequence[uuid.UUID]) -> Any:
    return query.where(activations.c.cube_id.in_(list(cube_ids))) if cube_ids else query


async def summary(conn: AsyncConnection, cube_ids: Sequence[uuid.UUID] = ()) -> list[ModelKV]:
    """Per model, in name order: counts by state and the bytes they take."""
    await require_cubes(conn, cube_ids)
    rows = (await conn.execute(_scoped(with_freshness(), cube_ids))).all()
    out: dict[str, ModelKV] = {}
    files: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        kv = out.setdefault(row.model, ModelKV(model=row.model))
        kv.activations += 1
        kv.fresh += is_fresh(row)
        kv.stale += is_stale(row)
        kv.corrupt += row.corrupt_at is not None
        kv.pinned += row.tier != "store"
        kv.bytes += row.bytes
        files[row.model][row.sha256] = row.bytes
    for model, sizes in files.items():
        out[model].blobs = len(sizes)
        out[model].blob_bytes = sum(sizes.values())
    return [out[name] for name in sorted(out)]


async def drop(
    db: Database,
    store: BlobStore,
    *,
    model: str | None = None,
    stale_only: bool = False,
    cube_ids: Sequence[uuid.UUID] = (),
    dry_run: bool = False,
) -> Dropped:
    """Delete the activations of ``model`` (every model: None), only the stale ones with ``stale_only``, then
    free their files once nothing refers to them. One transaction, with an audit row per tenant."""
    query = _scoped(with_freshness(), cube_ids).order_by(activations.c.id)
    if model is not None:
        query = query.where(activations.c.model == model)
    if stale_only:
        query = query.where(STALE)
    report = Dropped()
    async with db.transaction() as conn:
        await require_cubes(conn, cube_ids)
        # The rows to drop, locked in id order (a pin, a hit count or a repair of one of them waits for the
        # drop; every other row is left alone). A dry run locks nothing.
        rows = list((await conn.execute(query if dry_run else query.with_for_update(of=activations))).all())
        report.activations = len(rows)
        report.by_model = dict(Counter(r.model for r in rows))
        sizes = {r.sha256: r.bytes for r in rows if is_key(r.sha256)}
        report.bad_keys = sorted({r.sha256 for r in rows} - sizes.keys())
        if dry_run:
            report.blobs_freed, report.bytes_freed = await _would_free(conn, rows, sizes)
            return report
        if not rows:
            return report
        await conn.execute(delete(memories).where(memories.c.id.in_([r.id for r in rows])))
        per_tenant: dict[uuid.UUID, list[Any]] = defaultdict(list)
        for row in rows:
            per_tenant[row.tenant_id].append(row)
        for tenant_id, dropped in per_tenant.items():
            await record(
                conn,
                OPERATOR,
                "kv.drop_stale" if stale_only else "kv.drop",
                "activations",
                model or "*",
                tenant_id=tenant_id,
                detail={"activations": len(dropped), "models": dict(Counter(r.model for r in dropped))},
            )
    # Only keys of the store's form: a damaged one (a manual edit) raised ValueError in files.free after the
    # drop had committed, a traceback for a drop that had in fact happened.
    for key in await files.free(db, store, list(sizes)):
        report.blobs_freed += 1
        report.bytes_freed += sizes[key]
    return report


async def _would_free(conn: AsyncConnection, rows: Sequence[Any], sizes: dict[str, int]) -> tuple[int, int]:
    """Files that dropping ``rows`` would free (of ``sizes``, their blob keys): those no other activation
    refers to."""
    if not sizes:
        return 0, 0
    ids = [r.id for r in rows]
    kept = {
        r.sha256
        for r in await conn.execute(
            select(activations.c.sha256)
            .where(activations.c.sha256.in_(list(sizes)), activations.c.id.not_in(ids))
            .distinct()
        )
    }
    free = [key for key in sizes if key not in kept]
    return len(free), sum(sizes[key] for key in free)

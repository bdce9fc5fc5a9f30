"""Whether an activation may still be injected, and which stored files no activation refers to any more.

Shared by the activation service (requests, the scheduler) and the admin tools (``memos admin kv``,
``gc``, ``verify``), so that "stale" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.models import activations, memories


def with_freshness() -> Any:
    """Activation rows with what decides their freshness: the source's current version and state."""
    source = memories.alias("source")
    derived = memories.alias("derived")
    return (
        select(
            activations,
            source.c.version.label("source_current_version"),
            source.c.state.label("source_state"),
            derived.c.state.label("activation_state"),
        )
        .select_from(activations)
        .join(source, source.c.id == activations.c.memory_id)
        .join(derived, and_(derived.c.id == activations.c.id))
    )


def is_stale(row: Row[Any]) -> bool:
    """Built from a text that is no longer the source's (never injected again), or deleted either side."""
    # Archived memories stay usable (archiving hides, it does not retire); deleted ones do not.
    return bool(
        row.stale
        or row.source_current_version != row.source_version
        or row.source_state == "deleted"
        or row.activation_state == "deleted"
    )


def is_fresh(row: Row[Any]) -> bool:
    return not is_stale(row) and row.corrupt_at is None


async def unreferenced_blobs(conn: AsyncConnection, keys: Sequence[str]) -> list[str]:
    """Those of ``keys`` that no activation row refers to (in any tenant: identical KV is stored once)."""
    if not keys:
        return []
    used = {
        r.sha256
        for r in await conn.execute(select(activations.c.sha256).where(activations.c.sha256.in_(list(keys))).distinct())
    }
    return [key for key in dict.fromkeys(keys) if key not in used]

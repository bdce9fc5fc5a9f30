"""Whether an activation may still be injected.

Shared by the activation service (requests, the scheduler) and the admin tools (``memos admin kv``,
``gc``), so that "stale" means one thing everywhere: one SQL expression, which ``kv drop`` filters on
and every read of an activation row selects.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, func, or_, select

from memos.store.models import activations, memories

_source = memories.alias("source")
_derived = memories.alias("derived")

STALE = or_(
    activations.c.stale,
    _source.c.version != activations.c.source_version,
    _source.c.state == "deleted",
    _derived.c.state == "deleted",
)
"""Built from a version that is no longer the source's (never injected again), or deleted either side. Every new
version counts, archiving and tag changes too (decisions 44): a rebuild of unchanged text finds the same tokens
and reuses the file. Valid in ``with_freshness``."""


SOURCE_LIVE = or_(_source.c.expires_at.is_(None), _source.c.expires_at > func.now())
"""The source memory has not expired (valid in ``with_freshness``): an expired memory's activations are 404 as
the memory is, since their tokens are its text."""


def with_freshness() -> Any:
    """Activation rows with what decides their freshness (``is_stale``: ``STALE``, computed by Postgres)."""
    return (
        select(activations, STALE.label("is_stale"))
        .select_from(activations)
        .join(_source, _source.c.id == activations.c.memory_id)
        .join(_derived, _derived.c.id == activations.c.id)
    )


def is_stale(row: Row[Any]) -> bool:
    """For a row of ``with_freshness``."""
    return bool(row.is_stale)


def is_fresh(row: Row[Any]) -> bool:
    return not is_stale(row) and row.corrupt_at is None

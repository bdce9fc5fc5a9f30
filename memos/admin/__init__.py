"""Operator tools behind ``memos admin``: they call the same domain code as the API, outside any request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.models import cubes


class AdminError(Exception):
    """A tool's target or input that is not right (a bad bundle, no such agent or key): said, and exit 1."""


async def require_cubes(conn: AsyncConnection, cube_ids: Sequence[uuid.UUID]) -> None:
    """Every one of ``cube_ids`` is a cube (deleted ones too: their rows are still there); else AdminError, so
    a mistyped id is not answered with "nothing wrong" or "nothing to drop"."""
    if not cube_ids:
        return
    found = set((await conn.scalars(select(cubes.c.id).where(cubes.c.id.in_(list(cube_ids))))).all())
    missing = [str(c) for c in cube_ids if c not in found]
    if missing:
        raise AdminError(f"no cube {', '.join(missing)}")

"""Indexes for a memory graph's catch-up with other processes' writes.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

Each memos process keeps its own in-memory graph of a cube. Writes of another process on the same database reached
it only when the graph was rebuilt (evicted, or a restart): until then graph search walked a stale graph (found in a
multi-process review). A graph now catches up by reading the memories changed since its last read, and the links
written since on their own. New memories are found by ``(cube_id, created_at)``; these two partial indexes find the
rest: memories at version 2 or more by ``updated_at`` (a create adds nothing to it), and a tenant's links other than
knn by ``created_at`` (knn links, most of a create's, are written only with their memory and stay out of it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_memories_cube_id_changed",
        "memories",
        ["cube_id", "updated_at"],
        postgresql_where=sa.text("version > 1"),
    )
    op.create_index(
        "ix_memory_links_tenant_id_created_at_not_knn",
        "memory_links",
        ["tenant_id", "created_at"],
        postgresql_where=sa.text("type <> 'knn'"),
    )


def downgrade() -> None:
    op.drop_index("ix_memory_links_tenant_id_created_at_not_knn", table_name="memory_links")
    op.drop_index("ix_memories_cube_id_changed", table_name="memories")

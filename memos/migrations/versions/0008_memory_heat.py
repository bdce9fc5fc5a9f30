"""Heat in a narrow table of its own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

The scheduler writes heat (up to 1,000 memories every 30 s). As a column of ``memories`` every such write
copied a whole row (its inline 384-float vector included) and, since full pages leave no room for an
in-place (HOT) update, added entries to every index, the HNSW one of big cubes too: 0.9-1.4 s of Postgres
time per 1,000 rows of a 20,000-memory cube, measured. ``memory_heat`` holds (memory_id, heat); a memory
with no row there shows ``memories.heat``, which stays for what was written before (and for imported
bundles) and is zeroed here once its value has moved.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memory_heat",
        sa.Column(
            "memory_id",
            UUID(as_uuid=True),
            sa.ForeignKey("memories.id", ondelete="CASCADE", name="fk_memory_heat_memory_id_memories"),
            primary_key=True,
        ),
        sa.Column("heat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("memory_id", name="pk_memory_heat"),
    )
    op.execute("INSERT INTO memory_heat (memory_id, heat) SELECT id, heat FROM memories WHERE heat > 0")
    op.execute("UPDATE memories SET heat = 0 WHERE heat <> 0")


def downgrade() -> None:
    op.execute("UPDATE memories m SET heat = h.heat FROM memory_heat h WHERE h.memory_id = m.id")
    op.drop_table("memory_heat")

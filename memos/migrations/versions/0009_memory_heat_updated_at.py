"""When each memory's heat was written.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Heat halves every half-life, but a row of ``memory_heat`` only held the value: after a restart the scheduler
seeded its table with heat as it was when last written, however long the service had been down, so a memory
hot a week ago came back as hot as then (found in review). ``updated_at`` says when the value was true; the
seed decays it by the time since. Rows already there count as written now (their age is unknown; the next
half-life corrects them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "memory_heat",
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_column("memory_heat", "updated_at")

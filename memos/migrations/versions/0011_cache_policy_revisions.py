"""A revision number for each cube's cache policy, in the order its changes commit.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Every process holds a cube's cache policy (categories, thresholds feedback moved) in memory and reloads it when
it sees a change. The cue was the newest ``updated_at`` of the configuration and the category rows: a
transaction's start time, not its commit's, so a change that committed after a newer one was never seen, and a
process kept deciding with the old threshold until the next change (found in a multi-process review). Each
change now bumps this number under the row's lock, so the numbers follow the commits; a process compares its
number with the stored one. No row is revision 0 (nothing changed since the cube was made or imported).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_policy_revisions",
        sa.Column("cube_id", UUID(as_uuid=True), sa.ForeignKey("cubes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cache_policy_revisions")

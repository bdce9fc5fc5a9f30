"""An index on the activations pinned to a memory tier.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

The scheduler asks every pass (every ``MEMOS_SCHEDULER_SECONDS``) for each loaded model's pinned
activations (``tier`` device or host). Without an index that read scanned every activation row; pins
are few, so a partial index on them keeps the read as small as the answer.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_activations_model_pinned",
        "activations",
        ["model"],
        postgresql_where=sa.text("tier IN ('device', 'host')"),
    )


def downgrade() -> None:
    op.drop_index("ix_activations_model_pinned", table_name="activations")

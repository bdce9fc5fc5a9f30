"""Keep a memory's embedding in its row: storage MAIN and a TOAST target of a full page.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

A 384-float vector is 1.5 kB, and pgvector's type defaults to EXTERNAL storage, so most memory rows
(over the 2 kB TOAST threshold with their text, metadata and tsvector) had their vector moved to the
TOAST table. Every exact distance computed from the heap then fetched it from there: the kNN links of a
write (an exact scan over a small cube) read about 12 buffers per neighbour candidate, and search's
cosine for its candidates paid the same. With MAIN storage the vector is the last thing moved out,
and with ``toast_tuple_target`` at a page's worth nothing is moved out of a row that fits one page.

Only rows written from now on are laid out this way: rewriting every existing row (and re-inserting
it into HNSW) is a maintenance job, not a migration step.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE memories ALTER COLUMN embedding SET STORAGE MAIN")
    # 8160: the largest value Postgres accepts (a page less its header): rows that fit a page stay whole.
    op.execute("ALTER TABLE memories SET (toast_tuple_target = 8160)")


def downgrade() -> None:
    op.execute("ALTER TABLE memories RESET (toast_tuple_target)")
    op.execute("ALTER TABLE memories ALTER COLUMN embedding SET STORAGE EXTERNAL")

"""Small cubes are searched exactly: only memories of cubes past a size sit in the HNSW index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

``memories.ann`` says whether a memory is in the (now partial) HNSW index. A cube's memories join it
once the cube holds ``memos.memories.ann.EXACT_CUBE_MAX`` embedded memories; below that, nearest
neighbours are found by an exact scan of the cube, which costs less than keeping the index up to date
(an HNSW insert was most of a batch create's Postgres time) and is exact. Search reads both sets, so
where a memory sits changes its speed, never whether it is found. Here, cubes already that large are
marked and the index is rebuilt over their memories.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The value of memos.memories.ann.EXACT_CUBE_MAX when this migration was written (a migration must not
# change with the code that comes after it).
EXACT_CUBE_MAX = 2000


def upgrade() -> None:
    op.add_column("memories", sa.Column("ann", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    # Dropped before the update: rewriting those rows would otherwise insert each into the index again.
    op.drop_index("ix_memories_embedding_hnsw", table_name="memories", postgresql_using="hnsw")
    op.execute(
        sa.text(
            "UPDATE memories SET ann = true WHERE embedding IS NOT NULL AND cube_id IN ("
            " SELECT cube_id FROM memories WHERE embedding IS NOT NULL GROUP BY cube_id HAVING count(*) >= :n)"
        ).bindparams(n=EXACT_CUBE_MAX)
    )
    _create_hnsw(where=sa.text("ann"))
    # Whether a cube is past the size (one of its memories is in the index), and its memories still outside.
    op.create_index("ix_memories_cube_id_ann", "memories", ["cube_id"], postgresql_where=sa.text("ann"))
    op.create_index(
        "ix_memories_cube_id_exact",
        "memories",
        ["cube_id"],
        postgresql_where=sa.text("NOT ann AND embedding IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_memories_cube_id_exact", table_name="memories")
    op.drop_index("ix_memories_cube_id_ann", table_name="memories")
    op.drop_index("ix_memories_embedding_hnsw", table_name="memories", postgresql_using="hnsw")
    op.drop_column("memories", "ann")
    _create_hnsw(where=None)


def _create_hnsw(where: sa.TextClause | None) -> None:
    op.create_index(
        "ix_memories_embedding_hnsw",
        "memories",
        ["embedding"],
        postgresql_using="hnsw",
        postgresql_ops={"embedding": "vector_cosine_ops"},
        postgresql_where=where,
    )

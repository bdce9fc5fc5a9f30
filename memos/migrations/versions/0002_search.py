"""Search columns: event time, embedding model per version, full-text vector; HNSW and GIN indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

TSV_EXPRESSION = (
    "to_tsvector('english'::regconfig, coalesce(metadata->>'speaker', '') || ' ' || coalesce(content, '') "
    "|| ' ' || coalesce(metadata->>'time', ''))"
)

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("memories", "memory_versions"):
        op.add_column(table, sa.Column("event_time", sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column("embedding_model", sa.Text(), nullable=True))
    # The full-text vector is derived by Postgres itself, so no write path can forget it: the speaker and the
    # user-written event time sit next to the content, which helps "who"/"when" questions.
    op.add_column(
        "memories",
        sa.Column("tsv", postgresql.TSVECTOR(), sa.Computed(TSV_EXPRESSION, persisted=True), nullable=True),
    )
    # Cosine HNSW over current embeddings; defaults (m=16, ef_construction=64) suit 384-d sentence vectors.
    op.create_index(
        "ix_memories_embedding_hnsw",
        "memories",
        ["embedding"],
        postgresql_using="hnsw",
        postgresql_ops={"embedding": "vector_cosine_ops"},
    )
    op.create_index("ix_memories_tsv", "memories", ["tsv"], postgresql_using="gin")
    op.create_index("ix_memories_cube_id_event_time", "memories", ["cube_id", "event_time"])


def downgrade() -> None:
    op.drop_index("ix_memories_cube_id_event_time", table_name="memories")
    op.drop_index("ix_memories_tsv", table_name="memories", postgresql_using="gin")
    op.drop_index("ix_memories_embedding_hnsw", table_name="memories", postgresql_using="hnsw")
    op.drop_column("memories", "tsv")
    for table in ("memories", "memory_versions"):
        op.drop_column(table, "embedding_model")
        op.drop_column(table, "event_time")

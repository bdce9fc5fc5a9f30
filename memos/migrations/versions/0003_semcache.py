"""Semantic cache: per-cube category configuration, adapted thresholds and counters, per-entry state.

Cached answers themselves are ``response`` memories; these tables hold what the cache adds to them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EMBEDDING_DIMS = 384


def upgrade() -> None:
    op.create_table(
        "cache_configs",
        sa.Column("cube_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("cubes.id", ondelete="CASCADE")),
        sa.Column("config", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_by", postgresql.UUID(as_uuid=True), nullable=False),
        sa.PrimaryKeyConstraint("cube_id", name="pk_cache_configs"),
    )
    op.create_table(
        "cache_categories",
        sa.Column("cube_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("cubes.id", ondelete="CASCADE")),
        sa.Column("category", sa.Text(), nullable=False),
        # The threshold feedback moved to (NULL: the configured one) and the highest reported false hit.
        sa.Column("threshold", sa.Float()),
        sa.Column("false_hit_floor", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.Column("hits", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("misses", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("false_hits", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("correct_hits", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("evicted", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("cube_id", "category", name="pk_cache_categories"),
    )
    op.create_table(
        "cache_entries",
        sa.Column("memory_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("memories.id", ondelete="CASCADE")),
        sa.Column(
            "cube_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False
        ),
        # The embedding of the entry's context, valid only while the context text still hashes to this.
        sa.Column("context_sha256", sa.Text()),
        sa.Column("context_embedding", Vector(EMBEDDING_DIMS)),
        sa.Column("threshold", sa.Float()),
        sa.Column("hits", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("false_hits", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_hit_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("memory_id", name="pk_cache_entries"),
    )
    op.create_index("ix_cache_entries_cube_id", "cache_entries", ["cube_id"])
    # The cache reads a cube's response memories (loads, catch-up since a time, quota counts) through this.
    op.create_index(
        "ix_memories_response_cube",
        "memories",
        ["cube_id", "updated_at"],
        postgresql_where=sa.text("kind = 'response'"),
    )


def downgrade() -> None:
    op.drop_index("ix_memories_response_cube", table_name="memories")
    op.drop_index("ix_cache_entries_cube_id", table_name="cache_entries")
    op.drop_table("cache_entries")
    op.drop_table("cache_categories")
    op.drop_table("cache_configs")

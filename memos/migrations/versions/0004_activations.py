"""KV activations: one row per activation memory, pointing at its safetensors blob.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "activations",
        # The id of the memory of kind ``activation`` that represents this KV cache.
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("cube_id", sa.UUID(), nullable=False),
        # The source (plaintext) memory and the version whose text was prefilled.
        sa.Column("memory_id", sa.UUID(), nullable=False),
        sa.Column("source_version", sa.Integer(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        # sha256 of the int64 token ids: (fingerprint, token_ids_sha256) names identical KV whoever built it.
        sa.Column("token_ids_sha256", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        # sha256 of the whole memos-kv/1 file: its key in the blob store.
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("tier", sa.Text(), server_default="store", nullable=False),
        sa.Column("stale", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        # When the blob last failed its checksum; NULL while it is sound.
        sa.Column("corrupt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hits", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.UUID(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["memories.id"], name=op.f("fk_activations_id_memories"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_activations_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["cube_id"], ["cubes.id"], name=op.f("fk_activations_cube_id_cubes"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["memory_id"], ["memories.id"], name=op.f("fk_activations_memory_id_memories"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activations")),
    )
    op.create_index(
        op.f("ix_activations_memory_id_model_source_version"),
        "activations",
        ["memory_id", "model", "source_version"],
        unique=False,
    )
    op.create_index(
        op.f("ix_activations_tenant_id_fingerprint_token_ids_sha256"),
        "activations",
        ["tenant_id", "fingerprint", "token_ids_sha256"],
        unique=False,
    )
    op.create_index(op.f("ix_activations_sha256"), "activations", ["sha256"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_activations_sha256"), table_name="activations")
    op.drop_index(op.f("ix_activations_tenant_id_fingerprint_token_ids_sha256"), table_name="activations")
    op.drop_index(op.f("ix_activations_memory_id_model_source_version"), table_name="activations")
    op.drop_table("activations")

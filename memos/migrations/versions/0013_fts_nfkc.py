"""Full text of Unicode-compatible forms: the indexed text is NFKC-normalized before it is parsed.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

Text pasted from PDFs carries ligatures ("ﬁnance" with U+FB01), phones and IMEs full-width letters and digits,
macOS decomposed accents: Postgres parsed each as written, so "finance" never found "ﬁnance" and a decomposed
"café" was another word than the composed one. The tsvector is now of ``normalize(..., NFKC)``; queries are
normalized the same way before they are parsed (memos.search). ``normalize`` needs a UTF8 database: on any other
encoding the column keeps its expression, and memos sends queries as written there (``Database.utf8``).

The generated column is dropped and added again (``ALTER COLUMN ... SET EXPRESSION``, Postgres 17+, rewrites the
table too): the upgrade rewrites ``memories`` and so rebuilds every index on it, the HNSW index included, under an
exclusive lock (docs/architecture.md gives the time it took at 100k memories). ``maintenance_work_mem`` is raised
for it, as an HNSW build that outgrows it slows down many times over.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TEXT = "coalesce(metadata->>'speaker', '') || ' ' || coalesce(content, '') || ' ' || coalesce(metadata->>'time', '')"
RAW = f"to_tsvector('english'::regconfig, {_TEXT})"
NFKC = f"to_tsvector('english'::regconfig, normalize({_TEXT}, NFKC))"


def _utf8() -> bool:
    return op.get_bind().execute(sa.text("SELECT current_setting('server_encoding') = 'UTF8'")).scalar_one() is True


def _set_tsv(expression: str) -> None:
    op.execute("SET LOCAL maintenance_work_mem = '512MB'")
    op.drop_index("ix_memories_tsv", table_name="memories", postgresql_using="gin")
    op.drop_column("memories", "tsv")
    op.add_column(
        "memories",
        sa.Column("tsv", postgresql.TSVECTOR(), sa.Computed(expression, persisted=True), nullable=True),
    )
    op.create_index("ix_memories_tsv", "memories", ["tsv"], postgresql_using="gin")
    op.execute("ANALYZE memories")  # the new column has no statistics until autovacuum comes by


def upgrade() -> None:
    if _utf8():
        _set_tsv(NFKC)


def downgrade() -> None:
    if _utf8():
        _set_tsv(RAW)

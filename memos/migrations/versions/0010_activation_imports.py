"""Which KV files hold uploaded bytes, and the cube they were uploaded into.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08

A build reused any stored file of the same KV in its tenant, imported ones too, and an import's K/V values
are unchecked: an agent could upload forged values that builds of the same text in cubes it cannot read
then used (found in review; ``memos/activations/origins.py``). ``activation_imports`` marks the activations
whose file holds uploaded bytes, with the cube they went into; builds reuse such a file in that cube only.

What was stored before is marked from the audit log, which records every import (``activation.import``,
target the activation memory) and every repair (``activation.repair``, ``detail.sha256`` the rebuilt file):
a file counts as uploaded when an imported activation was the first row to refer to it and no repair wrote
it (an import that reused a file already stored wrote nothing). Every activation on such a file is marked:
with its own cube where an import of that file happened there, otherwise with the first importing cube,
and then it is made stale too. Those are builds that took another cube's upload: never injected again,
their next build prefills.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

MARK_UPLOADED = """
WITH imported AS (
    SELECT a.id, a.sha256, a.cube_id, a.created_at
    FROM activations a
    WHERE EXISTS (
        SELECT 1 FROM audit_log l
        WHERE l.action = 'activation.import' AND l.target_type = 'memory' AND l.target_id = a.id::text
    )
),
uploaded AS (
    SELECT DISTINCT i.sha256
    FROM imported i
    WHERE NOT EXISTS (
        SELECT 1 FROM activations b WHERE b.sha256 = i.sha256 AND b.created_at < i.created_at
    )
    AND NOT EXISTS (
        SELECT 1 FROM audit_log l WHERE l.action = 'activation.repair' AND l.detail ->> 'sha256' = i.sha256
    )
)
INSERT INTO activation_imports (activation_id, cube_id)
SELECT a.id, COALESCE(
    (SELECT i.cube_id FROM imported i WHERE i.sha256 = a.sha256 AND i.cube_id = a.cube_id LIMIT 1),
    (SELECT i.cube_id FROM imported i WHERE i.sha256 = a.sha256 ORDER BY i.created_at, i.id LIMIT 1)
)
FROM activations a
WHERE a.sha256 IN (SELECT sha256 FROM uploaded)
ON CONFLICT (activation_id) DO NOTHING
"""

STALE_ELSEWHERE = """
UPDATE activations a SET stale = true
FROM activation_imports m
WHERE m.activation_id = a.id AND m.cube_id <> a.cube_id AND NOT a.stale
"""


def upgrade() -> None:
    op.create_table(
        "activation_imports",
        sa.Column(
            "activation_id",
            UUID(as_uuid=True),
            sa.ForeignKey("activations.id", ondelete="CASCADE", name="fk_activation_imports_activation_id_activations"),
            nullable=False,
        ),
        sa.Column(
            "cube_id",
            UUID(as_uuid=True),
            sa.ForeignKey("cubes.id", ondelete="CASCADE", name="fk_activation_imports_cube_id_cubes"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("activation_id", name="pk_activation_imports"),
    )
    op.execute(MARK_UPLOADED)
    op.execute(STALE_ELSEWHERE)


def downgrade() -> None:
    # The activations made stale stay stale: their file is another cube's upload either way.
    op.drop_table("activation_imports")

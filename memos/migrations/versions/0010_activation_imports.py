"""Which KV files hold uploaded bytes, and the cube they were uploaded into.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08

A build reused any stored file of the same KV in its tenant, imported ones too, and an import's K/V values
are unchecked: an agent could upload forged values that builds of the same text in cubes it cannot read
then used (found in review; decisions 86). ``activation_imports`` marks the activations
whose file holds uploaded bytes, with the cube they went into; builds reuse such a file in that cube only.

What was stored before is marked from the audit log, which records every build, import and repair with
the file it wrote or reused (``detail.sha256``) and the source memory (``detail.source``, whose cube it is):
a file counts as uploaded when the first event that names it is an import (nothing stored it before: the
upload's bytes were written) and no repair wrote it (a repair's bytes are this server's prefill). The audit
log, not the surviving rows, decides: an import whose activation was dropped or purged since still made the
file (found in review). Every activation on an uploaded file is marked with its own cube where an import of
that file happened there, and is then the upload's own; every other one (a build that took another cube's
upload) is marked with the first importing cube and made stale: never injected again, its next build
prefills. (Source memories are never deleted, only purged, so the importing cube is known; its own cube
stands in only to keep the column's NOT NULL if one ever were.)

Linear in the audit log and the activations (hash joins; found in review: correlated subqueries over the
imports made it quadratic, 48 s at 20,000 imports).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPLOADS = """
CREATE TEMP TABLE uploaded_files ON COMMIT DROP AS
WITH events AS (
    SELECT l.id, l.at, l.action, l.detail ->> 'sha256' AS sha256, m.cube_id
    FROM audit_log l
    LEFT JOIN memories m ON m.id::text = l.detail ->> 'source'
    WHERE l.action IN ('activation.build', 'activation.import', 'activation.repair') AND l.detail ? 'sha256'
),
first_event AS (
    SELECT DISTINCT ON (sha256) sha256, action, cube_id FROM events ORDER BY sha256, at, id
),
repaired AS (
    SELECT DISTINCT sha256 FROM events WHERE action = 'activation.repair'
)
SELECT f.sha256, f.cube_id AS first_cube
FROM first_event f
LEFT JOIN repaired r ON r.sha256 = f.sha256
WHERE f.action = 'activation.import' AND r.sha256 IS NULL
"""

IMPORTED_HERE = """
CREATE TEMP TABLE imported_here ON COMMIT DROP AS
SELECT DISTINCT l.detail ->> 'sha256' AS sha256, m.cube_id
FROM audit_log l
JOIN memories m ON m.id::text = l.detail ->> 'source'
WHERE l.action = 'activation.import' AND l.detail ? 'sha256'
"""

MARK_UPLOADED = """
INSERT INTO activation_imports (activation_id, cube_id)
SELECT a.id, COALESCE(h.cube_id, u.first_cube, a.cube_id)
FROM activations a
JOIN uploaded_files u ON u.sha256 = a.sha256
LEFT JOIN imported_here h ON h.sha256 = a.sha256 AND h.cube_id = a.cube_id
ON CONFLICT (activation_id) DO NOTHING
"""

STALE_ELSEWHERE = """
UPDATE activations a SET stale = true
FROM uploaded_files u
WHERE u.sha256 = a.sha256 AND NOT a.stale
  AND NOT EXISTS (SELECT 1 FROM imported_here h WHERE h.sha256 = a.sha256 AND h.cube_id = a.cube_id)
"""

BACKFILL = (UPLOADS, IMPORTED_HERE, MARK_UPLOADED, STALE_ELSEWHERE)
"""In this order, in one transaction (the temporary tables go at its commit)."""


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
    for statement in BACKFILL:
        op.execute(statement)


def downgrade() -> None:
    # The activations made stale stay stale: their file is another cube's upload either way.
    op.drop_table("activation_imports")

"""Tell every memos process when an API key or an agent changes (LISTEN/NOTIFY), so it may cache keys.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

Each process now remembers the keys it has checked (``memos/identity/keycache.py``): the lookup was a database
round trip on every request, about a quarter of a GET by id. A cached key must stop working as soon as it is
revoked, wherever the revocation comes from: another memos process, ``memos admin keys revoke`` on the server
machine, or an operator's own SQL. So the database says so itself: these triggers send a notification on channel
``memos_auth`` when a key row is updated or deleted (its prefix) and when agents or keys are changed wholesale
(``*``: forget everything). Postgres delivers a notification when the transaction commits, to every session
listening on the channel. Inserts send nothing: a new key was never cached.
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION memos_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('memos_auth', OLD.prefix);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION memos_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('memos_auth', '*');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER memos_api_keys_notify AFTER UPDATE OR DELETE ON api_keys "
        "FOR EACH ROW EXECUTE FUNCTION memos_key_changed()"
    )
    op.execute(
        "CREATE TRIGGER memos_api_keys_truncate_notify AFTER TRUNCATE ON api_keys "
        "FOR EACH STATEMENT EXECUTE FUNCTION memos_auth_changed()"
    )
    # An agent's role or tenant changing (no endpoint does that today) changes what its keys stand for.
    op.execute(
        "CREATE TRIGGER memos_agents_truncate_notify AFTER TRUNCATE ON agents "
        "FOR EACH STATEMENT EXECUTE FUNCTION memos_auth_changed()"
    )
    op.execute(
        "CREATE TRIGGER memos_agents_notify AFTER UPDATE OR DELETE ON agents "
        "FOR EACH STATEMENT EXECUTE FUNCTION memos_auth_changed()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER memos_agents_notify ON agents")
    op.execute("DROP TRIGGER memos_agents_truncate_notify ON agents")
    op.execute("DROP TRIGGER memos_api_keys_truncate_notify ON api_keys")
    op.execute("DROP TRIGGER memos_api_keys_notify ON api_keys")
    op.execute("DROP FUNCTION memos_auth_changed()")
    op.execute("DROP FUNCTION memos_key_changed()")

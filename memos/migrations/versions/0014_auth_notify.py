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

``memos_auth_probe(payload)`` is how a process checks that it would hear of a change: it notifies with the payload,
and refuses while one of these triggers is missing or disabled (``ALTER TABLE ... DISABLE TRIGGER``, or a
downgrade run beside live servers), so no process trusts its cache then.
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
        """
        CREATE FUNCTION memos_auth_probe(payload text) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM pg_trigger
                WHERE tgrelid IN ('api_keys'::regclass, 'agents'::regclass)
                  AND tgname IN ('memos_api_keys_notify', 'memos_api_keys_truncate_notify',
                                 'memos_agents_notify', 'memos_agents_truncate_notify')
                  AND tgenabled IN ('O', 'A')) <> 4 THEN
                RAISE EXCEPTION 'API key changes are not notified: a trigger of migration 0014 is missing or disabled';
            END IF;
            PERFORM pg_notify('memos_auth', payload);
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
    op.execute("DROP FUNCTION memos_auth_probe(text)")
    op.execute("DROP FUNCTION memos_auth_changed()")
    op.execute("DROP FUNCTION memos_key_changed()")

"""Alembic environment for memos: runs migrations online against ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from memos.store.models import metadata

config = context.config
target_metadata = metadata

# One migrator at a time per database: `memos admin migrate` beside a starting `memos serve` (or two serves on
# one external database) both read the revision, and the second failed creating what the first had just made.
# The two-integer key space of advisory locks is apart from the one-bigint one memos uses elsewhere.
_MIGRATION_LOCK = text("SELECT pg_advisory_xact_lock(1835363695, 1)")  # 1835363695: "memo" in ASCII


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            # Taken before alembic reads the revision, held to the commit: the second sees the first's result.
            connection.execute(_MIGRATION_LOCK)
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("memos migrations run online only: use `memos admin migrate`")
run_migrations_online()

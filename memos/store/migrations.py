"""Alembic, driven from code: upgrade, downgrade and "is the schema current?"; and "can this server hold it?"."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, text

from memos.store.urls import sqlalchemy_url

# Inside the package (memos/migrations/), so a wheel ships them as package data (pyproject.toml) and an
# installed memos can migrate its database as an editable checkout can.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


def alembic_config(url: str) -> Config:
    if not (MIGRATIONS_DIR / "env.py").exists():
        raise RuntimeError(f"alembic migrations not found at {MIGRATIONS_DIR}: this install of memos is incomplete")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be doubled in alembic's ini-style options.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


MIN_POSTGRES = 140000
"""``server_version_num`` of PostgreSQL 14, the oldest memos supports (ARCHITECTURE.md)."""
MIN_PGVECTOR = (0, 8, 0)
"""Filtered vector search relies on pgvector 0.8's iterative index scans (``hnsw.iterative_scan``, store/db.py):
with an older pgvector a search with filters silently returns fewer than ``k`` results."""


class UnsupportedServer(RuntimeError):
    """The PostgreSQL server, or its pgvector, is too old for memos."""


def server_problem(server_version_num: int, pgvector: str | None, *, installed: bool) -> str | None:
    """What keeps a server from holding memos's schema (None: nothing). ``pgvector``: the installed extension's
    version, or when ``installed`` is False the version ``CREATE EXTENSION`` would install (None: not there)."""
    if server_version_num < MIN_POSTGRES:
        major = server_version_num // 10000
        return f"PostgreSQL {major} is too old: memos needs PostgreSQL 14 or newer"
    wanted = ".".join(map(str, MIN_PGVECTOR))
    if pgvector is None:
        return f"the pgvector extension is not available on this server: install pgvector {wanted} or newer"
    if _version(pgvector) < MIN_PGVECTOR:
        if installed:
            return (
                f"pgvector {pgvector} is installed, memos needs {wanted} or newer: "
                "install a newer pgvector, then run ALTER EXTENSION vector UPDATE"
            )
        return f"this server offers pgvector {pgvector}, memos needs {wanted} or newer"
    return None


def _version(value: str) -> tuple[int, ...]:
    """ "0.8.1" -> (0, 8, 1), "0.8" -> (0, 8, 0); each part's leading digits ("0-dev" -> 0), none -> 0."""
    parts = [int(m.group()) if (m := re.match(r"\d+", part)) else 0 for part in value.split(".")]
    return tuple(parts + [0] * (len(MIN_PGVECTOR) - len(parts)))


def check_server(url: str) -> None:
    """UnsupportedServer, saying what to do, when the server cannot hold memos's schema."""
    engine = create_engine(sqlalchemy_url(url), poolclass=None)
    try:
        with engine.connect() as conn:
            server = int(conn.execute(text("SHOW server_version_num")).scalar_one())
            installed = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            offered = conn.execute(
                text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
            ).scalar()
    finally:
        engine.dispose()
    problem = server_problem(server, installed or offered, installed=installed is not None)
    if problem is not None:
        raise UnsupportedServer(problem)


def upgrade(url: str, revision: str = "head") -> None:
    check_server(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def older_than(current: str | None, target: str) -> bool:
    """Whether ``target`` is older than the schema's ``current`` revision (one it descends from, or ``base``):
    an upgrade to it changes nothing, going back is a downgrade. False when alembic cannot place one of them
    (an unknown or relative revision): the upgrade then says so in alembic's words."""
    if current is None:
        return False
    if target == "base":
        return True
    script = ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused"))
    try:
        wanted = script.get_revision(target)
        below = {r.revision for r in script.walk_revisions(base="base", head=current)}
    except CommandError:
        return False
    return wanted is not None and wanted.revision != current and wanted.revision in below


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused")).get_current_head()
    assert head is not None
    return head


def current_revision(url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(url), poolclass=None)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()

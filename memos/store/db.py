"""The database handle: engine lifecycle, the schema check at start, and transactions.

Driver errors stop here: a lost connection becomes ``Unavailable`` (503), so no
psycopg or SQLAlchemy exception reaches the HTTP layer.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from memos.errors import BeyondDatabaseLimit, Conflict, Unavailable
from memos.settings import Settings
from memos.store import migrations
from memos.store.embedded import EmbeddedPostgres
from memos.store.urls import libpq_url, sqlalchemy_url

log = logging.getLogger(__name__)


CONNECT_TIMEOUT_S = 5
"""How long opening a connection may take: a server that accepts and never answers is a 503, not a hang."""

POOL_TIMEOUT_S = 10
"""How long a request waits for a pooled connection before 503."""
PING_AFTER_IDLE_S = 30.0
"""A pooled connection idle longer than this is pinged (one round trip) before use."""


def pool_most(pool_size: int) -> int:
    """The most connections the pool opens: ``pool_size``, and as many again when busy (its overflow)."""
    return 2 * pool_size


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_most(pool_size) - pool_size,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            # Timestamps leave Postgres in UTC, whatever the server's default zone. Filtered HNSW scans keep
            # scanning until enough rows pass the filters (pgvector >= 0.8): every memos query that uses the
            # index wants that, and a search with the default ef_search then needs no transaction for SET LOCAL.
            "options": "-c TimeZone=UTC -c hnsw.iterative_scan=relaxed_order",
            # Text goes to the server as UTF8 whatever the database's encoding: on a LATIN1 database a character it
            # cannot hold (an emoji) was a UnicodeEncodeError in the driver, a 500; the server refuses it instead
            # (SQLSTATE 22P05), which is the caller's 422. A no-op on a UTF8 database.
            "client_encoding": "utf8",
        },
    )
    _check_liveness_on_checkout(engine)
    return engine


def _check_liveness_on_checkout(engine: AsyncEngine) -> None:
    """Hand out no pooled connection that Postgres has closed, without a round trip per checkout.

    After Postgres restarts while the service is idle, every pooled connection is dead, and the first
    request after the restart got a 503 (found by tests/test_faults.py). SQLAlchemy's ``pool_pre_ping``
    fixes that with a ``SELECT 1`` per checkout: 0.6 ms of a hybrid search's ~15 (two checkouts, measured
    A/B in one process). Instead: a server that ends a session (restart, crash, ``pg_terminate_backend``,
    an idle timeout) sends an error and closes the socket, so an idle connection whose socket has
    anything to read is dead, which a zero-timeout ``poll`` sees. A peer that vanished without a word
    (a dropped NAT entry, a lost host) leaves nothing to read: connections idle past
    ``PING_AFTER_IDLE_S`` are still pinged. Raising ``DisconnectionError`` makes the pool discard the
    connection and hand out a new one.
    """
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _alive(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None:  # just opened
            return
        if _server_has_spoken(dbapi_connection):
            raise DisconnectionError("the server closed this connection while it was idle")
        if time.monotonic() - idle_since > PING_AFTER_IDLE_S:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:  # whatever the driver raises, the connection is not usable
                raise DisconnectionError("an idle connection did not answer a ping") from exc


def _server_has_spoken(dbapi_connection: Any) -> bool:
    """Whether an idle connection's socket is readable: Postgres sent an error or closed it (or it is gone)."""
    try:
        fd = dbapi_connection.driver_connection.fileno()
        poller = select.poll()  # not select.select: that refuses descriptors past 1023
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error) as exc:  # closed already: no socket to ask
        log.debug("pooled connection has no usable socket", extra={"error": type(exc).__name__})
        return True


class SchemaOutOfDate(RuntimeError):
    """The external database's schema is not the one this code knows."""


class Database:
    """Owns the engine (and the embedded server, when memos runs one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url: str | None = settings.database_url
        self._embedded: EmbeddedPostgres | None = None
        self._engine: AsyncEngine | None = None
        self.head = migrations.head_revision()
        self.utf8 = True
        """Whether the server encoding is UTF8 (read at start): text is matched in NFKC form only there."""

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "Database.start() has not run"
        return self._engine

    def pool_state(self) -> tuple[int, int, int] | None:
        """(connections in use, idle, the most the pool opens), or None while not connected (``/metrics``)."""
        engine = self._engine
        if engine is None:
            return None
        pool: Any = engine.sync_engine.pool
        return pool.checkedout(), pool.checkedin(), pool_most(self.settings.db_pool_size)

    async def start(self, *, migrate: bool = True) -> None:
        """Start the embedded server and migrate it (unless not ``migrate``: the admin tools only check it, as for
        an external server), or check an external server's schema; then connect."""
        if self.url is None:
            self._embedded = EmbeddedPostgres(self.settings.data_dir)
            self.url = await asyncio.to_thread(self._embedded.start)
        if self._embedded is not None and migrate:
            await asyncio.to_thread(self._upgrade_if_needed, self.url)
        else:
            await asyncio.to_thread(migrations.check_server, self.url)
            current = await asyncio.to_thread(migrations.current_revision, self.url)
            if current != self.head:
                raise SchemaOutOfDate(
                    f"database schema is at {current or 'nothing'}, this memos needs {self.head}: "
                    "run `memos admin migrate` first"
                )
        self._engine = create_engine(self.url, self.settings.db_pool_size)
        async with self.read() as conn:
            self.utf8 = await conn.scalar(text("SELECT current_setting('server_encoding') = 'UTF8'")) is True

    def _upgrade_if_needed(self, url: str) -> None:
        if migrations.current_revision(url) != self.head:
            log.info("applying database migrations", extra={"target": self.head})
            migrations.upgrade(url)

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None

    @property
    def conninfo(self) -> str:
        """The server as a libpq URL, for a connection of its own outside the pool (a LISTEN)."""
        assert self.url is not None, "Database.start() has not run"
        return libpq_url(self.url)

    async def ready(self) -> bool:
        """True when the database answers and its schema is the one this code knows."""
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
        except (DBAPIError, PoolTimeout, OSError):
            return False
        return row is not None and row[0] == self.head

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction: commits when the block ends, rolls back on any exception."""
        with _unavailable_when_disconnected():
            async with self.engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A read-only REPEATABLE READ transaction: every statement sees one moment, while others write (the
        admin tools that read a whole cube or database: export, verify)."""
        async with self.transaction() as conn:
            await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads, in autocommit: no BEGIN/COMMIT round trips.

        Visibility is the same as in a READ COMMITTED transaction (each statement sees what was
        committed when it started). Code that needs ``SET LOCAL``-style settings uses ``transaction()``, or
        opens a short transaction on this same connection (search's ``_with_ef_search``): never a second
        pooled connection while holding this one."""
        with _unavailable_when_disconnected():
            async with self.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn


async def db_now(conn: AsyncConnection) -> datetime:
    """The database's clock (``now()``: in a read's autocommit statement, that statement's start; either way no
    later than what the connection reads next). Catch-ups read "changed since" against it, never this host's clock."""
    value: datetime = (await conn.exec_driver_sql("SELECT now()")).scalar_one()
    return value


def driver_sql(query: Any) -> str:
    """``query`` compiled once to the driver's SQL text (``%(name)s`` for each bind parameter), to be run with
    ``exec_driver_sql``: on paths every request takes, building a statement with the expression language and its
    cache key cost the event loop more than Postgres took to run it (measured in one process)."""
    from sqlalchemy.dialects.postgresql.psycopg import dialect

    return str(query.compile(dialect=dialect()))  # type: ignore[no-untyped-call]


def past_a_limit(error: BaseException | None) -> str | None:
    """Postgres's reason when ``error`` (a driver error) is a refusal past one of its own limits (SQLSTATE class 54,
    "program limit exceeded", e.g. a tsvector over 1 MiB): the database answered, the request asked too much."""
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None or not sqlstate.startswith("54"):
        return None
    return getattr(getattr(error, "diag", None), "message_primary", None) or "past one of its limits"


_CONCURRENT_WRITES = {"40P01", "40001"}
"""SQLSTATEs of a deadlock and a serialization failure: two writers' transactions crossed, nothing is down."""


@contextmanager
def _unavailable_when_disconnected() -> Iterator[None]:
    """A lost or exhausted connection is the service's problem, not the caller's: 503, retry shortly. A deadlock
    (an OperationalError too) is a 409 naming it: the database answered, and a retry of the request succeeds."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeout) as exc:
        orig = exc.orig if isinstance(exc, OperationalError) else None
        if (reason := past_a_limit(orig)) is not None:
            raise BeyondDatabaseLimit(f"too large for the database: {reason}") from exc
        if getattr(orig, "sqlstate", None) in _CONCURRENT_WRITES:
            log.warning("concurrent writes crossed", extra={"error": type(orig).__name__})
            raise Conflict(
                "a concurrent write to the same data crossed this one and it was rolled back; retry",
                headers={"Retry-After": "0"},
            ) from exc
        log.warning("database unavailable", extra={"error": type(exc).__name__})
        raise Unavailable("the database is not answering; retry shortly", headers={"Retry-After": "1"}) from exc

"""Checked API keys remembered in this process, forgotten the moment the database says a key changed.

Every request looked its key up in Postgres: one round trip, about 0.55 ms of a 2.4 ms GET by id on the 2-core
box (measured A/B with ``bench.api_latency --quick``, 2026-12-07). A key's row almost never changes, so the
process remembers (prefix -> hash, principal) for keys it has checked. A revoked key must then stop working at
once, wherever the revocation came from (another process, ``memos admin keys revoke``, an operator's SQL): the
database's triggers (migration 0014) send the key's prefix on channel ``memos_auth`` when a key row changes, and
``*`` when agents do. ``KeyListener`` holds one connection that LISTENs there and drops what it hears of.

The cache is only used while notifications are known to arrive. The listener checks that end to end: it sends a
probe notification through the service's own pool (as a revocation from another session would come) and waits
for it, when it connects and every ``HEARTBEAT_S`` after; the probe's SQL function refuses while a trigger is
missing or disabled. A probe that does not come back (a transaction-mode pooler such as pgbouncer delivers no
notifications; a peer lost without a word; a trigger off) or a lost connection empties the cache and turns it
off, and every request asks the database again until a probe comes back. The entries' ``ttl`` bounds what a
failure the probe cannot see could cost (a session that writes with ``session_replication_role = replica``, as
``pg_restore --disable-triggers`` does, fires no trigger).

A lookup that started before a change and ends after it must not store what it read: each put carries the
``generation`` read before the lookup, and every notification (and every change of liveness) moves it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import psycopg

from memos.identity.principal import Principal
from memos.store.db import Database

log = logging.getLogger(__name__)

CHANNEL = "memos_auth"
"""The channel migration 0014's triggers notify on."""
_LISTEN = "LISTEN memos_auth"  # SQL stays literal text (tests/test_hardening.py scans for SQL built from values)
FORGET_ALL = "*"
PROBE = "probe:"
"""Prefix of the listener's own probes (a key prefix is hex, never this)."""
HEARTBEAT_S = 10.0
"""How often the listener checks that a notification still reaches it."""
PROBE_WAIT_S = 5.0
"""How long a probe may take to come back before the cache is turned off."""
RETRY_S = 2.0
"""Wait before connecting again after the listener's connection failed."""
MAX_ENTRIES = 10_000


@dataclasses.dataclass(slots=True)
class KeyCacheStats:
    hits: int = 0
    misses: int = 0
    forgotten: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    key_hash: bytes
    principal: Principal
    stored_at: float


class KeyCache:
    """Prefix -> (key hash, principal), for ``ttl`` seconds at most, and only while ``live``."""

    def __init__(
        self, ttl: float, *, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._live = False
        self.generation = 0
        """Moves on at every change this cache hears of: a put with an older one stores nothing."""
        self.stats = KeyCacheStats()

    @property
    def live(self) -> bool:
        """Whether notifications are known to arrive, so entries may be used and stored."""
        return self._live

    def set_live(self, live: bool) -> None:
        """Turned on when a probe came back, off when the listener lost its connection or a probe: empties it."""
        if live != self._live:
            log.info("API key cache %s", "on" if live else "off: every request looks its key up")
        self._live = live
        self._entries.clear()
        self.generation += 1

    def get(self, prefix: str) -> tuple[bytes, Principal] | None:
        """The stored hash and principal of the key with this prefix, if known and fresh."""
        entry = self._entries.get(prefix) if self._live else None
        if entry is None or self._clock() - entry.stored_at >= self.ttl:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._entries.move_to_end(prefix)  # least recently used leave first when it is full
        return entry.key_hash, entry.principal

    def put(self, prefix: str, key_hash: bytes, principal: Principal, generation: int) -> None:
        """Remember a key read from the database, unless anything changed since ``generation`` was read."""
        if not self._live or generation != self.generation or self.ttl <= 0:
            return
        self._entries[prefix] = _Entry(key_hash, principal, self._clock())
        self._entries.move_to_end(prefix)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, prefix: str) -> None:
        """A key changed (its prefix), or ``*``: agents or keys changed wholesale."""
        self.generation += 1
        self.stats.forgotten += 1
        if prefix == FORGET_ALL:
            self._entries.clear()
        else:
            self._entries.pop(prefix, None)

    @property
    def size(self) -> int:
        """Keys held (not ``__len__``: an empty cache would be falsy, and ``cache or default`` replaced it)."""
        return len(self._entries)


async def probe(db: Database, payload: str) -> None:
    """Send a probe through the service's pool, as a revocation from another session would come (migration 0014's
    function: it refuses while a trigger that notifies changes is missing or disabled)."""
    async with db.read() as conn:  # autocommit: delivered at once
        await conn.exec_driver_sql("SELECT memos_auth_probe(%(payload)s)", {"payload": payload})


class ProbeLost(Exception):
    """A probe notification did not come back in time."""


class KeyListener:
    """LISTENs on ``memos_auth`` for the cache, and keeps checking that notifications arrive.

    ``conninfo``: a libpq URL of the database; ``probe(payload)`` sends a notification through the service's pool.
    """

    def __init__(
        self,
        conninfo: str,
        cache: KeyCache,
        probe: Callable[[str], Awaitable[None]],
        *,
        heartbeat: float = HEARTBEAT_S,
        probe_wait: float = PROBE_WAIT_S,
        retry: float = RETRY_S,
    ) -> None:
        self._conninfo = conninfo
        self._cache = cache
        self._probe = probe
        self._heartbeat = heartbeat
        self._probe_wait = probe_wait
        self._retry = retry
        self._task: asyncio.Task[None] | None = None
        self._failed = False
        self.backend_pid: int | None = None
        """The listening session's server process while connected (``pg_stat_activity``)."""
        self.connections = 0
        """LISTENs made so far (one per connection)."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="memos-key-listener")

    async def close(self) -> None:
        self._cache.set_live(False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=5, application_name="memos key listener"
                )
                async with conn:
                    await conn.execute(_LISTEN)
                    self.backend_pid = conn.info.backend_pid
                    self.connections += 1
                    await self._serve(conn)
            except Exception as exc:  # psycopg's, a lost probe, or the pool's own (the probe goes through it)
                # At warning level the first time and once per outage, not at every retry while it lasts.
                level = logging.WARNING if self._cache.live or not self._failed else logging.DEBUG
                self._failed = True
                log.log(level, "API key listener failed: %s", exc, extra={"error": type(exc).__name__})
            finally:
                self._cache.set_live(False)
                self.backend_pid = None
            await asyncio.sleep(self._retry)

    async def _serve(self, conn: psycopg.AsyncConnection[object]) -> None:
        while True:
            token = PROBE + secrets.token_hex(8)
            # Sent beside the listening, never before it: the probe may wait for a pooled connection (up to the
            # pool's timeout under load), and revocations heard meanwhile must still be acted on at once.
            sending: asyncio.Future[None] = asyncio.ensure_future(self._probe(token))
            try:
                came_back = await self._hear(conn, self._probe_wait, until=token)
            finally:
                failed = sending.exception() if sending.done() and not sending.cancelled() else None
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # its failure is the probe not coming back
                    await sending
            if not came_back:
                why = (
                    f"it failed: {failed}"
                    if failed is not None
                    else f"it did not come back within {self._probe_wait} s"
                )
                raise ProbeLost(f"a probe notification was sent and {why}")
            if not self._cache.live:
                self._cache.set_live(True)
            await self._hear(conn, self._heartbeat)
            # A statement now and then: a server with idle_session_timeout ended the listening session (it only ever
            # receives), turning the cache off until it reconnected. Notifications that arrive meanwhile wait in
            # psycopg's backlog for the next _hear.
            await conn.execute("SELECT 1")

    async def _hear(self, conn: psycopg.AsyncConnection[object], seconds: float, until: str | None = None) -> bool:
        """Act on notifications for ``seconds``; True once ``until`` arrived (if given), after the rest of its batch.

        psycopg reads notifications in batches (all that one read of the socket brings) and hands them out one by one:
        leaving its generator in the middle of one dropped the rest of it, a revocation committed just after a probe
        among them (found in review). So each generator is run to its end: ``stop_after=1`` ends it after the batch
        that brings one.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        came = False
        while not came and (left := end - loop.time()) > 0:
            async for note in conn.notifies(timeout=left, stop_after=1):
                if until is not None and note.payload == until:
                    came = True
                elif not note.payload.startswith(PROBE):  # other processes' probes say nothing
                    self._cache.forget(note.payload)
        return came

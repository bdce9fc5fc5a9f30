"""Checked API keys remembered in this process, forgotten the moment the database says a key changed.

Every request looked its key up in Postgres: one round trip, about 0.55 ms of a 2.4 ms GET by id on the 2-core
box (measured A/B with ``bench.api_latency --quick``, 2026-12-07). A key's row almost never changes, so the
process remembers (prefix -> hash, principal) for keys it has checked. A revoked key must then stop working at
once, wherever the revocation came from (another process, ``memos admin keys revoke``, an operator's SQL): the
database's triggers (migration 0014) send the key's prefix on channel ``memos_auth`` when a key row changes, and
``*`` when agents do. ``KeyListener`` holds one connection that LISTENs there and drops what it hears of.

The cache is only used while notifications are known to arrive. The listener checks that end to end: it sends a
probe notification through the service's own pool (as a revocation from another session would come) and waits
for it, when it connects and every ``HEARTBEAT_S`` after. A probe that does not come back (a transaction-mode
pooler such as pgbouncer delivers no notifications; a peer lost without a word) or a lost connection empties the
cache and turns it off, and every request asks the database again until a probe comes back. The entries'
``ttl`` bounds what a failure the probe cannot see could cost.

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
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, connect_timeout=5)
                async with conn:
                    await conn.execute(_LISTEN)
                    await self._serve(conn)
            except Exception as exc:  # psycopg's, a lost probe, or the pool's own (the probe goes through it)
                # At warning level the first time and once per outage, not at every retry while it lasts.
                level = logging.WARNING if self._cache.live or not self._failed else logging.DEBUG
                self._failed = True
                log.log(level, "API key listener failed: %s", exc, extra={"error": type(exc).__name__})
            finally:
                self._cache.set_live(False)
            await asyncio.sleep(self._retry)

    async def _serve(self, conn: psycopg.AsyncConnection[object]) -> None:
        while True:
            token = PROBE + secrets.token_hex(8)
            await self._probe(token)
            if not await self._hear(conn, self._probe_wait, until=token):
                raise ProbeLost(f"a notification sent did not come back within {self._probe_wait} s")
            if not self._cache.live:
                self._cache.set_live(True)
            await self._hear(conn, self._heartbeat)

    async def _hear(self, conn: psycopg.AsyncConnection[object], seconds: float, until: str | None = None) -> bool:
        """Act on notifications for ``seconds``; True as soon as ``until`` arrives (if given)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            async with contextlib.aclosing(conn.notifies(timeout=left)) as heard:
                async for note in heard:
                    if note.payload == until:
                        return True
                    if not note.payload.startswith(PROBE):  # other processes' probes say nothing
                        self._cache.forget(note.payload)
        return False

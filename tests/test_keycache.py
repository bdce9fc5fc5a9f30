"""API keys cached per process, and forgotten the moment the database says a key changed (identity/keycache.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import OPERATOR_KEY, Factory, bearer, soon
from litestar import Litestar
from litestar.testing import TestClient
from test_metrics import scrape, value

from memos.app import create_app
from memos.embed.base import Embedder
from memos.identity.keycache import KeyCache, KeyListener, probe
from memos.identity.principal import OPERATOR, Principal
from memos.identity.schemas import TenantIn
from memos.identity.service import IdentityService
from memos.settings import Settings
from memos.store.db import Database

Client = TestClient[Litestar]


def principal() -> Principal:
    return Principal(role="agent", agent_id=uuid.uuid4(), tenant_id=uuid.uuid4(), key_prefix="0" * 12)


# ---------------------------------------------------------------------- the cache alone


def test_entries_expire_after_their_ttl_and_only_a_live_cache_holds_any() -> None:
    now = [100.0]
    cache = KeyCache(60, clock=lambda: now[0])
    who = principal()
    cache.put("aa", b"h", who, cache.generation)
    assert cache.get("aa") is None and cache.size == 0  # not live: nothing is stored
    cache.set_live(True)
    cache.put("aa", b"h", who, cache.generation)
    assert cache.get("aa") == (b"h", who)
    now[0] += 59.9
    assert cache.get("aa") == (b"h", who)
    now[0] += 0.1
    assert cache.get("aa") is None
    cache.put("bb", b"h", who, cache.generation)
    cache.set_live(False)  # the listener lost its connection: everything goes
    assert cache.size == 0
    cache.set_live(True)
    assert cache.get("bb") is None


def test_a_lookup_that_crossed_a_change_stores_nothing() -> None:
    cache = KeyCache(60)
    cache.set_live(True)
    before = cache.generation
    cache.forget("cc")  # heard while the lookup of "aa" was in the database
    cache.put("aa", b"h", principal(), before)
    assert cache.get("aa") is None
    cache.put("aa", b"h", principal(), cache.generation)
    assert cache.get("aa") is not None


def test_forget_drops_one_key_or_all_and_the_cache_stays_bounded() -> None:
    cache = KeyCache(60, max_entries=3)
    cache.set_live(True)
    for prefix in ("a", "b", "c", "d"):
        cache.put(prefix, b"h", principal(), cache.generation)
    assert cache.size == 3 and cache.get("a") is None  # the oldest left
    cache.forget("c")
    assert cache.get("c") is None and cache.get("b") is not None
    cache.forget("*")
    assert cache.size == 0


def test_a_zero_ttl_caches_nothing() -> None:
    cache = KeyCache(0)
    cache.set_live(True)
    cache.put("a", b"h", principal(), cache.generation)
    assert cache.size == 0


# ---------------------------------------------------------------------- through the service


def test_a_checked_key_is_served_from_the_cache(app: Litestar, client: Client, factory: Factory) -> None:
    keys: KeyCache = app.state.identity.keys
    assert soon(lambda: keys.live), "the listener's probe never came back"
    tenant = factory.tenant()
    assert client.get("/v1/agents/me", headers=bearer(tenant.admin_key)).status_code == 200
    hits = keys.stats.hits
    for _ in range(3):
        assert client.get("/v1/agents/me", headers=bearer(tenant.admin_key)).status_code == 200
    assert keys.stats.hits == hits + 3
    figures = scrape(client)
    assert value(figures, "memos_auth_cache_live") == 1
    assert value(figures, "memos_auth_cache_lookups_total", outcome="hit") == keys.stats.hits >= 3
    # The right prefix with another secret is still refused, from the cache too.
    wrong = tenant.admin_key[:-4] + ("AAAA" if not tenant.admin_key.endswith("AAAA") else "BBBB")
    assert client.get("/v1/agents/me", headers=bearer(wrong)).status_code == 401


def test_a_key_revoked_through_the_api_fails_on_the_next_request(
    app: Litestar, client: Client, factory: Factory, database_url: str
) -> None:
    """The process that revoked it forgets it itself: its listener hears of it a moment after the 204, which a
    client's next request may beat. The trigger is off here, so only that path can make the test pass."""
    assert soon(lambda: app.state.identity.keys.live)
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 200  # cached now
    prefix = agent.key.split("_")[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE api_keys DISABLE TRIGGER memos_api_keys_notify")
        try:
            assert client.delete(f"/v1/keys/{prefix}", headers=bearer(tenant.admin_key)).status_code == 204
            assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 401
        finally:
            conn.execute("ALTER TABLE api_keys ENABLE TRIGGER memos_api_keys_notify")


def test_a_key_revoked_outside_this_process_fails_within_moments(
    app: Litestar, client: Client, factory: Factory, database_url: str
) -> None:
    """Another memos process, ``memos admin keys revoke`` or an operator's SQL: the database's trigger tells every
    listening process. Without it the cached key would work on for the entry's whole minute."""
    keys: KeyCache = app.state.identity.keys
    assert soon(lambda: keys.live)
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 200
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 200
    prefix = agent.key.split("_")[1]
    assert keys.get(prefix) is not None
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE prefix = %s", [prefix])
    assert soon(lambda: client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 401, 3.0)
    assert keys.get(prefix) is None


def test_agents_changed_by_hand_empty_every_process_cache(
    app: Litestar, client: Client, factory: Factory, database_url: str
) -> None:
    keys: KeyCache = app.state.identity.keys
    assert soon(lambda: keys.live)
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 200
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).json()["role"] == "agent"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET role = 'admin' WHERE id = %s", [agent.id])
    assert soon(lambda: keys.size == 0, 3.0)
    admin_only = client.get("/v1/agents", headers=bearer(agent.key))
    assert admin_only.status_code == 200  # the key now stands for an admin


def test_a_key_revoked_in_one_process_fails_in_another_within_moments(
    app: Litestar, client: Client, factory: Factory, settings: Settings, embedder: Embedder
) -> None:
    """Two memos processes on one database, each with its own cache and listener: a key the other one has cached
    stops working there once this one revokes it."""
    other_app = create_app(settings, embedder_factory=lambda: embedder)
    with TestClient(other_app) as other:
        assert soon(lambda: app.state.identity.keys.live and other_app.state.identity.keys.live)
        tenant = factory.tenant()
        agent = factory.agent(tenant)
        for _ in range(2):
            assert other.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 200
        prefix = agent.key.split("_")[1]
        assert other_app.state.identity.keys.get(prefix) is not None  # cached over there
        assert client.delete(f"/v1/keys/{prefix}", headers=bearer(tenant.admin_key)).status_code == 204
        assert soon(lambda: other.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 401, 3.0)


# ---------------------------------------------------------------------- the listener


@pytest.fixture
async def db(database_url: str, tmp_path: Path) -> Any:
    database = Database(Settings(database_url=database_url, data_dir=tmp_path))
    await database.start()
    yield database
    await database.stop()


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_the_cache_stays_off_where_notifications_do_not_arrive(db: Database) -> None:
    """A transaction-mode pooler (pgbouncer) takes LISTEN and delivers nothing: the probe never comes back."""

    async def lost(payload: str) -> None:
        return None

    cache = KeyCache(60)
    listener = KeyListener(db.conninfo, cache, lost, probe_wait=0.2, retry=0.1)
    listener.start()
    try:
        assert await eventually(lambda: listener.connections >= 2)  # it listened, gave up on the probe, and again
        cache.put("a", b"h", principal(), cache.generation)
        assert not cache.live and cache.size == 0
    finally:
        await listener.close()


async def notify(db: Database, *payloads: str) -> None:
    """Notifications on the channel, sent in one transaction (delivered together when it commits)."""
    async with db.transaction() as conn:
        for payload in payloads:
            await conn.exec_driver_sql("SELECT pg_notify('memos_auth', %(payload)s)", {"payload": payload})


async def test_a_change_that_arrives_with_the_probe_is_acted_on(db: Database) -> None:
    """psycopg hands out what one read brings one by one: leaving after the probe dropped a revocation behind it."""
    cache = KeyCache(60)
    cache.set_live(True)
    listener = KeyListener(db.conninfo, cache, functools.partial(probe, db))
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        await conn.execute("LISTEN memos_auth")
        cache.put("abc", b"h", principal(), cache.generation)
        await notify(db, "probe:x", "abc")
        assert await listener._hear(conn, 2.0, until="probe:x")
        assert cache.get("abc") is None


async def test_changes_are_heard_while_a_probe_waits_for_the_pool(db: Database) -> None:
    """A probe waits for a pooled connection (up to the pool's timeout under load): meanwhile revocations must still
    be heard, and a probe that does not come back in time turns the cache off."""
    sent = 0

    async def stuck_after_the_first(payload: str) -> None:
        nonlocal sent
        sent += 1
        if sent > 1:
            await asyncio.sleep(30)
        await probe(db, payload)

    cache = KeyCache(60)
    listener = KeyListener(db.conninfo, cache, stuck_after_the_first, heartbeat=0.1, probe_wait=1.0, retry=5)
    listener.start()
    try:
        assert await eventually(lambda: cache.live)
        assert await eventually(lambda: sent == 2)
        cache.put("abc", b"h", principal(), cache.generation)
        await notify(db, "abc")
        assert await eventually(lambda: cache.get("abc") is None, 0.5)
        assert cache.live
        assert await eventually(lambda: not cache.live, 2.0)
    finally:
        await listener.close()


async def test_a_disabled_trigger_turns_every_cache_off(db: Database, database_url: str) -> None:
    """With a trigger off (by hand, or a downgrade beside live servers) changes go unheard: the probe refuses."""
    cache = KeyCache(60)
    listener = KeyListener(db.conninfo, cache, functools.partial(probe, db), heartbeat=0.1, probe_wait=0.5, retry=0.1)
    listener.start()
    try:
        assert await eventually(lambda: cache.live)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE agents DISABLE TRIGGER memos_agents_notify")
            try:
                assert await eventually(lambda: not cache.live, 3.0)
            finally:
                conn.execute("ALTER TABLE agents ENABLE TRIGGER memos_agents_notify")
        assert await eventually(lambda: cache.live, 3.0)
    finally:
        await listener.close()


async def test_the_listening_session_outlives_an_idle_session_timeout(db: Database) -> None:
    """The listener only receives: with the server's idle_session_timeout shorter than its heartbeat it was ended
    again and again, and the cache went off each time."""
    cache = KeyCache(60)
    conninfo = db.conninfo + ("&" if "?" in db.conninfo else "?") + "options=-c%20idle_session_timeout%3D400"
    listener = KeyListener(conninfo, cache, functools.partial(probe, db), heartbeat=0.1, retry=0.1)
    listener.start()
    try:
        assert await eventually(lambda: cache.live)
        await asyncio.sleep(1.5)
        assert cache.live and listener.connections == 1
    finally:
        await listener.close()


async def test_the_listener_comes_back_after_its_connection_is_lost(db: Database) -> None:
    cache = KeyCache(60)
    listener = KeyListener(db.conninfo, cache, functools.partial(probe, db), heartbeat=0.2, retry=0.1)
    listener.start()
    try:
        assert await eventually(lambda: cache.live)
        cache.put("a", b"h", principal(), cache.generation)
        async with db.read() as conn:
            ended = await conn.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": listener.backend_pid})
            assert ended.scalar() is True
        assert await eventually(lambda: cache.size == 0)  # what it held may have changed unheard
        assert await eventually(lambda: cache.live)
        assert listener.connections == 2
    finally:
        await listener.close()


async def test_a_lookup_crossed_by_a_change_does_not_keep_the_key(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup read the key as good, and a revocation was heard before it returned: what it read is not stored
    (the generation is read before the lookup, not after)."""
    cache = KeyCache(60)
    cache.set_live(True)
    service = IdentityService(db, OPERATOR_KEY, cache)
    created = await service.create_tenant(OPERATOR, TenantIn(name=f"crossed-{uuid.uuid4().hex[:8]}"))
    prefix = created.admin_key.split("_")[1]
    lookup = db.read

    @contextlib.asynccontextmanager
    async def crossed() -> AsyncIterator[Any]:
        async with lookup() as conn:
            yield conn
        cache.forget(prefix)  # the notification arrives while the lookup's answer is on its way back

    monkeypatch.setattr(db, "read", crossed)
    assert await service.authenticate(created.admin_key) is not None
    assert cache.size == 0
    monkeypatch.setattr(db, "read", lookup)
    assert await service.authenticate(created.admin_key) is not None
    assert cache.size == 1  # a lookup nothing crossed is kept

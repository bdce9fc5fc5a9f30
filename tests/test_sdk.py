"""The Python SDK (clients/python) against the real app: in-process, and over a real socket.

The sync client reaches the app through Litestar's test transport (the app runs in the conftest
``client`` fixture's portal, lifespan and all); the async client through ``httpx.ASGITransport`` on
a second app whose lifespan runs in the test's own event loop. One module-scoped uvicorn server on
127.0.0.1 serves the real-socket test and runs the Python blocks of docs/sdk.md and the SDK README.
Only the retry-policy tests use a fake transport: a real server cannot be made to answer 503 or
drop a connection on demand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# The SDK is its own package; until the dev install includes it, import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import httpx
import memos_client
import msgspec
import pytest
import uvicorn
from conftest import OPERATOR_KEY, Factory, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient
from litestar.testing import transport as litestar_transport
from memos_client import (
    AsyncMemosClient,
    BadRequest,
    Conflict,
    DerivedFrom,
    Forbidden,
    Invalid,
    InvalidResponse,
    LinkIn,
    MemoryIn,
    MemosClient,
    MemosError,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
    Provenance,
    RateLimited,
    RetryPolicy,
    ServerError,
    Timeout,
    TooLarge,
    TransportError,
    Turn,
    Unauthorized,
    Unavailable,
)

from memos.app import create_app
from memos.embed.base import Embedder
from memos.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BASE = "http://memos.test"
MISSING = "00000000-0000-0000-0000-000000000000"
DOC_MODEL = "tiny"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- fixtures -----------------------------------------------------------------------------------


class InProcess(httpx.BaseTransport):
    """Litestar's test transport (each request runs on the TestClient's portal, where the app lives) for httpx."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self._inner = litestar_transport.TestClientTransport(client=client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(request)


@pytest.fixture
def connect(client: TestClient[Litestar]) -> Iterator[Callable[[str], MemosClient]]:
    """Sync SDK clients bound to the module's app in-process, closed after the test."""
    made: list[MemosClient] = []

    def make(key: str) -> MemosClient:
        sdk = MemosClient(BASE, api_key=key, transport=InProcess(client))
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        sdk.close()


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The shared settings plus a tiny random causal LM, so the docs' KV and generation snippets run."""
    return with_tiny_model(settings, tmp_path_factory, DOC_MODEL, seed=5)


@pytest.fixture(scope="module")
async def async_app(settings: Settings, embedder: Embedder) -> AsyncIterator[Litestar]:
    """A second app on the module's database whose lifespan runs in the test event loop (ASGITransport sends none)."""
    app = create_app(settings, embedder_factory=lambda: embedder)
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        # One task enters and exits the lifespan (its cancel scopes require it); fixture setup and teardown are two.
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(serve())
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()  # the lifespan failed: raise its error
    assert started.is_set(), "the app did not start"
    yield app
    stop.set()
    await task


def async_connect(app: Litestar, key: str) -> AsyncMemosClient:
    # Litestar types its ASGI callable with its own scope types, narrower than httpx's; at runtime it is plain ASGI.
    return AsyncMemosClient(BASE, api_key=key, transport=httpx.ASGITransport(app=app))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live_url(settings: Settings, embedder: Embedder) -> Iterator[str]:
    """A third app served by uvicorn on a real socket (127.0.0.1, a free port), stopped at module end."""
    app = create_app(settings, embedder_factory=lambda: embedder)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-sdk-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
    assert not thread.is_alive()


# --- the public surface -------------------------------------------------------------------------

PUBLIC_NAMES = {
    # clients and configuration
    "MemosClient",
    "AsyncMemosClient",
    "RetryPolicy",
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "Pager",
    "AsyncPager",
    "Page",
    "__version__",
    # answers
    "TenantCreated",
    "AgentCreated",
    "Agent",
    "Me",
    "KeyCreated",
    "ApiKey",
    "Cube",
    "CubeStats",
    "Grant",
    "Memory",
    "Version",
    "Link",
    "ProvenanceGraph",
    "ProvenanceNode",
    "ProvenanceEdge",
    "SearchResponse",
    "SearchResult",
    "CacheLookup",
    "CacheStats",
    "CacheCategoryStats",
    "CacheConfig",
    "Model",
    "Activation",
    "Generation",
    "SchedulerState",
    "Pin",
    # inputs
    "Turn",
    "MemoryIn",
    "Provenance",
    "DerivedFrom",
    "LinkIn",
    # errors
    "MemosError",
    "FieldError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
    "TooLarge",
    "Invalid",
    "PreconditionRequired",
    "RateLimited",
    "ServerError",
    "Unavailable",
    "InvalidResponse",
    "TransportError",
    "Timeout",
}


def test_public_names_are_exactly_all() -> None:
    """Adding or dropping a public name is a decision: change this list with it."""
    assert set(memos_client.__all__) == PUBLIC_NAMES
    assert len(memos_client.__all__) == len(PUBLIC_NAMES)
    for name in memos_client.__all__:
        assert getattr(memos_client, name) is not None
    # Submodules imported explicitly (memos_client.compat.*, memos_client.kv) appear as attributes once loaded.
    public_attrs = {
        n for n, v in vars(memos_client).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
    } | {"__version__"}
    assert public_attrs == PUBLIC_NAMES, "a public attribute of memos_client is missing from __all__"


def test_adapter_public_names() -> None:
    from memos_client.compat import langgraph, mem0

    assert langgraph.__all__ == ["MemosStore"]
    assert mem0.__all__ == ["Memory"]


def test_exception_tree_mirrors_the_server_problems() -> None:
    statuses = {
        BadRequest: 400,
        Unauthorized: 401,
        Forbidden: 403,
        NotFound: 404,
        Conflict: 409,
        PreconditionFailed: 412,
        TooLarge: 413,
        Invalid: 422,
        PreconditionRequired: 428,
        RateLimited: 429,
        Unavailable: 503,
    }
    for cls in [*statuses, ServerError, TransportError, InvalidResponse]:
        assert issubclass(cls, MemosError)
    assert issubclass(Unavailable, ServerError)
    assert issubclass(Timeout, TransportError)
    # The server's own tree has the same names for the same statuses.
    from memos import errors as server_errors

    for cls, status in statuses.items():
        server_cls = getattr(server_errors, cls.__name__, None)
        if server_cls is not None:
            assert server_cls.status == status, cls.__name__


def test_configuration_from_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOS_API_KEY", raising=False)
    monkeypatch.delenv("MEMOS_URL", raising=False)
    with pytest.raises(ValueError, match="MEMOS_API_KEY"):
        MemosClient()
    with MemosClient(api_key="k") as sdk:
        assert sdk.base_url == memos_client.DEFAULT_BASE_URL
        assert sdk.timeout == memos_client.DEFAULT_TIMEOUT
    monkeypatch.setenv("MEMOS_URL", "http://example.test:9000/")
    monkeypatch.setenv("MEMOS_API_KEY", "secret-key-from-env")
    sdk = MemosClient(timeout=3, retries=0)
    assert sdk.base_url == "http://example.test:9000"
    assert sdk.timeout == httpx.Timeout(3)
    assert sdk.retry_policy.max_retries == 0
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(max_retries=-1)
    assert "secret-key-from-env" not in repr(sdk)
    sdk.close()
    # Arguments win over the environment.
    with MemosClient("http://other.test", api_key="explicit") as sdk:
        assert sdk.base_url == "http://other.test"
    # Mistakes caught before anything is sent.
    with MemosClient(api_key="k", transport=httpx.MockTransport(Script(500))) as sdk:
        with pytest.raises(ValueError, match="timezone-aware"):
            sdk.search("x", since=datetime(2026, 1, 1))
        with pytest.raises(TypeError, match="if_version"):
            sdk.memories.update(MISSING, if_version="3", content="x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            sdk.memories.update(MISSING, content="x")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="tags"):
            sdk.memories.add(MISSING, content="x", tags="one-tag")
        with pytest.raises(ValueError, match="path"):
            sdk.request("GET", "https://elsewhere.test/v1/agents/me")  # would send the key to another host


# --- the whole flow -----------------------------------------------------------------------------


def test_full_flow_sync(connect: Callable[[str], MemosClient]) -> None:
    operator = connect(OPERATOR_KEY)
    tenant = operator.tenants.create(unique("acme"))
    assert tenant.admin_key.startswith("memos_")

    admin = connect(tenant.admin_key)
    me = admin.agents.me()
    assert (me.id, me.role, me.tenant_id) == (tenant.admin_agent_id, "admin", tenant.id)
    bot_created = admin.agents.create(unique("bot"))
    assert bot_created.role == "agent"
    bot = connect(bot_created.api_key)
    assert bot.agents.me().id == bot_created.id

    cube = bot.cubes.create(unique("cube"), description="flow", metadata={"team": "a"})
    assert (cube.owner_agent_id, cube.access, cube.metadata) == (bot_created.id, "manage", {"team": "a"})

    memory = bot.memories.add(
        cube.id,
        content="Ada prefers jasmine tea",
        tags=["prefs", "tea"],
        metadata={"speaker": "Ada"},
        provenance=Provenance(source="chat", agent="bot"),
        ttl_seconds=3600,
    )
    assert (memory.version, memory.state, memory.kind) == (1, "active", "plaintext")
    assert memory.provenance == {"source": "chat", "agent": "bot"}
    assert memory.expires_at is not None
    assert bot.memories.get(memory.id) == memory

    updated = bot.memories.update(memory.id, if_version=1, content="Ada prefers green tea", ttl_seconds=None)
    assert (updated.version, updated.content, updated.expires_at) == (2, "Ada prefers green tea", None)
    assert updated.tags == ["prefs", "tea"]  # fields not sent stay as they are

    versions = list(bot.memories.versions(memory.id))
    assert [(v.version, v.op) for v in versions] == [(1, "create"), (2, "update")]
    assert bot.memories.version(memory.id, 1).content == "Ada prefers jasmine tea"

    restored = bot.memories.restore(memory.id, 1, if_version=2)
    assert (restored.version, restored.content) == (3, "Ada prefers jasmine tea")

    derived = bot.memories.add(
        cube.id,
        content="Ada likes floral teas",
        provenance={"derived_from": [DerivedFrom(memory.id)], "note": "generalised"},
        links=[LinkIn(memory.id, "supports", 2.0)],
    )
    graph = bot.memories.provenance(memory.id)
    assert {(n.memory_id, n.depth) for n in graph.nodes} == {(memory.id, 0), (derived.id, 1)}
    assert [(e.from_id, e.to_id, e.to_version) for e in graph.edges] == [(derived.id, memory.id, 3)]

    other = bot.memories.add(cube.id, content="Ada is allergic to cats")
    link = bot.memories.link(other.id, to=memory.id, type="about_same_person", weight=0.5)
    assert (link.from_id, link.to_id, link.type, link.weight) == (other.id, memory.id, "about_same_person", 0.5)

    found = bot.search("what tea does Ada like", cube_ids=[cube.id], k=2)
    assert found.results
    assert found.results[0].memory.id in {memory.id, derived.id}
    assert found.took_ms >= 0
    text_hits = bot.search("allergic cats", mode="text", tags=None, kinds=["plaintext"])
    assert [h.memory.id for h in text_hits.results] == [other.id]
    assert text_hits.results[0].via == "text"
    now = datetime.now(UTC)
    filtered = bot.search(
        "Ada tea",
        mode="text",
        filters={"speaker": "Ada"},
        since=now - timedelta(hours=1),
        until=(now + timedelta(hours=1)).isoformat(),
        states=["active"],
    )
    assert [h.memory.id for h in filtered.results] == [memory.id]
    assert bot.search("Ada tea", mode="text", since=now + timedelta(hours=1)).results == []

    # Sharing: a second agent gets read access, then loses it.
    reader_created = admin.agents.create(unique("reader"))
    reader = connect(reader_created.api_key)
    grant = bot.cubes.grant(cube.id, reader_created.id, "read")
    assert (grant.access, grant.agent_id) == ("read", reader_created.id)
    assert reader.cubes.get(cube.id).access == "read"
    assert reader.memories.get(memory.id).content == "Ada prefers jasmine tea"
    bot.cubes.revoke(cube.id, reader_created.id)
    with pytest.raises(NotFound):
        reader.cubes.get(cube.id)

    renamed = bot.cubes.update(cube.id, name=unique("renamed"))
    assert renamed.name != cube.name and renamed.description == "flow"
    assert bot.cubes.get(cube.id).stats.memories == 3

    # Keys: rotate, both work, revoke the new one.
    key = admin.agents.rotate_key(bot_created.id)
    rotated = connect(key.api_key)
    assert rotated.agents.me().id == bot_created.id
    bot.agents.revoke_key(key.prefix)
    with pytest.raises(Unauthorized):
        rotated.agents.me()
    listed = list(bot.agents.list_keys(bot_created.id, page_size=1))  # its own keys, page by page
    assert [k.prefix for k in listed][-1] == key.prefix and listed[-1].revoked_at is not None
    assert listed[0].revoked_at is None and {k.agent_id for k in listed} == {bot_created.id}
    with pytest.raises(NotFound):
        list(bot.agents.list_keys(reader_created.id))  # another agent's are not the bot's to see
    assert {a.id for a in admin.agents.list()} >= {tenant.admin_agent_id, bot_created.id, reader_created.id}

    bot.memories.delete(other.id, if_version=1)
    assert bot.memories.get(other.id).state == "deleted"
    admin.memories.delete(derived.id, purge=True)
    assert admin.memories.get(derived.id).content is None
    bot.cubes.delete(cube.id)
    with pytest.raises(NotFound):
        bot.cubes.get(cube.id)
    # request() reaches endpoints without a method, with the same auth and errors.
    assert bot.request("GET", "/v1/agents/me")["id"] == bot_created.id


async def test_full_flow_async(async_app: Litestar) -> None:
    async with async_connect(async_app, OPERATOR_KEY) as operator:
        tenant = await operator.tenants.create(unique("async-acme"))
    async with async_connect(async_app, tenant.admin_key) as admin:
        assert (await admin.agents.me()).role == "admin"
        bot_created = await admin.agents.create(unique("bot"))
        reader_created = await admin.agents.create(unique("reader"))
        key = await admin.agents.rotate_key(bot_created.id)
        assert [a.id async for a in admin.agents.list(page_size=1)] == [
            tenant.admin_agent_id,
            bot_created.id,
            reader_created.id,
        ]

    async with async_connect(async_app, key.api_key) as bot:
        cube = await bot.cubes.create(unique("cube"))
        memory = await bot.memories.add(cube.id, content="Grace takes her coffee black", tags=["prefs"])
        assert (await bot.memories.get(memory.id)).version == 1
        updated = await bot.memories.update(memory.id, if_version=1, tags=["prefs", "coffee"], state="archived")
        assert (updated.version, updated.state, updated.tags) == (2, "archived", ["prefs", "coffee"])
        assert [m.id async for m in bot.memories.list(cube.id, state="archived")] == [memory.id]
        assert [v.op async for v in bot.memories.versions(memory.id)] == ["create", "update"]
        assert (await bot.memories.version(memory.id, 2)).state == "archived"
        restored = await bot.memories.restore(memory.id, 1)
        assert (restored.version, restored.state, restored.tags) == (3, "active", ["prefs"])

        [a, b] = await bot.memories.add_many(
            cube.id,
            [
                MemoryIn(content="Grace drinks tea in the evening", provenance=Provenance(derived_from=[])),
                {"content": "What does Grace drink?", "kind": "response", "metadata": {"query": "drink?"}},
            ],
        )
        assert (a.kind, b.kind) == ("plaintext", "response")
        link = await bot.memories.link(a.id, to=memory.id, type="related")
        assert link.weight == 1.0
        graph = await bot.memories.provenance(memory.id)
        assert [n.memory_id for n in graph.nodes] == [memory.id]

        found = await bot.search("how does Grace take coffee", cube_ids=[cube.id], mode="graph", diversity=0.3)
        assert memory.id in {r.memory.id for r in found.results}

        assert (await bot.cubes.grant(cube.id, reader_created.id, "write")).access == "write"
        assert [c.id async for c in bot.cubes.list()] == [cube.id]
        assert (await bot.cubes.update(cube.id, description="async")).description == "async"
        await bot.cubes.revoke(cube.id, reader_created.id)

        with pytest.raises(PreconditionFailed):
            await bot.memories.update(memory.id, if_version=1, content="stale")
        with pytest.raises(NotFound):
            await bot.memories.get(MISSING)
        await bot.memories.delete(memory.id)
        await bot.cubes.delete(cube.id)
        assert (await bot.request("GET", "/v1/agents/me"))["id"] == bot_created.id
        assert [k.prefix async for k in bot.agents.list_keys(bot_created.id)][-1] == key.prefix
        await bot.agents.revoke_key(key.prefix)
        with pytest.raises(Unauthorized):
            await bot.agents.me()


# --- pagination ---------------------------------------------------------------------------------


def test_cache_sync(connect: Callable[[str], MemosClient], factory: Factory) -> None:
    tenant = factory.tenant()
    sdk = connect(tenant.admin_key)
    cube = sdk.cubes.create(unique("cache"))
    config = sdk.cache.configure(cube.id, {"faq": {"threshold": 0.8, "max_entries": 10}})
    assert (config.categories["faq"]["threshold"], config.categories["faq"]["max_entries"]) == (0.8, 10)
    assert config.configured == {"categories": {"faq": {"threshold": 0.8, "max_entries": 10}}}
    assert sdk.cache.config(cube.id) == config

    memory = sdk.cache.store(cube.id, "How do I renew my library card?", "At the front desk.", category="faq")
    assert (memory.kind, memory.content, memory.metadata["query"]) == (
        "response",
        "At the front desk.",
        "How do I renew my library card?",
    )
    found = sdk.cache.lookup(cube.id, "How can I renew my library card?", category="faq")
    assert (found.hit, found.memory_id, found.response, found.category) == (
        True,
        memory.id,
        "At the front desk.",
        "faq",
    )
    assert found.similarity is not None and found.similarity >= found.threshold
    assert not sdk.cache.lookup(cube.id, "How can I renew my library card?").hit  # the default category

    history = [
        Turn(role="user", content="My Glimmer phone plan is too dear."),
        Turn(role="assistant", content="Glimmer Max is £30 a month. Cancel or downgrade?"),
    ]
    bound = sdk.cache.store(cube.id, "cancel it", "Cancelled.", context=history, ttl_seconds=600)
    assert bound.metadata["context"] == [
        {"role": "user", "content": "My Glimmer phone plan is too dear."},
        {"role": "assistant", "content": "Glimmer Max is £30 a month. Cancel or downgrade?"},
    ]
    assert bound.expires_at is not None
    as_strings = [t.content for t in history]  # plain strings alternate, the newest being the assistant's
    assert sdk.cache.lookup(cube.id, "Cancel it", context=as_strings).memory_id == bound.id
    assert not sdk.cache.lookup(cube.id, "Cancel it").hit

    sdk.cache.feedback(memory.id, "How can I renew my library card?", correct=False)
    stats = sdk.cache.stats(cube.id)
    faq = next(c for c in stats.categories if c.category == "faq")
    assert (faq.entries, faq.false_hits, faq.hits) == (1, 1, 1)
    assert faq.threshold is not None and faq.threshold > 0.8
    assert stats.entries == 2

    assert sdk.cache.invalidate(cube.id, category="faq") == 1
    assert sdk.cache.invalidate(cube.id, older_than=3600) == 0
    assert not sdk.cache.lookup(cube.id, "How do I renew my library card?", category="faq").hit

    with pytest.raises(Invalid) as bad:
        sdk.cache.configure(cube.id, {"faq": {"threshold": 2}})
    assert bad.value.field_errors[0].field == "categories.faq.threshold"
    with pytest.raises(Invalid):
        sdk.cache.lookup(cube.id, "   ")
    with pytest.raises(TypeError):
        sdk.cache.lookup(cube.id, "q", context="a string, not turns")
    with pytest.raises(NotFound):
        connect(factory.tenant().admin_key).cache.lookup(cube.id, "How do I renew my library card?")


async def test_cache_async(async_app: Litestar, factory: Factory) -> None:
    tenant = factory.tenant()
    async with async_connect(async_app, tenant.admin_key) as sdk:
        cube = await sdk.cubes.create(unique("cache"))
        memory = await sdk.cache.store(cube.id, "What time does the pool open?", "7 am.")
        found = await sdk.cache.lookup(cube.id, "When does the pool open?")
        assert (found.hit, found.memory_id) == (True, memory.id)
        await sdk.cache.feedback(memory.id, "When does the pool open?", correct=True)
        assert (await sdk.cache.stats(cube.id)).categories[0].category == "chat"
        assert (await sdk.cache.config(cube.id)).default == "default"
        assert (await sdk.cache.configure(cube.id, {}, default="chat")).default == "chat"
        assert await sdk.cache.invalidate(cube.id) == 1


def test_pagers_follow_cursors_lazily(connect: Callable[[str], MemosClient], factory: Factory) -> None:
    tenant = factory.tenant()
    admin = connect(tenant.admin_key)
    cube = admin.cubes.create(unique("pages"))
    made = admin.memories.add_many(cube.id, [MemoryIn(content=f"fact {i}", tags=["t"]) for i in range(7)])
    assert [m.content for m in made] == [f"fact {i}" for i in range(7)]

    # A batch shares one created_at, so the list orders it by id (created_at, then id: docs/api.md).
    in_order = [m.id for m in next(admin.memories.list(cube.id, page_size=500).pages()).items]
    assert sorted(in_order) == sorted(m.id for m in made)
    pager = admin.memories.list(cube.id, page_size=3)
    assert [m.id for m in pager] == in_order
    assert [m.id for m in pager] == in_order  # iterating again starts over
    pages = list(pager.pages())
    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert pages[-1].next_cursor is None
    resumed = admin.memories.list(cube.id, page_size=3, cursor=pages[0].next_cursor)
    assert [m.id for m in resumed] == in_order[3:]

    # Filters travel with every page.
    admin.memories.add(cube.id, content="other", tags=["u"])
    assert len(list(admin.memories.list(cube.id, tag="t", page_size=2))) == 7
    assert len(list(admin.memories.list(cube.id, tag=["t", "u"]))) == 0
    now = datetime.now(UTC)
    assert list(admin.memories.list(cube.id, since=now + timedelta(hours=1))) == []
    assert len(list(admin.memories.list(cube.id, until=now + timedelta(hours=1), kind="plaintext"))) == 8
    assert list(admin.memories.list(cube.id, until=(now - timedelta(hours=1)).isoformat())) == []

    # Versions and cubes page the same way.
    memory = made[0]
    for n in range(1, 5):
        memory = admin.memories.update(memory.id, if_version=n, content=f"fact 0 v{n + 1}")
    assert [v.version for v in admin.memories.versions(memory.id, page_size=2)] == [1, 2, 3, 4, 5]
    extra = [admin.cubes.create(unique("c")) for _ in range(2)]
    assert [c.id for c in admin.cubes.list(page_size=1)] == [cube.id, *(c.id for c in extra)]

    # Nothing is fetched until iteration: the error comes from the loop.
    lazy = admin.memories.list(MISSING)
    with pytest.raises(NotFound):
        list(lazy)
    with pytest.raises(Invalid) as bad_cursor:
        list(admin.memories.list(cube.id, cursor="not-a-cursor"))
    assert [e.field for e in bad_cursor.value.field_errors] == ["cursor"]


async def test_async_pagers_follow_cursors(async_app: Litestar, factory: Factory) -> None:
    tenant = factory.tenant()
    async with async_connect(async_app, tenant.admin_key) as admin:
        cube = await admin.cubes.create(unique("pages"))
        made = await admin.memories.add_many(cube.id, [{"content": f"fact {i}"} for i in range(5)])
        pager = admin.memories.list(cube.id, page_size=2)
        assert sorted([m.id async for m in pager]) == sorted(m.id for m in made)
        sizes = [len(p.items) async for p in pager.pages()]
        assert sizes == [2, 2, 1]
        with pytest.raises(NotFound):
            [m async for m in admin.memories.list(MISSING)]


def test_expired_memories_only_with_include_expired(connect: Callable[[str], MemosClient], factory: Factory) -> None:
    tenant = factory.tenant()
    admin = connect(tenant.admin_key)
    cube = admin.cubes.create(unique("ttl"))
    memory = admin.memories.add(cube.id, content="short-lived", ttl_seconds=1)
    time.sleep(1.2)
    with pytest.raises(NotFound):
        admin.memories.get(memory.id)
    assert admin.memories.get(memory.id, include_expired=True).id == memory.id
    assert list(admin.memories.list(cube.id)) == []
    assert [m.id for m in admin.memories.list(cube.id, include_expired=True)] == [memory.id]
    # Its history and provenance too.
    with pytest.raises(NotFound):
        list(admin.memories.versions(memory.id))
    with pytest.raises(NotFound):
        admin.memories.version(memory.id, 1)
    with pytest.raises(NotFound):
        admin.memories.provenance(memory.id)
    assert [v.version for v in admin.memories.versions(memory.id, include_expired=True)] == [1]
    assert admin.memories.version(memory.id, 1, include_expired=True).content == "short-lived"
    assert [n.memory_id for n in admin.memories.provenance(memory.id, include_expired=True).nodes] == [memory.id]
    # Expired memories can be patched: that is how a TTL is extended or cleared.
    assert admin.memories.update(memory.id, if_version=1, ttl_seconds=None).expires_at is None
    assert admin.memories.get(memory.id).version == 2


# --- errors from the real server ----------------------------------------------------------------


def test_every_server_problem_becomes_its_exception(connect: Callable[[str], MemosClient], factory: Factory) -> None:
    tenant = factory.tenant()
    admin = connect(tenant.admin_key)
    agent = factory.agent(tenant)
    bot = connect(agent.key)
    cube = admin.cubes.create(unique("errors"))
    memory = admin.memories.add(cube.id, content="v1")

    with pytest.raises(Unauthorized) as e401:
        connect("memos_nope_nope").agents.me()
    assert e401.value.status == 401
    assert e401.value.problem["type"] == "https://memos.dev/problems/unauthorized"

    with pytest.raises(Forbidden) as e403:
        connect(OPERATOR_KEY).agents.me()
    assert e403.value.status == 403
    admin.cubes.grant(cube.id, agent.id, "read")
    with pytest.raises(Forbidden):
        bot.memories.add(cube.id, content="read grants cannot write")

    with pytest.raises(NotFound) as e404:
        admin.memories.get(MISSING)
    assert (e404.value.status, e404.value.detail) == (404, "no such memory")
    assert e404.value.request_id
    with pytest.raises(NotFound):
        admin.cubes.get("not-a-uuid/../../agents")  # the id is one path segment, whatever it holds

    with pytest.raises(Conflict) as e409:
        admin.cubes.create(cube.name)
    assert e409.value.status == 409

    admin.memories.update(memory.id, if_version=1, content="v2")
    with pytest.raises(PreconditionFailed) as e412:
        admin.memories.update(memory.id, if_version=1, content="lost update")
    assert e412.value.status == 412
    assert e412.value.extra["current_version"] == 2
    assert admin.memories.get(memory.id).content == "v2"

    with pytest.raises(Invalid) as e422:
        admin.memories.add(cube.id, content="", tags=["ok", ""])
    assert e422.value.status == 422
    assert {e.field for e in e422.value.field_errors} >= {"content"}
    assert str(e422.value).startswith("422 ")
    with pytest.raises(Invalid) as bad_k:
        admin.search("tea", k=0)
    assert [e.field for e in bad_k.value.field_errors] == ["k"]

    with pytest.raises(PreconditionRequired) as e428:
        admin.request("PATCH", f"/v1/memories/{memory.id}", json={"content": "no If-Match"})
    assert e428.value.status == 428

    with pytest.raises(TooLarge) as e413:
        admin.memories.add(cube.id, content="x" * (1024 * 1024 + 1))
    assert e413.value.status == 413

    with pytest.raises(BadRequest) as e400:
        admin.request("POST", "/v1/cubes", content=b"{not json", headers={"Content-Type": "application/json"})
    assert e400.value.status == 400


def test_unauthorized_errors_carry_the_request_id(connect: Callable[[str], MemosClient]) -> None:
    with pytest.raises(Unauthorized) as e401:
        connect("memos_nope_nope").agents.me()
    assert e401.value.request_id


# --- the retry policy (fake transport: a real server cannot 503 or drop connections on demand) --------


class Script:
    """An httpx.MockTransport handler playing back answers, statuses or transport errors (the last one repeats)."""

    def __init__(self, *steps: httpx.Response | type[httpx.TransportError] | int) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, type):
            raise step("scripted failure", request=request)
        if isinstance(step, int):
            return problem(step)
        return step


def problem(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"type": "https://memos.dev/problems/x", "title": "t", "status": status, "detail": f"scripted {status}"}
    return httpx.Response(status, json=body, headers=headers)


ME = {"id": "a", "name": "n", "role": "agent", "tenant_id": "t"}
FAST = RetryPolicy(max_retries=3, backoff=0.001, max_backoff=0.002)


def scripted(script: Script, retries: RetryPolicy = FAST) -> MemosClient:
    return MemosClient(BASE, api_key="k", retries=retries, transport=httpx.MockTransport(script))


def test_retry_honours_retry_after_on_503_and_429() -> None:
    script = Script(problem(503, retry_after="1"), problem(429), httpx.Response(200, json=ME))
    with scripted(script) as sdk:
        assert sdk.agents.me().id == "a"
    assert len(script.requests) == 3
    assert script.times[1] - script.times[0] >= 1.0  # Retry-After: 1 was waited out
    assert script.times[2] - script.times[1] < 0.5  # no Retry-After: the (tiny) backoff
    assert script.requests[0].headers["Authorization"] == "Bearer k"


def test_retry_gives_up_after_max_retries_or_a_long_retry_after() -> None:
    script = Script(503)
    with scripted(script) as sdk, pytest.raises(Unavailable) as exhausted:
        sdk.cubes.get(MISSING)
    assert len(script.requests) == 4  # the first attempt and 3 retries
    assert isinstance(exhausted.value, ServerError)
    assert exhausted.value.detail == "scripted 503"

    script = Script(problem(503, retry_after="120"))
    with scripted(script) as sdk, pytest.raises(Unavailable) as too_long:
        sdk.agents.me()
    assert len(script.requests) == 1  # asked to wait past max_retry_after: raised at once
    assert too_long.value.retry_after == 120.0

    script = Script(problem(429, retry_after="7"))
    with scripted(script, RetryPolicy(max_retries=0)) as sdk, pytest.raises(RateLimited) as limited:
        sdk.agents.me()
    assert (len(script.requests), limited.value.retry_after) == (1, 7.0)


def test_writes_are_retried_only_when_nothing_was_sent() -> None:
    # A create (POST) on 503: not repeated.
    script = Script(503)
    with scripted(script) as sdk, pytest.raises(Unavailable):
        sdk.memories.add(MISSING, content="x")
    assert len(script.requests) == 1
    # A PATCH on 429: not repeated.
    script = Script(429)
    with scripted(script) as sdk, pytest.raises(RateLimited):
        sdk.memories.update(MISSING, if_version=1, content="x")
    assert len(script.requests) == 1
    # A POST whose connection failed before sending: repeated.
    script = Script(httpx.ConnectError, httpx.ConnectTimeout, httpx.Response(201, json={"items": []}))
    with scripted(script) as sdk:
        assert sdk.memories.add_many(MISSING, [{"content": "x"}]) == []
    assert len(script.requests) == 3
    # A POST whose connection broke after sending: not repeated (the server may have written).
    script = Script(httpx.ReadError)
    with scripted(script) as sdk, pytest.raises(TransportError) as lost:
        sdk.cubes.create("x")
    assert len(script.requests) == 1
    assert lost.value.status is None
    assert isinstance(lost.value.__cause__, httpx.ReadError)
    # A DELETE whose connection broke after sending: not repeated either. A delete writes, so a repeat of one
    # that landed answers 412 under If-Match (the delete moved the version), or 404 for a cube: a failure
    # reported for a delete that happened.
    for delete in (lambda sdk: sdk.memories.delete(MISSING), lambda sdk: sdk.cubes.delete(MISSING)):
        script = Script(httpx.ReadError, httpx.Response(204))
        with scripted(script) as sdk, pytest.raises(TransportError):
            delete(sdk)
        assert len(script.requests) == 1
    # ... but one that was never sent is.
    script = Script(httpx.ConnectError, httpx.Response(204))
    with scripted(script) as sdk:
        sdk.memories.delete(MISSING)
    assert len(script.requests) == 2
    # search is a POST that only reads: retried like a GET.
    script = Script(503, httpx.RemoteProtocolError, httpx.Response(200, json={"results": [], "took_ms": 1.0}))
    with scripted(script) as sdk:
        assert sdk.search("x").results == []
    assert len(script.requests) == 3


def test_reads_retry_lost_connections_but_not_timeouts_or_500() -> None:
    script = Script(httpx.ReadError, httpx.Response(200, json=ME))
    with scripted(script) as sdk:
        assert sdk.agents.me().name == "n"
    assert len(script.requests) == 2

    script = Script(httpx.ReadTimeout)
    with scripted(script) as sdk, pytest.raises(Timeout):
        sdk.agents.me()
    assert len(script.requests) == 1

    script = Script(httpx.ConnectError)
    with scripted(script) as sdk, pytest.raises(TransportError) as refused:
        sdk.agents.me()
    assert len(script.requests) == 4
    assert not isinstance(refused.value, Timeout)

    script = Script(500)
    with scripted(script) as sdk, pytest.raises(ServerError) as failed:
        sdk.agents.me()
    assert len(script.requests) == 1
    assert type(failed.value) is ServerError


def test_a_downloaded_kv_file_is_checked_against_its_digest() -> None:
    body = b"memos-kv bytes"
    good = {"X-Memos-SHA256": hashlib.sha256(body).hexdigest(), "Content-Type": "application/octet-stream"}
    with scripted(Script(httpx.Response(200, content=body, headers=good))) as sdk:
        assert sdk.activations.download(MISSING) == body
    damaged = httpx.Response(200, content=body[:-1] + b"X", headers=good)
    with scripted(Script(damaged)) as sdk, pytest.raises(InvalidResponse, match="SHA-256"):
        sdk.activations.download(MISSING)
    unsigned = httpx.Response(200, content=body, headers={"Content-Type": "application/octet-stream"})
    with scripted(Script(unsigned)) as sdk, pytest.raises(InvalidResponse):
        sdk.activations.download(MISSING)


def test_an_id_cannot_change_the_route() -> None:
    """quote() leaves "." alone and httpx resolves dot segments: "grants/.." would have been the cube itself."""
    for hostile in ("..", "."):
        script = Script(404)
        with scripted(script) as sdk, pytest.raises(NotFound):
            sdk.cubes.revoke(MISSING, hostile)
        assert script.requests[0].method == "DELETE"
        assert script.requests[0].url.raw_path.decode().startswith(f"/v1/cubes/{MISSING}/grants/%2E")
    with scripted(Script(404)) as sdk, pytest.raises(ValueError, match="empty"):
        sdk.memories.delete("")


def test_one_string_where_a_list_belongs_is_refused() -> None:
    """Iterating "prefs" gives its letters: the search would quietly have looked for tags p, r, e, f and s."""
    with scripted(Script(500)) as sdk:
        for call in (
            lambda: sdk.search("x", tags="prefs"),
            lambda: sdk.search("x", kinds="plaintext"),
            lambda: sdk.search("x", states="active"),
            lambda: sdk.search("x", cube_ids=MISSING),
            lambda: sdk.memories.add(MISSING, content="x", tags="prefs"),
        ):
            with pytest.raises(TypeError, match="must be a list"):
                call()


def test_unexpected_bodies_are_sdk_errors_not_decoder_errors() -> None:
    html = httpx.Response(502, text="<html>bad gateway</html>", headers={"Content-Type": "text/html"})
    with scripted(Script(html)) as sdk, pytest.raises(ServerError) as gateway:
        sdk.agents.me()
    assert gateway.value.status == 502
    assert "bad gateway" in gateway.value.detail
    with scripted(Script(httpx.Response(200, json={"id": 1}))) as sdk, pytest.raises(InvalidResponse):
        sdk.agents.me()
    # Fields a newer server adds are ignored.
    newer = httpx.Response(200, json={**ME, "added_later": {"x": 1}})
    with scripted(Script(newer)) as sdk:
        assert sdk.agents.me() == msgspec.convert(ME, memos_client.Me)
    # A body httpx cannot decompress is a TransportError too, never an httpx exception.
    broken = httpx.Response(200, stream=httpx.ByteStream(b"not gzip"), headers={"Content-Encoding": "gzip"})
    with scripted(Script(broken)) as sdk, pytest.raises(TransportError) as undecodable:
        sdk.agents.me()
    assert isinstance(undecodable.value.__cause__, httpx.DecodingError)
    # A server that hands back the cursor it was given would loop forever: refused.
    same = httpx.Response(200, json={"items": [], "next_cursor": "c1"})
    with scripted(Script(same)) as sdk, pytest.raises(InvalidResponse, match="same cursor"):
        list(sdk.cubes.list(cursor="c1"))


async def test_async_client_retries_the_same_way() -> None:
    script = Script(problem(503, retry_after="0"), httpx.ConnectError, httpx.Response(200, json=ME))
    transport = httpx.MockTransport(script)
    async with AsyncMemosClient(BASE, api_key="k", retries=FAST, transport=transport) as sdk:
        assert (await sdk.agents.me()).id == "a"
    assert len(script.requests) == 3

    script = Script(503)
    transport = httpx.MockTransport(script)
    async with AsyncMemosClient(BASE, api_key="k", retries=FAST, transport=transport) as sdk:
        with pytest.raises(Unavailable):
            await sdk.memories.add(MISSING, content="x")
    assert len(script.requests) == 1


# --- a real socket, and the documentation -------------------------------------------------------


def test_over_a_real_socket(live_url: str) -> None:
    with MemosClient(live_url, api_key=OPERATOR_KEY, timeout=10) as operator:
        tenant = operator.tenants.create(unique("socket"))
    with MemosClient(live_url, api_key=tenant.admin_key, timeout=10) as admin:
        cube = admin.cubes.create(unique("socket"))
        memory = admin.memories.add(cube.id, content="sent over TCP")
        assert admin.memories.get(memory.id).content == "sent over TCP"
        assert [m.id for m in admin.memories.list(cube.id)] == [memory.id]

    async def use_async() -> str:
        async with AsyncMemosClient(live_url, api_key=tenant.admin_key, timeout=10) as sdk:
            found = await sdk.search("TCP", cube_ids=[cube.id], mode="text")
            return found.results[0].memory.id

    assert asyncio.run(use_async()) == memory.id

    # Nothing listens on a closed port: the connection error is retried, then raised as TransportError.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with (
        MemosClient(dead, api_key="k", retries=RetryPolicy(max_retries=1, backoff=0.01)) as sdk,
        pytest.raises(TransportError) as refused,
    ):
        sdk.agents.me()
    assert isinstance(refused.value.__cause__, httpx.ConnectError)


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("doc", ["docs/sdk.md", "docs/quickstart.md", "clients/python/README.md"])
def test_documentation_snippets_run(
    doc: str, live_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ```python block of the page, in order, in one namespace, against the live server."""
    with MemosClient(live_url, api_key=OPERATOR_KEY) as operator:
        tenant = operator.tenants.create(unique("docs"))
    monkeypatch.setenv("MEMOS_URL", live_url)
    monkeypatch.setenv("MEMOS_API_KEY", tenant.admin_key)
    monkeypatch.setenv("MEMOS_OPERATOR_KEY", OPERATOR_KEY)
    spec = settings.models[DOC_MODEL]
    monkeypatch.setenv("MEMOS_MODELS", json.dumps({DOC_MODEL: {"path": str(spec.path)}}))
    blocks = python_blocks(REPO / doc)
    assert blocks, f"no python blocks in {doc}"
    namespace: dict[str, Any] = {"__name__": "__doc_snippet__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc}[block {i}]", "exec"), namespace)  # noqa: S102 -- running our own docs
    out = capsys.readouterr().out
    print(out)  # shown when an assertion below fails
    assert "jasmine" in out or "green tea" in out
    if doc == "docs/quickstart.md":
        assert "agent key issued: True" in out
        assert "memories: 4" in out
        assert re.search(r"^[0-9.]+ \S+ +Ada prefers jasmine tea$", out, flags=re.M)
        assert "graph: Ada flies to Lisbon on 3 June" in out
        assert "hit: True Jasmine tea." in out
        assert re.search(r"^hit: False - miss: .*negation", out, flags=re.M)
        assert "cache hits so far: 1" in out
        assert "reused the stored KV: True" in out
    if doc == "docs/sdk.md":
        assert "agent True" in out
        assert "Grace takes her coffee black" in out
        assert "someone wrote first; current version: 2" in out
        assert "3 the meeting is on Monday" in out
        assert "\n7\n" in out
        assert "3 4" in out
        assert "422 ['content']" in out
        assert "404 no such cube" in out
        assert "MemosClient(base_url='http://127.0.0.1:8000')" in out
        assert re.search(r"^cached tokens: (\d+) \1$", out, flags=re.M)


def test_mcp_documentation_runs(
    live_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/mcp.md's blocks as written: make a cube with the agent's key, then talk to `memos mcp --transport http`."""
    import subprocess

    blocks = python_blocks(REPO / "docs/mcp.md")
    assert len(blocks) == 2, "docs/mcp.md's python blocks changed: update this test"
    with MemosClient(live_url, api_key=OPERATOR_KEY) as operator:
        tenant = operator.tenants.create(unique("mcp-docs"))
    with MemosClient(live_url, api_key=tenant.admin_key) as admin:
        agent = admin.agents.create("assistant")
    monkeypatch.setenv("MEMOS_URL", live_url)
    monkeypatch.setenv("MEMOS_API_KEY", agent.api_key)  # the page exports the agent's key before its first block
    namespace: dict[str, Any] = {"__name__": "__doc_snippet__"}
    exec(compile(blocks[0], "docs/mcp.md[block 0]", "exec"), namespace)  # noqa: S102
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "memos.cli.main", "mcp", "--transport", "http", "--port", str(port)]
    env = {"MEMOS_API_KEY": agent.api_key, "MEMOS_CUBE_ID": str(namespace["cube"].id)}
    log = tmp_path / "mcp.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, env={**os.environ, **env}, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "memos mcp did not start listening"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        block = blocks[1].replace("8765", str(port))
        exec(compile(block, "docs/mcp.md[block 1]", "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert capsys.readouterr().out.splitlines()[-1] == "Ada prefers jasmine tea"


def test_the_sdk_installs_and_imports_alone(tmp_path: Path) -> None:
    """``pip install ./clients/python`` in a bare virtual environment: no server, no torch, and it works."""
    import shutil
    import subprocess

    # A copy: building the package writes build/ next to its sources, and the checkout stays clean.
    source = shutil.copytree(
        REPO / "clients" / "python",
        tmp_path / "src",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(REPO / "constraints.txt"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = (
        "import sys, memos_client\n"
        "from memos_client import MemosClient, NotFound\n"
        "assert not [m for m in sys.modules if m == 'memos' or m.startswith(('memos.', 'torch', 'transformers'))]\n"
        "print(memos_client.__version__, MemosClient('http://127.0.0.1:1', api_key='k'))\n"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "MemosClient(base_url='http://127.0.0.1:1')" in out.stdout
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "torch" not in listed and "memos==" not in listed, listed

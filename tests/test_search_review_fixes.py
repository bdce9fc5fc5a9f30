"""Search review fixes: one pooled connection per search (a bigger ef_search included), and BM25 in a cube
whose memories have no words."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import Factory, bearer
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy.exc import DBAPIError

from memos.app import create_app
from memos.search import lexical
from memos.search.service import HNSW_DEFAULT_EF, SearchService
from memos.settings import Settings
from memos.store import db as store_db
from memos.store.db import Database

POOL_TIMEOUT_S = 2
"""The pool wait in these tests: a search that waits for a second connection fails in 2 s, not 10."""


def search(client: Any, key: str, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/search", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


# -- bug 1: a search held one pooled connection while it waited for a second --------------------------------


def test_concurrent_searches_with_a_big_pool_never_wait_for_a_second_connection(
    settings: Settings, embedder: Any, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k = 20 makes a pool of 80 candidates, over the default ef_search (40). With a db pool of 1 (at most 2
    connections), two searches each holding their connection used to wait for a second one until the pool
    timed out (503). The two searches are lined up at the vector leg, each holding its connection, so the
    old code deadlocked every time."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    items = [{"kind": "plaintext", "content": f"note {i} about jasmine tea and gardens"} for i in range(25)]
    r = factory.client.post(
        f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key)
    )
    assert r.status_code == 201, r.text

    monkeypatch.setattr(store_db, "POOL_TIMEOUT_S", POOL_TIMEOUT_S)
    barrier = asyncio.Barrier(2)
    vector_leg = SearchService._vector

    async def lined_up(self: SearchService, *args: Any, **kwargs: Any) -> None:
        # Both searches hold their read connection here; neither goes on until the other has arrived.
        async with asyncio.timeout(5):
            await barrier.wait()
        await vector_leg(self, *args, **kwargs)

    def concurrently(client: TestClient[Litestar], bodies: list[dict[str, Any]]) -> list[Any]:
        """The requests at once: the TestClient runs the app on one event loop, each request from its thread."""
        out: list[Any] = [None] * len(bodies)

        def one(i: int) -> None:
            out[i] = client.post("/v1/search", json=bodies[i], headers=bearer(tenant.admin_key))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out

    app: Litestar = create_app(dataclasses.replace(settings, db_pool_size=1), embedder_factory=lambda: embedder)
    with TestClient(app) as client:
        with monkeypatch.context() as patched:
            patched.setattr(SearchService, "_vector", lined_up)
            started = time.monotonic()
            lined = concurrently(client, [{"query": "jasmine tea", "k": 20}] * 2)
            took = time.monotonic() - started
        assert [r.status_code for r in lined] == [200, 200], [r.text[:200] for r in lined]
        assert took < POOL_TIMEOUT_S, f"the searches waited for the pool: {took:.2f} s"
        assert all(len(r.json()["results"]) == 20 for r in lined)

        # More searches than connections, every mode with a vector leg: each waits for one connection only.
        bodies = [{"query": "jasmine tea", "k": 20, "mode": mode} for mode in ("hybrid", "vector", "graph") * 2]
        burst = concurrently(client, bodies)
        assert [r.status_code for r in burst] == [200] * len(bodies), [r.text[:200] for r in burst]


@contextlib.asynccontextmanager
async def one_connection_pool(settings: Settings) -> AsyncIterator[Database]:
    """A Database whose pool opens at most 2 connections, so the checks below see every connection."""
    db = Database(dataclasses.replace(settings, db_pool_size=1))
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


async def ef_search_of(db: Database) -> list[str]:
    """``hnsw.ef_search`` of every connection the pool has (both checked out at once, so both are seen)."""
    async with db.read() as first, db.read() as second:
        values = []
        for conn in (first, second):
            await conn.exec_driver_sql("SELECT '[1]'::vector")  # loads pgvector, which defines the setting
            values.append(str((await conn.exec_driver_sql("SHOW hnsw.ef_search")).scalar_one()))
        return values


async def test_the_bigger_ef_search_never_outlives_its_statement(settings: Settings) -> None:
    """The setting is the statement's alone, on the search's own connection, whether the statement succeeds,
    fails or is cancelled: no connection goes back to the pool with it."""
    from memos.search.service import _with_ef_search

    default = str(HNSW_DEFAULT_EF)
    current = "SELECT current_setting('hnsw.ef_search') AS ef"
    async with one_connection_pool(settings) as db:
        async with db.read() as conn:
            await conn.exec_driver_sql("SELECT '[1]'::vector")
            rows = await _with_ef_search(conn, 200, current, {})
            assert [r.ef for r in rows] == ["200"]
            assert (await conn.exec_driver_sql("SHOW hnsw.ef_search")).scalar_one() == default
        assert await ef_search_of(db) == [default, default]

        async with db.read() as conn:
            with pytest.raises(DBAPIError, match="division by zero"):
                await _with_ef_search(conn, 300, "SELECT 1 / (0 * length(current_setting('hnsw.ef_search')))", {})
            # The same connection goes on, in autocommit, with its own setting.
            assert (await conn.exec_driver_sql("SHOW hnsw.ef_search")).scalar_one() == default
        assert await ef_search_of(db) == [default, default]

        async def slow() -> None:
            async with db.read() as conn:
                await _with_ef_search(conn, 400, "SELECT pg_sleep(30)", {})

        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
        assert await ef_search_of(db) == [default, default]


# -- bug 2: BM25 divided by an average length of 0 -----------------------------------------------------------


def test_bm25_without_an_average_length_leaves_lengths_out() -> None:
    idf = {"tea": 1.5}
    neutral = lexical.bm25({"tea": 2}, idf, avg_length=7.0, length=7)
    assert lexical.bm25({"tea": 2}, idf, avg_length=0.0, length=7) == pytest.approx(neutral)
    assert lexical.bm25({"tea": 2}, idf, avg_length=0.0, length=0) == pytest.approx(neutral)
    assert lexical.bm25({}, idf, avg_length=0.0, length=3) == 0.0


def test_a_cube_whose_memories_have_no_words_is_searchable(client: Any, factory: Factory) -> None:
    """Active memories with only stopwords and punctuation have no lexeme: their average length is 0."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    wordless = [factory.memory(key, cube["id"], text)["id"] for text in ("it is what it is", "!!! ??? ...")]
    archived = factory.memory(key, cube["id"], "Ada keeps her jasmine tea in a tin.")
    r = client.patch(
        f"/v1/memories/{archived['id']}", json={"state": "archived"}, headers={**bearer(key), "If-Match": '"1"'}
    )
    assert r.status_code == 200, r.text

    # The archived memory has the word; the active ones (all the statistics count) have none.
    body = search(client, key, query="jasmine tea", mode="text", states=["archived"], cube_ids=[cube["id"]])
    assert [x["memory"]["id"] for x in body["results"]] == [archived["id"]]
    assert body["results"][0]["score"] > 0
    for mode in ("hybrid", "graph"):
        body = search(client, key, query="what is it about tea", mode=mode, k=5, cube_ids=[cube["id"]])
        assert {x["memory"]["id"] for x in body["results"]} == set(wordless)


def test_cached_statistics_without_words_still_score_a_new_memory(client: Any, factory: Factory) -> None:
    """The per-cube counts are cached for minutes: a memory with words written after a cube's wordless counts
    were taken is scored with those counts."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    for text in ("it is what it is", "!!! ??? ..."):
        factory.memory(key, cube["id"], text)
    # Counts the cube (no lexeme in it) and caches the counts; no memory has the word, so nothing is scored.
    assert search(client, key, query="tea", mode="text", cube_ids=[cube["id"]])["results"] == []
    fresh = factory.memory(key, cube["id"], "Ada prefers jasmine tea")
    for mode in ("text", "hybrid", "graph"):
        body = search(client, key, query="what tea does Ada like", mode=mode, k=3, cube_ids=[cube["id"]])
        assert body["results"][0]["memory"]["id"] == fresh["id"], mode
        assert "text" in body["results"][0]["via"], mode


# -- a memory deleted between the ranking and the read of the winners' rows ---------------------------------


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid", "graph"])
def test_a_memory_deleted_after_the_ranking_is_left_out_not_returned_deleted(
    factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The winners' rows were read by id alone: a memory deleted after the ranking had read it came back with
    state "deleted" in a search for active memories (found in review)."""
    import psycopg

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    made = [factory.memory(tenant.admin_key, cube["id"], f"Ada drinks jasmine tea, note {i}") for i in range(3)]
    rank = SearchService._rank
    deleted: list[str] = []

    def rank_then_delete(self: SearchService, *args: Any, **kwargs: Any) -> Any:
        ranked = rank(self, *args, **kwargs)
        if ranked and not deleted:
            deleted.append(str(ranked[0].id))
            with psycopg.connect(database_url, autocommit=True) as conn:  # another writer, committed at once
                conn.execute("UPDATE memories SET state = 'deleted' WHERE id = %s", (ranked[0].id,))
        return ranked

    monkeypatch.setattr(SearchService, "_rank", rank_then_delete)
    found = search(factory.client, tenant.admin_key, query="jasmine tea", mode=mode, cube_ids=[cube["id"]])
    assert deleted and deleted[0] in {m["id"] for m in made}
    assert [r["memory"]["state"] for r in found["results"]] == ["active"] * len(found["results"])
    assert deleted[0] not in {r["memory"]["id"] for r in found["results"]}


# -- a turn number past float's range (security review) ------------------------------------------------------


def test_a_turn_past_floats_range_neither_fails_the_write_nor_the_cubes_graph(
    client: Any, app: Litestar, factory: Factory
) -> None:
    """``metadata.turn`` of 401 digits: float() raised OverflowError after the commit (the write answered 500,
    committed) and in every build of the cube's graph, so every graph search of the cube was a 500."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = bearer(tenant.admin_key)
    plain = factory.memory(tenant.admin_key, cube["id"], "the lighthouse keeper paints seashells")
    assert search(client, tenant.admin_key, query="lighthouse", mode="graph")["results"]  # the graph is loaded
    body = {"kind": "plaintext", "content": "the lighthouse keeper feeds gulls", "metadata": {"turn": 10**400}}
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json=body, headers=key)
    assert r.status_code == 201, r.text
    huge = r.json()["id"]
    for _ in range(2):  # the graph updated by the write, then built again from the database
        found = {
            x["memory"]["id"] for x in search(client, tenant.admin_key, query="lighthouse", mode="graph")["results"]
        }
        assert {plain["id"], huge} <= found
        app.state.memories.graphs.drop(uuid.UUID(cube["id"]))


def test_a_graph_note_that_fails_leaves_the_write_standing_and_the_graph_rebuilt(
    client: Any, app: Litestar, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a graph update raises after the commit, the write answers 201 (not 500 for a committed write) and
    the cube's graph is rebuilt from the database on its next search."""
    from memos.search import graphs

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    factory.memory(tenant.admin_key, cube["id"], "the orchard grows quinces")
    assert search(client, tenant.admin_key, query="quinces", mode="graph")["results"]

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("a graph update that fails")

    with monkeypatch.context() as patched:
        patched.setattr(graphs, "node_fields", broken)
        written = factory.memory(tenant.admin_key, cube["id"], "the orchard also grows medlars")
    assert uuid.UUID(cube["id"]) not in app.state.memories.graphs._graphs, "dropped, to be rebuilt"
    found = {x["memory"]["id"] for x in search(client, tenant.admin_key, query="medlars", mode="graph")["results"]}
    assert written["id"] in found


def test_a_link_to_a_memory_made_active_again_at_the_same_time_reaches_the_graph(
    client: Any, app: Litestar, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH to active (or a restore) read the memory's edges for the graph, then a link to it committed before
    the PATCH did (the link's foreign key took a lock the PATCH did not block): the link was in neither that read
    nor, with no node yet, the graph (found in a concurrency review). Here the link is sent right after the read;
    the reviver now holds the memory locked, so the link waits for it and lands in the graph."""
    from memos.identity.principal import Principal
    from memos.memories import schemas as memory_schemas
    from memos.memories import service as memory_service

    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    principal = Principal(role="admin", tenant_id=uuid.UUID(tenant.id), agent_id=uuid.UUID(tenant.admin_id))
    service = app.state.memories
    real_edges = memory_service._edges_of
    cube_id = uuid.UUID(cube["id"])
    for how in ("patch", "restore"):
        target = factory.memory(key, cube["id"], f"alpha bravo charlie target {how}")
        source = factory.memory(key, cube["id"], f"xylophone quartz zebra source {how}")
        if how == "patch":
            r = client.patch(
                f"/v1/memories/{target['id']}", json={"state": "archived"}, headers={**bearer(key), "If-Match": '"1"'}
            )
        else:
            r = client.delete(f"/v1/memories/{target['id']}", headers=bearer(key))
        assert r.status_code in (200, 204), r.text
        target_id, source_id = uuid.UUID(target["id"]), uuid.UUID(source["id"])

        async def race(how: str = how, target_id: uuid.UUID = target_id, source_id: uuid.UUID = source_id) -> None:
            await service.graphs.get(cube_id)
            read = asyncio.Event()

            async def edges_then_pause(conn: Any, memory_id: uuid.UUID) -> Any:
                out = await real_edges(conn, memory_id)
                if memory_id == target_id:
                    read.set()
                    await asyncio.sleep(0.3)  # room for the link to commit, if nothing stops it
                return out

            monkeypatch.setattr(memory_service, "_edges_of", edges_then_pause)

            async def revive() -> Any:
                if how == "patch":
                    return await service.update(
                        principal, target_id, memory_schemas.MemoryPatch(state="active"), frozenset({2})
                    )
                return await service.restore(principal, target_id, 1, None)

            async def link() -> Any:
                await read.wait()
                return await service.link(principal, source_id, memory_schemas.LinkIn(to=target_id, type="related"))

            await asyncio.gather(revive(), link())
            monkeypatch.setattr(memory_service, "_edges_of", real_edges)

        client.blocking_portal.call(race)
        graph = client.blocking_portal.call(service.graphs.get, cube_id)
        assert (source_id, "link", 1.0) in graph.edges(target_id), (how, graph.edges(target_id))

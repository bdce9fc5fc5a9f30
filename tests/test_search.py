"""Search through real HTTP with the real embedder: every mode, filters, scoping, isolation, bad input."""

from __future__ import annotations

import struct
import threading
import uuid

import numpy as np
import psycopg
import pytest
from conftest import Factory, Tenant, bearer, full_width
from litestar.testing import TestClient
from psycopg import sql

from memos.app import create_app
from memos.search.lexical import POSTINGS_BUDGET, discriminating
from memos.search.service import Candidate, cosines

FACTS = [
    ("Alice drinks a double espresso every morning before work.", ["food"], {"speaker": "Alice"}),
    ("Bob adopted a golden retriever puppy named Biscuit.", ["pets"], {"speaker": "Bob"}),
    ("The quarterly revenue report is due on Friday.", ["work"], {"speaker": "Carol"}),
    ("Alice is allergic to peanuts and shellfish.", ["health"], {"speaker": "Alice"}),
    ("Bob's favourite hiking trail is in the Dolomites.", ["travel"], {"speaker": "Bob"}),
    ("The office wifi password rotates every month.", ["work"], {"speaker": "Carol"}),
]


@pytest.fixture(scope="module")
def world(factory: Factory) -> dict:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    ids = [factory.memory(tenant.admin_key, cube["id"], c, tags=t, metadata=m)["id"] for c, t, m in FACTS]
    return {"tenant": tenant, "cube": cube, "ids": ids}


def search(client, key: str, **body) -> dict:
    r = client.post("/v1/search", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


def test_vector_mode_finds_meaning_not_words(client, world) -> None:
    body = search(client, world["tenant"].admin_key, query="what coffee does she like", mode="vector", k=3)
    assert body["results"][0]["memory"]["id"] == world["ids"][0]
    assert body["results"][0]["via"] == "vector"
    assert 0 < body["results"][0]["score"] <= 1
    assert body["took_ms"] > 0


def test_text_mode_matches_rare_words(client, world) -> None:
    body = search(client, world["tenant"].admin_key, query="Dolomites", mode="text", k=5)
    assert [r["memory"]["id"] for r in body["results"]] == [world["ids"][4]]
    assert body["results"][0]["via"] == "text"
    # The speaker is indexed for full text too.
    carol = search(client, world["tenant"].admin_key, query="Carol", mode="text", k=5)
    assert {r["memory"]["id"] for r in carol["results"]} == {world["ids"][2], world["ids"][5]}


def test_hybrid_is_default_and_fuses_both(client, world) -> None:
    body = search(client, world["tenant"].admin_key, query="Biscuit the dog", k=3)
    top = body["results"][0]
    assert top["memory"]["id"] == world["ids"][1]
    assert top["via"] == "text+vector"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_filters_tags_kinds_and_states(client, factory: Factory, world) -> None:
    key = world["tenant"].admin_key
    body = search(client, key, query="Alice", tags=["health"], k=10)
    assert [r["memory"]["id"] for r in body["results"]] == [world["ids"][3]]
    body = search(client, key, query="anything at all", filters={"speaker": "Carol"}, k=10)
    assert {r["memory"]["id"] for r in body["results"]} == {world["ids"][2], world["ids"][5]}
    assert search(client, key, query="espresso", kinds=["response"], k=10)["results"] == []

    doomed = factory.memory(key, world["cube"]["id"], "The zeppelin hangar closes at dusk.")
    assert client.delete(f"/v1/memories/{doomed['id']}", headers=bearer(key)).status_code == 204
    assert search(client, key, query="zeppelin hangar", k=5, mode="text")["results"] == []
    found = search(client, key, query="zeppelin hangar", k=5, mode="text", states=["deleted"])
    assert [r["memory"]["id"] for r in found["results"]] == [doomed["id"]]


def test_since_until_use_the_event_time(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    may = factory.memory(
        tenant.admin_key, cube["id"], "went to the support group", metadata={"time": "1:56 pm on 8 May, 2023"}
    )
    june = factory.memory(
        tenant.admin_key, cube["id"], "went to the support group again", metadata={"time": "2023-06-20"}
    )
    body = search(client, tenant.admin_key, query="support group", since="2023-06-01T00:00:00Z", k=10)
    assert [r["memory"]["id"] for r in body["results"]] == [june["id"]]
    body = search(client, tenant.admin_key, query="support group", until="2023-06-01T00:00:00Z", k=10)
    assert [r["memory"]["id"] for r in body["results"]] == [may["id"]]
    # The user-written date is searchable as text.
    body = search(client, tenant.admin_key, query="May 2023", mode="text", k=10)
    assert body["results"][0]["memory"]["id"] == may["id"]


def test_unreadable_time_is_422(client, world) -> None:
    r = client.post(
        f"/v1/cubes/{world['cube']['id']}/memories",
        json={"kind": "plaintext", "content": "x", "metadata": {"time": "the day after never"}},
        headers=bearer(world["tenant"].admin_key),
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "metadata.time"


def test_a_time_is_at_most_120_characters_as_sent(client, factory: Factory) -> None:
    """The limit was counted after whitespace was collapsed: 10,000 spaces and a date passed, and were parsed."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = bearer(tenant.admin_key)
    padded = " " * 10_000 + "8 May 2023"
    r = client.post(
        f"/v1/cubes/{cube['id']}/memories",
        json={"kind": "plaintext", "content": "x", "metadata": {"time": padded}},
        headers=key,
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["field"] == "metadata.time"
    assert len(r.text) < 1000  # the message does not echo the text
    items = [
        {"kind": "plaintext", "content": "ok"},
        {"kind": "plaintext", "content": "x", "metadata": {"time": padded}},
    ]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=key)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "items[1].metadata.time"
    # Exactly 120 characters, spaces included, is read.
    edge = factory.memory(tenant.admin_key, cube["id"], "edge", metadata={"time": " " * 110 + "8 May 2023"})
    assert edge["version"] == 1
    r = client.patch(
        f"/v1/memories/{edge['id']}", json={"metadata": {"time": padded}}, headers={**key, "If-Match": '"1"'}
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "metadata.time"


def test_a_content_only_patch_keeps_a_time_stored_under_older_rules(
    client, factory: Factory, database_url: str
) -> None:
    """The event time was read again on every content change: a memory whose metadata.time a later rule refuses
    (over 120 characters as sent, accepted before) could not have its content fixed (found in review)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "old", metadata={"time": "8 May 2023"})
    with psycopg.connect(database_url) as conn:  # as an earlier release stored it
        conn.execute(
            "UPDATE memories SET metadata = jsonb_build_object('time', %s::text) WHERE id = %s",
            (" " * 200 + "8 May 2023", m["id"]),
        )
    r = client.patch(
        f"/v1/memories/{m['id']}", json={"content": "new"}, headers={**bearer(tenant.admin_key), "If-Match": '"1"'}
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "new"


def test_patch_reembeds_and_records_the_model(client, factory: Factory, database_url: str) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "The cat sleeps on the sofa.")
    r = client.patch(
        f"/v1/memories/{m['id']}",
        json={"content": "The rocket launch was postponed due to weather."},
        headers={**bearer(tenant.admin_key), "If-Match": '"1"'},
    )
    assert r.status_code == 200
    body = search(client, tenant.admin_key, query="space launch delayed", mode="vector", k=1)
    assert body["results"][0]["memory"]["id"] == m["id"]
    assert body["results"][0]["score"] > 0.4
    with psycopg.connect(database_url) as conn:
        models = conn.execute(
            "SELECT version, embedding_model, embedding IS NOT NULL FROM memory_versions WHERE memory_id = %s ORDER BY version",
            (m["id"],),
        ).fetchall()
    assert [row[0] for row in models] == [1, 2]
    assert all(row[1] and row[2] for row in models)


def test_search_is_scoped_to_readable_cubes(client, factory: Factory, world) -> None:
    other: Tenant = factory.tenant()
    other_cube = factory.cube(other.admin_key)
    factory.memory(other.admin_key, other_cube["id"], "Alice drinks a double espresso every morning before work.")
    for mode in ("vector", "text", "hybrid", "graph"):
        body = search(client, other.admin_key, query="espresso Alice", mode=mode, k=50)
        assert all(r["memory"]["cube_id"] == other_cube["id"] for r in body["results"]), mode
        mine = search(client, world["tenant"].admin_key, query="espresso Alice", mode=mode, k=50)
        assert all(r["memory"]["cube_id"] == world["cube"]["id"] for r in mine["results"]), mode
    r = client.post(
        "/v1/search", json={"query": "x", "cube_ids": [world["cube"]["id"]]}, headers=bearer(other.admin_key)
    )
    assert r.status_code == 404
    # An agent without a grant sees nothing of the admin's cube; with a read grant it does.
    agent = factory.agent(world["tenant"])
    assert search(client, agent.key, query="espresso", k=10)["results"] == []
    client.put(
        f"/v1/cubes/{world['cube']['id']}/grants/{agent.id}",
        json={"access": "read"},
        headers=bearer(world["tenant"].admin_key),
    )
    assert search(client, agent.key, query="espresso", k=10)["results"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x", "k": 201}, "k"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "mode": "psychic"}, "mode"),
        ({"query": "x", "diversity": 1.5}, "diversity"),
        ({"query": "x", "cube_ids": ["nope"]}, None),
        ({"query": "x", "colour": "blue"}, "colour"),
        ({"query": "x", "tags": [""]}, "tags[0]"),  # accepted until review (no memory has an empty tag)
        ({"query": "x", "tags": ["t" * 129]}, "tags[0]"),
    ],
)
def test_bad_search_requests_are_422(client, world, body, field) -> None:
    r = client.post("/v1/search", json=body, headers=bearer(world["tenant"].admin_key))
    assert r.status_code == 422, r.text
    if field is not None:
        assert r.json()["errors"][0]["field"] == field


@pytest.mark.parametrize("field", ["states", "kinds", "cube_ids"])
def test_an_empty_list_that_can_match_nothing_is_422(client, world, field) -> None:
    """An empty ``states`` was read as the default (active), an empty ``kinds`` as any kind and an empty
    ``cube_ids`` searched nothing: each is a caller's mistake, so it is refused, naming the field."""
    r = client.post("/v1/search", json={"query": "Alice", field: []}, headers=bearer(world["tenant"].admin_key))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert {"type", "title", "status", "detail", "errors"} <= problem.keys()
    assert [e["field"] for e in problem["errors"]] == [field]


def test_an_empty_tags_list_requires_no_tag(client, world) -> None:
    """Every listed tag must be present: with none listed every memory qualifies, as without the field."""
    key = world["tenant"].admin_key
    everything = search(client, key, query="Alice", mode="text", k=50)
    assert everything["results"]
    assert search(client, key, query="Alice", mode="text", k=50, tags=[])["results"] == everything["results"]


def test_unknown_cube_in_search_is_404(client, world) -> None:
    r = client.post(
        "/v1/search", json={"query": "x", "cube_ids": [str(uuid.uuid4())]}, headers=bearer(world["tenant"].admin_key)
    )
    assert r.status_code == 404


def test_search_while_the_model_loads_is_503_with_retry_after(settings, embedder, factory: Factory, world) -> None:
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return embedder

    slow = create_app(
        settings.__class__(
            **{**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, "embed_wait_seconds": 0.2}
        ),
        embedder_factory=slow_load,
    )
    try:
        with TestClient(slow) as c:
            r = c.post("/v1/search", json={"query": "espresso"}, headers=bearer(world["tenant"].admin_key))
            assert r.status_code == 503
            assert r.headers["retry-after"]
            assert r.headers["content-type"].startswith("application/problem+json")
            w = c.post(
                f"/v1/cubes/{world['cube']['id']}/memories",
                json={"kind": "plaintext", "content": "written while loading"},
                headers=bearer(world["tenant"].admin_key),
            )
            assert w.status_code == 503
            gate.set()
            r = c.post("/v1/search", json={"query": "espresso"}, headers=bearer(world["tenant"].admin_key))
            assert r.status_code == 200
    finally:
        gate.set()


def test_a_bigger_pool_gives_the_same_head(client, world) -> None:
    """k over 10 takes the vector leg's other path (a transaction with a bigger ef_search): same ranking."""
    small = search(client, world["tenant"].admin_key, query="what does Alice eat or drink", k=3)
    big = search(client, world["tenant"].admin_key, query="what does Alice eat or drink", k=25)
    assert [r["memory"]["id"] for r in big["results"][:3]] == [r["memory"]["id"] for r in small["results"]]
    assert len(big["results"]) == len(FACTS)


def test_candidate_words_stay_within_the_postings_budget() -> None:
    """The rarest word always selects candidates; a second one only while the postings fit the budget."""
    docs = 100 * POSTINGS_BUDGET
    # Two words of a big cube whose memories together exceed the budget: only the rarest selects.
    assert discriminating({"research": 0.004, "carolin": 0.008}, docs=docs) == ["research"]
    # A rarest word over the budget by itself still selects (its matches are capped when ranked).
    assert discriminating({"carolin": 0.1, "said": 0.2}, docs=docs) == ["carolin"]
    # Within the budget, the two rarest are kept even when one is common; more only if rare.
    assert discriminating({"research": 0.003, "carolin": 0.004}, docs=docs) == ["research", "carolin"]
    assert discriminating({"dolomit": 0.002, "bob": 0.5, "hike": 0.003}, docs=600) == ["dolomit", "hike"]
    assert discriminating({"dolomit": 0.002, "bob": 0.5}, docs=600) == ["dolomit", "bob"]


def test_words_no_memory_has_are_always_looked_up() -> None:
    """A word the counts say no memory has came after the common words, and the loop stopped at the first rule
    that refused one, so it was never looked up; counts cached for minutes say so of a word a new memory holds
    (found in review)."""
    common = {"tea": 0.3, "coffee": 0.3, "piano": 0.3, "zanzibar": 0.0}
    assert discriminating(common, docs=1000) == ["coffee", "piano", "zanzibar"]
    over_budget = {"carolin": 0.1, "said": 0.2, "zanzibar": 0.0}
    assert discriminating(over_budget, docs=100 * POSTINGS_BUDGET) == ["carolin", "zanzibar"]
    # A small cube's common words still select no candidates beyond the two rarest (they would crowd graph mode's
    # seeds); the word no memory has is taken.
    assert discriminating({"tea": 0.25, "coffee": 0.375, "cat": 0.25, "gnu": 0.0}, docs=8) == ["cat", "tea", "gnu"]


def test_words_no_memory_has_do_not_crowd_out_the_words_that_find_candidates(client, factory: Factory) -> None:
    """Two query words no memory contains are the rarest of all: they must not fill the lookup in place of
    a common word that does find memories."""
    assert discriminating({"zebra": 0.75, "unicorn": 0.0, "dragon": 0.0}, docs=20)[0] == "zebra"
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    items = [{"kind": "plaintext", "content": f"zebra sighting number {i} near the river"} for i in range(15)]
    items += [{"kind": "plaintext", "content": f"unrelated note {i} about groceries"} for i in range(5)]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201
    alone = search(client, tenant.admin_key, query="zebra", mode="text", k=5, cube_ids=[cube["id"]])
    padded = search(client, tenant.admin_key, query="zebra unicorn dragon", mode="text", k=5, cube_ids=[cube["id"]])
    assert len(alone["results"]) == len(padded["results"]) == 5


def test_embeddings_stay_in_the_row(client, factory: Factory, database_url: str) -> None:
    """A memory's vector is not moved to TOAST (migration 0005): every exact distance would fetch it from there."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    with psycopg.connect(database_url) as conn:
        toast = conn.execute(
            "SELECT t.relname FROM pg_class m JOIN pg_class t ON t.oid = m.reltoastrelid WHERE m.relname = 'memories'"
        ).fetchone()
        assert toast is not None
        count_chunks = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("pg_toast", toast[0]))

        def chunks() -> int:
            row = conn.execute(count_chunks).fetchone()
            assert row is not None
            return int(row[0])

        before = chunks()
        # A row well over the 2 kB TOAST threshold with its 1.5 kB vector, well under a page.
        text = "Caroline talked about the adoption agency and her painting class. " * 12
        m = factory.memory(tenant.admin_key, cube["id"], text, metadata={"speaker": "Caroline", "session": 3})
        assert chunks() == before
        size = conn.execute("SELECT pg_column_size(m.*) FROM memories m WHERE id = %s", (m["id"],)).fetchone()
    assert size is not None and size[0] > 2100


def test_stale_word_counts_keep_serving_while_a_background_task_counts_again(client, app, factory: Factory) -> None:
    """Only a cube's first count runs in the search; later ones run beside it (0.5-0.9 s at 100k memories)."""
    import asyncio
    import contextlib

    from memos.search.lexical import LexicalStats

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    cube_id = uuid.UUID(cube["id"])
    factory.memory(tenant.admin_key, cube["id"], "A spice tour of Zanzibar is booked for June.")
    background = LexicalStats(ttl=0.0, connect=app.state.db.read)
    inline = LexicalStats(ttl=0.0)

    @contextlib.asynccontextmanager
    async def no_database():
        raise OSError("the database is away")
        yield

    broken = LexicalStats(ttl=0.0, connect=no_database)

    def counts(stats: LexicalStats) -> tuple[int, float]:
        async def read() -> tuple[int, float]:
            async with app.state.db.read() as conn:
                _, _, share, docs = await stats.idf(conn, [cube_id], ["zanzibar"])
            return docs, share["zanzibar"]

        return client.blocking_portal.call(read)

    for stats in (background, inline, broken):
        assert counts(stats) == (1, 1.0)  # the first count, in the search
    factory.memory(tenant.admin_key, cube["id"], "The ferry to the islands leaves at nine.")
    assert counts(inline) == (2, 0.5), "without a connection source the search counts again itself"
    assert counts(background) == (1, 1.0), "stale counts answer at once"
    client.blocking_portal.call(background.refreshed)
    assert counts(background) == (2, 0.5), "and the background count replaced them"
    assert counts(broken) == (1, 1.0)
    client.blocking_portal.call(broken.refreshed)
    assert counts(broken) == (1, 1.0), "a failed recount leaves the stale counts serving"

    @contextlib.asynccontextmanager
    async def never_answers():
        await asyncio.Event().wait()
        yield

    hung = LexicalStats(ttl=0.0, connect=never_answers)
    counts(hung)
    counts(hung)  # stale: a recount starts, and waits forever for its connection
    assert len(hung._refreshing) == 1
    client.blocking_portal.call(hung.close)
    assert hung._refreshing == {}, "shutdown stops it"


def test_shutdown_stops_a_graph_build_in_flight(client, app, factory: Factory) -> None:
    """A big cube's graph builds in the background after the query that asked gave up on it; shutdown ends it."""
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from memos.search.graphs import CubeGraphs

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key, name="graphs")
    factory.memory(tenant.admin_key, cube["id"], "Melanie painted a lake at sunrise.")
    cube_id = uuid.UUID(cube["id"])
    graphs = CubeGraphs(app.state.db)
    graph = client.blocking_portal.call(graphs.get_within, cube_id, 30.0)
    assert graph is not None and graph.graph.number_of_nodes() == 1
    client.blocking_portal.call(graphs.close)  # nothing under way: nothing to stop

    @contextlib.asynccontextmanager
    async def never_answers():
        await asyncio.Event().wait()
        yield

    hung = CubeGraphs(SimpleNamespace(read=never_answers))  # type: ignore[arg-type]
    assert client.blocking_portal.call(hung.get_within, cube_id, 0.01) is None, "the query does not wait"
    (task,) = hung._background.values()
    client.blocking_portal.call(hung.close)
    assert task.cancelled() and hung._background == {} and hung._building == {}, "shutdown stops it"


def test_a_graph_build_reads_at_most_max_links_links(client, app, factory: Factory) -> None:
    """Nothing bounds the links an agent writes; a cube's graph holds (and its build reads) max_links."""
    from memos.search.graphs import CubeGraphs

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key, name="many links")
    hub = factory.memory(tenant.admin_key, cube["id"], "The hub everything cites.")
    items = [
        {"kind": "plaintext", "content": f"Citing note {i}.", "links": [{"to": hub["id"], "type": "cites"}]}
        for i in range(6)
    ]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    cube_id = uuid.UUID(cube["id"])
    whole = client.blocking_portal.call(CubeGraphs(app.state.db).get_within, cube_id, 30.0)
    assert whole is not None and whole.links >= 6
    bounded = client.blocking_portal.call(CubeGraphs(app.state.db, max_links=3).get_within, cube_id, 30.0)
    assert bounded is not None and bounded.links == 3
    assert len(bounded) == len(whole) == 7  # every memory is still there
    # The links kept are the graph's own: not those of deleted memories (they stay stored), and user links
    # before knn ones. Found in review: under a bare LIMIT, the links of deleted memories filled it.
    for item in r.json()["items"]:
        assert client.delete(f"/v1/memories/{item['id']}", headers=bearer(tenant.admin_key)).status_code == 204
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    live = {uuid.UUID(item["id"]) for item in r.json()["items"]}
    bounded = client.blocking_portal.call(CubeGraphs(app.state.db, max_links=6).get_within, cube_id, 30.0)
    assert bounded is not None and bounded.links == 6
    assert {other for m in live for other, kind, _ in bounded.edges(m) if kind == "link"} == {uuid.UUID(hub["id"])}
    assert sum(1 for m in live for _, kind, _ in bounded.edges(m) if kind == "link") == 6


# -- which memories sit in the HNSW index (memos/memories/ann.py) -------------------------------------------


def _indexed(database_url: str, cube_id: str) -> dict[str, bool]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id::text, ann FROM memories WHERE cube_id = %s", (cube_id,)).fetchall()
    return {r[0]: r[1] for r in rows}


def _vector_ids(client, key: str, cube_id: str, query: str, k: int = 20) -> list[str]:
    r = client.post(
        "/v1/search", json={"query": query, "mode": "vector", "k": k, "cube_ids": [cube_id]}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    return [hit["memory"]["id"] for hit in r.json()["results"]]


def test_a_small_cube_stays_out_of_the_hnsw_index_and_is_searched_exactly(
    client, factory: Factory, database_url: str
) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    texts = [
        "Caroline went to the LGBTQ support group",
        "Melanie painted a sunrise",
        "Caroline went to the LGBTQ support group again on Friday",
    ]
    ids = [factory.memory(tenant.admin_key, cube["id"], t)["id"] for t in texts]
    assert _indexed(database_url, cube["id"]) == dict.fromkeys(ids, False)
    assert _vector_ids(client, tenant.admin_key, cube["id"], "Who painted a sunrise?")[0] == ids[1]
    assert set(_vector_ids(client, tenant.admin_key, cube["id"], "anything")) == set(ids)
    with psycopg.connect(database_url) as conn:
        knn = conn.execute("SELECT to_id::text FROM memory_links WHERE type = 'knn' AND from_id = %s", (ids[2],))
        assert ids[0] in {r[0] for r in knn}  # its exact nearest neighbour was linked at write


def test_a_cube_past_the_size_moves_into_the_hnsw_index_and_every_memory_is_still_found(
    client, factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("memos.memories.ann.EXACT_CUBE_MAX", 5)
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    small = factory.cube(tenant.admin_key)
    factory.memory(tenant.admin_key, small["id"], "Caroline's small cube stays exact")
    items = [
        {"kind": "plaintext", "content": f"Caroline's note number {i} about the adoption agency"} for i in range(6)
    ]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    first = [m["id"] for m in r.json()["items"]]
    client.blocking_portal.call(client.app.state.memories.index_mover.wait)
    assert set(_indexed(database_url, cube["id"]).values()) == {True}
    assert set(_indexed(database_url, small["id"]).values()) == {False}
    # Past the size, a new memory is written into the index at once.
    later = factory.memory(tenant.admin_key, cube["id"], "Melanie signed up for a pottery class")["id"]
    assert _indexed(database_url, cube["id"])[later] is True
    # A memory left outside (a write that raced the move) is still found, beside the indexed ones.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET ann = false WHERE id = %s", (first[0],))
    found = _vector_ids(client, tenant.admin_key, cube["id"], "Caroline adoption agency note")
    assert set(found) == {*first, later}
    # A search over both cubes reads the indexed and the exact one.
    r = client.post(
        "/v1/search",
        json={"query": "Caroline", "mode": "vector", "k": 20, "cube_ids": [cube["id"], small["id"]]},
        headers=bearer(tenant.admin_key),
    )
    assert len(r.json()["results"]) == 8
    # The cube's next write moves the straggler in; links to neighbours come from both sets meanwhile.
    newest = factory.memory(tenant.admin_key, cube["id"], "Caroline's note number 0 about the adoption agency!")["id"]
    with psycopg.connect(database_url) as conn:
        linked = {
            r[0]
            for r in conn.execute("SELECT to_id::text FROM memory_links WHERE type = 'knn' AND from_id = %s", (newest,))
        }
    assert first[0] in linked  # its nearest, outside the index, beside the indexed ones
    client.blocking_portal.call(client.app.state.memories.index_mover.wait)
    assert set(_indexed(database_url, cube["id"]).values()) == {True}
    # A memory re-embedded by a PATCH stays in the index and is found by its new text.
    r = client.patch(
        f"/v1/memories/{later}",
        json={"content": "Melanie adopted a grey kitten named Oscar"},
        headers={**bearer(tenant.admin_key), "If-Match": '"1"'},
    )
    assert r.status_code == 200, r.text
    assert _indexed(database_url, cube["id"])[later] is True
    assert _vector_ids(client, tenant.admin_key, cube["id"], "Who adopted a kitten?")[0] == later


@pytest.mark.parametrize("indexed", [False, True], ids=["exact", "hnsw"])
def test_vectors_of_another_model_are_not_compared_with_the_query(
    client, factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch, indexed: bool
) -> None:
    """A memory embedded by an earlier model (MEMOS_EMBED_MODEL changed since) is in another vector space: the
    vector leg neither ranks it nor scores it; the text leg still finds it."""
    if indexed:
        monkeypatch.setattr("memos.memories.ann.EXACT_CUBE_MAX", 2)
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    texts = ["Melanie repaints the old lighthouse every spring.", "Caroline keeps bees behind the barn.", "ok"]
    ids = [factory.memory(tenant.admin_key, cube["id"], t)["id"] for t in texts]
    if indexed:
        client.blocking_portal.call(client.app.state.memories.index_mover.wait)
        assert set(_indexed(database_url, cube["id"]).values()) == {True}
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET embedding_model = 'an/older-model' WHERE id = %s", (ids[0],))
    found = _vector_ids(client, tenant.admin_key, cube["id"], "Melanie repaints the old lighthouse every spring.")
    assert ids[0] not in found and ids[1] in found
    hybrid = search(client, tenant.admin_key, query="lighthouse", cube_ids=[cube["id"]], k=5)
    assert (ids[0], "text") in [(r["memory"]["id"], r["via"]) for r in hybrid["results"]]


def _send(vector: list[float]) -> bytes:
    """A vector in pgvector's binary form (``vector_send``): dimensions, an unused int16, big-endian floats."""
    return struct.pack(">hh", len(vector), 0) + np.asarray(vector, dtype=">f4").tobytes()


def test_text_leg_candidates_get_their_cosine_for_the_query_model_only() -> None:
    """The text leg brings its candidates' embeddings (it runs while the query embeds); their cosine is taken
    once the query vector exists, only where the query's model made them, and a zero vector scores 0."""

    query = np.asarray([0.6, 0.8, 0.0], dtype=np.float32)
    same = Candidate(uuid.uuid4(), uuid.uuid4(), vec=_send([3.0, 4.0, 0.0]), model="query-model")
    tilted = Candidate(uuid.uuid4(), uuid.uuid4(), vec=_send([0.0, 1.0, 0.0]), model="query-model")
    other = Candidate(uuid.uuid4(), uuid.uuid4(), vec=_send([0.6, 0.8, 0.0]), model="another-model")
    zero = Candidate(uuid.uuid4(), uuid.uuid4(), vec=_send([0.0, 0.0, 0.0]), model="query-model")
    none = Candidate(uuid.uuid4(), uuid.uuid4())
    cosines(query, "query-model", [same, tilted, other, zero, none])
    assert same.dense == pytest.approx(1.0)
    assert tilted.dense == pytest.approx(0.8)
    assert (other.dense, zero.dense, none.dense) == (0.0, 0.0, 0.0)


def test_a_memory_written_after_the_word_counts_were_cached_is_found_by_text(client, factory: Factory) -> None:
    """The word counts are cached for minutes: a word only a memory written since holds counts as in none, came
    last, and was never looked up after three common words (found in review)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    items = [{"kind": "plaintext", "content": f"note {i}: tea, coffee and piano practice"} for i in range(20)]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201
    search(client, tenant.admin_key, query="tea", mode="text", cube_ids=[cube["id"]])  # the counts are cached
    new = factory.memory(tenant.admin_key, cube["id"], "Zanzibar ferry tickets are booked.")
    found = search(
        client, tenant.admin_key, query="tea coffee piano zanzibar", mode="text", k=50, cube_ids=[cube["id"]]
    )
    assert new["id"] in {r["memory"]["id"] for r in found["results"]}


def test_text_search_matches_compatibility_forms_both_ways(client, factory: Factory) -> None:
    """Ligatures, full-width letters and decomposed accents are the same words for full text (migration 0013):
    before, "financial" never found the ligature form a PDF extraction writes."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    ligature = factory.memory(key, cube["id"], "The \ufb01nancial audit closes in March.")["id"]
    wide = factory.memory(key, cube["id"], f"{full_width('ACME')} signed the warehouse lease.")["id"]
    decomposed = factory.memory(key, cube["id"], "Cafe\u0301 Lumiere opens at nine.")["id"]
    plain = factory.memory(key, cube["id"], "The finance committee approved the budget.")["id"]

    def found(query: str) -> list[str]:
        body = search(client, key, query=query, mode="text", k=5, cube_ids=[cube["id"]])
        return [r["memory"]["id"] for r in body["results"]]

    # One word each: any other word of a memory would find it alone.
    assert found("financial") == [ligature]
    assert found("acme") == [wide]
    assert found("caf\u00e9") == [decomposed]  # composed in the query, decomposed in the memory
    # And the query in those forms finds the plain text.
    assert found("\ufb01nance") == [plain]
    assert found(full_width("finance")) == [plain]

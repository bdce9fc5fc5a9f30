"""Graph mode through real HTTP: memories reached only over a link or a shared entity, kept current by writes.

The app here fetches only 4 candidates per retrieval leg, or k when that is more: the cubes hold enough
painting-themed fillers that a memory unlike the query ("Qwertz flumbo") is never among a leg's nearest,
so it can only enter the results through the graph.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import Factory, bearer
from litestar import Litestar
from litestar.testing import TestClient

from memos.app import create_app

FILLERS = [
    "Jon painted the garden fence blue last weekend.",
    "The art class meets on Tuesday evenings.",
    "Oil paints dry slower than acrylic paints.",
    "The museum added three watercolour landscapes.",
    "Priya sketches portraits of her neighbours.",
    "A gallery downtown sells framed prints.",
    "The kids made finger paintings at school.",
    "Brushes should be cleaned with warm soapy water.",
    "Tom bought an easel at the flea market.",
    "Colour theory explains why blue and orange contrast.",
]
CLASS = [f"The painting class finished canvas number {i} today." for i in range(12)]


@pytest.fixture(scope="module")
def app(settings, embedder) -> Litestar:
    return create_app(dataclasses.replace(settings, search_pool=4), embedder_factory=lambda: embedder)


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def world(factory: Factory, client) -> dict:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    hit = factory.memory(key, cube["id"], "Melanie painted a sunrise over the beach in Zanzibar.")
    linked = factory.memory(key, cube["id"], "Qwertz flumbo 4471 grelt.", links=[{"to": hit["id"], "type": "about"}])
    entity = factory.memory(key, cube["id"], "Our ferry tickets for Zanzibar are booked.")
    r = client.post(
        f"/v1/cubes/{cube['id']}/memories/batch",
        json={"items": [{"kind": "plaintext", "content": c} for c in FILLERS + CLASS]},
        headers=bearer(key),
    )
    assert r.status_code == 201
    return {"key": key, "cube": cube, "hit": hit, "linked": linked, "entity": entity}


def search(client, key: str, **body) -> list[dict]:
    r = client.post("/v1/search", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_graph_reaches_a_memory_only_through_a_link(client, world) -> None:
    query = "Melanie sunrise painting"
    hybrid = [r["memory"]["id"] for r in search(client, world["key"], query=query, k=10, mode="hybrid")]
    assert world["hit"]["id"] == hybrid[0]
    assert world["linked"]["id"] not in hybrid, "neither leg finds the linked memory by itself"
    graph = search(client, world["key"], query=query, k=10, mode="graph")
    via = {r["memory"]["id"]: r["via"] for r in graph}
    assert graph[0]["memory"]["id"] == world["hit"]["id"]
    assert via[world["linked"]["id"]] == f"graph:link<-{world['hit']['id']}"


def test_graph_search_reads_at_most_its_scan_budget(client, world, monkeypatch: pytest.MonkeyPatch) -> None:
    from memos.search import service

    query = "Melanie sunrise painting"
    # The budget reaches the walk: with none, the memory only a link leads to is not found.
    monkeypatch.setattr(service, "GRAPH_MAX_SCAN", 0)
    found = {r["memory"]["id"]: r["via"] for r in search(client, world["key"], query=query, k=10, mode="graph")}
    assert world["hit"]["id"] in found
    assert world["linked"]["id"] not in found
    monkeypatch.setattr(service, "GRAPH_MAX_SCAN", 40_000)
    found = {r["memory"]["id"]: r["via"] for r in search(client, world["key"], query=query, k=10, mode="graph")}
    assert found[world["linked"]["id"]] == f"graph:link<-{world['hit']['id']}"


def test_graph_reaches_a_memory_only_through_a_shared_entity(client, world) -> None:
    query = "Melanie sunrise painting"
    hybrid = [r["memory"]["id"] for r in search(client, world["key"], query=query, k=10, mode="hybrid")]
    assert world["entity"]["id"] not in hybrid
    graph = search(client, world["key"], query=query, k=10, mode="graph")
    via = {r["memory"]["id"]: r["via"] for r in graph}
    assert via[world["entity"]["id"]] == f"graph:entity(zanzibar)<-{world['hit']['id']}"


def test_graph_follows_writes_made_after_it_was_built(client, factory: Factory, world) -> None:
    key = world["key"]
    query = "Melanie sunrise painting"
    search(client, key, query=query, k=10, mode="graph")  # the cube's graph is loaded now
    late = factory.memory(
        key, world["cube"]["id"], "Blorp snazz 9. Vindu klep.", links=[{"to": world["hit"]["id"], "type": "see"}]
    )
    via = {r["memory"]["id"]: r["via"] for r in search(client, key, query=query, k=12, mode="graph")}
    assert via.get(late["id"]) == f"graph:link<-{world['hit']['id']}"
    assert client.delete(f"/v1/memories/{late['id']}", headers=bearer(key)).status_code == 204
    ids = {r["memory"]["id"] for r in search(client, key, query=query, k=12, mode="graph")}
    assert late["id"] not in ids


def test_graph_results_respect_filters_and_isolation(client, factory: Factory, world) -> None:
    query = "Melanie sunrise painting"
    # A memory reached over the graph still has to pass the request's filters.
    only_tagged = search(client, world["key"], query=query, k=10, mode="graph", tags=["nothing-has-this"])
    assert only_tagged == []
    other = factory.tenant()
    other_cube = factory.cube(other.admin_key)
    factory.memory(other.admin_key, other_cube["id"], "Melanie painted a sunrise over the beach in Zanzibar.")
    theirs = search(client, other.admin_key, query=query, k=10, mode="graph")
    assert {r["memory"]["cube_id"] for r in theirs} == {other_cube["id"]}


def test_graph_over_two_cubes_ranks_on_one_scale(client, factory: Factory) -> None:
    """PageRank runs per cube, each cube weighted by its share of the seeds' scores: the memory linked to a
    strong match in one cube outranks the one linked to a weak match in another (scaled cube by cube, the
    two would score alike)."""
    tenant = factory.tenant()
    key = tenant.admin_key
    strong, weak = factory.cube(key), factory.cube(key)
    hit = factory.memory(key, strong["id"], "Melanie painted a sunrise over the beach in Zanzibar.")
    near = factory.memory(key, strong["id"], "Qwertz flumbo 4471 grelt.", links=[{"to": hit["id"], "type": "about"}])
    faint = factory.memory(key, weak["id"], "The kids made finger paintings at school.")
    far = factory.memory(key, weak["id"], "Blorp snazz 9. Vindu klep.", links=[{"to": faint["id"], "type": "about"}])
    for text in FILLERS[:3]:
        factory.memory(key, weak["id"], text)
    # k = 4, the app's pool: neither leg reaches the two unlike memories, only the graph does.
    results = search(
        client, key, query="Melanie sunrise painting", k=4, mode="graph", cube_ids=[strong["id"], weak["id"]]
    )
    score = {r["memory"]["id"]: r["score"] for r in results}
    assert results[0]["memory"]["id"] == hit["id"]
    assert score[near["id"]] > 2 * score.get(far["id"], 0.0)
    assert score[near["id"]] > score[faint["id"]]


def test_graph_checks_the_filters_of_reached_memories_until_enough_pass(
    client, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graph-reached memories pass the request's filters in chunks, best first: when a whole chunk fails
    them, the next chunk is checked, so a weaker memory that passes still makes the results."""
    monkeypatch.setattr("memos.search.service.GRAPH_FINALISTS", 1)  # k = 2: 6 finalists, a first chunk of 12
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    hit = factory.memory(key, cube["id"], "Melanie painted a sunrise over the beach in Zanzibar.", tags=["keep"])
    for i in range(14):
        factory.memory(key, cube["id"], f"Qwertz flumbo {i} grelt.", links=[{"to": hit["id"], "type": "about"}])
    weak = factory.memory(key, cube["id"], "Tom bought an easel at the flea market.", tags=["keep"])
    body = {"query": "Melanie sunrise painting", "k": 2, "mode": "graph", "cube_ids": [cube["id"]]}
    everything = search(client, key, **{**body, "k": 20})
    # Unfiltered, the 14 linked memories rank between the two tagged ones.
    ranks = [r["memory"]["id"] for r in everything]
    assert ranks[0] == hit["id"] and ranks.index(weak["id"]) > 12
    filtered = search(client, key, **body, tags=["keep"])
    assert [r["memory"]["id"] for r in filtered] == [hit["id"], weak["id"]]


def test_the_graph_walks_only_through_memories_that_could_be_results(client, factory: Factory) -> None:
    """An edge to a filtered-out or expired memory leads nowhere: the memory behind it is not reached over
    it, and no ``via`` names a memory the caller could not get as a result."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    items = [{"kind": "plaintext", "content": text, "tags": ["t"]} for text in FILLERS + CLASS]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201
    behind = factory.memory(key, cube["id"], "Blorptastic vunderkrumb 9931.", tags=["t"])
    expires = time.monotonic() + 4
    between = factory.memory(
        key,
        cube["id"],
        "Frobnicate wibble 5512.",
        tags=["other"],
        ttl_seconds=4,
        links=[{"to": behind["id"], "type": "x"}],
    )
    factory.memory(
        key,
        cube["id"],
        "Melanie painted a sunrise over the beach in Zanzibar.",
        tags=["t"],
        links=[{"to": between["id"], "type": "x"}],
    )
    body = {"query": "Melanie sunrise painting", "k": 10, "mode": "graph", "cube_ids": [cube["id"]]}
    # Unfiltered and unexpired, the memory behind is reached over the one between (neither leg finds it).
    via = {r["memory"]["id"]: r["via"] for r in search(client, key, **body)}
    assert via[behind["id"]] == f"graph:link<-{between['id']}"

    filtered = search(client, key, **body, tags=["t"])
    assert between["id"] not in {r["memory"]["id"] for r in filtered}
    assert not [r["via"] for r in filtered if between["id"] in r["via"]]
    assert behind["id"] not in {r["memory"]["id"] for r in filtered}

    time.sleep(max(0.0, expires - time.monotonic()) + 0.5)
    expired = search(client, key, **body)
    assert between["id"] not in {r["memory"]["id"] for r in expired}
    assert not [r["via"] for r in expired if between["id"] in r["via"]]
    assert behind["id"] not in {r["memory"]["id"] for r in expired}


def test_a_pool_below_k_does_not_cut_the_results(client, factory: Factory) -> None:
    """This app's pool is 4: a search for k = 10 still gets 10 results when 11 memories match, in every mode."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    items = [{"kind": "plaintext", "content": f"Painting lesson {i}: {text}"} for i, text in enumerate(FILLERS)]
    items.append({"kind": "plaintext", "content": "Painting lesson 10: mixing a warm grey."})
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201
    for mode in ("vector", "text", "hybrid", "graph"):
        results = search(client, key, query="painting lesson", k=10, mode=mode, cube_ids=[cube["id"]])
        assert len(results) == 10, mode


def test_diversity_prefers_unlike_results(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    for text in (
        "Alice loves strong espresso in the morning.",
        "Alice really loves a strong espresso each morning.",
        "Every morning Alice loves strong espresso.",
        "Alice keeps bees on her allotment.",
    ):
        factory.memory(key, cube["id"], text)
    plain = search(client, key, query="strong espresso in the morning", k=2, mode="graph", diversity=0.0)
    diverse = search(client, key, query="strong espresso in the morning", k=2, mode="graph", diversity=0.9)
    assert all("espresso" in r["memory"]["content"] for r in plain)
    assert any("bees" in r["memory"]["content"] for r in diverse)


def test_diversity_compares_only_vectors_of_the_query_model(client, factory: Factory, database_url: str) -> None:
    """A finalist embedded by an earlier model has its vector in another space: diversity must not compare it.

    Two memories with the same text have the same vector; marked as another model's, the copy's vector says
    nothing about the query model's space, so the copy is not redundant by vector and is picked on relevance."""

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    same = "Alice loves strong espresso in the morning."
    first = factory.memory(key, cube["id"], same)
    copy = factory.memory(key, cube["id"], same)
    factory.memory(key, cube["id"], "Alice keeps bees on her allotment.")
    body = {"query": "strong espresso in the morning", "k": 2, "mode": "graph", "diversity": 0.9}
    assert {r["memory"]["id"] for r in search(client, key, **body)} != {first["id"], copy["id"]}
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET embedding_model = 'an/older-model' WHERE id = %s", (copy["id"],))
    assert {r["memory"]["id"] for r in search(client, key, **body)} == {first["id"], copy["id"]}


def test_knn_links_are_written_at_create_and_refreshed_on_change(client, factory: Factory, database_url: str) -> None:

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    cats = factory.memory(key, cube["id"], "My cat sleeps on the sofa all afternoon.")
    kitten = factory.memory(key, cube["id"], "Our kitten naps on the couch every afternoon.")
    tax = factory.memory(key, cube["id"], "The tax return is due at the end of April.")

    def neighbours(memory_id: str) -> dict[str, float]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT to_id, weight FROM memory_links WHERE from_id = %s AND type = 'knn'", (memory_id,)
            ).fetchall()
        return {str(r[0]): r[1] for r in rows}

    near = neighbours(kitten["id"])
    assert cats["id"] in near
    assert near[cats["id"]] >= 0.5
    assert tax["id"] not in near, "unrelated memories are below the similarity floor"
    # New content, new neighbours.
    r = client.patch(
        f"/v1/memories/{kitten['id']}",
        json={"content": "File the April tax return before the deadline."},
        headers={**bearer(key), "If-Match": '"1"'},
    )
    assert r.status_code == 200
    near = neighbours(kitten["id"])
    assert tax["id"] in near
    assert cats["id"] not in near
    # Users cannot write knn links themselves.
    r = client.post(f"/v1/memories/{tax['id']}/links", json={"to": cats["id"], "type": "knn"}, headers=bearer(key))
    assert r.status_code == 422


def test_a_restored_memory_returns_to_the_graph(client, factory: Factory, world) -> None:
    key = world["key"]
    query = "Melanie sunrise painting"
    late = factory.memory(
        key, world["cube"]["id"], "Zib zab 77 quorn.", links=[{"to": world["hit"]["id"], "type": "see"}]
    )
    search(client, key, query=query, k=12, mode="graph")
    assert client.delete(f"/v1/memories/{late['id']}", headers=bearer(key)).status_code == 204
    assert late["id"] not in {r["memory"]["id"] for r in search(client, key, query=query, k=12, mode="graph")}
    r = client.post(f"/v1/memories/{late['id']}/restore", json={"version": 1}, headers=bearer(key))
    assert r.status_code == 200
    via = {r["memory"]["id"]: r["via"] for r in search(client, key, query=query, k=12, mode="graph")}
    assert via.get(late["id"]) == f"graph:link<-{world['hit']['id']}"


def test_a_graph_still_building_answers_in_hybrid_and_says_so(settings, embedder, factory: Factory) -> None:
    """A cube whose graph is not ready within the wait gets hybrid's ranking (via says so); the build goes on."""
    app = create_app(dataclasses.replace(settings, graph_wait_seconds=0.0), embedder_factory=lambda: embedder)
    with TestClient(app) as client:
        tenant = factory.tenant()
        cube = factory.cube(tenant.admin_key)
        for text in FILLERS[:4]:
            factory.memory(tenant.admin_key, cube["id"], text)
        body = {"query": "painting", "mode": "graph", "k": 4, "cube_ids": [cube["id"]]}
        hybrid = client.post("/v1/search", json={**body, "mode": "hybrid"}, headers=bearer(tenant.admin_key)).json()
        first = client.post("/v1/search", json=body, headers=bearer(tenant.admin_key)).json()
        assert [r["via"] for r in first["results"]] == [f"graph-building:{r['via']}" for r in hybrid["results"]]
        assert [r["memory"]["id"] for r in first["results"]] == [r["memory"]["id"] for r in hybrid["results"]]
        for _ in range(200):  # the build finishes in the background; no query waits for it
            later = client.post("/v1/search", json=body, headers=bearer(tenant.admin_key)).json()
            if not any(r["via"].startswith("graph-building:") for r in later["results"]):
                break
        else:
            raise AssertionError("the graph never became ready")
        assert later["results"]


def test_a_filtered_graph_search_reaches_a_linked_memory_behind_heavier_ones_that_fail(
    client, factory: Factory
) -> None:
    """A filtered graph search checked only the memories its unfiltered walk reached: a memory keeps its 32
    heaviest neighbours, so a linked memory that passed the filter was never reached behind 40 heavier ones that
    failed it (found in a search review). The neighbourhood is now gathered again without the failures."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)["id"]
    fill = [{"kind": "plaintext", "content": f"A sunrise over the beach, study {i}.", "tags": ["t"]} for i in range(10)]
    heavy = [{"kind": "plaintext", "content": f"Blarg vintol {i} snerp."} for i in range(40)]
    for items in (fill, heavy):
        r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
        assert r.status_code == 201, r.text
    heavy_ids = [m["id"] for m in r.json()["items"]]
    seed = factory.memory(key, cube, "Melanie painted a sunrise over the beach in Zanzibar.", tags=["t"])
    linked = factory.memory(key, cube, "Qwertz flumbo 4471 grelt.", tags=["t"])
    for other, weight in [(h, 5) for h in heavy_ids] + [(linked["id"], 1)]:
        r = client.post(
            f"/v1/memories/{seed['id']}/links", json={"to": other, "type": "rel", "weight": weight}, headers=bearer(key)
        )
        assert r.status_code == 201, r.text
    results = search(
        client, key, query="Melanie sunrise beach Zanzibar", mode="graph", k=10, tags=["t"], cube_ids=[cube]
    )
    found = {r["memory"]["id"]: r["via"] for r in results}
    assert found.get(linked["id"]) == f"graph:link<-{seed['id']}", found
    assert not set(heavy_ids) & set(found)


# ---- another memos process on the same database (found in a multi-process review: its writes never reached this
# process's loaded graph until the cube was evicted or the process restarted)


@pytest.fixture(scope="module")
def reader(settings, embedder) -> Iterator[TestClient]:  # type: ignore[type-arg]
    """A second process on the same database whose graphs catch up at every graph search; the module's client
    (and the factory) write through the first."""
    app = create_app(
        dataclasses.replace(settings, search_pool=4, graph_sync_seconds=0), embedder_factory=lambda: embedder
    )
    with TestClient(app) as c:
        yield c


def painted_cube(client, factory: Factory) -> tuple[str, str, dict]:
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)["id"]
    hit = factory.memory(key, cube, "Melanie painted a sunrise over the beach in Zanzibar.")
    r = client.post(
        f"/v1/cubes/{cube}/memories/batch",
        json={"items": [{"kind": "plaintext", "content": c} for c in FILLERS + CLASS]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    return key, cube, hit


def graph_via(client, key: str, cube: str) -> dict[str, str]:
    results = search(client, key, query="Melanie sunrise painting", k=12, mode="graph", cube_ids=[cube])
    return {r["memory"]["id"]: r["via"] for r in results}


def eventually(check, what: str) -> None:
    """``check()`` turns true within 20 s (each graph search starts a catch-up in the background)."""
    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def loaded_graph(client, cube: str):
    return client.app.state.search.graphs._graphs.get(uuid.UUID(cube))


def test_another_processs_writes_reach_a_loaded_graph(client, reader, factory: Factory) -> None:
    key, cube, hit = painted_cube(client, factory)
    assert graph_via(reader, key, cube)[hit["id"]]  # the reader's graph of the cube is loaded now
    graph = loaded_graph(reader, cube)

    # A memory made with a link, by the other process.
    late = factory.memory(key, cube, "Blorp snazz 9. Vindu klep.", links=[{"to": hit["id"], "type": "see"}])
    eventually(
        lambda: graph_via(reader, key, cube).get(late["id"]) == f"graph:link<-{hit['id']}", "the new linked memory"
    )
    # A link written on its own between memories the graph already holds.
    lonely = factory.memory(key, cube, "Qwertz flumbo 4471 grelt.")

    def holds(memory_id: str) -> bool:
        graph_via(reader, key, cube)  # a graph search starts the next catch-up
        return memory_id in {str(m) for m in graph.memory_ids()}

    eventually(lambda: holds(lonely["id"]), "the new memory without links")
    r = client.post(f"/v1/memories/{lonely['id']}/links", json={"to": hit["id"], "type": "about"}, headers=bearer(key))
    assert r.status_code == 201, r.text
    eventually(
        lambda: graph_via(reader, key, cube).get(lonely["id"]) == f"graph:link<-{hit['id']}", "the link made later"
    )
    # A change of text: the memory now shares an entity with the seed (the update's own index arm).
    other = factory.memory(key, cube, "Grelp vonk 12 sprue.")
    r = client.patch(
        f"/v1/memories/{other['id']}",
        json={"content": "Our ferry tickets for Zanzibar are booked."},
        headers={**bearer(key), "If-Match": '"1"'},
    )
    assert r.status_code == 200, r.text
    eventually(
        lambda: graph_via(reader, key, cube).get(other["id"]) == f"graph:entity(zanzibar)<-{hit['id']}",
        "the changed text's entity",
    )
    # Archived and purged by the other process: out of this one's graph, not only out of its results.
    r = client.patch(
        f"/v1/memories/{late['id']}", json={"state": "archived"}, headers={**bearer(key), "If-Match": '"1"'}
    )
    assert r.status_code == 200, r.text
    assert (
        client.delete(f"/v1/memories/{lonely['id']}", params={"purge": "true"}, headers=bearer(key)).status_code == 204
    )
    gone = {late["id"], lonely["id"]}

    eventually(lambda: not any(holds(m) for m in gone), "the archived and purged memories leave the graph")
    assert loaded_graph(reader, cube) is graph, "caught up, not rebuilt"
    assert not gone & set(graph_via(reader, key, cube))


def test_a_change_of_text_elsewhere_replaces_the_memorys_links_in_this_graph(
    client, reader, factory: Factory, database_url: str
) -> None:
    """The other process's PATCH rewrites the memory's knn links and drops its provenance: the catch-up replaces
    the memory's links with those stored, so no old one stays behind in this process's graph."""
    key, cube, _ = painted_cube(client, factory)
    source = factory.memory(key, cube, "Vintol grask 31 plim.")
    derived = factory.memory(
        key,
        cube,
        "Melanie's sunrise painting of Zanzibar beach.",
        provenance={"derived_from": [{"memory_id": source["id"]}]},
    )
    graph_via(reader, key, cube)
    graph = loaded_graph(reader, cube)
    eventually(lambda: any(str(o) == source["id"] for o, _, _ in graph.edges(_uuid(derived["id"]))), "provenance")
    r = client.patch(
        f"/v1/memories/{derived['id']}",
        json={"content": "Spreadsheet macros for quarterly tax filings.", "provenance": {}},
        headers={**bearer(key), "If-Match": '"1"'},
    )
    assert r.status_code == 200, r.text
    stored = stored_links(database_url, derived["id"])

    def replaced() -> bool:
        graph_via(reader, key, cube)
        held = {
            (str(o), kind)
            for o, kind, _ in graph.edges(_uuid(derived["id"]))
            if kind in ("knn", "derived_from", "link")
        }
        return held == stored

    eventually(replaced, "the changed memory's links are the stored ones")
    assert not any(str(o) == source["id"] for o, _, _ in graph.edges(_uuid(derived["id"])))


def test_a_big_catch_up_rebuilds_the_graph(client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import memos.search.graphs as graphs_module

    key, cube, hit = painted_cube(client, factory)
    graph_via(reader, key, cube)
    before = loaded_graph(reader, cube)
    monkeypatch.setattr(graphs_module, "CATCH_UP_MAX", 1)
    late = factory.memory(key, cube, "Blorp snazz 9. Vindu klep.", links=[{"to": hit["id"], "type": "see"}])
    # More new memories than half the graph holds (and than CATCH_UP_MAX): rebuilt, not caught up.
    items = [{"kind": "plaintext", "content": f"Zib zab {i} quorn."} for i in range(len(before) // 2 + 1)]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    eventually(lambda: graph_via(reader, key, cube).get(late["id"]) == f"graph:link<-{hit['id']}", "the rebuilt graph")
    assert loaded_graph(reader, cube) is not before


def test_this_processs_own_writes_are_not_caught_up_again(
    client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up reads back this process's own recent writes too: at the versions its notes applied they are not
    applied again, so a bulk write of its own does not look like a big change and rebuild the graph."""
    import memos.search.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "CATCH_UP_MAX", 1)  # past half the graph decides
    key, cube, _ = painted_cube(client, factory)
    graph_via(reader, key, cube)
    before = loaded_graph(reader, cube)
    items = [{"kind": "plaintext", "content": f"Zib zab {i} quorn."} for i in range(len(before) + 5)]
    r = reader.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    sync = reader.app.state.search.graphs._syncs[_uuid(cube)]
    for _ in range(3):
        graph_via(reader, key, cube)
        eventually(lambda: sync.task is None, "the catch-up ends")
    assert loaded_graph(reader, cube) is before
    assert {m["id"] for m in r.json()["items"]} <= {str(m) for m in before.memory_ids()}
    # Nor its own deletions (found in review: they recorded no version, and looked like a big change).
    for m in r.json()["items"]:
        assert reader.delete(f"/v1/memories/{m['id']}", headers=bearer(key)).status_code == 204
    for _ in range(3):
        graph_via(reader, key, cube)
        eventually(lambda: sync.task is None, "the catch-up ends")
    assert loaded_graph(reader, cube) is before
    assert not {m["id"] for m in r.json()["items"]} & {str(m) for m in before.memory_ids()}


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def stored_links(database_url: str, memory_id: str) -> set[tuple[str, str]]:
    """The memory's stored links to active memories, either direction: (other memory, graph edge kind)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT CASE WHEN l.from_id = %(m)s THEN l.to_id ELSE l.from_id END, l.type FROM memory_links l"
            " JOIN memories o ON o.id = CASE WHEN l.from_id = %(m)s THEN l.to_id ELSE l.from_id END"
            " WHERE (l.from_id = %(m)s OR l.to_id = %(m)s) AND o.state = 'active'",
            {"m": memory_id},
        ).fetchall()
    return {(str(other), kind if kind in ("knn", "derived_from") else "link") for other, kind in rows}


def test_a_catch_up_leaves_alone_what_this_process_wrote_while_it_read(
    client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up's rows can be older than a write of this process that committed while they were read: that
    memory is skipped (its note is as new) and read again by the next catch-up, not set back to the old row."""
    import types

    import memos.search.graphs as graphs_module

    key, cube, _ = painted_cube(client, factory)
    graph_via(reader, key, cube)
    graphs = reader.app.state.search.graphs
    graph = loaded_graph(reader, cube)
    m = factory.memory(key, cube, "Grelp vonk 12 sprue.")  # by the other process: the catch-up reads it
    real_now = graphs_module.db_now
    sync = graphs._syncs[_uuid(cube)]

    async def own_write_meanwhile(conn):
        if asyncio.current_task() is not sync.task:  # another app's or cube's clock read (the patch is process-wide)
            return await real_now(conn)
        monkeypatch.setattr(graphs_module, "db_now", real_now)
        # This process's own write of the memory lands while the catch-up reads.
        row = types.SimpleNamespace(
            id=_uuid(m["id"]), state="active", content="Dinner in Oslo with Priya.", metadata={}, expires_at=None
        )
        graphs.memories_written(_uuid(cube), [row])
        return await real_now(conn)

    monkeypatch.setattr(graphs_module, "db_now", own_write_meanwhile)
    graph_via(reader, key, cube)  # starts a catch-up
    eventually(lambda: sync.task is None and _uuid(m["id"]) in sync.retry, "skipped for now")
    assert {"oslo", "priya"} <= graph.entities(_uuid(m["id"])), "the newer note stands"
    graph_via(reader, key, cube)  # the next one
    eventually(lambda: sync.task is None and not sync.retry, "read again")
    assert not {"oslo", "priya"} & graph.entities(_uuid(m["id"])), "and then the stored text, the truth, applies"


def test_a_link_left_out_for_a_touched_end_comes_back_at_the_next_catch_up(
    client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a changed memory's links were replaced without those to a memory this process touched
    meanwhile, and nothing read them again: a stored link left this process's graph for good."""
    import memos.search.graphs as graphs_module

    key, cube, hit = painted_cube(client, factory)
    b = factory.memory(key, cube, "Blorp snazz 9. Vindu klep.", links=[{"to": hit["id"], "type": "see"}])
    graph_via(reader, key, cube)
    graphs = reader.app.state.search.graphs
    graph = loaded_graph(reader, cube)
    sync = graphs._syncs[_uuid(cube)]

    def linked() -> bool:
        return any(str(o) == hit["id"] for o, _, _ in graph.edges(_uuid(b["id"])))

    eventually(lambda: bool(graph_via(reader, key, cube)) and linked(), "the link, caught up")
    eventually(lambda: sync.task is None, "idle")
    r = client.patch(f"/v1/memories/{b['id']}", json={"tags": ["x"]}, headers={**bearer(key), "If-Match": '"1"'})
    assert r.status_code == 200, r.text  # another process changes b: the catch-up replaces its links
    real_now = graphs_module.db_now

    async def own_link_meanwhile(conn):
        # Only in this graph's catch-up: the patch is process-wide, and the other app's background catch-ups (or
        # another cube's) read the clock too; the link written then was not "meanwhile" (a flaky failure).
        if asyncio.current_task() is not sync.task:
            return await real_now(conn)
        monkeypatch.setattr(graphs_module, "db_now", real_now)
        graphs.links_written(_uuid(cube), [(uuid.uuid4(), _uuid(hit["id"]), "knn", 0.9)])  # this process touches hit
        return await real_now(conn)

    monkeypatch.setattr(graphs_module, "db_now", own_link_meanwhile)
    graph_via(reader, key, cube)
    eventually(lambda: sync.task is None and _uuid(hit["id"]) in sync.retry, "the touched end, kept for a retry")
    graph_via(reader, key, cube)
    eventually(lambda: sync.task is None and not sync.retry, "retried")
    assert linked(), "the stored link is back"


def test_activations_a_purge_deletes_elsewhere_leave_this_graph(
    client, reader, factory: Factory, database_url: str
) -> None:
    """A purge deletes the memories derived from it as KV activations, rows and all (no version a catch-up could
    read): they leave with the purged memory when their rows are gone (found in review)."""
    key, cube, hit = painted_cube(client, factory)
    source = factory.memory(key, cube, "Grelp vonk 12 sprue.", links=[{"to": hit["id"], "type": "see"}])
    derived = factory.memory(
        key, cube, "Vintol grask 31 plim.", provenance={"derived_from": [{"memory_id": source["id"]}]}
    )
    graph_via(reader, key, cube)
    graph = loaded_graph(reader, cube)
    eventually(lambda: bool(graph_via(reader, key, cube)) and _uuid(derived["id"]) in graph, "caught up")
    with psycopg.connect(database_url) as conn:  # what a purge does to an activation memory of the source
        conn.execute("DELETE FROM memories WHERE id = %s", (derived["id"],))
    r = client.delete(f"/v1/memories/{source['id']}", params={"purge": "true"}, headers=bearer(key))
    assert r.status_code == 204, r.text
    eventually(
        lambda: (
            bool(graph_via(reader, key, cube))
            and not {_uuid(source["id"]), _uuid(derived["id"])} & set(graph.memory_ids())
        ),
        "both left",
    )


def test_a_failed_catch_up_keeps_its_retries(client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import memos.search.graphs as graphs_module

    key, cube, _ = painted_cube(client, factory)
    graph_via(reader, key, cube)
    sync = reader.app.state.search.graphs._syncs[_uuid(cube)]
    eventually(lambda: sync.task is None, "idle")
    waiting = uuid.uuid4()
    sync.retry.add(waiting)

    async def down(conn):
        raise psycopg.OperationalError("the database went away")

    monkeypatch.setattr(graphs_module, "db_now", down)
    graph_via(reader, key, cube)
    eventually(lambda: sync.task is None, "the catch-up failed")
    assert waiting in sync.retry


def test_own_writes_past_what_a_graph_remembers_rebuild_it(
    client, reader, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SEEN_MAX own writes between catch-ups a graph can no longer tell them from other processes': it is
    rebuilt at its next use rather than caught up with rows it may already hold (or set back by them)."""
    import memos.search.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "SEEN_MAX", 3)
    key, cube, _ = painted_cube(client, factory)
    graph_via(reader, key, cube)
    before = loaded_graph(reader, cube)
    items = [{"kind": "plaintext", "content": f"Zib zab {i} quorn."} for i in range(5)]
    r = reader.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    assert reader.app.state.search.graphs._syncs[_uuid(cube)].overflow
    eventually(
        lambda: bool(graph_via(reader, key, cube)) and loaded_graph(reader, cube) not in (None, before), "rebuilt"
    )
    assert {m["id"] for m in r.json()["items"]} <= {str(m) for m in loaded_graph(reader, cube).memory_ids()}


def test_a_warm_graph_catches_up_between_searches(client, settings, embedder, factory: Factory) -> None:
    app = create_app(
        dataclasses.replace(settings, search_pool=4, graph_sync_seconds=0.1), embedder_factory=lambda: embedder
    )
    with TestClient(app) as warm:
        key, cube, hit = painted_cube(client, factory)
        graph_via(warm, key, cube)
        graph = loaded_graph(warm, cube)
        late = factory.memory(key, cube, "Blorp snazz 9. Vindu klep.", links=[{"to": hit["id"], "type": "see"}])
        eventually(lambda: _uuid(late["id"]) in graph, "caught up with no search")
        assert graph_via(warm, key, cube).get(late["id"]) == f"graph:link<-{hit['id']}"

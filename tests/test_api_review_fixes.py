"""API review of memories, links, the cache's invalidation and cursors against the contract (API.md, docs/api.md).

- A deleted or purged memory took new links (201): writing it is 409 everywhere else.
- An activation memory (server-made, derived from its source) could be rewritten by PATCH while its KV stayed
  fresh; restore and links from it went through too.
- ``DELETE /v1/cache?category=<unknown>`` answered ``{"invalidated": 0}`` where a lookup answers 422.
- A cursor of one list was taken by another (a cubes cursor gave an empty page of agents).
- A time without a UTC offset is read as UTC, by list filters and search alike (pinned, documented).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from conftest import Factory, Tenant, bearer, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient

from memos.settings import Settings

Client = TestClient[Litestar]
MODEL = "tiny"


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=5)


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def fields(r: Any, status: int = 422) -> list[str]:
    return [e["field"] for e in problem(r, status).get("errors") or []]


def link(client: Client, key: str, from_id: str, to_id: str, type_: str = "rel") -> Any:
    return client.post(f"/v1/memories/{from_id}/links", json={"to": to_id, "type": type_}, headers=bearer(key))


def cursor_of(keys: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(keys).encode()).decode().rstrip("=")


# ---------------------------------------------------------------- 1. links of deleted and purged memories


def test_a_link_from_a_deleted_or_purged_memory_is_409(client: Client, factory: Factory, tenant: Tenant) -> None:
    key = tenant.admin_key
    cube = factory.cube(key)
    target = factory.memory(key, cube["id"], "the target")
    deleted = factory.memory(key, cube["id"], "soon deleted")
    purged = factory.memory(key, cube["id"], "soon purged")
    assert client.delete(f"/v1/memories/{deleted['id']}", headers=bearer(key)).status_code == 204
    assert client.delete(f"/v1/memories/{purged['id']}?purge=true", headers=bearer(key)).status_code == 204
    problem(link(client, key, deleted["id"], target["id"]), 409)
    problem(link(client, key, purged["id"], target["id"]), 409)
    # Once restored it may link again, and the link is new (a link written by the refused call would make
    # this one a 409 duplicate).
    r = client.post(f"/v1/memories/{deleted['id']}/restore", json={"version": 1}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert link(client, key, deleted["id"], target["id"]).status_code == 201


def test_a_link_to_a_deleted_or_purged_memory_is_kept_as_derived_from_is(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    """The decision documented in docs/api.md: the target may be deleted or purged, as a derived_from source may
    (in a create, a PATCH and a memory's own ``links``)."""
    key = tenant.admin_key
    cube = factory.cube(key)
    source = factory.memory(key, cube["id"], "a live memory")
    deleted = factory.memory(key, cube["id"], "deleted target")
    purged = factory.memory(key, cube["id"], "purged target")
    assert client.delete(f"/v1/memories/{deleted['id']}", headers=bearer(key)).status_code == 204
    assert client.delete(f"/v1/memories/{purged['id']}?purge=true", headers=bearer(key)).status_code == 204
    assert link(client, key, source["id"], deleted["id"]).status_code == 201
    assert link(client, key, source["id"], purged["id"]).status_code == 201
    made = factory.memory(
        key,
        cube["id"],
        "made with references",
        provenance={"derived_from": [{"memory_id": deleted["id"]}, {"memory_id": purged["id"]}]},
        links=[{"to": deleted["id"], "type": "about"}],
    )
    assert len(made["provenance"]["derived_from"]) == 2


# ---------------------------------------------------------------- 2. activation memories are server-made


@pytest.fixture(scope="module")
def activation(factory: Factory, tenant: Tenant) -> dict[str, Any]:
    cube = factory.cube(tenant.admin_key)
    source = factory.memory(tenant.admin_key, cube["id"], "The vault code is 4711.")
    act = factory.activation(tenant.admin_key, source["id"], MODEL)
    return {"cube": cube, "source": source, "activation": act}


def test_an_activation_memory_cannot_be_patched(client: Client, tenant: Tenant, activation: dict[str, Any]) -> None:
    key = tenant.admin_key
    act_id, source_id = activation["activation"]["id"], activation["source"]["id"]
    before = client.get(f"/v1/memories/{act_id}", headers=bearer(key)).json()
    assert before["kind"] == "activation"
    headers = {**bearer(key), "If-Match": "*"}
    forged = {"content": "forged", "metadata": {"model": "other"}, "provenance": {}}
    r = client.patch(f"/v1/memories/{act_id}", json=forged, headers=headers)
    assert fields(r) == ["content", "metadata", "provenance"]
    for body in ({"state": "archived"}, {"tags": ["x"]}, {"ttl_seconds": 60}, {"content": before["content"]}):
        r = client.patch(f"/v1/memories/{act_id}", json=body, headers=headers)
        assert fields(r) == list(body), r.text
    # An empty PATCH changes nothing, as for every memory.
    assert client.patch(f"/v1/memories/{act_id}", json={}, headers=headers).json()["version"] == 1
    after = client.get(f"/v1/memories/{act_id}", headers=bearer(key)).json()
    assert after == before
    graph = client.get(f"/v1/memories/{source_id}/provenance", headers=bearer(key)).json()
    assert act_id in {n["memory_id"] for n in graph["nodes"]}
    state = client.get(f"/v1/activations/{act_id}", headers=bearer(key)).json()
    assert state["stale"] is False


def test_an_activation_memory_cannot_be_restored_or_linked_from(
    client: Client, factory: Factory, tenant: Tenant, activation: dict[str, Any]
) -> None:
    key = tenant.admin_key
    cube_id, source_id = activation["cube"]["id"], activation["source"]["id"]
    other = factory.memory(key, cube_id, "another memory")
    act = factory.activation(key, other["id"], MODEL)
    assert fields(link(client, key, act["id"], source_id)) == ["memory_id"]
    # A link to it writes the other memory, not the activation's: allowed, as deriving from it is.
    assert link(client, key, source_id, act["id"], "uses").status_code == 201
    # Deleting one stays allowed (its KV is then stale); restoring it is not: build it again.
    assert client.delete(f"/v1/memories/{act['id']}", headers=bearer(key)).status_code == 204
    r = client.post(f"/v1/memories/{act['id']}/restore", json={"version": 1}, headers=bearer(key))
    assert fields(r) == ["version"]
    assert client.get(f"/v1/memories/{act['id']}", headers=bearer(key)).json()["state"] == "deleted"
    assert client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()["stale"] is True
    rebuilt = factory.activation(key, other["id"], MODEL)
    assert rebuilt["id"] != act["id"] and rebuilt["stale"] is False
    # Creating one through the memories API is refused on `kind`, one by one or in a batch.
    r = client.post(f"/v1/cubes/{cube_id}/memories", json={"kind": "activation", "content": "x"}, headers=bearer(key))
    assert fields(r) == ["kind"]
    batch = {"items": [{"kind": "plaintext", "content": "x"}, {"kind": "activation", "content": "y"}]}
    r = client.post(f"/v1/cubes/{cube_id}/memories/batch", json=batch, headers=bearer(key))
    assert fields(r) == ["items[1].kind"]


# ---------------------------------------------------------------- 3. cache invalidation of an unknown category


def test_invalidating_an_unknown_category_is_422(client: Client, factory: Factory, tenant: Tenant) -> None:
    key = tenant.admin_key
    cube_id = factory.cube(key)["id"]
    r = client.post(
        "/v1/cache", json={"cube_id": cube_id, "query": "what is the port?", "response": "8080"}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    r = client.delete("/v1/cache", params={"cube_id": cube_id, "category": "nope"}, headers=bearer(key))
    assert fields(r) == ["category"]
    assert "configured: " in r.json()["errors"][0]["message"]
    # A configured category with no entries is known: 0 invalidated.
    r = client.delete("/v1/cache", params={"cube_id": cube_id, "category": "code"}, headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"invalidated": 0}
    r = client.delete("/v1/cache", params={"cube_id": cube_id, "category": "default"}, headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"invalidated": 1}


def test_a_category_no_longer_configured_still_names_its_entries(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    """Stats list such a category (its entries are never served); invalidating it by name removes them."""
    key = tenant.admin_key
    cube_id = factory.cube(key)["id"]
    config = {"cube_id": cube_id, "categories": {"legacy": {"threshold": 0.9}}}
    assert client.put("/v1/cache/config", json=config, headers=bearer(key)).status_code == 200
    body = {"cube_id": cube_id, "query": "old question?", "response": "old answer", "category": "legacy"}
    assert client.post("/v1/cache", json=body, headers=bearer(key)).status_code == 201
    assert client.put("/v1/cache/config", json={**config, "categories": {}}, headers=bearer(key)).status_code == 200
    r = client.delete("/v1/cache", params={"cube_id": cube_id, "category": "legacy"}, headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"invalidated": 1}, r.text
    # Now nothing names it: unknown.
    r = client.delete("/v1/cache", params={"cube_id": cube_id, "category": "legacy"}, headers=bearer(key))
    assert fields(r) == ["category"]


# ---------------------------------------------------------------- 4. cursors belong to their list


def _first_cursor(client: Client, key: str, path: str) -> str:
    r = client.get(path, params={"limit": 1}, headers=bearer(key))
    assert r.status_code == 200, r.text
    cursor: str = r.json()["next_cursor"]
    assert cursor is not None and len(cursor) <= 128
    return cursor


def test_a_cursor_of_another_list_is_422_on_cursor(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    key = tenant.admin_key
    for _ in range(2):
        factory.agent(tenant)
    a, b = factory.cube(key), factory.cube(key)
    for cube in (a, b):
        for i in range(2):
            factory.memory(key, cube["id"], f"memory {i} of {cube['name']}")
    m1, m2 = (factory.memory(key, a["id"], f"versioned {i}") for i in range(2))
    for m in (m1, m2):
        r = client.patch(f"/v1/memories/{m['id']}", json={"content": "v2"}, headers={**bearer(key), "If-Match": "1"})
        assert r.status_code == 200, r.text
    cursors = {
        "/v1/cubes": _first_cursor(client, key, "/v1/cubes"),
        "/v1/agents": _first_cursor(client, key, "/v1/agents"),
        f"/v1/cubes/{a['id']}/memories": _first_cursor(client, key, f"/v1/cubes/{a['id']}/memories"),
        f"/v1/cubes/{b['id']}/memories": _first_cursor(client, key, f"/v1/cubes/{b['id']}/memories"),
        f"/v1/memories/{m1['id']}/versions": _first_cursor(client, key, f"/v1/memories/{m1['id']}/versions"),
        f"/v1/memories/{m2['id']}/versions": _first_cursor(client, key, f"/v1/memories/{m2['id']}/versions"),
    }
    for path, own in cursors.items():
        r = client.get(path, params={"cursor": own}, headers=bearer(key))
        assert r.status_code == 200 and r.json()["items"], (path, r.text)
        for other_path, other in cursors.items():
            if other_path != path:
                r = client.get(path, params={"cursor": other}, headers=bearer(key))
                assert fields(r) == ["cursor"], (path, other_path, r.text)


def test_an_untagged_cursor_of_an_older_release_is_422_saying_to_start_again(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    key = tenant.admin_key
    cube = factory.cube(key)
    m = factory.memory(key, cube["id"], "one")
    old_keyset = cursor_of(["2000-01-01T00:00:00+00:00", str(uuid.uuid4())])
    for path in ("/v1/cubes", "/v1/agents", f"/v1/cubes/{cube['id']}/memories"):
        r = client.get(path, params={"cursor": old_keyset}, headers=bearer(key))
        assert fields(r) == ["cursor"], r.text
        assert "first page" in r.json()["errors"][0]["message"]
    r = client.get(f"/v1/memories/{m['id']}/versions", params={"cursor": cursor_of([1])}, headers=bearer(key))
    assert fields(r) == ["cursor"]


def test_a_hand_made_cursor_is_a_position_in_the_callers_own_list(client: Client, factory: Factory) -> None:
    """Cursors are not signed: a well-formed one picks where the page starts, and reaches nothing else."""
    from memos.pagination import list_tag

    tenant = factory.tenant()
    owner = factory.agent(tenant)
    outsider = factory.agent(tenant)
    cube = factory.cube(owner.key)
    mine = factory.memory(owner.key, cube["id"], "the owner's memory")
    start = cursor_of([list_tag("memories", uuid.UUID(cube["id"])), "2000-01-01T00:00:00+00:00", str(uuid.UUID(int=0))])
    r = client.get(f"/v1/cubes/{cube['id']}/memories", params={"cursor": start}, headers=bearer(owner.key))
    assert [x["id"] for x in r.json()["items"]] == [mine["id"]]
    r = client.get(f"/v1/cubes/{cube['id']}/memories", params={"cursor": start}, headers=bearer(outsider.key))
    assert r.status_code == 404
    r = client.get(
        "/v1/cubes",
        params={"cursor": cursor_of([list_tag("cubes"), "2000-01-01T00:00:00", str(uuid.UUID(int=0))])},
        headers=bearer(outsider.key),
    )
    assert r.status_code == 200 and r.json()["items"] == []


# ---------------------------------------------------------------- 5. a time without an offset is UTC


def test_a_time_without_an_offset_is_read_as_utc_in_lists_and_search(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    key = tenant.admin_key
    cube = factory.cube(key)
    factory.memory(key, cube["id"], "the lighthouse keeper wrote", metadata={"time": "2030-05-01T12:00:00Z"})
    made = factory.memory(key, cube["id"], "the lighthouse keeper slept")
    created = made["created_at"].removesuffix("Z")
    for since in (created, created + "Z", created + "+00:00"):
        r = client.get(f"/v1/cubes/{cube['id']}/memories", params={"since": since}, headers=bearer(key))
        assert [x["id"] for x in r.json()["items"]] == [made["id"]], since
    for since, until in (
        ("2030-05-01T11:59:59", "2030-05-01T12:00:01"),
        ("2030-05-01T11:59:59Z", "2030-05-01T12:00:01Z"),
    ):
        body = {"query": "lighthouse keeper", "mode": "text", "cube_ids": [cube["id"]], "since": since, "until": until}
        r = client.post("/v1/search", json=body, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert [x["memory"]["content"] for x in r.json()["results"]] == ["the lighthouse keeper wrote"], since
    r = client.post(
        "/v1/search",
        json={"query": "lighthouse keeper", "mode": "text", "cube_ids": [cube["id"]], "since": "2030-05-01T12:00:01"},
        headers=bearer(key),
    )
    assert r.json()["results"] == []


def test_the_kv_lists_cursors_name_their_list_too(client: Client, tenant: Tenant, activation: dict[str, Any]) -> None:
    """A memory's activations and the models paged with cursors that named no list: memory A's activations
    cursor was taken by memory B's list as a position."""
    from datetime import UTC, datetime

    from memos.pagination import encode_cursor, encode_keyset, list_tag

    key = tenant.admin_key
    source_id, other_id = activation["source"]["id"], activation["activation"]["id"]
    when = datetime(2000, 1, 1, tzinfo=UTC)
    mine = encode_keyset(when, uuid.uuid4(), list_tag("activations", uuid.UUID(source_id)))
    r = client.get(f"/v1/memories/{source_id}/activations", params={"cursor": mine}, headers=bearer(key))
    assert r.status_code == 200, r.text
    r = client.get(f"/v1/memories/{other_id}/activations", params={"cursor": mine}, headers=bearer(key))
    assert fields(r) == ["cursor"]
    models = encode_cursor([MODEL], list_tag("models"))
    assert client.get("/v1/models", params={"cursor": models}, headers=bearer(key)).status_code == 200
    for stranger in (mine, encode_cursor([MODEL])):  # another list's, and an untagged one of an older release
        assert fields(client.get("/v1/models", params={"cursor": stranger}, headers=bearer(key))) == ["cursor"]


def test_purge_erases_provenance_text_and_keeps_the_lineage(client: Client, factory: Factory, tenant: Tenant) -> None:
    """api.md said a purge kept ``provenance``; it erases it (notes and sources are free text) and keeps its links."""
    key = tenant.admin_key
    cube = factory.cube(key)
    source = factory.memory(key, cube["id"], "the source")
    body = {
        "kind": "plaintext",
        "content": "derived",
        "provenance": {"source": "chat 7", "note": "private", "derived_from": [{"memory_id": source["id"]}]},
    }
    made = client.post(f"/v1/cubes/{cube['id']}/memories", json=body, headers=bearer(key)).json()
    r = client.delete(f"/v1/memories/{made['id']}", params={"purge": "true"}, headers=bearer(key))
    assert r.status_code == 204, r.text
    gone = client.get(f"/v1/memories/{made['id']}", headers=bearer(key)).json()
    assert gone["provenance"] == {} and gone["content"] is None
    versions = client.get(f"/v1/memories/{made['id']}/versions", headers=bearer(key)).json()["items"]
    assert all(v["provenance"] == {} for v in versions)
    graph = client.get(f"/v1/memories/{source['id']}/provenance", headers=bearer(key)).json()
    assert made["id"] in {n["memory_id"] for n in graph["nodes"]}


def test_the_same_link_twice_in_one_body_is_422_naming_it(client: Client, factory: Factory, tenant: Tenant) -> None:
    """It was a 409 "a link of this type between these memories already exists" for a memory not yet written."""
    key = tenant.admin_key
    cube = factory.cube(key)
    target = factory.memory(key, cube["id"], "the target")
    twice = [{"to": target["id"], "type": "rel"}, {"to": target["id"], "type": "rel"}]
    item = {"kind": "plaintext", "content": "x", "links": twice}
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json=item, headers=bearer(key))
    assert fields(r) == ["links[1]"]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": [item]}, headers=bearer(key))
    assert fields(r) == ["items[0].links[1]"]
    # Two types between the same pair are two links.
    item["links"] = [twice[0], {"to": target["id"], "type": "cites"}]
    assert client.post(f"/v1/cubes/{cube['id']}/memories", json=item, headers=bearer(key)).status_code == 201


def test_the_same_source_twice_in_derived_from_is_422_naming_it(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    """It was a 409 "a link of this type between these memories already exists", on create and on PATCH."""
    key = tenant.admin_key
    cube = factory.cube(key)
    source = factory.memory(key, cube["id"], "the source")
    twice = {"derived_from": [{"memory_id": source["id"]}, {"memory_id": source["id"], "version": 1}]}
    item = {"kind": "plaintext", "content": "x", "provenance": twice}
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json=item, headers=bearer(key))
    assert fields(r) == ["provenance.derived_from[1].memory_id"]
    made = factory.memory(key, cube["id"], "patched later")
    r = client.patch(f"/v1/memories/{made['id']}", json={"provenance": twice}, headers={**bearer(key), "If-Match": "1"})
    assert fields(r) == ["provenance.derived_from[1].memory_id"]

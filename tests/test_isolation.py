"""Tenant isolation: another tenant's ids (and an ungranted cube of one's own tenant) are 404, and stay unchanged.

Every endpoint that takes a cube, memory, agent or key id is driven by one table of
(method, path template, body, headers). Each row is sent with tenant B's admin key,
tenant B's agent key, and the key of an agent of tenant A that holds no grant on A's
cube. The answer must be the same as for an id that does not exist at all (no
existence oracle): 404, except where the endpoint is refused to the caller's role
whatever the id (purge, key rotation: 403 for a non-admin). Afterwards A's cube,
memories, versions, grants and keys are exactly as they were.

The table covers the semantic cache (A's cube and A's cached answer, by id in bodies and query
strings) and KV activations (A's memory and activation in paths, query strings and generation
requests); the app runs a tiny random causal LM so those requests reach past "no model configured".
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import psycopg
import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import TestClient

from memos.settings import Settings
from tests.conftest import Agent, Factory, Tenant, bearer, with_tiny_model

Client = TestClient[Litestar]
MODEL = "tiny"
A_QUESTION = "What is the code of A's vault?"


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=7)


@dataclasses.dataclass
class World:
    a: Tenant
    a_owner: Agent  # owns A's cube
    a_reader: Agent  # holds a read grant on A's cube
    a_outsider: Agent  # an agent of A with no grant on A's cube
    a_cube: dict[str, Any]
    a_mem: dict[str, Any]  # version 2, linked to and derived from by a_child
    a_child: dict[str, Any]
    b: Tenant
    b_agent: Agent  # owns B's cube
    b_cube: dict[str, Any]
    b_mem: dict[str, Any]
    a_entry: dict[str, Any]  # a cached answer in A's cube
    a_act: dict[str, Any]  # the KV activation of a_mem

    def key_of(self, caller: str) -> tuple[str, str, bool]:
        """(key, agent id, is admin) of a caller name."""
        return {
            "b_admin": (self.b.admin_key, self.b.admin_id, True),
            "b_agent": (self.b_agent.key, self.b_agent.id, False),
            "a_outsider": (self.a_outsider.key, self.a_outsider.id, False),
        }[caller]


@pytest.fixture(scope="module")
def world(client: Client, factory: Factory) -> World:
    a, b = factory.tenant(), factory.tenant()
    a_owner, a_reader, a_outsider = factory.agent(a), factory.agent(a), factory.agent(a)
    a_cube = factory.cube(a_owner.key, description="A's secrets", metadata={"team": "a"})
    r = client.put(
        f"/v1/cubes/{a_cube['id']}/grants/{a_reader.id}", json={"access": "read"}, headers=bearer(a_owner.key)
    )
    assert r.status_code == 200, r.text
    a_mem = factory.memory(a_owner.key, a_cube["id"], "A's first fact", tags=["a"])
    r = client.patch(
        f"/v1/memories/{a_mem['id']}",
        json={"content": "A's fact, revised"},
        headers={**bearer(a_owner.key), "If-Match": '"1"'},
    )
    assert r.status_code == 200, r.text
    a_mem = r.json()
    assert a_mem["version"] == 2
    a_child = factory.memory(
        a_owner.key,
        a_cube["id"],
        "derived from A's fact",
        provenance={"derived_from": [{"memory_id": a_mem["id"]}]},
        links=[{"to": a_mem["id"], "type": "related"}],
    )
    b_agent = factory.agent(b)
    b_cube = factory.cube(b_agent.key)
    b_mem = factory.memory(b_agent.key, b_cube["id"], "B's fact")
    owner = bearer(a_owner.key)
    r = client.post(
        "/v1/cache",
        json={"cube_id": a_cube["id"], "query": A_QUESTION, "response": "A's vault code is 4711"},
        headers=owner,
    )
    assert r.status_code == 201, r.text
    a_entry = r.json()
    r = client.post(f"/v1/memories/{a_mem['id']}/activations", json={"model": MODEL}, headers=owner)
    assert r.status_code == 201, r.text
    a_act = r.json()
    return World(a, a_owner, a_reader, a_outsider, a_cube, a_mem, a_child, b, b_agent, b_cube, b_mem, a_entry, a_act)


def fill(template: Any, values: dict[str, str]) -> Any:
    """``template`` with every ``{name}`` in its strings replaced (recursively through lists and dicts)."""
    if isinstance(template, str):
        return template.format_map(values)
    if isinstance(template, list):
        return [fill(t, values) for t in template]
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    return template


def send(client: Client, method: str, path: str, body: Any, headers: dict[str, str]) -> Response:
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return client.request(method, path, **kwargs)


def snapshot(client: Client, w: World) -> dict[str, Any]:
    """Everything a foreign caller might have changed, as A's owner sees it (heat and KV tiers left out: these
    reads warm A's memories, and the scheduler moves their KV between tiers; the test checks heat itself)."""
    owner = bearer(w.a_owner.key)

    def get(path: str) -> Any:
        r = client.get(path, headers=owner)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        body = r.json()
        if isinstance(body, dict):
            body.pop("heat", None)
            body.pop("tier", None)
            for item in body.get("items", []):
                if isinstance(item, dict):
                    item.pop("heat", None)
                    item.pop("tier", None)
        return body

    state = {
        "cube": get(f"/v1/cubes/{w.a_cube['id']}"),
        "memories": get(f"/v1/cubes/{w.a_cube['id']}/memories?limit=500"),
        "deleted": get(f"/v1/cubes/{w.a_cube['id']}/memories?state=deleted"),
        "mem": get(f"/v1/memories/{w.a_mem['id']}"),
        "child": get(f"/v1/memories/{w.a_child['id']}"),
        "versions": get(f"/v1/memories/{w.a_mem['id']}/versions"),
        "provenance": get(f"/v1/memories/{w.a_mem['id']}/provenance"),
        "a_cubes": sorted(c["id"] for c in get("/v1/cubes?limit=500")["items"]),
        "reader_sees_cube": client.get(f"/v1/cubes/{w.a_cube['id']}", headers=bearer(w.a_reader.key)).status_code,
        "outsider_sees_cube": client.get(f"/v1/cubes/{w.a_cube['id']}", headers=bearer(w.a_outsider.key)).status_code,
        "b_agent_sees_cube": client.get(f"/v1/cubes/{w.a_cube['id']}", headers=bearer(w.b_agent.key)).status_code,
        "owner_key": client.get("/v1/agents/me", headers=owner).status_code,
        "b_mem_version": client.get(f"/v1/memories/{w.b_mem['id']}", headers=bearer(w.b_agent.key)).json()["version"],
        "b_cube_stats": client.get(f"/v1/cubes/{w.b_cube['id']}", headers=bearer(w.b_agent.key)).json()["stats"],
        "cache_stats": get(f"/v1/cache/stats?cube_id={w.a_cube['id']}"),
        "cache_config": get(f"/v1/cache/config?cube_id={w.a_cube['id']}"),
        "entry": get(f"/v1/memories/{w.a_entry['id']}"),
        "activation": get(f"/v1/activations/{w.a_act['id']}"),
        "activations": get(f"/v1/memories/{w.a_mem['id']}/activations"),
    }
    assert state["mem"]["version"] == 2
    assert state["reader_sees_cube"] == 200
    assert state["outsider_sees_cube"] == 404
    return state


@pytest.fixture(scope="module")
def baseline(client: Client, world: World, database_url: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """The state every test must leave behind: nothing a foreign or ungranted caller does may change it."""
    return snapshot(client, world), _links_touching_a(database_url, world)


def placeholders(w: World, caller_id: str) -> dict[str, str]:
    return {
        "cube": w.a_cube["id"],
        "mem": w.a_mem["id"],
        "child": w.a_child["id"],
        "a_agent": w.a_owner.id,
        "a_reader": w.a_reader.id,
        "a_admin": w.a.admin_id,
        "a_key": w.a_owner.key.split("_")[1],
        "a_admin_key": w.a.admin_key.split("_")[1],
        "b_cube": w.b_cube["id"],
        "b_mem": w.b_mem["id"],
        "entry": w.a_entry["id"],
        "act": w.a_act["id"],
        "me": caller_id,
    }


# A's ids replaced by ids that name nothing: what a caller sees when there is nothing to find.
_GHOSTED = ("cube", "mem", "child", "a_agent", "a_reader", "a_admin", "entry", "act")

MEMORY_IN = {"kind": "plaintext", "content": "planted by a stranger"}
IF_MATCH_CURRENT = {"If-Match": '"2"'}
IF_MATCH_STALE = {"If-Match": '"1"'}

# (id, method, path template, body, extra headers, refused to non-admins whatever the id)
ROWS: list[tuple[str, str, str, Any, dict[str, str], bool]] = [
    # cubes
    ("get-cube", "GET", "/v1/cubes/{cube}", None, {}, False),
    ("patch-cube", "PATCH", "/v1/cubes/{cube}", {"name": "hijacked", "metadata": {"team": "b"}}, {}, False),
    ("patch-cube-empty", "PATCH", "/v1/cubes/{cube}", {}, {}, False),
    ("delete-cube", "DELETE", "/v1/cubes/{cube}", None, {}, False),
    # grants
    ("grant-self", "PUT", "/v1/cubes/{cube}/grants/{me}", {"access": "write"}, {}, False),
    ("grant-a-agent", "PUT", "/v1/cubes/{cube}/grants/{a_reader}", {"access": "write"}, {}, False),
    ("revoke-a-grant", "DELETE", "/v1/cubes/{cube}/grants/{a_reader}", None, {}, False),
    ("revoke-self", "DELETE", "/v1/cubes/{cube}/grants/{me}", None, {}, False),
    ("grant-own-cube-to-a", "PUT", "/v1/cubes/{b_cube}/grants/{a_agent}", {"access": "read"}, {}, False),
    ("grant-own-cube-to-a-admin", "PUT", "/v1/cubes/{b_cube}/grants/{a_admin}", {"access": "write"}, {}, False),
    ("revoke-own-cube-from-a", "DELETE", "/v1/cubes/{b_cube}/grants/{a_agent}", None, {}, False),
    # memories of a cube
    ("list-memories", "GET", "/v1/cubes/{cube}/memories", None, {}, False),
    ("list-deleted-memories", "GET", "/v1/cubes/{cube}/memories?state=deleted&tag=a", None, {}, False),
    ("add-memory", "POST", "/v1/cubes/{cube}/memories", MEMORY_IN, {}, False),
    ("add-batch", "POST", "/v1/cubes/{cube}/memories/batch", {"items": [MEMORY_IN, MEMORY_IN]}, {}, False),
    # one memory
    ("get-memory", "GET", "/v1/memories/{mem}", None, {}, False),
    ("get-memory-expired", "GET", "/v1/memories/{mem}?include_expired=true", None, {}, False),
    ("patch-memory", "PATCH", "/v1/memories/{mem}", {"content": "hijacked"}, IF_MATCH_CURRENT, False),
    ("patch-memory-stale", "PATCH", "/v1/memories/{mem}", {"content": "hijacked"}, IF_MATCH_STALE, False),
    ("patch-memory-any", "PATCH", "/v1/memories/{mem}", {"tags": ["x"]}, {"If-Match": "*"}, False),
    ("archive-memory", "PATCH", "/v1/memories/{mem}", {"state": "archived"}, IF_MATCH_CURRENT, False),
    ("delete-memory", "DELETE", "/v1/memories/{mem}", None, {}, False),
    ("delete-memory-if-match", "DELETE", "/v1/memories/{mem}", None, IF_MATCH_CURRENT, False),
    ("delete-memory-stale", "DELETE", "/v1/memories/{mem}", None, IF_MATCH_STALE, False),
    ("purge-memory", "DELETE", "/v1/memories/{mem}?purge=true", None, {}, True),
    ("versions", "GET", "/v1/memories/{mem}/versions", None, {}, False),
    ("version-1", "GET", "/v1/memories/{mem}/versions/1", None, {}, False),
    ("version-2", "GET", "/v1/memories/{mem}/versions/2", None, {}, False),
    ("version-99", "GET", "/v1/memories/{mem}/versions/99", None, {}, False),
    ("restore", "POST", "/v1/memories/{mem}/restore", {"version": 1}, {}, False),
    ("restore-stale", "POST", "/v1/memories/{mem}/restore", {"version": 1}, IF_MATCH_STALE, False),
    ("provenance", "GET", "/v1/memories/{mem}/provenance", None, {}, False),
    ("provenance-child", "GET", "/v1/memories/{child}/provenance", None, {}, False),
    ("link-from-a", "POST", "/v1/memories/{mem}/links", {"to": "{child}", "type": "related"}, {}, False),
    ("link-a-to-b", "POST", "/v1/memories/{mem}/links", {"to": "{b_mem}", "type": "related"}, {}, False),
    # A's ids inside the body of a request on one's own (B's) resources
    ("link-b-to-a", "POST", "/v1/memories/{b_mem}/links", {"to": "{mem}", "type": "related"}, {}, False),
    (
        "add-linking-a",
        "POST",
        "/v1/cubes/{b_cube}/memories",
        {**MEMORY_IN, "links": [{"to": "{mem}", "type": "related"}]},
        {},
        False,
    ),
    (
        "add-derived-from-a",
        "POST",
        "/v1/cubes/{b_cube}/memories",
        {**MEMORY_IN, "provenance": {"derived_from": [{"memory_id": "{mem}", "version": 1}]}},
        {},
        False,
    ),
    (
        "batch-derived-from-a",
        "POST",
        "/v1/cubes/{b_cube}/memories/batch",
        {"items": [MEMORY_IN, {**MEMORY_IN, "provenance": {"derived_from": [{"memory_id": "{child}"}]}}]},
        {},
        False,
    ),
    (
        "batch-linking-a",
        "POST",
        "/v1/cubes/{b_cube}/memories/batch",
        {"items": [{**MEMORY_IN, "links": [{"to": "{mem}", "type": "cites"}]}]},
        {},
        False,
    ),
    (
        "patch-own-derived-from-a",
        "PATCH",
        "/v1/memories/{b_mem}",
        {"provenance": {"derived_from": [{"memory_id": "{mem}"}]}},
        {"If-Match": "*"},
        False,
    ),
    # the semantic cache: A's cube in bodies and query strings, A's cached answer by id
    ("cache-lookup", "POST", "/v1/cache/lookup", {"cube_id": "{cube}", "query": A_QUESTION}, {}, False),
    (
        "cache-store",
        "POST",
        "/v1/cache",
        {"cube_id": "{cube}", "query": A_QUESTION, "response": "planted by a stranger"},
        {},
        False,
    ),
    (
        "cache-feedback",
        "POST",
        "/v1/cache/feedback",
        {"memory_id": "{entry}", "query": A_QUESTION, "correct": False},
        {},
        False,
    ),
    ("cache-invalidate", "DELETE", "/v1/cache?cube_id={cube}", None, {}, False),
    ("cache-invalidate-old", "DELETE", "/v1/cache?cube_id={cube}&category=default&older_than=0", None, {}, False),
    ("cache-stats", "GET", "/v1/cache/stats?cube_id={cube}", None, {}, False),
    ("cache-config", "GET", "/v1/cache/config?cube_id={cube}", None, {}, False),
    (
        "cache-configure",
        "PUT",
        "/v1/cache/config",
        {"cube_id": "{cube}", "categories": {"chat": {"threshold": 0.9}}},
        {},
        False,
    ),
    ("entry-as-memory", "GET", "/v1/memories/{entry}", None, {}, False),
    ("delete-entry", "DELETE", "/v1/memories/{entry}", None, {}, False),
    # KV activations and generation
    ("build-activation", "POST", "/v1/memories/{mem}/activations", {"model": MODEL}, {}, False),
    ("list-activations", "GET", "/v1/memories/{mem}/activations", None, {}, False),
    ("get-activation", "GET", "/v1/activations/{act}", None, {}, False),
    ("download-kv", "GET", "/v1/activations/{act}/kv", None, {}, False),
    ("activation-as-memory", "GET", "/v1/memories/{act}", None, {}, False),
    ("import-kv", "POST", "/v1/activations/import?memory_id={mem}&model=" + MODEL, {}, {}, False),
    ("pin-kv", "POST", "/v1/scheduler/pin", {"memory_id": "{mem}", "model": MODEL, "tier": "host"}, {}, False),
    (
        "generate-with-a-memory",
        "POST",
        "/v1/generate",
        {"model": MODEL, "prompt": "Tell me.", "memory_ids": ["{mem}"], "max_new_tokens": 1},
        {},
        False,
    ),
    (
        "generate-searching-a-cube",
        "POST",
        "/v1/generate",
        {"model": MODEL, "prompt": "Tell me.", "search": {"query": "fact", "cube_ids": ["{cube}"]}},
        {},
        False,
    ),
    ("search-a-cube", "POST", "/v1/search", {"query": "fact", "cube_ids": ["{cube}"]}, {}, False),
    (
        "search-a-cube-graph",
        "POST",
        "/v1/search",
        {"query": "fact", "cube_ids": ["{cube}"], "mode": "graph"},
        {},
        False,
    ),
    # agents and keys
    ("rotate-a-key", "POST", "/v1/agents/{a_agent}/keys", None, {}, True),
    ("rotate-a-admin-key", "POST", "/v1/agents/{a_admin}/keys", None, {}, True),
    ("revoke-a-key", "DELETE", "/v1/keys/{a_key}", None, {}, False),
    ("revoke-a-admin-key", "DELETE", "/v1/keys/{a_admin_key}", None, {}, False),
]

# Rows that only make sense for a caller of the other tenant: A's outsider can see these ids legitimately.
_FOREIGN_ONLY = {"revoke-a-key", "revoke-a-admin-key", "grant-own-cube-to-a", "grant-own-cube-to-a-admin"}
_FOREIGN_ONLY |= {"revoke-own-cube-from-a", "link-b-to-a", "add-linking-a", "add-derived-from-a"}
_FOREIGN_ONLY |= {"batch-derived-from-a", "batch-linking-a", "patch-own-derived-from-a"}

CASES = [
    pytest.param(caller, *row[1:], id=f"{caller}-{row[0]}")
    for caller in ("b_admin", "b_agent", "a_outsider")
    for row in ROWS
    if not (caller == "a_outsider" and row[0] in _FOREIGN_ONLY)
]


@pytest.mark.parametrize(("caller", "method", "path", "body", "extra", "role_gated"), CASES)
def test_foreign_ids_are_404_and_untouched(
    client: Client,
    world: World,
    baseline: tuple[dict[str, Any], list[tuple[Any, ...]]],
    database_url: str,
    caller: str,
    method: str,
    path: str,
    body: Any,
    extra: dict[str, str],
    role_gated: bool,
) -> None:
    key, caller_id, is_admin = world.key_of(caller)
    headers = {**bearer(key), **extra}

    values = placeholders(world, caller_id)
    heat = client.app.state.scheduler.heat
    warm = {
        m: heat.value(uuid.UUID(world_id))
        for m, world_id in (("mem", world.a_mem["id"]), ("child", world.a_child["id"]))
    }
    r = send(client, method, fill(path, values), fill(body, values), headers)
    # A foreign caller does not warm A's memories either (heat only cools meanwhile).
    assert all(heat.value(uuid.UUID(getattr(world, f"a_{m}")["id"])) <= h for m, h in warm.items())

    expected = 403 if role_gated and not is_admin else 404
    assert r.status_code == expected, f"{method} {path} as {caller}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "ETag" not in r.headers
    problem = r.json()
    assert problem["status"] == expected
    for secret in (world.a_mem["content"], world.a_cube["name"], "A's"):
        assert secret not in r.text

    # The same answer as for ids that name nothing: no way to tell that A's ids exist.
    ghost_values = {**values, **{name: str(uuid.uuid4()) for name in _GHOSTED}}
    ghost = send(client, method, fill(path, ghost_values), fill(body, ghost_values), headers)
    assert ghost.status_code == r.status_code, ghost.text
    assert ghost.json()["detail"] == problem["detail"]
    assert ghost.json().get("errors") == problem.get("errors")

    assert (snapshot(client, world), _links_touching_a(database_url, world)) == baseline


def _links_touching_a(database_url: str, w: World) -> list[tuple[Any, ...]]:
    ids = [w.a_mem["id"], w.a_child["id"], w.b_mem["id"]]
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT from_id, to_id, type, to_version FROM memory_links"
            " WHERE from_id = ANY(%s::uuid[]) OR to_id = ANY(%s::uuid[]) ORDER BY id",
            (ids, ids),
        ).fetchall()


def test_the_setup_is_what_the_table_assumes(client: Client, world: World) -> None:
    """A's owner and reader do reach A's resources, so the 404s above are about the caller, not the ids."""
    owner, reader = bearer(world.a_owner.key), bearer(world.a_reader.key)
    for path in (
        f"/v1/cubes/{world.a_cube['id']}",
        f"/v1/cubes/{world.a_cube['id']}/memories",
        f"/v1/memories/{world.a_mem['id']}",
        f"/v1/memories/{world.a_mem['id']}/versions",
        f"/v1/memories/{world.a_mem['id']}/versions/1",
        f"/v1/memories/{world.a_mem['id']}/provenance",
    ):
        for headers in (owner, reader, bearer(world.a.admin_key)):
            assert client.get(path, headers=headers).status_code == 200, path
    graph = client.get(f"/v1/memories/{world.a_mem['id']}/provenance", headers=owner).json()
    # The child and the KV activation are both derived from A's memory.
    assert {n["memory_id"] for n in graph["nodes"]} == {world.a_mem["id"], world.a_child["id"], world.a_act["id"]}
    for path in (
        f"/v1/activations/{world.a_act['id']}",
        f"/v1/memories/{world.a_mem['id']}/activations",
        f"/v1/cache/stats?cube_id={world.a_cube['id']}",
        f"/v1/memories/{world.a_entry['id']}",
    ):
        assert client.get(path, headers=reader).status_code == 200, path
    # B reaches its own.
    assert client.get(f"/v1/memories/{world.b_mem['id']}", headers=bearer(world.b_agent.key)).status_code == 200
    assert client.get(f"/v1/memories/{world.b_mem['id']}", headers=bearer(world.b.admin_key)).status_code == 200


@pytest.mark.parametrize("caller", ["b_admin", "b_agent", "a_outsider"])
def test_lists_never_show_foreign_cubes(client: Client, world: World, caller: str) -> None:
    key, _, _ = world.key_of(caller)
    r = client.get("/v1/cubes", params={"limit": 500}, headers=bearer(key))
    assert r.status_code == 200, r.text
    ids = {c["id"] for c in r.json()["items"]}
    assert world.a_cube["id"] not in ids
    if caller != "a_outsider":
        assert world.b_cube["id"] in ids


def test_b_admin_sees_only_its_own_agents(client: Client, world: World) -> None:
    r = client.get("/v1/agents", headers=bearer(world.b.admin_key))
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"] if isinstance(body, dict) else body
    ids = {a["id"] for a in items}
    assert ids == {world.b.admin_id, world.b_agent.id}
    me = client.get("/v1/agents/me", headers=bearer(world.b_agent.key)).json()
    assert me["tenant_id"] == world.b.id


# Requests by A's own owner whose bodies name B's memory: B's id must be as unknown to A as A's is to B.
OWN_ROWS: list[tuple[str, str, str, Any, dict[str, str], str]] = [
    (
        "add-linking-b",
        "POST",
        "/v1/cubes/{cube}/memories",
        {**MEMORY_IN, "links": [{"to": "{b_mem}", "type": "related"}]},
        {},
        "links[0].to",
    ),
    (
        "add-derived-from-b",
        "POST",
        "/v1/cubes/{cube}/memories",
        {**MEMORY_IN, "provenance": {"derived_from": [{"memory_id": "{b_mem}"}]}},
        {},
        "provenance.derived_from[0].memory_id",
    ),
    (
        "add-derived-from-b-v1",
        "POST",
        "/v1/cubes/{cube}/memories",
        {**MEMORY_IN, "provenance": {"derived_from": [{"memory_id": "{mem}"}, {"memory_id": "{b_mem}", "version": 1}]}},
        {},
        "provenance.derived_from[1].memory_id",
    ),
    (
        "batch-linking-b",
        "POST",
        "/v1/cubes/{cube}/memories/batch",
        {"items": [MEMORY_IN, {**MEMORY_IN, "links": [{"to": "{b_mem}", "type": "related"}]}]},
        {},
        "items[1].links[0].to",
    ),
    (
        "batch-derived-from-b",
        "POST",
        "/v1/cubes/{cube}/memories/batch",
        {"items": [{**MEMORY_IN, "provenance": {"derived_from": [{"memory_id": "{b_mem}"}]}}]},
        {},
        "items[0].provenance.derived_from[0].memory_id",
    ),
    (
        "patch-derived-from-b",
        "PATCH",
        "/v1/memories/{mem}",
        {"content": "changed", "provenance": {"derived_from": [{"memory_id": "{b_mem}"}]}},
        IF_MATCH_CURRENT,
        "provenance.derived_from[0].memory_id",
    ),
    ("link-to-b", "POST", "/v1/memories/{mem}/links", {"to": "{b_mem}", "type": "related"}, {}, "to"),
]


@pytest.mark.parametrize("who", ["a_owner", "a_admin"])
@pytest.mark.parametrize(
    ("method", "path", "body", "extra", "field"), [pytest.param(*r[1:], id=r[0]) for r in OWN_ROWS]
)
def test_foreign_memory_ids_in_bodies_are_404(
    client: Client,
    world: World,
    baseline: tuple[dict[str, Any], list[tuple[Any, ...]]],
    database_url: str,
    who: str,
    method: str,
    path: str,
    body: Any,
    extra: dict[str, str],
    field: str,
) -> None:
    key = world.a_owner.key if who == "a_owner" else world.a.admin_key
    values = placeholders(world, "")
    r = send(client, method, fill(path, values), fill(body, values), {**bearer(key), **extra})
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert field in [e["field"] for e in r.json().get("errors", [])], r.text
    assert "B's fact" not in r.text

    # Indistinguishable from an id that names nothing.
    ghost_values = {**values, "b_mem": str(uuid.uuid4())}
    ghost = send(client, method, fill(path, ghost_values), fill(body, ghost_values), {**bearer(key), **extra})
    assert ghost.status_code == 404
    assert ghost.json().get("errors") == r.json().get("errors")

    # Nothing was written on either side: no memory, no version, no link.
    assert (snapshot(client, world), _links_touching_a(database_url, world)) == baseline
    b_view = client.get(f"/v1/memories/{world.b_mem['id']}", headers=bearer(world.b_agent.key))
    assert b_view.json()["version"] == 1


@pytest.mark.parametrize("caller", ["b_admin", "b_agent", "a_outsider"])
def test_nothing_of_a_leaks_into_search_cache_or_generation(client: Client, world: World, caller: str) -> None:
    """Requests that name no foreign id at all (whole-scope search, a lookup of A's exact question in one's
    own cube, generation from a search) never bring back A's memories, answers or KV."""
    key, _, _ = world.key_of(caller)
    headers = bearer(key)
    own = client.post("/v1/cubes", json={"name": f"own-{uuid.uuid4().hex[:8]}"}, headers=headers)
    assert own.status_code == 201, own.text
    cube_id = own.json()["id"]
    a_ids = {world.a_mem["id"], world.a_child["id"], world.a_entry["id"], world.a_act["id"]}
    for mode in ("vector", "text", "hybrid", "graph"):
        for query in ("A's fact, revised", A_QUESTION, "vault code 4711"):
            r = client.post("/v1/search", json={"query": query, "mode": mode, "k": 50}, headers=headers)
            assert r.status_code == 200, r.text
            assert not a_ids & {hit["memory"]["id"] for hit in r.json()["results"]}, (mode, query)
            assert "A's" not in r.text
    r = client.post("/v1/cache/lookup", json={"cube_id": cube_id, "query": A_QUESTION}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["hit"] is False and "4711" not in r.text
    r = client.post(
        "/v1/generate",
        json={"model": MODEL, "prompt": "Tell me.", "search": {"query": "A's fact"}, "max_new_tokens": 1},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    assert not a_ids & set(r.json()["memory_ids"]) and not r.json()["activations_used"]
    stats = client.get(f"/v1/cache/stats?cube_id={cube_id}", headers=headers).json()
    assert stats["entries"] == 0

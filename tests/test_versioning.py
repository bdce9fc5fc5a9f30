"""The one-statement insert of new memories (memos/memories/versioning.py) and its binary float4[] vectors."""

from __future__ import annotations

import re
import uuid
from typing import Any

import numpy as np
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from pgvector.psycopg import register_vector
from sqlalchemy.ext.asyncio import create_async_engine

from memos.embed.base import Embedder
from memos.memories.versioning import _COLUMNS, _INSERT_NEW, insert_new
from memos.search.indexing import embedding_text
from memos.store.arrays import Float4Array, decode_vector
from memos.store.models import memories, memory_versions
from memos.store.urls import sqlalchemy_url
from tests.conftest import Factory, bearer


def _listed(section: str) -> list[str]:
    return [name.strip() for name in section.replace("\n", " ").split(",") if name.strip()]


def test_the_statement_names_every_column_of_the_tables() -> None:
    """The SQL is written out; a column added to the tables without it here fails this test."""
    inserted = _listed(re.search(r"INSERT INTO memories \((.*?)\)", _INSERT_NEW, re.S).group(1))  # type: ignore[union-attr]
    defaults = {"created_at", "updated_at", "heat", "purged_at", "tsv"}
    assert sorted(inserted) == sorted(c.name for c in memories.columns if c.name not in defaults)
    assert sorted(inserted) == sorted([*_COLUMNS, "embedding", "ann"])
    versioned = _listed(re.search(r"INSERT INTO memory_versions \((.*?)\)", _INSERT_NEW, re.S).group(1))  # type: ignore[union-attr]
    assert sorted(versioned) == sorted(c.name for c in memory_versions.columns)
    returned = _listed(re.search(r"\)\nSELECT(.*?)FROM new\n$", _INSERT_NEW, re.S).group(1))  # type: ignore[union-attr]
    assert sorted(returned) == sorted(
        [c.name for c in memories.columns if c.name not in ("embedding", "tsv")] + ["vector_send(embedding) AS vec"]
    )


def test_a_batch_stores_each_vector_exactly_in_order(
    client: TestClient[Litestar], factory: Factory, database_url: str, embedder: Embedder
) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    contents = [f"turn {i}: the ferry to island {i} leaves at {i}:15" for i in range(23)]
    items = [
        {"kind": "plaintext", "content": c, "tags": ["t", f"n{i}"] if i % 2 else []} for i, c in enumerate(contents)
    ]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    made = r.json()["items"]
    assert [m["content"] for m in made] == contents
    assert [m["tags"] for m in made] == [i["tags"] for i in items]
    expected = embedder.embed([embedding_text("plaintext", c, {}) for c in contents])
    with psycopg.connect(database_url) as conn:
        register_vector(conn)
        for m, vector in zip(made, expected, strict=True):
            current, tags = conn.execute(
                "SELECT embedding, tags FROM memories WHERE id = %s", (uuid.UUID(m["id"]),)
            ).fetchone()  # type: ignore[misc]
            first = conn.execute(
                "SELECT embedding FROM memory_versions WHERE memory_id = %s AND version = 1", (uuid.UUID(m["id"]),)
            ).fetchone()
            assert first is not None
            assert np.array_equal(current.to_numpy(), vector)  # float32 in, the same float32 stored
            assert np.array_equal(first[0].to_numpy(), vector)
            assert tags == m["tags"]


@pytest.mark.parametrize("with_vectors", [True, False], ids=["some-vectors", "no-vectors"])
async def test_rows_without_an_embedding_keep_the_others_in_their_slots(
    factory: Factory, database_url: str, with_vectors: bool
) -> None:
    """Rows without a vector (a KV activation's memory) get NULL; the others keep theirs. A batch with no
    vector at all is an empty array (it once failed to reshape: 500 on every activation build)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    rng = np.random.default_rng(3)
    vectors = [None, rng.standard_normal(384).astype(np.float32), None, rng.standard_normal(384).astype(np.float32)]
    if not with_vectors:
        vectors = [None] * 4
    with psycopg.connect(database_url) as conn:
        agent = conn.execute("SELECT id FROM agents WHERE tenant_id = %s", (uuid.UUID(tenant.id),)).fetchone()
    assert agent is not None
    rows: list[dict[str, Any]] = [
        {
            "id": uuid.uuid4(),
            "tenant_id": uuid.UUID(tenant.id),
            "cube_id": uuid.UUID(cube["id"]),
            "kind": "plaintext",
            "state": "active",
            "version": 1,
            "content": f"row {i}",
            "metadata": {"i": i},
            "tags": ["a", "b"][: i % 3],
            "provenance": {},
            "content_sha256": None,
            "expires_at": None,
            "created_by": agent[0],
            "embedding": vector,
            "embedding_model": None if vector is None else "test",
            "event_time": None,
        }
        for i, vector in enumerate(vectors)
    ]
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with engine.begin() as conn:
            written = await insert_new(conn, rows)
    finally:
        await engine.dispose()
    assert [w.id for w in written] == [r["id"] for r in rows]
    assert [w.metadata for w in written] == [{"i": i} for i in range(4)]
    assert [list(w.tags) for w in written] == [r["tags"] for r in rows]
    for w, vector in zip(written, vectors, strict=True):
        decoded = decode_vector(w.vec)
        assert (decoded is None) == (vector is None)
        if vector is not None:
            assert np.array_equal(decoded, vector)


def test_an_empty_matrix_is_an_empty_array(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        empty = Float4Array(np.zeros((0, 384), dtype=np.float32))
        assert conn.execute("SELECT cardinality(%s::float4[])", (empty,)).fetchone() == (0,)
        three = Float4Array(np.array([[1.5, -2.0, 0.25]], dtype=np.float32))
        assert conn.execute("SELECT %s::float4[]::vector::text", (three,)).fetchone() == ("[1.5,-2,0.25]",)

"""Write-time kNN links (memos/memories/neighbours.py): a big batch finds them in Python, a small one in
Postgres, and both give the same links."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from memos.memories import neighbours
from memos.memories.neighbours import _CUBE_VECTORS, _KNN_SQL, BATCH_IN_PYTHON, KNN_FLOOR, KNN_NEIGHBOURS, nearest
from memos.store.urls import sqlalchemy_url
from tests.conftest import Factory, bearer

T = TypeVar("T")


def _new_cube(factory: Factory) -> tuple[str, str]:
    """A new tenant's admin key and a cube of its own."""
    key = factory.tenant().admin_key
    return key, factory.cube(key)["id"]


def _packed(ids: list[uuid.UUID], rows: list[list[float]]) -> bytes:
    """Each id's 16 bytes and its row in pgvector's binary form (``vector_send``), end to end."""
    return b"".join(i.bytes + struct.pack(f">hh{len(r)}f", len(r), 0, *r) for i, r in zip(ids, rows, strict=True))


def test_nearest_takes_the_k_most_similar_others_above_the_floor() -> None:
    ids = [uuid.UUID(int=i) for i in range(6)]
    vectors = [
        [1.0, 0.0, 0.0],
        [0.9, 0.1, 0.0],  # close to 0
        [0.0, 1.0, 0.0],  # far from 0
        [2.0, 0.0, 0.1],  # close to 0, not unit length: cosine, not dot product
        [0.0, 0.0, 0.0],  # no direction: no neighbours, nobody's neighbour
        [1.0, 0.0, 0.0],  # the same as 0
    ]
    found = nearest(_packed(ids, vectors), [ids[0], ids[4], uuid.UUID(int=99)], k=3, floor=0.5)
    # ids 4 (zero vector) and 99 (not in the cube) get none; 0 gets its three nearest others, best first.
    assert [(a, b) for a, b, _, _ in found] == [(ids[0], ids[5]), (ids[0], ids[3]), (ids[0], ids[1])]
    assert [kind for _, _, kind, _ in found] == ["knn"] * 3
    weights = [w for *_, w in found]
    assert weights == sorted(weights, reverse=True) and weights[0] == pytest.approx(1.0)
    assert nearest(_packed(ids, vectors), [ids[2]], k=3, floor=0.5) == [], "nothing else is near it"
    assert nearest(_packed(ids[:1], vectors[:1]), ids[:1]) == [], "a cube of one has no neighbours"


def test_a_weight_is_a_cosine_never_above_one() -> None:
    """float32 puts a text and its copy at 1.0000002 apart; the link's weight is a similarity, at most 1."""
    rng = np.random.default_rng(3)
    ids = [uuid.UUID(int=1), uuid.UUID(int=2)]
    weights = []
    for _ in range(50):
        vector = rng.normal(size=384).tolist()
        weights += [w for *_, w in nearest(_packed(ids, [vector, [3 * x for x in vector]]), ids[:1])]
    assert len(weights) == 50
    assert max(weights) == 1.0


def test_a_memory_with_a_zero_vector_is_nobodys_neighbour(
    client: TestClient[Litestar], factory: Factory, database_url: str
) -> None:
    """A zero vector has no direction: pgvector's cosine distance to it is NaN, which Postgres sorts above every
    number, so the lateral scan once let it pass the floor with a NaN weight. Neither way links it."""
    key, cube = _new_cube(factory)
    blank = factory.memory(key, cube, "A memory whose vector we blank out.")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET embedding = array_fill(0, ARRAY[384])::vector WHERE id = %s", (blank["id"],))
    factory.memory(key, cube, "One more memory, linked by the lateral scan.")
    items = [{"kind": "plaintext", "content": f"Memory {i} of a big batch."} for i in range(BATCH_IN_PYTHON)]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT from_id, weight FROM memory_links m JOIN memories x ON x.id = m.from_id "
            "WHERE m.type = 'knn' AND x.cube_id = %s AND (m.to_id = %s OR m.weight = 'NaN')",
            (cube, blank["id"]),
        ).fetchall()
    assert rows == [], "no link to the zero vector, and no NaN weight"


def test_a_memory_embedded_by_another_model_is_nobodys_neighbour(
    client: TestClient[Litestar], factory: Factory, database_url: str
) -> None:
    """After a model change, stored vectors are in another space: neither way compares them with new ones."""
    key, cube = _new_cube(factory)
    text = "The ferry to the island leaves at nine on Saturdays."
    old = factory.memory(key, cube, text)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET embedding_model = 'an/older-model' WHERE id = %s", (old["id"],))
    one = factory.memory(key, cube, text)  # the lateral scan
    topics = ["my cat sleeps on the sofa", "the tax return is due in April", "we planted tomatoes"]
    items = [{"kind": "plaintext", "content": f"Note {i}: {topics[i % 3]}."} for i in range(BATCH_IN_PYTHON)]
    items.append({"kind": "plaintext", "content": text})  # the batch's links are found in Python
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    copy = r.json()["items"][-1]["id"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT from_id, to_id FROM memory_links WHERE type = 'knn' AND (to_id = %s OR from_id = %s)",
            (old["id"], old["id"]),
        ).fetchall()
        linked = conn.execute(
            "SELECT to_id::text FROM memory_links WHERE type = 'knn' AND from_id = %s", (copy,)
        ).fetchall()
    assert rows == [], "the same text under another model: no link either way"
    assert (one["id"],) in linked, "the same text under the same model is linked"


async def _rolled_back(database_url: str, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """``work`` on a connection of its own, in a transaction that is rolled back."""
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with engine.connect() as conn, conn.begin() as transaction:
            result = await work(conn)
            await transaction.rollback()
            return result
    finally:
        await engine.dispose()


def test_a_batch_gets_the_links_the_lateral_scan_finds(
    client: TestClient[Litestar], factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's links (found in Python) are the ones Postgres's exact lateral scan finds for the same memories,
    over the same set: active memories of the cube, earlier ones included, a deleted one left out."""
    key, cube = _new_cube(factory)
    earlier = factory.memory(key, cube, "Note 99: something about the ferry timetable to the island, take 0.")
    gone = factory.memory(key, cube, "Note 98: something about the ferry timetable to the island, take 0.")
    assert client.delete(f"/v1/memories/{gone['id']}", headers=bearer(key)).status_code == 204
    topics = ["ferry timetable to the island", "my cat sleeps on the sofa", "tax return deadline in April"]
    items = [
        {"kind": "plaintext", "content": f"Note {i}: something about the {topics[i % 3]}, take {i // 3}."}
        for i in range(BATCH_IN_PYTHON + 2)
    ]
    found_in_python: list[int] = []

    def counted(packed: bytes, ids: list[uuid.UUID]) -> list[neighbours.LinkEdge]:
        found_in_python.append(len(ids))
        return nearest(packed, ids)

    monkeypatch.setattr(neighbours, "nearest", counted)
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    assert found_in_python == [len(items)], "a batch this size reads the cube once"
    new = [uuid.UUID(m["id"]) for m in r.json()["items"]]
    actor = uuid.UUID(r.json()["items"][0]["created_by"])

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT from_id, to_id, weight FROM memory_links WHERE type = 'knn' AND from_id = ANY(%s)", (new,)
        ).fetchall()
    written = {(a, b): w for a, b, w in rows}
    assert len(written) == KNN_NEIGHBOURS * len(new), "every note has five near others of its topic"
    assert all(w >= KNN_FLOOR for w in written.values())
    assert uuid.UUID(gone["id"]) not in {b for a, b in written}
    assert uuid.UUID(earlier["id"]) in {b for a, b in written}

    async def lateral(conn: AsyncConnection) -> dict[tuple[uuid.UUID, uuid.UUID], float]:
        await conn.exec_driver_sql(
            "DELETE FROM memory_links WHERE type = 'knn' AND from_id = ANY(%(ids)s)", {"ids": new}
        )
        found = await conn.execute(
            _KNN_SQL[False], {"ids": new, "cube": cube, "actor": actor, "k": KNN_NEIGHBOURS, "floor": KNN_FLOOR}
        )
        result = {(row.from_id, row.to_id): float(row.weight) for row in found}
        packed = (await conn.execute(_CUBE_VECTORS, {"cube": uuid.UUID(cube), "ids": new})).scalar_one()
        assert len(packed) == (1 + len(new)) * (16 + 4 + 4 * 384), "the set read: the earlier one and the batch"
        return result

    expected = client.blocking_portal.call(_rolled_back, database_url, lateral)
    assert written.keys() == expected.keys()
    for pair, weight in expected.items():
        assert written[pair] == pytest.approx(weight, abs=1e-5)


def test_in_a_cube_partly_in_the_hnsw_index_the_links_are_the_exact_nearest(
    client: TestClient[Litestar], factory: Factory, database_url: str
) -> None:
    """The indexed form of the statement (the memories outside the index read once, HNSW over those in it)
    finds what ranking every active memory of the cube in numpy finds: nothing missed, nothing counted twice,
    a deleted memory left out, new memories of the same transaction included."""
    key, cube = _new_cube(factory)
    topics = ["ferry timetable to the island", "my cat sleeps on the sofa", "tax return deadline in April"]
    items = [
        {"kind": "plaintext", "content": f"Note {i}: something about the {topics[i % 3]}, take {i // 3}."}
        for i in range(48)
    ]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items[:40]}, headers=bearer(key))
    assert r.status_code == 201, r.text
    old = [uuid.UUID(m["id"]) for m in r.json()["items"]]
    assert client.delete(f"/v1/memories/{old[0]}", headers=bearer(key)).status_code == 204
    actor = uuid.UUID(r.json()["items"][0]["created_by"])
    with psycopg.connect(database_url) as conn:  # half of the cube "moved" into the index (memos/memories/ann.py)
        conn.execute("UPDATE memories SET ann = true WHERE id = ANY(%s)", (old[1:20],))
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items[40:]}, headers=bearer(key))
    assert r.status_code == 201, r.text
    new = [uuid.UUID(m["id"]) for m in r.json()["items"]]

    async def indexed(conn: AsyncConnection) -> tuple[dict[tuple[uuid.UUID, uuid.UUID], float], bytes]:
        await conn.exec_driver_sql(
            "DELETE FROM memory_links WHERE type = 'knn' AND from_id = ANY(%(ids)s)", {"ids": new}
        )
        await conn.exec_driver_sql("UPDATE memories SET ann = true WHERE id = ANY(%(ids)s)", {"ids": new[:4]})
        found = await conn.execute(
            _KNN_SQL[True],
            {"ids": new, "cube": uuid.UUID(cube), "actor": actor, "k": KNN_NEIGHBOURS, "floor": KNN_FLOOR},
        )
        packed = (
            await conn.exec_driver_sql(
                "SELECT string_agg(uuid_send(id) || vector_send(embedding), ''::bytea) FROM memories "
                "WHERE cube_id = %(cube)s AND state = 'active'",
                {"cube": uuid.UUID(cube)},
            )
        ).scalar_one()
        return {(row.from_id, row.to_id): float(row.weight) for row in found}, packed

    found, packed = client.blocking_portal.call(_rolled_back, database_url, indexed)
    exact = nearest(packed, new)
    assert len(found) == len(exact) == KNN_NEIGHBOURS * len(new)
    assert found.keys() == {(a, b) for a, b, _, _ in exact}
    assert old[0] not in {b for _, b in found}
    for a, b, _, weight in exact:
        assert found[(a, b)] == pytest.approx(weight, abs=1e-5)


def test_a_small_batch_into_an_empty_cube_links_within_itself_and_one_memory_gets_none(
    client: TestClient[Litestar], factory: Factory, database_url: str
) -> None:
    key, cube = _new_cube(factory)
    items = [
        {"kind": "plaintext", "content": "My kitten naps on the couch every afternoon."},
        {"kind": "plaintext", "content": "Our cat sleeps on the sofa all afternoon."},
    ]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    a, b = (uuid.UUID(m["id"]) for m in r.json()["items"])
    lone = factory.cube(key)["id"]
    only = uuid.UUID(factory.memory(key, lone, "A memory on its own.")["id"])
    with psycopg.connect(database_url) as conn:
        pairs = conn.execute(
            "SELECT from_id, to_id FROM memory_links WHERE type = 'knn' AND from_id = ANY(%s)", ([a, b, only],)
        ).fetchall()
    assert sorted(pairs) == sorted([(a, b), (b, a)])


def test_the_service_runs_blas_on_one_thread(client: TestClient[Litestar]) -> None:
    """OpenBLAS's idle helper threads spin on the cores the embedder and Postgres need (memos/blas.py)."""
    from threadpoolctl import threadpool_info

    blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
    assert blas, "numpy brings a BLAS"
    assert {info["num_threads"] for info in blas} == {1}


@pytest.mark.parametrize("in_python", [False, True])
def test_a_write_that_believed_its_cube_outside_the_index_still_links_to_memories_moved_meanwhile(
    client: TestClient[Litestar], factory: Factory, database_url: str, in_python: bool
) -> None:
    """A write read ``indexed = False``, then the index mover moved the cube's memories into HNSW before the write's
    knn statement ran: the statement read only memories outside the index, and the write got no knn links to the
    moved ones, for good (found in a concurrency review). Both ways, the statement and numpy, read them all now."""
    key, cube = _new_cube(factory)
    items = [
        {"kind": "plaintext", "content": f"Note {i}: the ferry timetable to the island, take {i}."} for i in range(8)
    ]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    old = [uuid.UUID(m["id"]) for m in r.json()["items"]]
    actor = uuid.UUID(r.json()["items"][0]["created_by"])
    r = client.post(
        f"/v1/cubes/{cube}/memories",
        json={"kind": "plaintext", "content": "The ferry timetable to the island."},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    new = uuid.UUID(r.json()["id"])

    async def moved_meanwhile(conn: AsyncConnection) -> set[uuid.UUID]:
        await conn.exec_driver_sql("DELETE FROM memory_links WHERE type = 'knn' AND from_id = %(id)s", {"id": new})
        await conn.exec_driver_sql("UPDATE memories SET ann = true WHERE id = ANY(%(ids)s)", {"ids": old})
        if in_python:
            tenant = (
                await conn.exec_driver_sql("SELECT tenant_id FROM memories WHERE id = %(id)s", {"id": new})
            ).scalar_one()
            found = await neighbours._exact_in_python(conn, tenant, actor, uuid.UUID(cube), [new])
            return {link[1] for link in found}
        rows = await conn.execute(
            _KNN_SQL[False],
            {"ids": [new], "cube": uuid.UUID(cube), "actor": actor, "k": KNN_NEIGHBOURS, "floor": KNN_FLOOR},
        )
        return {row.to_id for row in rows}

    linked = client.blocking_portal.call(_rolled_back, database_url, moved_meanwhile)
    assert len(linked) == KNN_NEIGHBOURS and linked <= set(old), linked

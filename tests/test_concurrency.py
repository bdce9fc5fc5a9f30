"""Real concurrency: racing PATCHes with the same If-Match, through the HTTP stack, on real Postgres."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import psycopg
from conftest import Factory, bearer
from litestar import Litestar
from litestar.testing import AsyncTestClient

from memos.app import create_app
from memos.errors import Conflict
from memos.store.db import Database


async def test_racing_patches_one_wins_the_rest_get_412(
    settings, embedder, factory: Factory, database_url: str
) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "v1")
    app: Litestar = create_app(settings, embedder_factory=lambda: embedder)
    headers = {**bearer(tenant.admin_key), "If-Match": '"1"'}
    async with AsyncTestClient(app) as client:
        for round_ in range(5):
            # Everyone read the same version; all write at once.
            expected = 1 + round_
            headers["If-Match"] = f'"{expected}"'
            results = await asyncio.gather(
                *(
                    client.patch(f"/v1/memories/{memory['id']}", json={"content": f"r{round_}-w{i}"}, headers=headers)
                    for i in range(8)
                )
            )
            codes = sorted(r.status_code for r in results)
            assert codes == [200] + [412] * 7, codes
            (winner,) = [r.json() for r in results if r.status_code == 200]
            assert winner["version"] == expected + 1

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT version, op FROM memory_versions WHERE memory_id = %s ORDER BY version", (memory["id"],)
        ).fetchall()
        current = conn.execute("SELECT version, content FROM memories WHERE id = %s", (memory["id"],)).fetchone()
    # Contiguous, no duplicates, nothing lost; current state equals the last version row.
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert current is not None
    assert current[0] == 6
    assert current[1].startswith("r4-")


async def test_concurrent_creates_in_one_cube_all_land(settings, embedder, factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    app: Litestar = create_app(settings, embedder_factory=lambda: embedder)
    async with AsyncTestClient(app) as client:
        results = await asyncio.gather(
            *(
                client.post(
                    f"/v1/cubes/{cube['id']}/memories",
                    json={"kind": "plaintext", "content": f"c{i}"},
                    headers=bearer(tenant.admin_key),
                )
                for i in range(40)
            )
        )
        assert all(r.status_code == 201 for r in results)
        page = await client.get(f"/v1/cubes/{cube['id']}/memories?limit=100", headers=bearer(tenant.admin_key))
    assert sorted(x["content"] for x in page.json()["items"]) == sorted(f"c{i}" for i in range(40))


async def test_a_purge_that_lands_during_a_restore_wins(
    settings, embedder, factory: Factory, database_url: str, monkeypatch
) -> None:
    """A restore reads the deleted memory, then a purge is sent, then the restore writes: the purge must win.

    Purging a memory that is already deleted writes no version, so the restore's compare-and-set on the
    version alone let it write the purged text back as a new version (found in review). Since a restore locks
    the memory (a link racing it missed the graph, found in a concurrency review), the purge waits for the
    restore to commit and then erases what it wrote: the purge still wins."""
    from memos.memories import service as memory_service

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    secret = "The vault code is 4417."
    memory = factory.memory(tenant.admin_key, cube["id"], secret)
    auth = bearer(tenant.admin_key)
    app: Litestar = create_app(settings, embedder_factory=lambda: embedder)
    async with AsyncTestClient(app) as client:
        assert (await client.delete(f"/v1/memories/{memory['id']}", headers=auth)).status_code == 204
        real_write_version = memory_service.write_version

        purges: list[asyncio.Future[None]] = []
        purged = threading.Event()  # the purge runs on the app's loop, not this test's

        async def purge_first(conn, memory_id, expected_version, op, actor, values):  # type: ignore[no-untyped-def]
            if op == "restore":  # the same admin purges, in a transaction of its own, while the restore writes
                purges.append(asyncio.ensure_future(app.state.memories.delete(actor, memory_id, None, purge=True)))
                purges[0].add_done_callback(lambda _: purged.set())
                await asyncio.sleep(0.3)  # the purge's turn, if the memory were not locked
                assert not purges[0].done(), "the purge waits for the restore"
            return await real_write_version(conn, memory_id, expected_version, op, actor, values)

        monkeypatch.setattr(memory_service, "write_version", purge_first)
        restored = await client.post(f"/v1/memories/{memory['id']}/restore", json={"version": 1}, headers=auth)
        assert restored.status_code == 200, restored.text
        assert await asyncio.to_thread(purged.wait, 30)
        assert purges[0].exception() is None
        monkeypatch.undo()
        again = await client.post(f"/v1/memories/{memory['id']}/restore", json={"version": 1}, headers=auth)
        assert again.status_code == 409  # purged: nothing to restore
        found = await client.post("/v1/search", json={"query": "vault code", "mode": "text"}, headers=auth)
        assert found.json()["results"] == []

    with psycopg.connect(database_url) as conn:
        texts = conn.execute(
            "SELECT count(*) FROM memory_versions WHERE memory_id = %s AND content IS NOT NULL", (memory["id"],)
        ).fetchone()
        row = conn.execute("SELECT content, state FROM memories WHERE id = %s", (memory["id"],)).fetchone()
    assert texts == (0,)
    assert row == (None, "deleted")


def test_a_memory_delete_waiting_on_its_cubes_deletion_is_404(client, factory: Factory, database_url: str) -> None:
    """The cube's deletion holds its row; a memory delete that comes meanwhile must wait for it and then find the
    memory gone with its cube. It locked only the memory row and answered 204 (found in review)."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "a note in a cube about to go")
    answers: list[int] = []
    with psycopg.connect(database_url) as deleting:
        deleting.execute("UPDATE cubes SET deleted_at = now() WHERE id = %s", (cube["id"],))  # uncommitted
        worker = threading.Thread(
            target=lambda: answers.append(
                client.delete(f"/v1/memories/{memory['id']}", headers=bearer(tenant.admin_key)).status_code
            )
        )
        worker.start()
        worker.join(timeout=1.0)
        assert answers == []  # it waits for the cube
        deleting.commit()
    worker.join(timeout=30)
    assert answers == [404]


async def test_crossed_writes_are_a_409_to_retry_not_a_503(settings, embedder, factory: Factory) -> None:
    """A deadlock is an OperationalError, like a lost connection, and was answered 503 'the database is not
    answering' (found in review); the database answered: it is a conflict to retry."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    a, b = (factory.memory(tenant.admin_key, cube["id"], text)["id"] for text in ("first", "second"))
    db = Database(settings)
    await db.start()
    try:
        first_locked, second_locked = asyncio.Event(), asyncio.Event()

        async def lock(mine: str, theirs: str, locked: asyncio.Event, other: asyncio.Event) -> None:
            async with db.transaction() as conn:
                await conn.exec_driver_sql("SELECT 1 FROM memories WHERE id = %(id)s FOR UPDATE", {"id": mine})
                locked.set()
                await other.wait()
                await conn.exec_driver_sql("SELECT 1 FROM memories WHERE id = %(id)s FOR UPDATE", {"id": theirs})

        outcomes = await asyncio.gather(
            lock(a, b, first_locked, second_locked), lock(b, a, second_locked, first_locked), return_exceptions=True
        )
    finally:
        await db.stop()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], Conflict), outcomes
    assert failed[0].status == 409 and "retry" in failed[0].detail


def test_the_index_move_waits_for_a_cube_deletion_and_then_moves_nothing(
    client, factory: Factory, database_url: str
) -> None:
    """The background move into the HNSW index locked its memories alone, in its own order, while a cube's deletion
    locks the cube and then all its memories: the two could deadlock (a suspicion from review). It now takes the
    cube's row first, like every other writer of memories."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    for text in ("first", "second", "third"):
        factory.memory(tenant.admin_key, cube["id"], text)
    mover = client.app.state.memories.index_mover
    with psycopg.connect(database_url) as deleting:
        deleting.execute("UPDATE cubes SET deleted_at = now() WHERE id = %s", (cube["id"],))  # uncommitted
        moving = client.blocking_portal.start_task_soon(mover._move, uuid.UUID(cube["id"]))
        time.sleep(1.0)
        assert not moving.done()  # waiting for the cube, holding no memory row
        deleting.commit()
    moving.result(timeout=30)
    with psycopg.connect(database_url) as conn:
        moved = conn.execute("SELECT count(*) FROM memories WHERE cube_id = %s AND ann", (cube["id"],)).fetchone()
    assert moved == (0,)


def _waits_then(database_url: str, hold_sql: list[tuple[str, tuple[Any, ...]]], request: Any) -> int:
    """Run ``hold_sql`` in a transaction left open, start ``request`` (a callable giving a status code) in a thread,
    check that it waits on the rows held, commit, and give its status."""
    answers: list[int] = []
    with psycopg.connect(database_url) as holding:
        for sql, args in hold_sql:
            holding.execute(sql, args)  # uncommitted: the rows stay locked
        worker = threading.Thread(target=lambda: answers.append(request()))
        worker.start()
        worker.join(timeout=2.0)
        assert answers == [], "it waits for the rows held"
        holding.commit()
    worker.join(timeout=30)
    assert len(answers) == 1
    return answers[0]


def test_a_write_waiting_while_its_grant_is_revoked_is_refused(client, factory: Factory, database_url: str) -> None:
    """A revoke holds the cube row and deletes the grant. A write that waited on the row got, once it went on, the
    grant row it had joined before waiting (Postgres re-checks only the locked row): it committed after the
    revoke had answered 204 (found in review). Its access is read again after the lock."""
    tenant = factory.tenant()
    owner, writer = factory.agent(tenant), factory.agent(tenant)
    cube = factory.cube(owner.key)
    r = client.put(f"/v1/cubes/{cube['id']}/grants/{writer.id}", json={"access": "write"}, headers=bearer(owner.key))
    assert r.status_code in (200, 201), r.text
    gone = factory.memory(owner.key, cube["id"], "a note to bring back")
    assert client.delete(f"/v1/memories/{gone['id']}", headers=bearer(owner.key)).status_code == 204
    revoke = [
        ("SELECT 1 FROM cubes WHERE id = %s FOR UPDATE", (cube["id"],)),
        ("DELETE FROM cube_grants WHERE cube_id = %s AND agent_id = %s", (cube["id"], writer.id)),
    ]
    for write in (
        lambda: (
            client.post(
                f"/v1/cubes/{cube['id']}/memories",
                json={"kind": "plaintext", "content": "after the revoke"},
                headers=bearer(writer.key),
            ).status_code
        ),  # cube_access
        lambda: (
            client.post(
                f"/v1/memories/{gone['id']}/restore", json={"version": 1}, headers=bearer(writer.key)
            ).status_code
        ),  # a memory's own access check
    ):
        assert _waits_then(database_url, revoke, write) == 404
        r = client.put(
            f"/v1/cubes/{cube['id']}/grants/{writer.id}", json={"access": "write"}, headers=bearer(owner.key)
        )
        assert r.status_code in (200, 201), r.text
    listed = client.get(f"/v1/cubes/{cube['id']}/memories", headers=bearer(owner.key)).json()["items"]
    assert [m["content"] for m in listed] == [], "nothing was written, nothing restored"


def test_a_link_waiting_on_its_memorys_delete_is_409(client, factory: Factory, database_url: str) -> None:
    """The link checked the memory's state, then inserted: a delete committing in between left a link on a deleted
    memory (the link's foreign key takes only a key-share lock; found in review). The memory is locked now."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    source = factory.memory(tenant.admin_key, cube["id"], "the source")
    target = factory.memory(tenant.admin_key, cube["id"], "the target")
    delete = [("UPDATE memories SET state = 'deleted' WHERE id = %s", (source["id"],))]
    status = _waits_then(
        database_url,
        delete,
        lambda: (
            client.post(
                f"/v1/memories/{source['id']}/links",
                json={"to": target["id"], "type": "related"},
                headers=bearer(tenant.admin_key),
            ).status_code
        ),
    )
    assert status == 409
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM memory_links WHERE from_id = %s", (source["id"],)).fetchone() == (0,)


def test_feedback_on_an_entry_invalidated_meanwhile_is_409(client, factory: Factory, database_url: str) -> None:
    """Feedback checked the entry's state before embedding the query and moved the category's threshold after it:
    an invalidation committing in between let one report on a deleted entry raise the threshold (0.75 -> 0.98,
    found in review). The state is read again, locked, in the feedback's transaction."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    key = bearer(tenant.admin_key)
    stored = client.post(
        "/v1/cache",
        json={"cube_id": cube["id"], "query": "What is the capital of France?", "response": "Paris."},
        headers=key,
    )
    assert stored.status_code == 201, stored.text
    entry = stored.json()["id"]
    invalidate = [("UPDATE memories SET state = 'deleted' WHERE id = %s", (entry,))]
    status = _waits_then(
        database_url,
        invalidate,
        lambda: (
            client.post(
                "/v1/cache/feedback",
                json={"memory_id": entry, "query": "What is the capital of France?", "correct": False},
                headers=key,
            ).status_code
        ),
    )
    assert status == 409
    stats = client.get("/v1/cache/stats", params={"cube_id": cube["id"]}, headers=key).json()
    default = next(c for c in stats["categories"] if c["category"] == stats["default"])
    assert default["threshold"] == default["configured_threshold"] and default["false_hits"] == 0, default

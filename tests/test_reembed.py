"""`memos admin reembed` after MEMOS_EMBED_MODEL names another encoder of the same dimensions.

Memories are written through the API with the bundled all-MiniLM-L6-v2; the tool then re-embeds them with a
tiny random 384-dimension BERT (a real transformers model from a config, saved and loaded from a directory),
and a second app running on that model finds them by vector and serves the cached answer again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from conftest import Factory, Tenant, bearer, make_encoder_dir, with_tiny_model
from litestar.testing import TestClient

from memos.admin.reembed import Report, reembed
from memos.app import create_app
from memos.cli.main import main as cli_main
from memos.embed.base import Embedder
from memos.embed.registry import load_embedder
from memos.search.indexing import embedding_text
from memos.semcache.context import context_text
from memos.semcache.index import turns_from
from memos.settings import Settings
from memos.store.arrays import decode_vector
from memos.store.db import Database

CONTEXT = ["Which trip are we planning?", "The Lisbon trip in May."]
KV_MODEL = "tiny"


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A KV model too: the KV built from a memory must stay current when only its embedding changes."""
    return with_tiny_model(settings, tmp_path_factory, KV_MODEL, seed=0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("other-encoder"), hidden_size=384, layers=1, heads=6, seed=7)


@pytest.fixture(scope="module")
def other(other_dir: Path) -> Embedder:
    return load_embedder(str(other_dir))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings, other_dir: Path) -> None:
    """What an operator sets before running the tool: the database and the new model."""
    assert settings.database_url is not None
    monkeypatch.setenv("MEMOS_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MEMOS_EMBED_MODEL", str(other_dir))


@pytest.fixture(scope="module")
def world(factory: Factory, client: TestClient) -> dict[str, Any]:  # type: ignore[type-arg]
    tenant = factory.tenant()
    key = tenant.admin_key
    cube, second = factory.cube(key), factory.cube(key)
    said = factory.memory(key, cube["id"], "I repainted the lighthouse last spring.", metadata={"speaker": "Melanie"})
    plain = factory.memory(key, cube["id"], "Caroline keeps bees behind the barn.")
    archived = factory.memory(key, cube["id"], "The ferry to the island leaves at noon.")
    headers = {**bearer(key), "If-Match": f'"{archived["version"]}"'}
    r = client.patch(f"/v1/memories/{archived['id']}", json={"state": "archived"}, headers=headers)
    assert r.status_code == 200, r.text
    deleted = factory.memory(key, cube["id"], "This one was deleted before the switch.")
    assert client.delete(f"/v1/memories/{deleted['id']}", headers=bearer(key)).status_code == 204
    cached = _store(client, key, cube["id"], "How long is the flight to Lisbon?", "About two hours.", CONTEXT)
    bare = _store(client, key, cube["id"], "What is the capital of Portugal?", "Lisbon.", None)
    elsewhere = factory.memory(key, second["id"], "The second cube holds one memory.")
    r = client.post(f"/v1/memories/{plain['id']}/activations", json={"model": KV_MODEL}, headers=bearer(key))
    assert r.status_code == 201, r.text
    return {
        "activation": r.json(),
        "tenant": tenant,
        "cube": cube,
        "second": second,
        "said": said,
        "plain": plain,
        "archived": archived,
        "deleted": deleted,
        "cached": cached,
        "bare": bare,
        "elsewhere": elsewhere,
    }


def _store(client: TestClient, key: str, cube_id: str, query: str, answer: str, context: list[str] | None) -> dict:  # type: ignore[type-arg]
    body: dict[str, Any] = {"cube_id": cube_id, "query": query, "response": answer}
    if context is not None:
        body["context"] = context
    r = client.post("/v1/cache", json=body, headers=bearer(key))
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def client_on_other(settings: Settings, other: Embedder) -> Iterator[TestClient]:  # type: ignore[type-arg]
    """A second memos process on the same database, started with the new model."""
    app = create_app(dataclasses.replace(settings, cache_sync_seconds=0.05), embedder_factory=lambda: other)
    with TestClient(app) as c:
        yield c


def _current(database_url: str, memory_id: str) -> tuple[int, str, tuple[float, ...], str]:
    """(version, embedding_model, embedding, state) of a memory now."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT version, embedding_model, vector_send(embedding), state FROM memories WHERE id = %s",
            (memory_id,),
        ).fetchone()
    assert row is not None
    vector = decode_vector(row[2])
    assert vector is not None
    return row[0], row[1], tuple(vector.tolist()), row[3]


def _vector_ids(client: TestClient, tenant: Tenant, cube_id: str, query: str) -> list[str]:  # type: ignore[type-arg]
    body = {"query": query, "cube_ids": [cube_id], "mode": "vector", "k": 3, "states": ["active", "archived"]}
    r = client.post("/v1/search", json=body, headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    return [x["memory"]["id"] for x in r.json()["results"]]


def _lookup(client: TestClient, tenant: Tenant, cube_id: str, query: str, context: list[str] | None) -> dict:  # type: ignore[type-arg]
    body: dict[str, Any] = {"cube_id": cube_id, "query": query}
    if context is not None:
        body["context"] = context
    r = client.post("/v1/cache/lookup", json=body, headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_before_reembedding_the_new_model_leaves_the_old_vectors_out(world, client_on_other, embedder) -> None:
    tenant, cube = world["tenant"], world["cube"]
    said = embedding_text("plaintext", world["said"]["content"], world["said"]["metadata"])
    assert _vector_ids(client_on_other, tenant, cube["id"], said) == []
    assert not _lookup(client_on_other, tenant, cube["id"], "How long is the flight to Lisbon?", CONTEXT)["hit"]


def test_dry_run_counts_by_model_and_writes_nothing(world, env, embedder, database_url, capsys) -> None:
    before = _current(database_url, world["said"]["id"])
    assert cli_main(["admin", "reembed", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # said, plain, archived, two cached answers, elsewhere; not the deleted one
    assert f"6 memories embedded by {embedder.name}" in out
    assert "dry run: nothing written" in out
    assert _current(database_url, world["said"]["id"]) == before


def test_bad_arguments_are_refused(env, tmp_path, monkeypatch, capsys) -> None:
    assert cli_main(["admin", "reembed", "--cube", "not-a-cube-id"]) == 2
    assert "--cube takes a cube id" in capsys.readouterr().err
    assert cli_main(["admin", "reembed", "--batch-size", "0"]) == 2
    monkeypatch.setenv("MEMOS_EMBED_MODEL", str(make_encoder_dir(tmp_path, hidden_size=32)))
    assert cli_main(["admin", "reembed"]) == 2
    assert "32-dimension vectors; the embedding column holds 384" in capsys.readouterr().err


def test_one_cube_only(world, env, other, database_url, capsys) -> None:
    assert cli_main(["admin", "reembed", "--cube", world["second"]["id"]]) == 0
    assert "re-embedded 1 memories" in capsys.readouterr().out
    assert _current(database_url, world["elsewhere"]["id"])[1] == other.name
    assert _current(database_url, world["said"]["id"])[1] != other.name


def test_reembeds_each_live_memory_as_a_new_version(world, env, other, embedder, database_url, capsys, client) -> None:
    names = ("said", "plain", "archived", "cached", "bare")
    before = {n: _current(database_url, world[n]["id"]) for n in (*names, "deleted")}
    assert cli_main(["admin", "reembed", "--batch-size", "2"]) == 0
    assert "re-embedded 5 memories" in capsys.readouterr().out
    for name in names:
        memory = world[name]
        version, model, vector, state = _current(database_url, memory["id"])
        assert (version, model, state) == (before[name][0] + 1, other.name, before[name][3])
        expected = other.embed([embedding_text(memory["kind"], memory["content"], memory["metadata"])])[0]
        assert float(np.asarray(vector) @ expected) > 0.999
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT version, op, embedding_model, content FROM memory_versions WHERE memory_id = %s"
                " ORDER BY version DESC LIMIT 2",
                (memory["id"],),
            ).fetchall()
        # The new version changes only the embedding; the one before keeps the old model's.
        assert [(r[0], r[1], r[2]) for r in rows] == [
            (version, "update", other.name),
            (version - 1, rows[1][1], embedder.name),
        ]
        assert rows[0][3] == rows[1][3] == memory["content"]
    assert _current(database_url, world["deleted"]["id"]) == before["deleted"]
    with psycopg.connect(database_url) as conn:
        context = conn.execute(
            "SELECT vector_send(context_embedding) FROM cache_entries WHERE memory_id = %s", (world["cached"]["id"],)
        ).fetchone()
        audit = conn.execute(
            "SELECT actor, detail FROM audit_log WHERE action = 'memory.reembed' AND target_id = %s",
            (world["cube"]["id"],),
        ).fetchall()
    turns = turns_from(world["cached"]["metadata"]["context"])
    assert turns
    context_vector = decode_vector(context[0])
    assert context_vector is not None
    assert float(context_vector @ other.embed([context_text(turns)])[0]) > 0.999
    assert {a[0] for a in audit} == {"operator"}
    assert sum(a[1]["memories"] for a in audit) == 5
    assert all(a[1]["model"] == other.name and a[1]["from"] == [embedder.name] for a in audit)
    # The KV built from "plain" was built from the text it still has: it stays current.
    r = client.get(f"/v1/activations/{world['activation']['id']}", headers=bearer(world["tenant"].admin_key))
    assert r.status_code == 200, r.text
    assert r.json()["stale"] is False
    # Nothing is left: a second run writes nothing.
    assert cli_main(["admin", "reembed"]) == 0
    assert "re-embedded 0 memories" in capsys.readouterr().out


def test_after_reembedding_the_new_model_finds_them(world, client_on_other) -> None:
    tenant, cube = world["tenant"], world["cube"]
    said = embedding_text("plaintext", world["said"]["content"], world["said"]["metadata"])
    assert _vector_ids(client_on_other, tenant, cube["id"], said)[0] == world["said"]["id"]
    archived = world["archived"]["content"]
    assert _vector_ids(client_on_other, tenant, cube["id"], archived)[0] == world["archived"]["id"]
    # The other process's cache index catches up with writes it did not make within cache_sync_seconds.
    deadline = time.monotonic() + 10
    while not (hit := _lookup(client_on_other, tenant, cube["id"], "How long is the flight to Lisbon?", CONTEXT))[
        "hit"
    ]:
        assert time.monotonic() < deadline, hit
        time.sleep(0.05)
    assert hit["memory_id"] == world["cached"]["id"] and hit["similarity"] > 0.999
    # The context is compared in the new model's space too: another conversation's context does not match.
    other_context = ["Should I bring a coat to the office?", "Yes, it is cold today."]
    assert not _lookup(client_on_other, tenant, cube["id"], "How long is the flight to Lisbon?", other_context)["hit"]


def _run(settings: Settings, embedder: Any, cube_id: str) -> Report:
    """The tool's own function on one cube, as `memos admin reembed --cube` calls it."""

    async def run() -> Report:
        db = Database(settings)
        await db.start()
        try:
            return await reembed(db, embedder, cube_ids=[uuid.UUID(cube_id)])
        finally:
            await db.stop()

    return asyncio.run(run())


class _Interrupted:
    """The new model, but a client changes one memory while the tool embeds its batch."""

    def __init__(self, inner: Embedder, change: Any) -> None:
        self.inner, self.change = inner, change
        self.name, self.dims = inner.name, inner.dims

    def embed(self, texts: Any) -> np.ndarray:
        if self.change is not None:
            self.change()
            self.change = None
        return self.inner.embed(texts)


def test_a_memory_changed_meanwhile_is_skipped_not_overwritten(
    world, factory: Factory, client, other, embedder, settings: Settings, database_url
) -> None:
    tenant, cube = world["tenant"], world["cube"]
    key = tenant.admin_key
    late = [factory.memory(key, cube["id"], f"Written after the switch, number {i}.") for i in range(2)]
    answer = _store(client, key, cube["id"], "Which gate does the ferry leave from?", "Gate four.", CONTEXT)
    context_before = _context_vector(database_url, answer["id"])

    def patch() -> None:
        for memory, body in ((late[0], {"content": "Changed meanwhile."}), (answer, {"content": "Gate five."})):
            headers = {**bearer(key), "If-Match": f'"{memory["version"]}"'}
            r = client.patch(f"/v1/memories/{memory['id']}", json=body, headers=headers)
            assert r.status_code == 200, r.text

    report = _run(settings, _Interrupted(other, patch), cube["id"])
    assert (report.reembedded, report.skipped) == (1, 2)
    version, model, _, _ = _current(database_url, late[0]["id"])
    assert model == embedder.name  # the client's change stands, embedded by the app's model
    assert _current(database_url, late[1]["id"])[1] == other.name
    # The skipped answer keeps its query and its context in one model's space.
    assert _current(database_url, answer["id"])[1] == embedder.name
    assert _context_vector(database_url, answer["id"]) == context_before
    again = _run(settings, other, cube["id"])
    assert (again.reembedded, again.skipped) == (2, 0)
    assert _current(database_url, late[0]["id"])[:2] == (version + 1, other.name)
    assert _context_vector(database_url, answer["id"]) != context_before


def _context_vector(database_url: str, memory_id: str) -> bytes:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT vector_send(context_embedding) FROM cache_entries WHERE memory_id = %s", (memory_id,)
        ).fetchone()
    assert row is not None and row[0] is not None
    return bytes(row[0])


def test_a_cached_answer_is_reembedded_with_the_context_its_metadata_holds(
    factory: Factory, client, client_on_other, other, settings: Settings, database_url
) -> None:
    """The cache compares a lookup's context with the turns an answer's metadata holds now (a PATCH may have
    changed them since it was stored): the tool embeds those, and records their hash with the vector. An
    answer whose turns cannot be read back is never served (semcache/index.py); it is re-embedded all the
    same, and its context vector left as it was."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    broken = _store(client, key, cube["id"], "When does the museum open?", "At nine.", CONTEXT)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE memories SET metadata = jsonb_set(metadata, '{context}', '\"not a list\"') WHERE id = %s",
            (broken["id"],),
        )
    changed = _store(client, key, cube["id"], "Is the cafe open late?", "Until ten.", CONTEXT)
    now = ["Are we meeting at the harbour cafe?", "Yes, the one by the pier."]
    headers = {**bearer(key), "If-Match": f'"{changed["version"]}"'}
    r = client.patch(
        f"/v1/memories/{changed['id']}", json={"metadata": {**changed["metadata"], "context": now}}, headers=headers
    )
    assert r.status_code == 200, r.text
    broken_context = _context_vector(database_url, broken["id"])
    report = _run(settings, other, cube["id"])
    assert (report.reembedded, report.contexts, report.skipped) == (2, 1, 0)
    assert _current(database_url, broken["id"])[1] == other.name
    assert _context_vector(database_url, broken["id"]) == broken_context
    stored = np.frombuffer(_context_vector(database_url, changed["id"])[4:], dtype=">f4")
    assert float(stored @ other.embed([context_text(turns_from(now) or ())])[0]) > 0.999
    # The app on the new model serves it for the conversation its metadata holds now.
    deadline = time.monotonic() + 10
    while not (hit := _lookup(client_on_other, tenant, cube["id"], "Is the cafe open late?", now))["hit"]:
        assert time.monotonic() < deadline, hit
        time.sleep(0.05)
    assert hit["memory_id"] == changed["id"]


def test_a_batch_the_database_aborted_is_written_again(
    factory: Factory, client, other, settings: Settings, database_url, caplog: pytest.LogCaptureFixture
) -> None:
    """A real deadlock with a concurrent write rolls a batch back: it is tried again, safely, since each memory's
    write is a compare-and-set on the version read. Found in review: Database.transaction raises a deadlock as
    Conflict, which the retry did not catch, so the run ended with a traceback and the batch was not written."""
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    answer = _store(client, tenant.admin_key, cube["id"], "How long is the flight?", "Two hours.", CONTEXT)
    writer = psycopg.connect(database_url)
    # The tool's backend must be the one that finds the cycle (its deadlock_timeout is the default second).
    writer.execute("SET deadlock_timeout = '30s'")
    # The writer holds the cached answer's entry: the tool's batch updates the memory row, then waits on it.
    writer.execute("SELECT 1 FROM cache_entries WHERE memory_id = %s FOR UPDATE", (answer["id"],))
    outcome: dict[str, Any] = {}

    def tool() -> None:
        try:
            outcome["report"] = _run(settings, other, cube["id"])
        except BaseException as exc:  # reported by the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=tool)
    thread.start()
    try:
        with psycopg.connect(database_url, autocommit=True) as monitor:
            for _ in range(600):
                row = monitor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE %s AND pid <> %s",
                    ("%cache_entries%", writer.info.backend_pid),
                ).fetchone()
                if row is not None and row[0]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the tool never waited on the cache entry")
        # Now the cycle: the writer wants the memory row the tool's batch holds; the tool's backend aborts.
        writer.execute("UPDATE memories SET heat = heat WHERE id = %s", (answer["id"],))
    finally:
        writer.rollback()
        writer.close()
        thread.join(120)
    assert "error" not in outcome, outcome["error"]
    report: Report = outcome["report"]
    assert "concurrent writes crossed" in caplog.text  # a real deadlock, raised as Conflict
    assert (report.reembedded, report.contexts, report.retries, report.skipped) == (1, 1, 1, 0)
    assert _current(database_url, answer["id"])[:2] == (answer["version"] + 1, other.name)


def test_an_unknown_cube_is_refused(env, capsys) -> None:
    """Found in review: a mistyped --cube was answered "0 to re-embed", exit 0 (verify and kv refuse it)."""
    nowhere = str(uuid.uuid4())
    for dry_run in (["--dry-run"], []):
        assert cli_main(["admin", "reembed", "--cube", nowhere, *dry_run]) == 1
        out = capsys.readouterr()
        assert out.err == f"memos admin reembed: no cube {nowhere}\n" and not out.out, out


def test_only_the_kv_of_the_version_before_moves(
    factory: Factory, client, other, settings: Settings, database_url
) -> None:
    """KV built from the version the tool re-embeds is current still; KV of an older text stays stale."""
    tenant = factory.tenant()
    key = tenant.admin_key
    cube = factory.cube(key)
    memory = factory.memory(key, cube["id"], "The first text of this memory.")

    def build() -> str:
        r = client.post(f"/v1/memories/{memory['id']}/activations", json={"model": KV_MODEL}, headers=bearer(key))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    old = build()
    headers = {**bearer(key), "If-Match": f'"{memory["version"]}"'}
    r = client.patch(f"/v1/memories/{memory['id']}", json={"content": "Its second text."}, headers=headers)
    assert r.status_code == 200, r.text
    new = build()
    assert _run(settings, other, cube["id"]).reembedded == 1
    with psycopg.connect(database_url) as conn:
        versions = dict(
            conn.execute(
                "SELECT id::text, source_version FROM activations WHERE memory_id = %s", (memory["id"],)
            ).fetchall()
        )
    assert versions == {old: 1, new: 3}
    stale = {a: client.get(f"/v1/activations/{a}", headers=bearer(key)).json()["stale"] for a in (old, new)}
    assert stale == {old: True, new: False}


def test_nfkc_reembeds_text_in_compatibility_forms_that_the_same_model_embedded(
    factory: Factory,
    embedder: Embedder,
    settings: Settings,
    database_url: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Memories embedded as written before text was NFKC-normalized (a ligature from a PDF): ``--nfkc`` gives them
    the vector their text embeds to now; memories already in NFKC form are left alone."""
    from memos.admin.reembed import pending

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    ligature = factory.memory(tenant.admin_key, cube["id"], "The \ufb01nancial audit closes in March.")
    plain = factory.memory(tenant.admin_key, cube["id"], "The budget was approved in April.")
    stale = embedder.embed(["something else entirely"])[0]
    with psycopg.connect(database_url) as conn:  # as a release before 2026-12-07 left it
        conn.execute("UPDATE memories SET embedding = %s::vector WHERE id = %s", (str(stale.tolist()), ligature["id"]))
    before = {m["id"]: _current(database_url, m["id"]) for m in (ligature, plain)}
    monkeypatch.delenv("MEMOS_EMBED_MODEL")  # the bundled model, which embedded them
    assert cli_main(["admin", "reembed", "--dry-run", "--cube", cube["id"]]) == 0
    assert f"0 to re-embed with {embedder.name}" in capsys.readouterr().out
    assert cli_main(["admin", "reembed", "--dry-run", "--nfkc", "--cube", cube["id"]]) == 0
    assert f"1 to re-embed with {embedder.name}" in capsys.readouterr().out

    async def run() -> tuple[dict[str, int], dict[str, int], Report]:
        db = Database(settings)
        await db.start()
        try:
            without = await pending(db, embedder.name, [uuid.UUID(cube["id"])])
            with_nfkc = await pending(db, embedder.name, [uuid.UUID(cube["id"])], nfkc=True)
            return without, with_nfkc, await reembed(db, embedder, cube_ids=[uuid.UUID(cube["id"])], nfkc=True)
        finally:
            await db.stop()

    without, with_nfkc, report = asyncio.run(run())
    assert without == {} and with_nfkc == {embedder.name: 1}
    assert report.reembedded == 1
    version, model, vector, _ = _current(database_url, ligature["id"])
    assert (version, model) == (before[ligature["id"]][0] + 1, embedder.name)
    assert float(np.asarray(vector) @ embedder.embed(["The financial audit closes in March."])[0]) > 0.999
    assert _current(database_url, plain["id"]) == before[plain["id"]]


def test_nfkc_also_finds_what_is_embedded_from_the_metadata(
    factory: Factory, embedder: Embedder, settings: Settings
) -> None:
    """A speaker in compatibility forms: the text embedded is not only the content; other metadata is not."""
    from memos.admin.reembed import pending

    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    factory.memory(tenant.admin_key, cube["id"], "We met at noon.", metadata={"speaker": "\uff2a\uff4f"})  # full-width
    # An ellipsis (NFKC: three dots) in a field that is not embedded: not re-embedded on every run for it.
    factory.memory(tenant.admin_key, cube["id"], "We left at one.", metadata={"note": "and then\u2026"})

    async def count() -> dict[str, int]:
        db = Database(settings)
        await db.start()
        try:
            return await pending(db, embedder.name, [uuid.UUID(cube["id"])], nfkc=True)
        finally:
            await db.stop()

    assert asyncio.run(count()) == {embedder.name: 1}

"""The cache's work per lookup is bounded, its limits hold on every write path, and its LRU is per tenant.

Found in review: a bare reply ("yes please") compared the last assistant turns word by word with a quadratic
``SequenceMatcher``, on the event loop (a 64 KiB turn: 105 s; a 1 MiB one written through the memories API,
which did not apply the 50-turn / 64 KiB context limits: minutes). The guards paired every differing word of
two 8,000-character queries (seconds). And one process-wide embedding LRU told an agent, from ``took_ms``,
which exact questions another tenant had just asked.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import string
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Factory, Tenant, bearer
from litestar import Litestar
from litestar.testing import TestClient

from memos.cli.main import main as cli_main
from memos.semcache import context as context_module
from memos.semcache import guards
from memos.semcache.context import REPLY_WINDOW_TOKENS, as_turns, context_text
from memos.semcache.index import VectorLRU
from memos.semcache.schemas import MAX_CONTEXT_BYTES, MAX_CONTEXT_TURNS, MAX_QUERY_CHARS
from memos.settings import Settings

Client = TestClient[Litestar]


def _turns(assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": assistant}]


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The lengths of every pair of sequences the cache's ``SequenceMatcher``s are given.

    One far over the bound raises at once: without the fix the comparison would run for minutes, not fail.
    """
    sizes: list[tuple[int, int]] = []

    class Recording(difflib.SequenceMatcher[Any]):
        def __init__(self, isjunk: Any = None, a: Any = "", b: Any = "", autojunk: bool = True) -> None:
            sizes.append((len(a), len(b)))
            assert max(len(a), len(b)) <= 10 * REPLY_WINDOW_TOKENS, f"compared {len(a)} x {len(b)} tokens"
            super().__init__(isjunk, a, b, autojunk)

    monkeypatch.setattr(context_module, "SequenceMatcher", Recording)
    monkeypatch.setattr(guards, "SequenceMatcher", Recording)
    return sizes


def _lookup(client: Client, key: str, cube_id: str, query: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/cache/lookup", json={"cube_id": cube_id, "query": query, **extra}, headers=bearer(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- the reply check reads a bounded tail -------------------------------------------------------------------


def test_a_reply_after_a_30000_word_turn_compares_a_bounded_tail(
    client: Client, factory: Factory, compared: list[tuple[int, int]]
) -> None:
    """30,000 words (60 KB: within the cache's own 64 KiB) on both sides; the comparison reads a tail of each."""
    tenant = factory.tenant()
    key, cube = tenant.admin_key, str(factory.cube(tenant.admin_key)["id"])
    long_turn = "a " * 30_000 + "Shall I book the 7:15 train for you?"
    assert len(long_turn.encode()) < MAX_CONTEXT_BYTES
    body = {"cube_id": cube, "query": "yes please", "response": "Booked.", "context": _turns(long_turn)}
    assert client.post("/v1/cache", json=body, headers=bearer(key)).status_code == 201
    hit = _lookup(client, key, cube, "yes please", context=_turns(long_turn))
    assert hit["hit"], hit
    assert compared and all(max(pair) <= REPLY_WINDOW_TOKENS for pair in compared), compared
    # the tail still decides: another offer at the end of the same long turn is another reply
    other = _lookup(client, key, cube, "yes please", context=_turns("a " * 30_000 + "Shall I cancel your ticket?"))
    assert not other["hit"], other


def test_a_stored_context_over_the_limits_costs_a_lookup_no_more(
    client: Client, factory: Factory, database_url: str, compared: list[tuple[int, int]]
) -> None:
    """A response memory holding a 250,000-word turn, as the memories API let one be written before the limits
    applied there (put straight into Postgres here: the API now refuses it)."""
    tenant = factory.tenant()
    key, cube = tenant.admin_key, str(factory.cube(tenant.admin_key)["id"])
    memory = factory.memory(
        key, cube, "Booked.", kind="response", metadata={"query": "yes please", "context": _turns("short")}
    )
    huge = {"query": "yes please", "context": _turns("a " * 250_000)}
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE memories SET metadata = %s::jsonb WHERE id = %s", (json.dumps(huge), memory["id"]))
    hit = _lookup(client, key, cube, "yes please", context=_turns("a " * 30_000))
    assert hit["hit"], hit
    assert compared and all(max(pair) <= REPLY_WINDOW_TOKENS for pair in compared), compared


def test_the_guards_compare_two_long_queries_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 8,000-character queries (the lookup limit) of different words: every pair of them was tried as a
    prefixed opposite and as a spelling (1,300 x 1,300), seconds of one lookup."""
    rng = random.Random(7)

    def text() -> str:
        words = ("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9))) for _ in range(2000))
        return " ".join(words)[:MAX_QUERY_CHARS]

    calls = {"opposites": 0, "spellings": 0, "edit distances": 0}
    opposites, spellings, distance = guards._prefixed_opposites, guards.similar_words, guards._damerau

    def counted_opposites(a: str, b: str) -> bool:
        calls["opposites"] += 1
        return opposites(a, b)

    def counted_spellings(a: str, b: str) -> bool:
        calls["spellings"] += 1
        return spellings(a, b)

    def counted_distance(a: str, b: str, limit: int) -> int:
        calls["edit distances"] += 1
        return distance(a, b, limit)

    monkeypatch.setattr(guards, "_prefixed_opposites", counted_opposites)
    monkeypatch.setattr(guards, "_damerau", counted_distance)
    monkeypatch.setattr(guards, "similar_words", counted_spellings)
    a, b = text(), text()
    assert len(guards.analyze(a).stems) > 1000 and len(guards.analyze(b).stems) > 1000
    guards.check_all(a, b)
    assert calls["opposites"] < 10_000 and calls["spellings"] <= guards.PAIRING_BUDGET, calls
    # one 2,000-letter token on each side: no edit distance (quadratic in their length) between them
    calls["edit distances"] = 0
    assert guards.similar_words("x" + "a" * 1999, "y" + "a" * 1999) is False
    assert calls["edit distances"] == 0


# -- the limits hold on every write path ----------------------------------------------------------------------

TOO_MANY_TURNS = ["ok"] * (MAX_CONTEXT_TURNS + 1)
TOO_MUCH_TEXT = _turns("a" * MAX_CONTEXT_BYTES)


def _response(context: Any, query: str = "yes please") -> dict[str, Any]:
    return {"kind": "response", "content": "Booked.", "metadata": {"query": query, "context": context}}


def _refused(r: Any, field: str, detail: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == field and detail in error["message"], r.text


@pytest.mark.parametrize(
    ("context", "detail"),
    [(TOO_MANY_TURNS, f"at most {MAX_CONTEXT_TURNS} turns"), (TOO_MUCH_TEXT, f"at most {MAX_CONTEXT_BYTES} bytes")],
)
def test_a_response_memory_over_the_context_limits_is_422(
    client: Client, factory: Factory, context: Any, detail: str
) -> None:
    tenant = factory.tenant()
    key, cube = bearer(tenant.admin_key), str(factory.cube(tenant.admin_key)["id"])
    _refused(
        client.post(f"/v1/cubes/{cube}/memories", json=_response(context), headers=key), "metadata.context", detail
    )
    items = [_response(_turns("fine")), _response(context)]
    r = client.post(f"/v1/cubes/{cube}/memories/batch", json={"items": items}, headers=key)
    _refused(r, "items[1].metadata.context", detail)
    # the cache's own endpoint, whose check this is
    body = {"cube_id": cube, "query": "yes please", "response": "Booked.", "context": context}
    _refused(client.post("/v1/cache", json=body, headers=key), "context", detail)
    # a PATCH of a response memory
    made = client.post(f"/v1/cubes/{cube}/memories", json=_response(_turns("fine")), headers=key)
    assert made.status_code == 201, made.text
    patch = {"metadata": _response(context)["metadata"]}
    r = client.patch(f"/v1/memories/{made.json()['id']}", json=patch, headers={**key, "If-Match": '"1"'})
    _refused(r, "metadata.context", detail)
    # within the limits (exactly at them) is fine
    at_limit = _response(["ok"] * MAX_CONTEXT_TURNS)
    assert client.post(f"/v1/cubes/{cube}/memories", json=at_limit, headers=key).status_code == 201


def test_a_response_memory_query_over_the_cache_limit_is_422(client: Client, factory: Factory) -> None:
    tenant = factory.tenant()
    key, cube = bearer(tenant.admin_key), str(factory.cube(tenant.admin_key)["id"])
    body = _response(_turns("fine"), query="q" * (MAX_QUERY_CHARS + 1))
    _refused(client.post(f"/v1/cubes/{cube}/memories", json=body, headers=key), "metadata.query", "at most 8000")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    assert settings.database_url is not None
    monkeypatch.setenv("MEMOS_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(settings.data_dir))


def _with_context(src: Path, dst: Path, memory_id: str, context: Any, only_version: int | None = None) -> Path:
    """``src`` with one memory's (and its versions') metadata.context replaced, the manifest made to match;
    ``only_version``: in that version's line alone (an old version, the memory's current one untouched)."""
    with zipfile.ZipFile(src) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    for name, key in (("memories.jsonl", "id"), ("versions.jsonl", "memory_id")):
        lines = [json.loads(x) for x in members[name].splitlines()]
        for line in lines:
            if line[key] == memory_id and (only_version is None or line.get("version") == only_version):
                if only_version is not None and name == "memories.jsonl":
                    continue
                line["metadata"] = dict(line["metadata"], context=context)
        members[name] = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    manifest = json.loads(members["manifest.json"])
    for name in ("memories.jsonl", "versions.jsonl"):
        blob = members[name]
        manifest["members"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return dst


def test_a_bundle_with_a_cached_answer_over_the_limits_is_refused(
    client: Client, factory: Factory, tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = factory.tenant()
    key, cube = tenant.admin_key, str(factory.cube(tenant.admin_key)["id"])
    body = {"cube_id": cube, "query": "yes please", "response": "Booked.", "context": _turns("Shall I book it?")}
    stored = client.post("/v1/cache", json=body, headers=bearer(key))
    assert stored.status_code == 201, stored.text
    exported = tmp_path / "cube.memos"
    assert cli_main(["admin", "export", "--cube", cube, "--out", str(exported)]) == 0
    capsys.readouterr()
    other = factory.tenant()
    for name, context, detail in (
        ("turns.memos", TOO_MANY_TURNS, f"at most {MAX_CONTEXT_TURNS} turns, not {MAX_CONTEXT_TURNS + 1}"),
        ("bytes.memos", TOO_MUCH_TEXT, f"at most {MAX_CONTEXT_BYTES} bytes of text"),
    ):
        path = _with_context(exported, tmp_path / name, stored.json()["id"], context)
        argv = ["admin", "import", str(path), "--owner", other.admin_id, "--new-ids", "--name", name]
        assert cli_main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("memos admin import: memories.jsonl line ") and f"metadata.context: {detail}" in err, err
        assert err.count("\n") == 1, err
    assert client.get("/v1/cubes", headers=bearer(other.admin_key)).json()["items"] == []
    # the untouched bundle imports (the check refuses only what is over the limits)
    assert cli_main(["admin", "import", str(exported), "--owner", other.admin_id, "--new-ids"]) == 0


def test_an_old_version_over_the_limits_is_refused_by_restore_and_by_import(
    client: Client,
    factory: Factory,
    database_url: str,
    tmp_path: Path,
    env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A restore makes an old version current, so an old version over the limits (written before they held on
    every path, or carried in by a bundle, whose history the import did not check) came back as a served entry
    over them (found in review)."""
    tenant = factory.tenant()
    key, cube = tenant.admin_key, str(factory.cube(tenant.admin_key)["id"])
    body = {"cube_id": cube, "query": "yes please", "response": "Booked.", "context": _turns("Shall I book it?")}
    stored = client.post("/v1/cache", json=body, headers=bearer(key))
    assert stored.status_code == 201, stored.text
    entry = stored.json()["id"]
    patched = client.patch(
        f"/v1/memories/{entry}",
        json={"metadata": {"query": "yes please", "context": _turns("Shall I book the 9:40?")}},
        headers={**bearer(key), "If-Match": '"1"'},
    )
    assert patched.status_code == 200, patched.text
    exported = tmp_path / "cube.memos"
    assert cli_main(["admin", "export", "--cube", cube, "--out", str(exported)]) == 0
    # An import: version 1's line over the limits, the current version within them.
    path = _with_context(exported, tmp_path / "old.memos", entry, TOO_MANY_TURNS, only_version=1)
    capsys.readouterr()
    other = factory.tenant()
    assert cli_main(["admin", "import", str(path), "--owner", other.admin_id, "--new-ids"]) == 1
    err = capsys.readouterr().err
    assert "(version 1): metadata.context: at most" in err and err.count("\n") == 1, err
    # A restore: version 1 as a write from before the fix left it.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE memory_versions SET metadata = %s::jsonb WHERE memory_id = %s AND version = 1",
            (json.dumps({"query": "yes please", "context": TOO_MANY_TURNS}), entry),
        )
    r = client.post(f"/v1/memories/{entry}/restore", json={"version": 1}, headers=bearer(key))
    _refused(r, "version", f"metadata.context is over the cache's limits: at most {MAX_CONTEXT_TURNS} turns")
    assert client.get(f"/v1/memories/{entry}", headers=bearer(key)).json()["version"] == 2, "nothing restored"


# -- the embedding LRU is per tenant -------------------------------------------------------------------------


def _lru(client: Client) -> VectorLRU:
    vectors: VectorLRU = client.app.state.semcache.vectors
    return vectors


def _cube_of(factory: Factory) -> tuple[Tenant, str]:
    tenant = factory.tenant()
    return tenant, str(factory.cube(tenant.admin_key)["id"])


def test_one_tenants_lookups_do_not_warm_anothers(client: Client, factory: Factory) -> None:
    """Tenant A looks a question up; tenant B's lookup of the very same text must embed it (a miss of the LRU),
    or B's ``took_ms`` tells it what A asked."""
    (a, cube_a), (b, cube_b) = _cube_of(factory), _cube_of(factory)
    question = f"what is the test result for patient {uuid.uuid4().hex}"
    lru = _lru(client)
    _lookup(client, a.admin_key, cube_a, question)
    hits, misses = lru.hits, lru.misses
    _lookup(client, b.admin_key, cube_b, question)
    assert (lru.hits, lru.misses) == (hits, misses + 1)
    _lookup(client, b.admin_key, cube_b, question)  # B's own repeat is what the LRU is for
    assert (lru.hits, lru.misses) == (hits + 1, misses + 1)
    assert lru.get(uuid.UUID(a.id), question) is not None and lru.get(uuid.UUID(b.id), question) is not None


def test_a_deleted_cached_answer_leaves_the_lru(client: Client, factory: Factory) -> None:
    tenant, cube = _cube_of(factory)
    key, question = tenant.admin_key, f"how do I reset token {uuid.uuid4().hex}"
    body = {"cube_id": cube, "query": question, "response": "Like so.", "context": _turns("Anything else?")}
    stored = client.post("/v1/cache", json=body, headers=bearer(key))
    assert stored.status_code == 201, stored.text
    deadline = time.monotonic() + 30
    while _lookup(client, key, cube, question, context=_turns("Anything else?"))["via"] != "index":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lru, tenant_id = _lru(client), uuid.UUID(tenant.id)
    assert lru.get(tenant_id, question) is not None
    assert lru.get(tenant_id, context_text(as_turns(_turns("Anything else?")))) is not None
    assert client.delete(f"/v1/memories/{stored.json()['id']}", headers=bearer(key)).status_code == 204
    assert lru.get(tenant_id, question) is None
    assert lru.get(tenant_id, context_text(as_turns(_turns("Anything else?")))) is None

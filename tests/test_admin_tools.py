"""`memos admin verify`, `gc`, `kv` and `keys`, run as the operator runs them (the CLI, against the database
and blob store a live service is using), on what the service wrote through HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Factory, Tenant, bearer, soon, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient

from memos.cli.main import main as cli_main
from memos.settings import Settings
from memos.store.blobs import LocalBlobStore

MODEL = "tiny"


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=0)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    assert settings.database_url is not None
    monkeypatch.setenv("MEMOS_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(settings.data_dir))


def run(*args: str) -> tuple[int, str, str]:
    """``memos admin ARGS``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["admin", *args])
    return code, out.getvalue(), err.getvalue()


def verified(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run("verify", "--json", *args)
    assert not err, err
    report: dict[str, Any] = json.loads(out)
    return code, report


@contextlib.contextmanager
def sql(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection, to do what no write path does (the damage verify is there to find)."""
    assert settings.database_url is not None
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def build(client: TestClient[Litestar], key: str, memory_id: str) -> dict[str, Any]:
    return Factory(client).activation(key, memory_id, MODEL)


def patch(client: TestClient[Litestar], key: str, memory: dict[str, Any], content: str) -> dict[str, Any]:
    r = client.patch(
        f"/v1/memories/{memory['id']}",
        json={"content": content},
        headers={**bearer(key), "If-Match": f'"{memory["version"]}"'},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def blob_path(settings: Settings, key: str) -> Path:
    return settings.blob_root / key[:2] / key[2:4] / key


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# ---------------------------------------------------------------------- verify


def test_verify_finds_nothing_wrong_in_what_the_service_wrote(client, factory, tenant) -> None:
    cube = factory.cube(tenant.admin_key)
    first = factory.memory(tenant.admin_key, cube["id"], "Caroline moved to Lisbon in May.")
    second = factory.memory(tenant.admin_key, cube["id"], "Melanie paints lighthouses.")
    patch(client, tenant.admin_key, first, "Caroline moved to Porto in June.")
    r = client.post(
        f"/v1/memories/{first['id']}/links",
        json={"to": second["id"], "type": "related"},
        headers=bearer(tenant.admin_key),
    )
    assert r.status_code == 201, r.text
    build(client, tenant.admin_key, second["id"])
    r = client.delete(f"/v1/memories/{second['id']}?purge=true", headers=bearer(tenant.admin_key))
    assert r.status_code == 204, r.text
    factory.memory(tenant.admin_key, cube["id"], "Jon opened a dance studio.")
    kept = factory.memory(tenant.admin_key, cube["id"], "Gina sells clothes online.")
    build(client, tenant.admin_key, kept["id"])

    # Scoped to the cube: other tests in this module damage their own cubes on purpose.
    code, report = verified("--blobs", "--cube", cube["id"])
    assert code == 0 and report["ok"], report["problems"]
    assert (
        report["checked"]["files_hashed"] == 1 and report["checked"]["memories"] == 5
    )  # one activation (the purge took the other)
    code, out, _ = run("verify", "--cube", cube["id"])
    assert code == 0 and "no problems found" in out and "all-MiniLM-L6-v2" in out


# case: (statements, the check that must name it, what its target holds). The statements do what no write
# path does; %(...)s are the world's ids (see the test).
DAMAGE: dict[str, tuple[str, str, str]] = {
    "content_hash": ("UPDATE memories SET content = 'edited behind its hash' WHERE id = %(m)s", "content_hash", "m"),
    "version_hash": (
        "UPDATE memory_versions SET content = 'edited' WHERE memory_id = %(m)s AND version = 1",
        "version_hash",
        "m",
    ),
    "gap": ("DELETE FROM memory_versions WHERE memory_id = %(m)s AND version = 1", "version_chain", "m"),
    "head_state": ("UPDATE memories SET state = 'archived' WHERE id = %(m)s", "version_chain", "m"),
    "head_tags": ("UPDATE memories SET tags = '{edited}' WHERE id = %(m)s", "version_chain", "m"),
    "two_creates": (
        "UPDATE memory_versions SET op = 'create' WHERE memory_id = %(m)s AND version = 2",
        "version_chain",
        "m",
    ),
    "tenant_memory": ("UPDATE memories SET tenant_id = %(other)s WHERE id = %(lone)s", "tenancy", "lone"),
    "tenant_link": ("UPDATE memory_links SET tenant_id = %(other)s WHERE id = %(link)s", "tenancy", "link"),
    "tenant_owner": ("UPDATE cubes SET owner_agent_id = %(other_admin)s WHERE id = %(cube)s", "tenancy", "cube"),
    "tenant_grant": (
        "INSERT INTO cube_grants (cube_id, agent_id, access) VALUES (%(cube)s, %(other_admin)s, 'read')",
        "tenancy",
        "cube",
    ),
    "tenant_kv": ("UPDATE activations SET tenant_id = %(other)s WHERE id = %(act)s", "tenancy", "act"),
    "model_missing": ("UPDATE memories SET embedding_model = NULL WHERE id = %(m)s", "embedding", "m"),
    "no_vector": (
        "UPDATE memories SET embedding = NULL, embedding_model = NULL WHERE id = %(m)s",
        "embedding",
        "m",
    ),
    # A purge that left the first version's text behind.
    "purge_versions": (
        "UPDATE memories SET content = NULL, content_sha256 = NULL, embedding = NULL, metadata = '{}', tags = '{}',"
        " provenance = '{}', purged_at = now() WHERE id = %(m)s;"
        " UPDATE memory_versions SET content = NULL, content_sha256 = NULL, embedding = NULL"
        " WHERE memory_id = %(m)s AND version = 2",
        "purge",
        "m",
    ),
    "purge_metadata": ("purge m; UPDATE memories SET metadata = '{\"kept\": 1}' WHERE id = %(m)s", "purge", "m"),
    "cache_entry": ("INSERT INTO cache_entries (memory_id, cube_id) VALUES (%(m)s, %(cube)s)", "cache_entry", "m"),
    "kv_corrupt": ("UPDATE activations SET corrupt_at = now() WHERE id = %(act)s", "kv_corrupt", "act"),
    "kv_row": ("DELETE FROM activations WHERE id = %(act)s", "kv_row", "act"),
    "kv_length": ("UPDATE activations SET bytes = bytes + 1 WHERE id = %(act)s", "kv_file", "sha"),
}


@pytest.fixture(scope="module")
def sound_cube(client, factory, tenant) -> dict[str, Any]:
    """A cube with history, a link and KV, that no test damages."""
    return _world(client, factory, tenant, "sound")["cube_row"]


def _world(client: TestClient[Litestar], factory: Factory, tenant: Tenant, label: str) -> dict[str, Any]:
    cube = factory.cube(tenant.admin_key)
    m = patch(
        client,
        tenant.admin_key,
        factory.memory(tenant.admin_key, cube["id"], f"a fact about {label}"),
        f"a newer fact about {label}",
    )
    n = factory.memory(tenant.admin_key, cube["id"], f"Nate keeps turtles ({label}).")
    twin = factory.memory(tenant.admin_key, cube["id"], n["content"])
    r = client.post(
        f"/v1/memories/{m['id']}/links", json={"to": n["id"], "type": "related"}, headers=bearer(tenant.admin_key)
    )
    assert r.status_code == 201, r.text
    act = build(client, tenant.admin_key, n["id"])
    build(client, tenant.admin_key, twin["id"])  # shares act's file
    lone = factory.memory(tenant.admin_key, cube["id"], f"Nothing links here ({label}).")
    return {
        "lone": lone["id"],
        "cube_row": cube,
        "cube": cube["id"],
        "m": m["id"],
        "n": n["id"],
        "link": r.json()["id"],
        "act": act["id"],
        "sha": act["sha256"],
    }


@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_names_each_kind_of_damage(client, factory, tenant, settings, sound_cube, case) -> None:
    statements, check, target = DAMAGE[case]
    world = _world(client, factory, tenant, case)
    other = factory.tenant()
    ids = {**world, "other": other.id, "other_admin": other.admin_id}
    assert verified("--cube", world["cube"], "--blobs")[0] == 0
    with sql(settings) as conn:
        for statement in statements.split("; "):
            if statement == "purge m":
                r = client.delete(f"/v1/memories/{world['m']}?purge=true", headers=bearer(tenant.admin_key))
                assert r.status_code == 204, r.text
                assert verified("--cube", world["cube"])[0] == 0  # a purge as the service does it is sound
            else:
                conn.execute(statement, ids)
    code, report = verified("--cube", world["cube"])
    assert code == 1 and not report["ok"]
    # Named by its check. Another check may see the same damage (an edited text also differs from its version;
    # a memory moved to another tenant takes the links the service wrote for it along), none other.
    assert any(p["check"] == check and world[target] in p["target"] for p in report["problems"]), report
    assert set(report["counts"]) <= {check, "version_chain"}, report["problems"]
    if case == "head_tags":
        assert report["problems"][0]["detail"].endswith("in: tags")
    # Another cube, with history, a link and KV of its own, is not what was asked about, and is sound.
    assert verified("--cube", sound_cube["id"], "--blobs")[0] == 0
    code, out, _ = run("verify", "--cube", world["cube"])
    assert code == 1 and f"{check}: " in out and "problems found" in out


def test_verify_checks_kv_files_by_length_and_with_blobs_by_hash(client, factory, tenant, settings) -> None:
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "Tim collects fantasy novels and maps of Narnia.")
    act = build(client, tenant.admin_key, memory["id"])
    path = blob_path(settings, act["sha256"])
    sound = path.read_bytes()
    try:
        damaged = bytearray(sound)
        damaged[-1] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert verified("--cube", cube["id"])[0] == 0  # same length: only hashing finds it
        code, report = verified("--cube", cube["id"], "--blobs")
        assert code == 1 and report["counts"] == {"kv_file": 1}
        assert act["id"] in report["problems"][0]["target"] and "hash to" in report["problems"][0]["detail"]
        path.write_bytes(sound[:-10])
        code, report = verified("--cube", cube["id"])
        assert code == 1 and "bytes stored" in report["problems"][0]["detail"]
        path.unlink()
        code, report = verified("--cube", cube["id"])
        assert code == 1 and "missing" in report["problems"][0]["detail"]
    finally:
        path.write_bytes(sound)
    assert verified("--cube", cube["id"], "--blobs")[0] == 0


def test_verify_refuses_a_bad_cube_id() -> None:
    code, _, err = run("verify", "--cube", "nope")
    assert code == 2 and "--cube takes a cube id" in err


# ---------------------------------------------------------------------- gc


def test_gc_frees_stale_kv_and_old_unreferenced_files_only(client, factory, tenant, settings) -> None:
    cube = factory.cube(tenant.admin_key)
    changed = factory.memory(tenant.admin_key, cube["id"], "Andrew adopted a beagle named Toby.")
    stale = build(client, tenant.admin_key, changed["id"])
    patch(client, tenant.admin_key, changed, "Andrew adopted two beagles, Toby and Buddy.")
    fresh = build(client, tenant.admin_key, changed["id"])
    # The same text in another memory shares the stale activation's file: the file must stay for it.
    text = "Audrey walks her four dogs every morning."
    twin_a = factory.memory(tenant.admin_key, cube["id"], text)
    twin_b = factory.memory(tenant.admin_key, cube["id"], text)
    shared = build(client, tenant.admin_key, twin_a["id"])
    build(client, tenant.admin_key, twin_b["id"])
    patch(client, tenant.admin_key, twin_a, "Audrey walks her dogs at night now.")
    assert client.get(f"/v1/activations/{shared['id']}", headers=bearer(tenant.admin_key)).json()["stale"]

    store = LocalBlobStore(settings.blob_root)
    old_orphan = store.put(b"left by a build that failed " + uuid.uuid4().bytes)
    age(blob_path(settings, old_orphan), 7200)
    young_orphan = store.put(b"a build about to refer to it " + uuid.uuid4().bytes)
    (settings.blob_root / "tmp").mkdir(exist_ok=True)
    partial = settings.blob_root / "tmp" / f"{'0' * 64}.abc.part"
    partial.write_bytes(b"half a file")
    age(partial, 7200)

    code, out, _ = run("gc", "--dry-run")
    assert code == 0 and "dry run" in out
    assert "; 1 unfinished writes" in out  # it said 0, and the run then removed it (found by an operator)
    assert store.exists(old_orphan) and partial.exists()
    assert client.get(f"/v1/activations/{stale['id']}", headers=bearer(tenant.admin_key)).status_code == 200

    code, out, _ = run("gc")
    assert code == 0, out
    assert "unreferenced files younger than 3600 s" in out
    for gone in (stale, shared):
        r = client.get(f"/v1/activations/{gone['id']}", headers=bearer(tenant.admin_key))
        assert r.status_code == 404, r.text
    assert not blob_path(settings, stale["sha256"]).exists()
    assert blob_path(settings, shared["sha256"]).exists()  # twin_b's fresh activation uses it
    assert blob_path(settings, fresh["sha256"]).exists()
    assert not store.exists(old_orphan) and store.exists(young_orphan) and not partial.exists()
    # What is left is sound and still injected.
    r = client.post(
        "/v1/generate",
        json={"model": MODEL, "memory_ids": [changed["id"]], "prompt": "Who is Toby?", "max_new_tokens": 2},
        headers=bearer(tenant.admin_key),
    )
    assert r.status_code == 200 and r.json()["activations_used"] == [fresh["id"]], r.text
    code, report = verified("--blobs", "--cube", cube["id"])
    assert code == 0, report["problems"]
    # The young file is counted (checked across the whole store: other tests here damage rows on purpose).
    assert verified()[1]["orphan_files"] >= 1
    with sql(settings) as conn:
        rows = conn.execute(
            "SELECT actor, detail FROM audit_log WHERE action = 'kv.drop_stale' AND tenant_id = %s", [tenant.id]
        ).fetchall()
    assert rows and rows[-1][0] == "operator" and rows[-1][1]["activations"] >= 2


def test_a_put_of_a_stored_file_restarts_its_age(tmp_path: Path) -> None:
    """Else gc could take a file a build has just claimed (written again, row not yet committed)."""
    store = LocalBlobStore(tmp_path)
    key = store.put(b"kv")
    age(blob_path_in(tmp_path, key), 7200)
    assert next(b.age_s for b in store.blobs()) > 7000
    store.put(b"kv")
    (blob,) = store.blobs()
    assert blob.key == key and blob.age_s < 60 and blob.nbytes == 2


def blob_path_in(root: Path, key: str) -> Path:
    return root / key[:2] / key[2:4] / key


def test_gc_refuses_a_negative_grace() -> None:
    assert run("gc", "--grace", "-1")[0] == 2


# ---------------------------------------------------------------------- kv


def test_kv_list_and_drop_a_models_kv(client, factory, settings) -> None:
    owner = factory.tenant()
    cube, other = factory.cube(owner.admin_key), factory.cube(owner.admin_key)
    here = build(client, owner.admin_key, factory.memory(owner.admin_key, cube["id"], "Nate plays chess.")["id"])
    there = build(client, owner.admin_key, factory.memory(owner.admin_key, other["id"], "Joanna writes.")["id"])

    code, out, _ = run("kv", "list", "--cube", cube["id"])
    assert code == 0 and out.startswith(f"{MODEL}: 1 activations (1 fresh, 0 stale, 0 corrupt, 0 pinned), 1 files")
    assert run("kv", "drop")[0] == 2  # neither a model nor --stale: nothing is dropped by accident
    code, out, _ = run("kv", "drop", "--model", MODEL, "--stale")  # all fresh: nothing to drop, no false hint
    assert code == 0 and "dropped 0 KV activations" in out and "no KV activations of model" not in out
    code, out, _ = run("kv", "drop", "--model", MODEL, "--cube", cube["id"], "--dry-run")
    assert code == 0 and f"would drop (dry run: nothing removed) 1 KV activations (1 of {MODEL}); 1 files" in out
    assert client.get(f"/v1/activations/{here['id']}", headers=bearer(owner.admin_key)).status_code == 200

    code, out, _ = run("kv", "drop", "--model", MODEL, "--cube", cube["id"])
    assert code == 0 and f"dropped 1 KV activations (1 of {MODEL}); 1 files" in out
    assert client.get(f"/v1/activations/{here['id']}", headers=bearer(owner.admin_key)).status_code == 404
    assert not blob_path(settings, here["sha256"]).exists()
    assert client.get(f"/v1/activations/{there['id']}", headers=bearer(owner.admin_key)).status_code == 200
    assert run("kv", "list", "--cube", cube["id"])[1].strip() == "no KV activations"
    code, out, _ = run("kv", "drop", "--model", "never-configured")
    assert code == 0 and "dropped 0 KV activations (none)" in out
    # A typo'd name said only that: it names the models that have KV now.
    assert f"no KV activations of model 'never-configured' here (models with KV activations: {MODEL})" in out


# ---------------------------------------------------------------------- keys


def test_keys_issue_list_and_revoke_from_the_operators_machine(client, factory, settings) -> None:
    lost = factory.tenant()  # a tenant whose admin key is lost
    code, out, _ = run("keys", "list", "--tenant", lost.id)
    assert code == 0 and len(out.splitlines()) == 1 and "(admin," in out
    old_prefix = out.split()[0]

    code, out, _ = run("keys", "issue", "--agent", lost.admin_id)
    assert code == 0, out
    new_key = out.splitlines()[-1]
    new_prefix = new_key.split("_")[1]
    me = client.get("/v1/agents/me", headers=bearer(new_key))
    assert me.status_code == 200 and me.json()["id"] == lost.admin_id
    assert client.get("/v1/agents/me", headers=bearer(lost.admin_key)).status_code == 200  # the service caches it

    code, out, _ = run("keys", "revoke", old_prefix)
    assert code == 0 and f"revoked {old_prefix}" in out
    # Another process revoked it: the database tells the service, a moment later (migration 0014).
    assert soon(lambda: client.get("/v1/agents/me", headers=bearer(lost.admin_key)).status_code == 401, 3.0)
    assert client.get("/v1/agents/me", headers=bearer(new_key)).status_code == 200

    listed = run("keys", "list", "--tenant", lost.id)[1]
    assert new_prefix in listed and old_prefix not in listed
    assert old_prefix in run("keys", "list", "--tenant", lost.id, "--revoked")[1]
    with sql(settings) as conn:
        rows = conn.execute(
            "SELECT action, actor FROM audit_log WHERE tenant_id = %s AND target_id IN (%s, %s) ORDER BY id",
            [lost.id, old_prefix, new_prefix],
        ).fetchall()
    assert [tuple(r) for r in rows] == [("key.create", "operator"), ("key.revoke", "operator")]

    for args, why in [
        (("revoke", old_prefix), "no live key"),
        (("revoke", "../etc"), "not a key prefix"),
        (("issue", "--agent", str(uuid.uuid4())), "no agent"),
        (("list", "--tenant", "no-such-tenant"), "no tenant"),
    ]:
        code, _, err = run("keys", *args)
        assert code == 1 and why in err, (args, err)
    assert run("keys", "issue", "--agent", "nope")[0] == 2


def test_a_build_reusing_a_file_that_gc_frees_meanwhile_builds_it_again(
    client, factory, tenant, settings, app, monkeypatch
) -> None:
    """gc (another process) drops the stale activation whose file a build has just chosen to reuse, before the
    build's row lands: the build sees the file gone under its lock and writes it again."""
    cube = factory.cube(tenant.admin_key)
    text = "Deborah teaches yoga by the lake on Sundays."
    first = factory.memory(tenant.admin_key, cube["id"], text)
    stale = build(client, tenant.admin_key, first["id"])
    patch(client, tenant.admin_key, first, "Deborah teaches yoga in the park now.")
    second = factory.memory(tenant.admin_key, cube["id"], text)  # the same KV as the stale activation
    service = app.state.activations
    choose = service._reusable_blob
    raced: list[int] = []

    async def racing(*args: Any, **kwargs: Any) -> Any:
        blob = await choose(*args, **kwargs)
        if blob is not None and blob.sha256 == stale["sha256"]:
            raced.append(await asyncio.to_thread(cli_main, ["admin", "gc"]))
        return blob

    monkeypatch.setattr(service, "_reusable_blob", racing)
    act = build(client, tenant.admin_key, second["id"])
    assert raced == [0]  # gc ran in between, and freed the file (nothing referred to it)
    assert act["sha256"] != stale["sha256"] and not act["stale"]  # built again: a file of its own
    assert blob_path(settings, act["sha256"]).exists()
    assert client.get(f"/v1/activations/{stale['id']}", headers=bearer(tenant.admin_key)).status_code == 404
    assert verified("--cube", cube["id"], "--blobs")[0] == 0


def test_unfinished_writes_are_kept_while_they_may_be_in_progress(settings) -> None:
    tmp = settings.blob_root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    young = tmp / f"{'1' * 64}.young.part"
    young.write_bytes(b"being written")
    age(young, 300)  # older than --grace 0, younger than gc.PARTIAL_MIN_S
    assert run("gc", "--grace", "0", "--keep-stale-kv")[0] == 0
    assert young.exists()
    age(young, 700)
    assert run("gc", "--grace", "0", "--keep-stale-kv")[0] == 0
    assert not young.exists()


def test_operator_mistakes_get_a_message_not_a_traceback(factory, monkeypatch) -> None:
    nowhere = str(uuid.uuid4())
    code, out, err = run("verify", "--cube", nowhere)
    assert code == 3 and f"no cube {nowhere}" in err and not out  # not checked: not "no problems"
    for args in (("kv", "list", "--cube", nowhere), ("kv", "drop", "--model", MODEL, "--cube", nowhere)):
        code, _, err = run(*args)
        assert code == 1 and f"no cube {nowhere}" in err, (args, err)
    # A whole key revokes it; a wrong one is refused without being repeated (it may be a secret).
    tenant = factory.tenant()
    code, out, _ = run("keys", "revoke", tenant.admin_key)
    assert code == 0 and f"revoked {tenant.admin_key.split('_')[1]}" in out
    secret = "memos_" + "z" * 40
    code, _, err = run("keys", "revoke", secret)
    assert code == 1 and "z" * 10 not in err
    # The database down: said in a line, exit 3 for verify, 1 for the others.
    monkeypatch.setenv("MEMOS_DATABASE_URL", "postgresql://memos@127.0.0.1:9/memos")
    for args, expected in ((("verify",), 3), (("gc", "--dry-run"), 1), (("keys", "list"), 1)):
        code, _, err = run(*args)
        assert code == expected and "database" in err and "Traceback" not in err, (args, err)
        assert len(err.splitlines()) <= 3, err


def test_freeing_a_file_another_sweep_took_first_is_not_an_error(client, app, settings) -> None:
    from memos.activations import files

    store = LocalBlobStore(settings.blob_root)
    gone = "ab" * 32
    freed = client.blocking_portal.call(lambda: files.free(app.state.db, store, [gone], older_than_s=10))
    assert freed == []


# ---------------------------------------------------------------------- found in review


def test_an_error_the_domain_code_raises_is_one_line_not_a_traceback(monkeypatch) -> None:
    """Database.transaction raises a deadlock or serialization failure as Conflict (a MemosError); the tools
    caught only Unavailable of those, so one ended `kv drop`, `gc` (or `import`, `reembed`) with a traceback."""
    from memos.admin import gc, kv
    from memos.errors import Conflict

    async def crossed(*args: Any, **kwargs: Any) -> Any:
        raise Conflict("a concurrent write to the same data crossed this one and it was rolled back; retry")

    monkeypatch.setattr(kv, "drop", crossed)
    monkeypatch.setattr(gc, "collect", crossed)
    for args in (("kv", "drop", "--model", MODEL), ("gc",)):
        code, out, err = run(*args)
        assert (code, out) == (1, ""), (args, out)
        said = "a concurrent write to the same data crossed this one and it was rolled back; retry"
        assert err == f"memos admin {args[0]}: {said}\n", (args, err)


def test_an_unusable_data_dir_is_one_line_and_verify_says_not_checked(monkeypatch, tmp_path: Path) -> None:
    """Embedded mode, with a MEMOS_DATA_DIR that cannot be a directory (a file in its path): every tool ended
    with a NotADirectoryError traceback, and verify exited 1 ("problems found") for what it never checked."""
    (tmp_path / "afile").write_text("")
    monkeypatch.delenv("MEMOS_DATABASE_URL")
    monkeypatch.setenv("MEMOS_DATA_DIR", str(tmp_path / "afile" / "data"))
    for args, expected in ((("verify",), 3), (("migrate",), 1), (("gc", "--dry-run"), 1), (("keys", "list"), 1)):
        code, out, err = run(*args)
        assert (code, out) == (expected, ""), (args, code, out)
        assert err == (
            f"memos admin {args[0]}: cannot start the embedded database in MEMOS_DATA_DIR "
            f"({tmp_path / 'afile' / 'data'}): Not a directory\n"
        ), (args, err)


def test_a_data_dir_without_a_deployment_is_refused_not_made(monkeypatch, tmp_path: Path) -> None:
    """A mistyped MEMOS_DATA_DIR (or ./.memos from the wrong directory) made a new, empty deployment there, and
    verify answered "no problems found", exit 0 (found in review). Only migrate makes one."""
    monkeypatch.delenv("MEMOS_DATABASE_URL")
    for where in (tmp_path / "missing", tmp_path / "empty"):
        if where.name == "empty":
            where.mkdir()
        monkeypatch.setenv("MEMOS_DATA_DIR", str(where))
        for args, expected in ((("verify",), 3), (("gc", "--dry-run"), 1), (("keys", "list"), 1), (("kv", "list"), 1)):
            code, out, err = run(*args)
            assert (code, out) == (expected, ""), (args, code, out, err)
            assert err.startswith(f"memos admin {args[0]}: no memos database in MEMOS_DATA_DIR ({where})"), err
        assert not (where / "pg").exists()


def test_admin_tools_never_migrate_an_embedded_deployment(monkeypatch, tmp_path: Path) -> None:
    """Found by an operator: verify, export and keys list (read-only, by their docs) upgraded an embedded
    deployment's schema on the way, undoing a deliberate downgrade. Only serve and migrate change it now; the
    others answer as for an external server with an older schema."""
    from memos.store import migrations

    monkeypatch.delenv("MEMOS_DATABASE_URL")
    monkeypatch.setenv("MEMOS_DATA_DIR", str(tmp_path / "data"))
    head = migrations.head_revision()
    below = next(r for r in ("0009", "0008") if migrations.older_than(head, r))
    assert run("migrate")[0] == 0
    code, out, _ = run("migrate", below, "--down")
    assert code == 0 and out == f"schema: {head} -> {below}\n"
    for args, expected in ((("verify",), 3), (("keys", "list"), 1), (("kv", "list"), 1)):
        code, out, err = run(*args)
        assert (code, out) == (expected, ""), (args, code, out, err)
        assert "run `memos admin migrate` first" in err, (args, err)
    code, out, _ = run("migrate")
    assert code == 0 and out == f"schema: {below} -> {head}\n"  # still where the downgrade left it


def test_a_damaged_file_key_is_a_kv_file_problem_and_drop_skips_it(client, factory, tenant, settings) -> None:
    """An activation whose recorded key is not a blob key (a manual edit, a restored table): verify raised
    ValueError from the store (a traceback, exit 1 as if it had listed problems), and `kv drop` raised it after
    its delete had committed."""
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "Gina opened a dance studio on the harbour front.")
    act = build(client, tenant.admin_key, memory["id"])
    with sql(settings) as conn:
        conn.execute("UPDATE activations SET sha256 = 'DAMAGED' WHERE id = %s", (act["id"],))
    try:
        code, report = verified("--cube", cube["id"])
        assert code == 1 and report["counts"] == {"kv_file": 1}, report
        (problem,) = report["problems"]
        assert problem["target"] == f"DAMAGED (activation {act['id']})" and "not a blob key" in problem["detail"]
        said = "left: 1 recorded file keys that are not blob keys, no file freed for them (e.g. 'DAMAGED';"
        code, out, err = run("kv", "drop", "--model", MODEL, "--cube", cube["id"], "--dry-run")
        assert (code, err) == (0, "") and "1 KV activations (1 of tiny); 0 files" in out and said in out, out
        code, out, err = run("kv", "drop", "--model", MODEL, "--cube", cube["id"])
        assert (code, err) == (0, "") and "dropped 1 KV activations (1 of tiny); 0 files" in out and said in out
        assert verified("--cube", cube["id"])[0] == 0
    finally:
        # The file its row no longer named is an orphan now: gone, so later checks of the store see none.
        blob_path(settings, act["sha256"]).unlink(missing_ok=True)


# ---------------------------------------------------------------------- export of a damaged cube

# Damage verify finds in what a bundle carries (the DAMAGE cases), and a cache setting the API refuses, which
# verify does not check and the import does.
REFUSED_CONFIG = (
    'INSERT INTO cache_configs (cube_id, config, updated_by) VALUES (%(cube)s, \'{"default": "nowhere"}\', %(admin)s)'
)


@pytest.mark.parametrize("case", ["content_hash", "gap", "no_vector", "cache_entry", "purge_versions", "config"])
def test_export_refuses_a_bundle_the_import_would_refuse(client, factory, tenant, settings, tmp_path, case) -> None:
    """A cube `memos admin verify` calls damaged was exported without a word, into a bundle `import` refuses:
    a backup found unusable when it is needed. Refused now in one line, exit 1, nothing written, saying how
    to go on; --allow-damaged writes it, saying so on stderr."""
    world = _world(client, factory, tenant, f"export {case}")
    out = tmp_path / "cube.memos"
    assert run("export", "--cube", world["cube"], "--out", str(out))[0] == 0  # sound: written
    out.unlink()
    statements = REFUSED_CONFIG if case == "config" else DAMAGE[case][0]
    with sql(settings) as conn:
        for statement in statements.split("; "):
            conn.execute(statement, {**world, "admin": tenant.admin_id})
    code, stdout, err = run("export", "--cube", world["cube"], "--out", str(out))
    assert (code, stdout) == (1, "") and err.count("\n") == 1, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    cube = world["cube"]
    if case == "config":
        said = f"`memos admin import` would refuse the bundle of cube {cube}: cache.json: config.default: must name"
    else:
        said = f"cube {cube} is damaged (`memos admin verify --cube {cube}` names the rows: "
        assert f" {DAMAGE[case][1]}" in err, err
    assert err.startswith(f"memos admin export: {said}"), err
    assert err.endswith(": nothing written (repair the cube and export again, or --allow-damaged writes it anyway)\n")

    code, stdout, err = run("export", "--cube", cube, "--out", str(out), "--allow-damaged")
    assert code == 0 and stdout.startswith("exported cube") and out.exists(), (stdout, err)
    assert err.startswith(f"memos admin export: warning: {said}") and err.count("\n") == 1, err
    assert err.endswith(": written all the same (--allow-damaged)\n"), err
    # The import does refuse it.
    code, _, err = run("import", str(out), "--owner", tenant.admin_id, "--new-ids", "--name", f"copy {case}")
    assert code == 1 and err.startswith("memos admin import: "), err

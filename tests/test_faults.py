"""Fault runs: a real ``memos serve`` process, real clients, and the fault done to it for real.

1. ``kill -9`` of the service in the middle of an ingest (single creates, batches and PATCHes from
   several clients). After a restart on the same database, every write the service acknowledged is
   there with the exact content at the exact version, every batch is all there or not at all, and no
   memory has a version row without its current-state update (or the other way round).
2. Postgres stopped and started again under load, the service left running. ``/readyz`` turns 503
   while it is down and 200 once it is back; requests meanwhile get a quick 503 (never a 500, never a
   hang past the client's timeout); once it is back, requests succeed again without a service restart,
   and every acknowledged write is there.

``make faults`` runs only these; ``make test`` runs them with everything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from memos.store import migrations
from memos.store.embedded import EmbeddedPostgres
from tests.conftest import OPERATOR_KEY, PgServer, bearer, free_port, fresh_database

pytestmark = pytest.mark.faults

CLIENT_TIMEOUT_S = 15.0
"""What a client waits for an answer; a request that takes longer counts as a hang."""


# ---------------------------------------------------------------- a real service process


@dataclasses.dataclass
class Service:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_service(
    database_url: str,
    data_dir: Path,
    port: int,
    *,
    log_name: str = "serve.log",
    env_extra: dict[str, str] | None = None,
) -> Service:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(
        MEMOS_DATABASE_URL=database_url,
        MEMOS_DATA_DIR=str(data_dir),
        MEMOS_OPERATOR_KEY=OPERATOR_KEY,
        MEMOS_LOG_LEVEL="WARNING",
        MEMOS_DB_POOL_SIZE="5",
    )
    env.update(env_extra or {})
    log = data_dir / log_name
    data_dir.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "memos"), "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = Service(f"http://127.0.0.1:{port}", proc, log)
    wait_for(lambda: _ready(service), 90, f"memos serve did not become ready:\n{_tail(log)}", proc=proc)
    return service


def _ready(service: Service) -> bool:
    """Ready to take writes: /readyz is 200 once the database answers, the model may still be loading."""
    try:
        r = httpx.get(service.url + "/readyz", timeout=2)
        return r.status_code == 200 and r.json().get("embedder") == "ready"
    except httpx.TransportError:
        return False


def stop_service(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGINT)
        try:
            service.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def wait_for(
    condition: Callable[[], bool], timeout: float, message: str, *, proc: subprocess.Popen[bytes] | None = None
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode}: {message}")
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(message)


# ---------------------------------------------------------------- load and its ledger


@dataclasses.dataclass
class Ack:
    """A write the service acknowledged: this memory had this content at this version."""

    memory_id: str
    version: int
    content: str


@dataclasses.dataclass
class Outcome:
    op: str
    started: float
    seconds: float
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    error: str | None = None


@dataclasses.dataclass
class Ledger:
    acks: list[Ack] = dataclasses.field(default_factory=list)
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    batches: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (batch tag, size) sent
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Load:
    """Writer threads: creates, batches and PATCHes in one cube, until stopped; every answer recorded."""

    def __init__(self, url: str, key: str, cube_id: str, ledger: Ledger, threads: int = 6) -> None:
        self.url, self.key, self.cube_id, self.ledger = url, key, cube_id, ledger
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
            assert not t.is_alive(), "a client thread hung"

    def _record(self, op: str, started: float, status: int | None, error: str | None = None) -> None:
        outcome = Outcome(op, started, time.monotonic() - started, status, error)
        with self.ledger.lock:
            self.ledger.outcomes.append(outcome)

    def _run(self, worker: int) -> None:
        mine: list[tuple[str, int]] = []  # (memory id, version) this thread may PATCH
        with httpx.Client(base_url=self.url, headers=bearer(self.key), timeout=CLIENT_TIMEOUT_S) as http:
            n = 0
            while not self.stop_flag.is_set():
                n += 1
                if n % 5 == 0:
                    self._batch(http, worker, n)
                elif n % 3 == 0 and mine:
                    mine = self._patch(http, worker, n, mine)
                else:
                    self._create(http, worker, n, mine)

    def _call(self, op: str, send: Callable[[], httpx.Response]) -> httpx.Response | None:
        started = time.monotonic()
        try:
            r = send()
        except httpx.HTTPError as exc:
            self._record(op, started, None, type(exc).__name__)
            time.sleep(0.05)  # the service is down: do not spin
            return None
        self._record(op, started, r.status_code)
        if r.status_code >= 500:
            time.sleep(0.05)
        return r

    def _create(self, http: httpx.Client, worker: int, n: int, mine: list[tuple[str, int]]) -> None:
        content = f"w{worker} fact {n} {uuid.uuid4().hex[:6]}"
        body = {"kind": "plaintext", "content": content}
        r = self._call("create", lambda: http.post(f"/v1/cubes/{self.cube_id}/memories", json=body))
        if r is not None and r.status_code == 201:
            m = r.json()
            assert (m["content"], m["version"]) == (content, 1)
            with self.ledger.lock:
                self.ledger.acks.append(Ack(m["id"], 1, content))
            mine.append((m["id"], 1))

    def _batch(self, http: httpx.Client, worker: int, n: int) -> None:
        tag = uuid.uuid4().hex
        items = [
            {"kind": "plaintext", "content": f"w{worker} batch {n}.{i}", "metadata": {"batch": tag}} for i in range(4)
        ]
        with self.ledger.lock:
            self.ledger.batches.append((tag, len(items)))
        r = self._call("batch", lambda: http.post(f"/v1/cubes/{self.cube_id}/memories/batch", json={"items": items}))
        if r is not None and r.status_code == 201:
            got = r.json()["items"]
            assert [m["content"] for m in got] == [i["content"] for i in items]
            with self.ledger.lock:
                self.ledger.acks += [Ack(m["id"], 1, m["content"]) for m in got]

    def _patch(self, http: httpx.Client, worker: int, n: int, mine: list[tuple[str, int]]) -> list[tuple[str, int]]:
        memory_id, version = mine[n % len(mine)]
        content = f"w{worker} revised {n} {uuid.uuid4().hex[:6]}"
        r = self._call(
            "patch",
            lambda: http.patch(
                f"/v1/memories/{memory_id}", json={"content": content}, headers={"If-Match": f'"{version}"'}
            ),
        )
        if r is not None and r.status_code == 200:
            m = r.json()
            assert (m["content"], m["version"]) == (content, version + 1)
            with self.ledger.lock:
                self.ledger.acks.append(Ack(memory_id, version + 1, content))
            return [(i, version + 1 if i == memory_id else v) for i, v in mine]
        return mine


def setup_tenant(url: str) -> tuple[str, str]:
    r = httpx.post(url + "/v1/tenants", json={"name": f"faults-{uuid.uuid4().hex[:8]}"}, headers=bearer(OPERATOR_KEY))
    assert r.status_code == 201, r.text
    key = r.json()["admin_key"]
    r = httpx.post(url + "/v1/cubes", json={"name": "ingest"}, headers=bearer(key))
    assert r.status_code == 201, r.text
    return key, r.json()["id"]


# ---------------------------------------------------------------- what must hold afterwards


def check_acknowledged_writes(url: str, key: str, ledger: Ledger) -> None:
    """Every acknowledged write readable with its exact content at its exact version."""
    assert ledger.acks, "the load acknowledged writes"
    latest: dict[str, int] = {}
    with httpx.Client(base_url=url, headers=bearer(key), timeout=CLIENT_TIMEOUT_S) as http:
        for ack in ledger.acks:
            r = http.get(f"/v1/memories/{ack.memory_id}/versions/{ack.version}")
            assert r.status_code == 200, (ack, r.text)
            assert r.json()["content"] == ack.content, ack
            latest[ack.memory_id] = max(latest.get(ack.memory_id, 0), ack.version)
        for memory_id, version in latest.items():
            r = http.get(f"/v1/memories/{memory_id}")
            assert r.status_code == 200
            assert r.json()["version"] >= version


def check_database_consistency(database_url: str, ledger: Ledger) -> None:
    """No version row without its current-state update, no gap, and every batch all or nothing."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        broken = conn.execute(
            "SELECT m.id, m.version, max(v.version), count(v.version), "
            " bool_or(v.version = m.version AND v.content IS NOT DISTINCT FROM m.content)"
            " FROM memories m LEFT JOIN memory_versions v ON v.memory_id = m.id"
            " GROUP BY m.id, m.version"
            " HAVING NOT (m.version = max(v.version) AND m.version = count(v.version))"
            " OR NOT bool_or(v.version = m.version AND v.content IS NOT DISTINCT FROM m.content)"
        ).fetchall()
        assert broken == []
        orphans = conn.execute(
            "SELECT count(*) FROM memory_versions v WHERE NOT EXISTS (SELECT 1 FROM memories m WHERE m.id = v.memory_id)"
        ).fetchone()
        assert orphans == (0,)
        counts = dict(
            conn.execute(
                "SELECT metadata->>'batch', count(*) FROM memories WHERE metadata ? 'batch' GROUP BY 1"
            ).fetchall()
        )
    for tag, size in ledger.batches:
        assert counts.get(tag, 0) in (0, size), f"batch {tag}: {counts.get(tag)} of {size} items"


# ---------------------------------------------------------------- 1. kill -9 mid-ingest


@pytest.fixture
def fault_db(pg_server: PgServer) -> Iterator[str]:
    from memos.store.embedded import drop_database

    name = fresh_database(pg_server, "faults")
    yield pg_server.url(name)
    drop_database(pg_server.admin_url, name)


def test_kill_9_mid_ingest_loses_no_acknowledged_write(fault_db: str, tmp_path: Path) -> None:
    port = free_port()
    service = start_service(fault_db, tmp_path / "data", port)
    try:
        key, cube_id = setup_tenant(service.url)
        ledger = Ledger()
        with Load(service.url, key, cube_id, ledger):
            wait_for(lambda: len(ledger.acks) >= 60, 60, "the load got writes acknowledged")
            os.kill(service.proc.pid, signal.SIGKILL)
            service.proc.wait(timeout=10)
            killed_at = time.monotonic()
            time.sleep(0.5)  # the clients see the service gone
        assert service.proc.returncode == -signal.SIGKILL
        unanswered = [o for o in ledger.outcomes if o.status is None]
        assert unanswered, "the clients saw the service die"
        assert all(o.status in (200, 201) for o in ledger.outcomes if o.status is not None), "only successes before"

        restarted = start_service(fault_db, tmp_path / "data", port, log_name="serve-2.log")
        try:
            check_acknowledged_writes(restarted.url, key, ledger)
            check_database_consistency(fault_db, ledger)
            # And it takes writes again.
            r = httpx.post(
                restarted.url + f"/v1/cubes/{cube_id}/memories",
                json={"kind": "plaintext", "content": "after the crash"},
                headers=bearer(key),
                timeout=CLIENT_TIMEOUT_S,
            )
            assert r.status_code == 201, r.text
        finally:
            stop_service(restarted)
        print(
            f"\nkill -9: {len(ledger.acks)} acknowledged writes all present after restart;"
            f" {len(unanswered)} requests got no answer (in flight at the kill, or sent after it);"
            f" {len(ledger.batches)} batches all or nothing; restarted and checked in {time.monotonic() - killed_at:.1f} s"
        )
    finally:
        stop_service(service)


# ---------------------------------------------------------------- 2. Postgres stopped and started under load


def test_postgres_restart_under_load_recovers_without_a_service_restart(tmp_path: Path) -> None:
    embedded = EmbeddedPostgres(tmp_path / "pgctl")
    database_url = embedded.start()
    try:
        migrations.upgrade(database_url)
        service = start_service(database_url, tmp_path / "data", free_port())
        try:
            key = _restart_postgres_under_load(embedded, database_url, service)
            _restart_postgres_while_idle(embedded, service, key)
        finally:
            stop_service(service)
    finally:
        embedded.stop()


def _restart_postgres_under_load(embedded: EmbeddedPostgres, database_url: str, service: Service) -> str:
    key, cube_id = setup_tenant(service.url)
    ledger = Ledger()
    ready: list[tuple[float, int | None]] = []
    with Load(service.url, key, cube_id, ledger, threads=4):
        wait_for(lambda: len(ledger.acks) >= 20, 60, "the load got writes acknowledged")
        stopped_at = time.monotonic()
        embedded.stop()  # pg_ctl stop -m fast: sessions are terminated
        wait_for(lambda: _readyz(service, ready) == 503, 15, "/readyz turned 503 while Postgres was down")
        time.sleep(3)  # load keeps coming while the database is away
        down_for = time.monotonic() - stopped_at
        assert embedded.start() == database_url
        restarted_at = time.monotonic()
        recovery = wait_for(lambda: _readyz(service, ready) == 200, 30, "/readyz turned 200 again")
        time.sleep(3)  # load after recovery
        acks_before_end = len(ledger.acks)
    assert service.proc.poll() is None, "the service kept running"

    outcomes = ledger.outcomes
    statuses = {o.status for o in outcomes}
    assert statuses <= {200, 201, 503}, f"unexpected answers: {statuses}"
    assert all(o.status is not None for o in outcomes), [o.error for o in outcomes if o.status is None]
    slowest = max(o.seconds for o in outcomes)
    assert slowest < CLIENT_TIMEOUT_S, f"a request hung for {slowest:.1f} s"
    outage = [o for o in outcomes if stopped_at <= o.started < restarted_at]
    assert any(o.status == 503 for o in outage), "requests were refused with 503 while Postgres was down"
    settled = restarted_at + recovery + 1.0
    after = [o for o in outcomes if o.started >= settled]
    assert after, "load ran after the recovery"
    assert all(o.status in (200, 201) for o in after), {o.status for o in after}
    assert acks_before_end > 20
    check_acknowledged_writes(service.url, key, ledger)
    check_database_consistency(database_url, ledger)
    outage_503 = [o.seconds for o in outage if o.status == 503]
    print(
        f"\nPostgres restart: down {down_for:.1f} s; {len(outage_503)} requests answered 503 meanwhile"
        f" (slowest {max(outage_503):.2f} s); /readyz 200 again {recovery:.1f} s after Postgres was back;"
        f" slowest request overall {slowest:.2f} s; {len(ledger.acks)} acknowledged writes all present"
    )
    return key


def _restart_postgres_while_idle(embedded: EmbeddedPostgres, service: Service, key: str) -> None:
    """No traffic sees the outage: the pooled connections are dead, and the next request must not pay for it."""
    auth = bearer(key)
    # Fill the pool with connections (several concurrent reads), then let them sit idle.
    threads = [threading.Thread(target=lambda: httpx.get(service.url + "/v1/cubes", headers=auth)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    embedded.stop()
    embedded.start()
    statuses = [
        httpx.get(service.url + "/v1/cubes", headers=auth, timeout=CLIENT_TIMEOUT_S).status_code for _ in range(8)
    ]
    assert statuses == [200] * 8, statuses


def _readyz(service: Service, seen: list[tuple[float, int | None]]) -> int | None:
    try:
        status: int | None = httpx.get(service.url + "/readyz", timeout=5).status_code
    except httpx.TransportError:
        status = None
    seen.append((time.monotonic(), status))
    return status


# ---------------------------------------------------------------- 3. a database that accepts and never answers


async def test_a_database_that_never_answers_is_503_not_a_hang(tmp_path: Path) -> None:
    """A server that takes the TCP connection and then says nothing (a hung host, a black-holed proxy).

    Without a connect timeout, opening a connection waited forever, and so did /readyz and every request.
    """
    import asyncio

    from memos.errors import Unavailable
    from memos.settings import Settings
    from memos.store import db as store_db

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepted by the kernel, never read from
    host, port = listener.getsockname()
    try:
        database = store_db.Database(Settings(database_url=f"postgresql://u@{host}:{port}/memos", data_dir=tmp_path))
        database._engine = store_db.create_engine(f"postgresql://u@{host}:{port}/memos", 2)
        started = time.monotonic()
        assert await asyncio.wait_for(database.ready(), 30) is False
        waited = time.monotonic() - started
        assert waited < store_db.CONNECT_TIMEOUT_S + 3, waited
        with pytest.raises(Unavailable):
            async with database.read():
                pass
        await database.stop()
    finally:
        listener.close()


# ---------------------------------------------------------------- 3. SIGTERM with a client that stalls


def test_sigterm_stops_the_service_past_a_client_that_stalls_mid_body(database_url: str, tmp_path: Path) -> None:
    """A client that sent its headers and part of its body, then nothing: the request waits for the rest, and
    the graceful shutdown waited for the request, for as long as the client held on (found in review). After
    ``MEMOS_SHUTDOWN_SECONDS`` the request is cancelled and the process ends."""
    env = {"MEMOS_SHUTDOWN_SECONDS": "1", "MEMOS_LOG_LEVEL": "INFO"}  # INFO: the access lines
    service = start_service(database_url, tmp_path / "data", free_port(), env_extra=env)
    try:
        port = int(service.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST /v1/tenants HTTP/1.1\r\nHost: memos\r\nAuthorization: Bearer "
                + OPERATOR_KEY.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"name": '
            )
            time.sleep(1)  # the request is in the app, waiting for the rest of its body
            sent = time.monotonic()
            service.proc.send_signal(signal.SIGTERM)
            try:
                service.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running 30 s after SIGTERM:\n{_tail(service.log)}") from None
            took = time.monotonic() - sent
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
    finally:
        stop_service(service)
    assert took < 15, took
    log = service.log.read_text(errors="replace")
    assert "timeout graceful shutdown exceeded" in log
    # The cancelled request is one line and its access line, not a CancelledError traceback logged as an
    # "Exception in ASGI application" and counted as a 500 (found in a walkthrough).
    assert "Traceback" not in log and "CancelledError" not in log, _tail(service.log)
    assert "a request still running at shutdown was cancelled" in log
    access = [json.loads(line) for line in log.splitlines() if '"memos.access"' in line and "/v1/tenants" in line]
    assert [line["status"] for line in access] == [499], access
    # The client was sent a plain-text 500, as for a bug; now a 503 that says to retry.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in head.lower() and b"content-type: application/problem+json" in head.lower(), head
    problem = json.loads(body)
    assert problem["status"] == 503 and "shutting down" in problem["detail"], problem

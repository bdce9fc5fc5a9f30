"""The ``memos`` command: ``serve`` and ``admin`` tools. Calls the same services as the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import stat
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from memos.settings import Settings, SettingsError, redact_password

if TYPE_CHECKING:
    from sqlalchemy.exc import DBAPIError

    from memos.admin.bundle import BundleReport
    from memos.admin.gc import Collected
    from memos.admin.kv import Dropped, ModelKV
    from memos.admin.verify import Verified
    from memos.store.blobs import BlobStore
    from memos.store.db import Database

T = TypeVar("T")

# ASGI, lifespan messages included (Litestar's own types cover HTTP and WebSocket scopes only).
_Message = MutableMapping[str, Any]
_Send = Callable[[_Message], Awaitable[None]]
_Receive = Callable[[], Awaitable[_Message]]
_ASGI = Callable[[_Message, _Receive, _Send], Awaitable[None]]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from memos.app import create_app
    from memos.observability import configure_logging

    settings = Settings.from_env(host=args.host, port=args.port)
    configure_logging(settings.log_level)
    # Before the database starts: uvicorn binds its socket only after the lifespan (the embedded server, the
    # migrations) has run, and then a taken port or a host that does not resolve was its traceback, exit 3.
    problem = _cannot_listen(settings, host_given=args.host is not None, port_given=args.port is not None)
    if problem is None:
        problem = _cannot_store_kv(settings)
    if problem is not None:
        print(f"memos serve: {problem}", file=sys.stderr)
        return 1
    failed = _StartFailure()
    try:
        uvicorn.run(
            _start_failures_on_one_line(create_app(settings), settings, failed),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            # Then requests still in flight are cancelled: without a deadline, a client that stalled
            # mid-body kept the process alive after SIGTERM for as long as it held the connection (found in
            # review).
            timeout_graceful_shutdown=settings.shutdown_seconds,
        )
    except SystemExit:
        if failed.line is None:
            raise
        print(failed.line, file=sys.stderr)
        return failed.status
    return 0


def _cannot_listen(settings: Settings, *, host_given: bool, port_given: bool) -> str | None:
    """Why ``memos serve`` cannot listen on its host and port (the flag or variable named), or None.

    Found by binding what uvicorn will bind, as asyncio's ``create_server`` does for it: every address the host
    resolves to, SO_REUSEADDR (so a port still in TIME_WAIT from a previous run is not refused), IPv6 sockets
    v6-only; then let go. Only a probe: another process can still take the port between it and uvicorn's bind
    (after the database has started), and then uvicorn's own error and exit code 3 stand.
    """
    import errno
    import socket

    host_name = "--host" if host_given else "MEMOS_HOST"
    port_name = "--port" if port_given else "MEMOS_PORT"
    try:
        # "" is every interface, as asyncio takes it.
        found = socket.getaddrinfo(
            settings.host or None, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:  # gaierror; UnicodeError: a name IDNA cannot encode (a label too long)
        return f"cannot resolve {host_name} ({settings.host}): {getattr(exc, 'strerror', None) or exc}"
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this host lacks: asyncio skips it too
            held.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):  # the port is taken, or privileged
                    return f"cannot listen on {port_name} ({settings.port}) at {address[0]}: {exc.strerror}"
                return f"cannot listen on {host_name} ({settings.host}) at {address[0]}: {exc.strerror}"
    finally:
        for sock in held:
            sock.close()
    return None


def _cannot_store_kv(settings: Settings) -> str | None:
    """Why the blob store cannot be written (the variable named), or None; checked when something may write
    there: ``MEMOS_BLOB_DIR`` set (the operator named it), or ``MEMOS_MODELS`` (KV builds and imports). With
    neither, nothing writes a KV file, and a data directory memos cannot write to (an external database, a
    read-only file system) must not stop the start."""
    from memos.store.blobs import LocalBlobStore

    if settings.blob_dir is None and not settings.models:
        return None
    try:
        LocalBlobStore(settings.blob_root).check_writable()
    except OSError as exc:
        if settings.blob_dir is not None:
            variable, value = "MEMOS_BLOB_DIR", settings.blob_dir
        else:
            variable, value = "MEMOS_DATA_DIR", settings.data_dir
        # Named by the path it is about when that is not the variable's own, as _start_failure does.
        where = f"{exc.filename} in " if exc.filename and Path(exc.filename) != value else ""
        return f"cannot use {where}{variable} ({value}): {exc.strerror or exc}"
    return None


@dataclasses.dataclass
class _StartFailure:
    """Why the application did not start, as the line to print, when that is one the operator can act on."""

    line: str | None = None
    status: int = 1


def _start_failures_on_one_line(
    app: Callable[..., Awaitable[None]], settings: Settings, failed: _StartFailure
) -> _ASGI:
    """``app``, with a start-up failure the operator can act on (settings, a database that is down or out of
    date, a data directory memos cannot use) told in one line, like the admin tools do, and not as the
    ~150-line traceback uvicorn logs of any failure in the lifespan.

    The failure is held back from uvicorn until the exception says what it was: Litestar reports it (with
    the traceback) before re-raising. One memos cannot name goes on to uvicorn with its traceback.
    """

    async def wrapped(scope: _Message, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        held: list[_Message] = []

        async def send_or_hold(message: _Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await app(scope, receive, send_or_hold)
        except BaseException as exc:
            if held and (described := _start_failure(settings, exc)) is not None:
                failed.line, failed.status = described
                held[:] = [{"type": "lifespan.startup.failed", "message": ""}]
            raise
        finally:
            for message in held:
                await send(message)

    return wrapped


def _start_failure(settings: Settings, exc: BaseException) -> tuple[str, int] | None:
    """The line to print and the exit status for a failure at start that the operator can act on, or None."""

    import psycopg
    from sqlalchemy.exc import DBAPIError

    from memos.store.db import SchemaOutOfDate
    from memos.store.migrations import UnsupportedServer

    # Litestar runs the lifespan in a task group: the cause comes wrapped.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, SettingsError):  # the operator key file (memos/identity/service.py): exit 2, as at parse
        return f"memos: configuration error: {exc}", 2
    if isinstance(exc, SchemaOutOfDate | UnsupportedServer):
        return f"memos serve: {exc}", 1
    if isinstance(exc, DBAPIError | psycopg.Error):
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        if settings.database_url is None:
            return f"memos serve: the embedded database in MEMOS_DATA_DIR ({settings.data_dir}) failed: {reason}", 1
        # libpq names the host and port, never the password; a URL it cannot parse it may quote whole.
        return (
            f"memos serve: the database at MEMOS_DATABASE_URL failed: {redact_password(reason, settings.database_url)}",
            1,
        )
    if (line := _embedded_did_not_start(settings, exc)) is not None:
        return f"memos serve: {line}", 1
    if isinstance(exc, OSError):
        # Named by the file it is about: the embedded server's directory, the operator key file or the blob
        # store are all in MEMOS_DATA_DIR, and "the embedded database" alone misled (found in review).
        where = f"{exc.filename} in " if exc.filename else ""
        return f"memos serve: cannot use {where}MEMOS_DATA_DIR ({settings.data_dir}): {exc.strerror or exc}", 1
    return None


def _embedded_did_not_start(settings: Settings, exc: BaseException) -> str | None:
    """The line for an embedded server that could not be used (memos refused it) or failed to start (pg_ctl failed
    or timed out), or None."""
    import subprocess

    from memos.store.embedded import EmbeddedStartError

    if isinstance(exc, EmbeddedStartError):
        return str(exc)
    if isinstance(exc, subprocess.CalledProcessError | subprocess.TimeoutExpired) and settings.embedded:
        log = Path(settings.data_dir, "pg", "log").resolve()
        return f"the embedded PostgreSQL in MEMOS_DATA_DIR ({settings.data_dir}) did not start: see {log}"
    return None


def _migrate(args: argparse.Namespace) -> int:
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from memos.store import migrations
    from memos.store.embedded import EmbeddedPostgres

    if args.status and (args.down or args.revision != "head"):
        print("memos admin migrate: --status takes no revision and no --down", file=sys.stderr)
        return 2
    # --status that could not look is 3 ("not checked", as for verify): its 1 means "the schema is not at head".
    failed = 3 if args.status else 1
    settings = Settings.from_env()
    if args.status and settings.embedded and _no_deployment(settings.data_dir):
        # --status changes nothing: it does not make a deployment where a mistyped MEMOS_DATA_DIR points.
        print(f"memos admin migrate: no memos database in MEMOS_DATA_DIR ({settings.data_dir})", file=sys.stderr)
        return failed
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    try:
        url = embedded.start() if embedded is not None else settings.database_url
    except OSError as exc:
        # A data directory that cannot be made or used (a file in its path, no permission): one line, as below.
        print(f"memos admin migrate: {_no_data_dir(settings, exc)}", file=sys.stderr)
        return failed
    except Exception as exc:  # refused, or pg_ctl failed or timed out: a traceback before (found by an operator)
        if (line := _embedded_did_not_start(settings, exc)) is None:
            raise
        print(f"memos admin migrate: {line}", file=sys.stderr)
        return failed
    assert url is not None
    try:
        before = migrations.current_revision(url)
        if args.status:
            return _schema_status(before, migrations.head_revision())
        if args.down and args.revision == "head":
            # --down alone downgraded to head: nothing, silently (found by an operator).
            print("memos admin migrate: --down needs the revision to go down to (0009, or -1)", file=sys.stderr)
            return 2
        if args.revision.startswith("-") and not args.down:
            # alembic reads -1 as "one down": a downgrade (-10 dropped every tenant) without the flag that says
            # so, exit 0 (found by an operator). Every downgrade names --down.
            print(
                f"memos admin migrate: {args.revision} downgrades: add --down to mean it "
                f"(`memos admin migrate {args.revision} --down`)",
                file=sys.stderr,
            )
            return 2
        if args.down:
            migrations.downgrade(url, args.revision)
        elif migrations.older_than(before, args.revision):
            # alembic's upgrade to an older revision does nothing and says nothing: `schema: 0010 -> 0010`, exit
            # 0, read as done. Refused like a revision alembic cannot locate (exit 1), with the way back.
            print(
                f"memos admin migrate: the schema is at {before}, newer than {args.revision}: an upgrade does not "
                f"go back (`memos admin migrate {args.revision} --down` downgrades to it)",
                file=sys.stderr,
            )
            return 1
        else:
            migrations.upgrade(url, args.revision)
        after = migrations.current_revision(url)
        print(f"schema: {before or 'empty'} -> {after or 'empty'}")
    # One line each, like _run_tool: a revision alembic cannot locate (a typo) and a database that is down or
    # refuses printed full tracebacks before.
    except (CommandError, migrations.UnsupportedServer) as exc:
        print(f"memos admin migrate: {exc}", file=sys.stderr)
        return failed
    except DBAPIError as exc:
        print(f"memos admin migrate: {_database_failed(exc)}", file=sys.stderr)
        return failed
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _reembed(args: argparse.Namespace) -> int:
    import uuid

    from memos.admin.reembed import Report, pending, reembed
    from memos.embed.base import misfit
    from memos.embed.errors import EmbedderLoadError
    from memos.embed.registry import load_embedder
    from memos.store.models import EMBEDDING_DIMS

    try:
        cube_ids = [uuid.UUID(c) for c in args.cube]
    except ValueError as exc:
        print(f"memos admin reembed: --cube takes a cube id: {exc}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("memos admin reembed: --batch-size must be >= 1", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    try:
        embedder = load_embedder(settings.embed_model)
    except EmbedderLoadError as exc:
        print(f"memos admin reembed: {exc}", file=sys.stderr)
        return 2
    if (why := misfit(embedder, EMBEDDING_DIMS)) is not None:
        print(f"memos admin reembed: {why}", file=sys.stderr)
        return 2

    def progress(report: Report) -> None:
        total = sum(report.pending.values())
        print(f"  {report.reembedded + report.skipped} of {total}", file=sys.stderr)

    async def run() -> int:
        async with _database() as db:
            if args.dry_run:
                counts = await pending(db, embedder.name, cube_ids, nfkc=args.nfkc)
                for model, count in counts.items():
                    print(f"{count} memories embedded by {model}")
                print(f"{sum(counts.values())} to re-embed with {embedder.name} (dry run: nothing written)")
                return 0
            report = await reembed(
                db, embedder, cube_ids=cube_ids, batch=args.batch_size, progress=progress, nfkc=args.nfkc
            )
        print(
            f"re-embedded {report.reembedded} memories with {report.model} "
            f"({report.contexts} cached-answer contexts); skipped {report.skipped} changed meanwhile"
        )
        return 0

    # Through _run_tool: a database that is down was a full traceback. On Unavailable (the model failed
    # mid-way), batches already written stay written: a re-run goes on with what still needs it.
    result = _run_tool("reembed", run)
    return 1 if result is None else result


def _export(args: argparse.Namespace) -> int:
    import uuid

    from memos.admin.bundle import export_cube

    try:
        cube_id = uuid.UUID(args.cube)
    except ValueError as exc:
        print(f"memos admin export: --cube takes a cube id: {exc}", file=sys.stderr)
        return 2
    if args.out == "-":
        # It wrote a file named "-" (found by an operator). A bundle is a zip, written beside its path and renamed
        # into place when whole: it cannot stream to stdout.
        print("memos admin export: --out takes a file path: a bundle is a zip file, not a stream", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"memos admin export: {out} exists (--force replaces it)", file=sys.stderr)
        return 2

    async def run() -> BundleReport:
        async with _database() as db:
            return await export_cube(db, cube_id, out, allow_damaged=args.allow_damaged)

    report = _run_tool("export", run)
    if report is None:
        return 1
    if report.damage is not None:
        print(f"memos admin export: warning: {report.damage}: written all the same (--allow-damaged)", file=sys.stderr)
    print(
        f"exported cube {report.name!r} ({report.cube_id}) to {out}: {report.memories} memories, "
        f"{report.versions} versions, {report.links} links, {report.cache_entries} cache entries"
    )
    _print_left_out(report)
    return 0


def _import(args: argparse.Namespace) -> int:
    import uuid

    from memos.admin.bundle import BundleError, import_bundle, read_bundle
    from memos.embed.registry import model_name

    try:
        owner = uuid.UUID(args.owner)
    except ValueError as exc:
        print(f"memos admin import: --owner takes an agent id: {exc}", file=sys.stderr)
        return 2
    try:
        bundle = read_bundle(Path(args.bundle))
    except BundleError as exc:
        print(f"memos admin import: {exc}", file=sys.stderr)
        return 1

    async def run() -> BundleReport:
        async with _database() as db:
            return await import_bundle(
                db, bundle, owner=owner, name=args.name, new_ids=args.new_ids, dry_run=args.dry_run
            )

    report = _run_tool("import", run)
    if report is None:
        return 1
    verb = "would import (dry run: nothing written)" if args.dry_run else "imported"
    print(
        f"{verb} cube {report.name!r} as {report.cube_id}: {report.memories} memories, {report.versions} versions, "
        f"{report.links} links, {report.cache_entries} cache entries"
    )
    _print_left_out(report)
    current = model_name(Settings.from_env().embed_model)
    others = {model: n for model, n in report.models.items() if model != current}
    for model, n in others.items():
        print(
            f"{n} memories were embedded by {model}, not {current}: run `memos admin reembed --cube {report.cube_id}`"
        )
    return 0


def _schema_status(current: str | None, head: str) -> int:
    """``migrate --status``: the schema's revision against this memos's head, one line; exit 0 only at head. There
    was no way to see it without upgrading (an operator before an upgrade, or after a downgrade)."""
    from memos.store import migrations

    if current == head:
        print(f"schema: {head} (this memos's head: up to date)")
        return 0
    if current is None:
        print(f"schema: empty (this memos's head: {head}; `memos admin migrate` creates it)")
    elif migrations.older_than(head, current):
        print(f"schema: {current} (this memos's head: {head}; `memos admin migrate` upgrades it)")
    else:
        print(f"schema: {current} (this memos's head: {head}; the schema is from another or newer memos)")
    return 1


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[Database]:
    """The deployment's database (``MEMOS_DATABASE_URL``, or the embedded server in ``MEMOS_DATA_DIR``)."""
    from memos.admin import AdminError
    from memos.store.db import Database

    settings = Settings.from_env()
    if settings.embedded and _no_deployment(settings.data_dir):
        # A mistyped MEMOS_DATA_DIR (or the default ./.memos, run from the wrong directory) made a new, empty
        # deployment there, and verify said "no problems found" (found in review). Only migrate makes one.
        raise AdminError(
            f"no memos database in MEMOS_DATA_DIR ({settings.data_dir}): point it at the data directory "
            "`memos serve` uses (or, for a new deployment, run `memos serve` or `memos admin migrate` there first)"
        )
    db = Database(settings)
    try:
        try:
            # Never migrated here: an upgrade on the way undid an operator's downgrade (verify, documented to
            # write nothing, took the schema from 0008 back to 0010; found by an operator). An older schema is
            # SchemaOutOfDate, one line naming `memos admin migrate`, as for an external server.
            await db.start(migrate=False)
        except OSError as exc:
            if not settings.embedded:
                raise
            # The embedded server's directory cannot be made or used: AdminError, so _run_tool prints one line
            # (and verify exits 3, "not checked") instead of a NotADirectoryError traceback.
            raise AdminError(_no_data_dir(settings, exc)) from None
        except Exception as exc:  # the same (verify exited 1, "problems found")
            if (line := _embedded_did_not_start(settings, exc)) is None:
                raise
            raise AdminError(line) from None
        yield db
    finally:
        # Also after a failed start: an embedded server started before the failure is let go of.
        await db.stop()


def _no_deployment(data_dir: Path) -> bool:
    """Whether ``data_dir`` is missing, or a directory without an embedded database. A path that cannot be a
    directory at all (a file in it, no permission) is not this: the start says what is wrong with it."""
    try:
        mode = data_dir.stat().st_mode
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISDIR(mode) and not (data_dir / "pg" / "PG_VERSION").is_file()


def _no_data_dir(settings: Settings, exc: OSError) -> str:
    """Why the embedded server's data directory cannot be used (the admin tools; serve names the file)."""
    return f"cannot start the embedded database in MEMOS_DATA_DIR ({settings.data_dir}): {exc.strerror or exc}"


def _blob_store() -> BlobStore:
    from memos.store.blobs import LocalBlobStore

    return LocalBlobStore(Settings.from_env().blob_root)


def _cube_ids(tool: str, given: Sequence[str]) -> list[uuid.UUID] | None:
    """``--cube`` values as ids; None (with the reason on stderr) when one is not an id."""
    try:
        return [uuid.UUID(c) for c in given]
    except ValueError as exc:
        print(f"memos admin {tool}: --cube takes a cube id: {exc}", file=sys.stderr)
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _verify(args: argparse.Namespace) -> int:
    from memos.admin.verify import verify

    cube_ids = _cube_ids("verify", args.cube)
    if cube_ids is None:
        return 2

    async def run() -> Verified:
        async with _database() as db:
            return await verify(db, _blob_store(), cube_ids=cube_ids, blob_bytes=args.blobs)

    report = _run_tool("verify", run)
    if report is None:
        return 3  # not checked: not the same as "problems found" (1), for a cron job to tell apart
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"ok": report.ok}, indent=2))
        return 0 if report.ok else 1
    checked = report.checked
    hashed = f", {checked['files_hashed']} hashed" if args.blobs else " (lengths only; --blobs hashes them)"
    print(
        f"checked {checked['memories']} memories, {checked['versions']} versions, {checked['activations']} "
        f"activations, {checked['files']} KV files{hashed}"
    )
    for problem in report.problems:
        print(f"  {problem.check}: {problem.target}: {problem.detail}")
    shown = Counter(p.check for p in report.problems)
    for check, count in report.counts.items():
        if count > shown[check]:
            print(f"  {check}: {count} in all (the first {shown[check]} shown)")
    for model, n in report.models.items():
        print(f"{n} memories embedded by {model}")
    if report.orphan_files:
        print(f"{report.orphan_files} KV files ({_mib(report.orphan_bytes)}) nothing refers to: `memos admin gc`")
    total = sum(report.counts.values())
    print("no problems found" if report.ok else f"{total} problems found")
    return 0 if report.ok else 1


def _gc(args: argparse.Namespace) -> int:
    from memos.admin.gc import collect

    if args.grace < 0:
        print("memos admin gc: --grace must be >= 0", file=sys.stderr)
        return 2

    async def run() -> Collected:
        async with _database() as db:
            return await collect(
                db, _blob_store(), grace_s=args.grace, stale_kv=not args.keep_stale_kv, dry_run=args.dry_run
            )

    report = _run_tool("gc", run)
    if report is None:
        return 1
    would = "would free (dry run: nothing removed)" if args.dry_run else "freed"
    kv = report.stale_kv
    print(
        f"{would}: {kv.activations} stale KV activations ({kv.blobs_freed} files, {_mib(kv.bytes_freed)}); "
        f"{report.orphans} KV files nothing refers to ({_mib(report.orphan_bytes)}); "
        f"{report.partial} unfinished writes"
    )
    if report.young_orphans:
        print(f"left: {report.young_orphans} unreferenced files younger than {args.grace:g} s (--grace)")
    _print_bad_keys(kv)
    return 0


def _kv(args: argparse.Namespace) -> int:
    from memos.admin.kv import drop, summary

    cube_ids = _cube_ids("kv", args.cube)
    if cube_ids is None:
        return 2
    if args.kv_command == "list":

        async def listed() -> list[ModelKV]:
            async with _database() as db, db.read() as conn:
                return await summary(conn, cube_ids)

        models = _run_tool("kv", listed)
        if models is None:
            return 1
        if not models:
            print("no KV activations")
        for kv in models:
            print(
                f"{kv.model}: {kv.activations} activations ({kv.fresh} fresh, {kv.stale} stale, {kv.corrupt} "
                f"corrupt, {kv.pinned} pinned), {kv.blobs} files, {_mib(kv.blob_bytes)}"
            )
        return 0
    if args.model is None and not args.stale:
        print("memos admin kv drop: name a --model, or --stale (the stale KV of every model)", file=sys.stderr)
        return 2

    async def dropped() -> tuple[Dropped, list[str]]:
        async with _database() as db:
            # The models with KV before the drop, read in the same session: a typo'd name drops nothing.
            have: list[str] = []
            if args.model is not None:
                async with db.read() as conn:
                    have = [kv.model for kv in await summary(conn, cube_ids)]
            report = await drop(
                db, _blob_store(), model=args.model, stale_only=args.stale, cube_ids=cube_ids, dry_run=args.dry_run
            )
            return report, have

    outcome = _run_tool("kv", dropped)
    if outcome is None:
        return 1
    report, have = outcome
    verb = "would drop (dry run: nothing removed)" if args.dry_run else "dropped"
    counted = ", ".join(f"{n} of {m}" for m, n in sorted(report.by_model.items())) or "none"
    print(
        f"{verb} {report.activations} KV activations ({counted}); {report.blobs_freed} files, "
        f"{_mib(report.bytes_freed)} freed"
    )
    _print_bad_keys(report)
    # A typo'd model name dropped nothing and said only "dropped 0": say which models have KV here. (With
    # --stale, a model whose KV is all fresh drops nothing either: no hint for it.)
    if args.model is not None and args.model not in have:
        print(
            f"no KV activations of model {args.model!r} here (models with KV activations: {', '.join(have) or 'none'})"
        )
    return 0


def _print_bad_keys(report: Dropped) -> None:
    if report.bad_keys:
        print(
            f"left: {len(report.bad_keys)} recorded file keys that are not blob keys, no file freed for them "
            f"(e.g. {report.bad_keys[0]!r}; `memos admin verify` names them)"
        )


def _keys(args: argparse.Namespace) -> int:
    from memos.admin import keys

    if args.keys_command == "list":

        async def listed() -> list[keys.KeyInfo]:
            async with _database() as db:
                return await keys.list_keys(db, args.tenant, revoked=args.revoked)

        found = _run_tool("keys", listed)
        if found is None:
            return 1
        for k in found:
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live"
            made = f"{k.created_at:%Y-%m-%d %H:%M}"
            print(f"{k.prefix}  {k.tenant}/{k.agent} ({k.role}, {k.agent_id})  created {made}  {state}")
        if not found:
            print("no keys")
        return 0
    if args.keys_command == "issue":
        try:
            agent_id = uuid.UUID(args.agent)
        except ValueError as exc:
            print(f"memos admin keys issue: --agent takes an agent id: {exc}", file=sys.stderr)
            return 2

        async def issued() -> keys.Issued:
            async with _database() as db:
                return await keys.issue(db, agent_id)

        new = _run_tool("keys", issued)
        if new is None:
            return 1
        print(f"new key for {new.tenant}/{new.agent} (prefix {new.prefix}; shown once, only its hash is kept):")
        print(new.key)
        return 0

    async def revoked() -> keys.KeyInfo:
        async with _database() as db:
            return await keys.revoke(db, args.prefix)

    info = _run_tool("keys", revoked)
    if info is None:
        return 1
    print(f"revoked {info.prefix} of {info.tenant}/{info.agent}: it is refused from the next request on")
    return 0


def _run_tool(tool: str, run: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
    """Run an admin tool's coroutine; None, with its reason on stderr, when it fails in a way the operator can
    act on (a bad bundle or target, the database down, the schema out of date)."""
    from sqlalchemy.exc import DBAPIError

    from memos.admin import AdminError
    from memos.errors import MemosError
    from memos.store.db import SchemaOutOfDate
    from memos.store.migrations import UnsupportedServer

    try:
        return asyncio.run(run())
    # MemosError, not only Unavailable: the domain code the tools call raises the API's errors, Conflict among
    # them (a deadlock or serialization failure that reembed's retries did not get past; in import, kv drop, gc),
    # and each was a traceback. Its detail is the line to print.
    except (AdminError, MemosError, SchemaOutOfDate, UnsupportedServer) as exc:
        print(f"memos admin {tool}: {getattr(exc, 'detail', None) or exc}", file=sys.stderr)
        return None
    except DBAPIError as exc:  # the database refused or is not there (raised before any request-level mapping)
        print(f"memos admin {tool}: {_database_failed(exc)}", file=sys.stderr)
        return None


def _database_failed(exc: DBAPIError) -> str:
    """The driver's reason on one line (libpq adds "Is the server running...?" on a line of its own)."""
    return "the database failed: " + " ".join(str(exc.orig or exc).split())


def _print_left_out(report: BundleReport) -> None:
    activations = report.left_out.get("activations", 0)
    outside = report.left_out.get("links_outside", 0)
    if activations:
        print(f"left out: {activations} KV activations (rebuild them with POST /v1/memories/{{id}}/activations)")
    if outside:
        # An activation's provenance edge is left out with its activation, both ends in the cube: "links to
        # memories outside the cube" said otherwise for a cube whose only left-out link was one (a new user).
        print(f"left out: {outside} links with an end outside the cube or on a KV activation")


def _mcp(args: argparse.Namespace) -> int:
    import anyio

    # Imported here so that only `memos mcp` needs the mcp package and the SDK.
    from memos.mcp_server import ConfigError, resolve, serve

    try:
        url, api_key, cube_id = resolve(args.url, args.api_key, args.cube)
        anyio.run(lambda: serve(url, api_key, cube_id, transport=args.transport, host=args.host, port=args.port))
    except ConfigError as exc:
        print(f"memos mcp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from memos.kv.maker import make_model

    out = make_model(Path(args.out_dir), arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote a random {args.arch} model ({args.preset}, seed {args.seed}) to {out}")
    return 0


def _port(value: str) -> int:
    """A TCP port from the command line: 1-65535 (99999 reached the socket layer as a traceback)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, not {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memos", description="memos: a memory operating system for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the REST API (embedded Postgres unless MEMOS_DATABASE_URL is set)",
        # Everything else is a MEMOS_* variable; a new user read --help and found only --host and --port.
        epilog=(
            "configured by environment variables, among them: MEMOS_DATA_DIR (default ./.memos: the embedded "
            "database, the operator key, KV files), MEMOS_DATABASE_URL (your own PostgreSQL instead), "
            "MEMOS_OPERATOR_KEY, MEMOS_MODELS (causal LMs for KV activations), MEMOS_EMBED_MODEL, MEMOS_LOG_LEVEL. "
            "Every one is listed in docs/architecture.md, Configuration."
        ),
    )
    serve.add_argument("--host", default=None, help="interface to listen on (MEMOS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="port to listen on (MEMOS_PORT, default 8000)")
    serve.set_defaults(func=_serve)

    mcp = sub.add_parser(
        "mcp",
        help="run an MCP server on one cube (remember, recall, forget, history, cache_lookup, cache_store)",
    )
    mcp.add_argument("--url", default=None, help="the memos API (MEMOS_URL, default http://127.0.0.1:8000)")
    mcp.add_argument("--api-key", default=None, help="the agent's API key (MEMOS_API_KEY)")
    mcp.add_argument("--cube", default=None, help="the cube id every tool acts on (MEMOS_CUBE_ID)")
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="stdio (default) or http")
    mcp.add_argument("--host", default="127.0.0.1", help="interface for --transport http (default 127.0.0.1)")
    mcp.add_argument("--port", type=_port, default=8765, help="port for --transport http (default 8765)")
    mcp.set_defaults(func=_mcp)

    admin = sub.add_parser("admin", help="operations: migrations, re-embedding, export/import, verify, gc, kv, keys")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    migrate = admin_sub.add_parser("migrate", help="upgrade the database schema (or --down to a revision)")
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    migrate.add_argument("--down", action="store_true", help="downgrade to the revision instead")
    migrate.add_argument(
        "--status", action="store_true", help="print the schema's revision and this memos's head; change nothing"
    )
    migrate.set_defaults(func=_migrate)
    reembed = admin_sub.add_parser(
        "reembed", help="re-embed, with MEMOS_EMBED_MODEL, the memories another embedding model embedded"
    )
    reembed.add_argument("--cube", action="append", default=[], metavar="CUBE_ID", help="only this cube (repeatable)")
    reembed.add_argument("--batch-size", type=int, default=256, help="memories per transaction (default 256)")
    reembed.add_argument("--dry-run", action="store_true", help="count what needs it, by model; write nothing")
    reembed.add_argument(
        "--nfkc",
        action="store_true",
        help="also memories whose text is not in NFKC form (ligatures, full-width letters), embedded as written "
        "before 2026-12-07; they are embedded again on every run with this flag",
    )
    reembed.set_defaults(func=_reembed)
    export = admin_sub.add_parser("export", help="write a cube, with its history, links and cache, to a bundle file")
    export.add_argument("--cube", required=True, metavar="CUBE_ID", help="the cube to export")
    export.add_argument("--out", required=True, metavar="FILE", help="the bundle to write (memos-bundle/1, a zip)")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    # Not --force: a routine overwrite (a nightly backup) must not also accept a bundle that will not import.
    export.add_argument(
        "--allow-damaged",
        action="store_true",
        help="write the bundle even if `memos admin import` would refuse it (the cube is damaged; said on stderr)",
    )
    export.set_defaults(func=_export)
    imp = admin_sub.add_parser("import", help="write a bundle as a new cube, in one transaction")
    imp.add_argument("bundle", metavar="FILE", help="a bundle written by `memos admin export`")
    imp.add_argument("--owner", required=True, metavar="AGENT_ID", help="the agent that owns the cube (its tenant)")
    imp.add_argument("--name", default=None, help="the cube's name (default: the exported cube's)")
    imp.add_argument("--new-ids", action="store_true", help="fresh ids for the cube, memories and links (a copy)")
    imp.add_argument("--dry-run", action="store_true", help="check the bundle and the target; write nothing")
    imp.set_defaults(func=_import)
    check = admin_sub.add_parser(
        "verify",
        help="check stored rows and KV files against each other; writes nothing (exit 1: problems; 3: not checked)",
    )
    check.add_argument("--cube", action="append", default=[], metavar="CUBE_ID", help="only this cube (repeatable)")
    check.add_argument("--blobs", action="store_true", help="read and hash every KV file too (slow)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_verify)
    gc = admin_sub.add_parser("gc", help="free stale KV activations, KV files nothing refers to, unfinished writes")
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="leave unreferenced files younger than this (default 3600)",
    )
    gc.add_argument("--keep-stale-kv", action="store_true", help="keep the KV built from older versions")
    gc.add_argument("--dry-run", action="store_true", help="count what would go; remove nothing")
    gc.set_defaults(func=_gc)
    kv = admin_sub.add_parser("kv", help="the stored KV activations: list them by model, drop a model's")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True)
    kv_list = kv_sub.add_parser("list", help="activations, their state and bytes, by model")
    kv_drop = kv_sub.add_parser("drop", help="delete a model's activations (or the stale ones) and free their files")
    for p in (kv_list, kv_drop):
        p.add_argument("--cube", action="append", default=[], metavar="CUBE_ID", help="only this cube (repeatable)")
        p.set_defaults(func=_kv)
    kv_drop.add_argument("--model", default=None, help="the model whose KV goes (a MEMOS_MODELS name, past or present)")
    kv_drop.add_argument("--stale", action="store_true", help="only KV built from older versions")
    kv_drop.add_argument("--dry-run", action="store_true", help="count what would go; remove nothing")
    keys = admin_sub.add_parser("keys", help="API keys of every tenant: list, issue, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_list = keys_sub.add_parser("list", help="live keys by tenant and agent (prefixes only)")
    keys_list.add_argument("--tenant", default=None, help="only this tenant (its id or name)")
    keys_list.add_argument("--revoked", action="store_true", help="revoked keys too")
    keys_issue = keys_sub.add_parser("issue", help="a new key for an agent (a tenant that lost its admin key)")
    keys_issue.add_argument("--agent", required=True, metavar="AGENT_ID", help="the agent the key stands for")
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key of any tenant at once")
    keys_revoke.add_argument("prefix", metavar="PREFIX", help="the key's prefix (as `keys list` shows)")
    for p in (keys_list, keys_issue, keys_revoke):
        p.set_defaults(func=_keys)

    dev = sub.add_parser("dev", help="tools for tests, benches and demos")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    make = dev_sub.add_parser(
        "make-model", help="write a randomly initialised causal LM with a real tokenizer (loads like a real model)"
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="directory to write config, safetensors weights, tokenizer")
    # Defaults, so that the command the no-model 409 suggests (`memos dev make-model DIR`) runs as written.
    make.add_argument("--arch", choices=["qwen2", "llama"], default="llama", help="model architecture (default llama)")
    make.add_argument(
        "--preset",
        choices=["tiny", "small", "qwen2.5-0.5b"],
        default="tiny",
        help="shape: tiny (default), small or qwen2.5-0.5b",
    )
    make.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    make.set_defaults(func=_make_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"memos: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

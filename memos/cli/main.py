"""The ``memos`` command: ``serve`` and ``admin`` tools. Calls the same services as the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from memos.settings import Settings, SettingsError

if TYPE_CHECKING:
    from memos.admin.bundle import BundleReport
    from memos.store.db import Database

T = TypeVar("T")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from memos.app import create_app
    from memos.observability import configure_logging

    settings = Settings.from_env(host=args.host, port=args.port)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from memos.store import migrations
    from memos.store.embedded import EmbeddedPostgres

    settings = Settings.from_env()
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    url = embedded.start() if embedded is not None else settings.database_url
    assert url is not None
    try:
        before = migrations.current_revision(url)
        if args.revision.startswith("-") or args.down:
            migrations.downgrade(url, args.revision)
        else:
            migrations.upgrade(url, args.revision)
        after = migrations.current_revision(url)
        print(f"schema: {before or 'empty'} -> {after or 'empty'}")
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _reembed(args: argparse.Namespace) -> int:
    import uuid

    from memos.admin.reembed import Report, misfit, pending, reembed
    from memos.embed.errors import EmbedderLoadError
    from memos.embed.registry import load_embedder
    from memos.errors import Unavailable

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
    if (why := misfit(embedder)) is not None:
        print(f"memos admin reembed: {why}", file=sys.stderr)
        return 2

    def progress(report: Report) -> None:
        total = sum(report.pending.values())
        print(f"  {report.reembedded + report.skipped} of {total}", file=sys.stderr)

    async def run() -> int:
        async with _database() as db:
            if args.dry_run:
                async with db.read() as conn:
                    counts = await pending(conn, embedder.name, cube_ids)
                for model, count in counts.items():
                    print(f"{count} memories embedded by {model}")
                print(f"{sum(counts.values())} to re-embed with {embedder.name} (dry run: nothing written)")
                return 0
            report = await reembed(db, embedder, cube_ids=cube_ids, batch=args.batch_size, progress=progress)
        print(
            f"re-embedded {report.reembedded} memories with {report.model} "
            f"({report.contexts} cached-answer contexts); skipped {report.skipped} changed meanwhile"
        )
        return 0

    try:
        return asyncio.run(run())
    except Unavailable as exc:
        # Batches already written stay written: a re-run goes on with what still needs it.
        print(f"memos admin reembed: {exc.detail}", file=sys.stderr)
        return 1


def _export(args: argparse.Namespace) -> int:
    import uuid

    from memos.admin.bundle import export_cube

    try:
        cube_id = uuid.UUID(args.cube)
    except ValueError as exc:
        print(f"memos admin export: --cube takes a cube id: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"memos admin export: {out} exists (--force replaces it)", file=sys.stderr)
        return 2

    async def run() -> BundleReport:
        async with _database() as db:
            return await export_cube(db, cube_id, out)

    report = _run_tool("export", run)
    if report is None:
        return 1
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


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[Database]:
    """The deployment's database (``MEMOS_DATABASE_URL``, or the embedded server in ``MEMOS_DATA_DIR``)."""
    from memos.store.db import Database

    db = Database(Settings.from_env())
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


def _run_tool(tool: str, run: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
    """Run an admin tool's coroutine; None, with its reason on stderr, when it fails in a way the operator can
    act on (a bad bundle or target, the database down, the schema out of date)."""
    from memos.admin.bundle import BundleError
    from memos.errors import Unavailable
    from memos.store.db import SchemaOutOfDate

    try:
        return asyncio.run(run())
    except (BundleError, Unavailable, SchemaOutOfDate) as exc:
        print(f"memos admin {tool}: {getattr(exc, 'detail', None) or exc}", file=sys.stderr)
        return None


def _print_left_out(report: BundleReport) -> None:
    activations = report.left_out.get("activations", 0)
    outside = report.left_out.get("links_outside", 0)
    if activations:
        print(f"left out: {activations} KV activations (rebuild them with POST /v1/memories/{id}/activations)")
    if outside:
        print(f"left out: {outside} links to memories outside the cube")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memos", description="memos: a memory operating system for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the REST API (embedded Postgres unless MEMOS_DATABASE_URL is set)")
    serve.add_argument("--host", default=None, help="interface to listen on (MEMOS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (MEMOS_PORT, default 8000)")
    serve.set_defaults(func=_serve)

    mcp = sub.add_parser("mcp", help="run an MCP server (remember, recall, forget, history) on one cube")
    mcp.add_argument("--url", default=None, help="the memos API (MEMOS_URL, default http://127.0.0.1:8000)")
    mcp.add_argument("--api-key", default=None, help="the agent's API key (MEMOS_API_KEY)")
    mcp.add_argument("--cube", default=None, help="the cube id every tool acts on (MEMOS_CUBE_ID)")
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="stdio (default) or http")
    mcp.add_argument("--host", default="127.0.0.1", help="interface for --transport http (default 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8765, help="port for --transport http (default 8765)")
    mcp.set_defaults(func=_mcp)

    admin = sub.add_parser("admin", help="operations: migrations, re-embedding, export and import")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    migrate = admin_sub.add_parser("migrate", help="upgrade the database schema (or --down to a revision)")
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    migrate.add_argument("--down", action="store_true", help="downgrade to the revision instead")
    migrate.set_defaults(func=_migrate)
    reembed = admin_sub.add_parser(
        "reembed", help="re-embed, with MEMOS_EMBED_MODEL, the memories another embedding model embedded"
    )
    reembed.add_argument("--cube", action="append", default=[], metavar="CUBE_ID", help="only this cube (repeatable)")
    reembed.add_argument("--batch-size", type=int, default=256, help="memories per transaction (default 256)")
    reembed.add_argument("--dry-run", action="store_true", help="count what needs it, by model; write nothing")
    reembed.set_defaults(func=_reembed)
    export = admin_sub.add_parser("export", help="write a cube, with its history, links and cache, to a bundle file")
    export.add_argument("--cube", required=True, metavar="CUBE_ID", help="the cube to export")
    export.add_argument("--out", required=True, metavar="FILE", help="the bundle to write (memos-bundle/1, a zip)")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    export.set_defaults(func=_export)
    imp = admin_sub.add_parser("import", help="write a bundle as a new cube, in one transaction")
    imp.add_argument("bundle", metavar="FILE", help="a bundle written by `memos admin export`")
    imp.add_argument("--owner", required=True, metavar="AGENT_ID", help="the agent that owns the cube (its tenant)")
    imp.add_argument("--name", default=None, help="the cube's name (default: the exported cube's)")
    imp.add_argument("--new-ids", action="store_true", help="fresh ids for the cube, memories and links (a copy)")
    imp.add_argument("--dry-run", action="store_true", help="check the bundle and the target; write nothing")
    imp.set_defaults(func=_import)

    dev = sub.add_parser("dev", help="tools for tests, benches and demos")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    make = dev_sub.add_parser(
        "make-model", help="write a randomly initialised causal LM with a real tokenizer (loads like a real model)"
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="directory to write config, safetensors weights, tokenizer")
    make.add_argument("--arch", choices=["qwen2", "llama"], required=True, help="model architecture")
    make.add_argument(
        "--preset", choices=["tiny", "small", "qwen2.5-0.5b"], required=True, help="shape: tiny, small or qwen2.5-0.5b"
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

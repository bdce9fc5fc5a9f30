"""``create_app(settings)``: the Litestar application, its lifecycle, DI and the one error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router, get, head
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, Schema, SecurityScheme
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from sqlalchemy.exc import DataError, IntegrityError

from memos import __version__
from memos.activations.controller import ActivationController, ActivationImportController
from memos.activations.models import KVWorker, ModelRegistry
from memos.activations.service import ActivationService
from memos.activations.tiers import KVTiers
from memos.blas import one_blas_thread
from memos.cubes.controller import CubeController
from memos.cubes.service import CubeService
from memos.deps import dependencies
from memos.embed.base import Embedder, misfit
from memos.embed.errors import EmbedderLoadError
from memos.embed.registry import load_embedder
from memos.embed.worker import EmbedWorker, WorkerState
from memos.errors import (
    PROBLEM_BASE,
    BadRequest,
    Conflict,
    FieldError,
    Invalid,
    MemosError,
    Problem,
    TooLarge,
    Unavailable,
)
from memos.identity.auth import require_api_key, require_operator_key
from memos.identity.controller import IdentityController
from memos.identity.keycache import KeyCache, KeyListener, probe
from memos.identity.ratelimit import RateLimiter
from memos.identity.service import IdentityService, load_operator_key
from memos.memories.controller import MemoryController
from memos.memories.service import MemoryService
from memos.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from memos.metrics import Metrics
from memos.observability import request_id_middleware, request_id_var
from memos.openapi import StrictStructSchemaPlugin, complete, errors
from memos.scheduler.controller import SchedulerController
from memos.scheduler.heat import HeatTable
from memos.scheduler.service import Scheduler
from memos.search.controller import SearchController
from memos.search.embedding import EmbeddingService
from memos.search.graphs import CubeGraphs
from memos.search.service import SearchService
from memos.semcache.controller import CacheController
from memos.semcache.index import CacheIndexes, VectorLRU
from memos.semcache.schemas import categories_schema
from memos.semcache.service import SemCacheService
from memos.settings import Settings
from memos.store.blobs import LocalBlobStore
from memos.store.db import Database
from memos.store.embedded import one_start_at_a_time
from memos.store.models import EMBEDDING_DIMS
from memos.strict_input import StrictQuery, decode_body

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class _Request(Request[Any, Any, Any]):
    """Litestar's request, with a JSON body decoded strictly into the handler's type, and the body errors its
    ``decode_json`` lets through answered as 400.

    Litestar decodes a body to plain JSON values and converts them leniently, which took ``"5"`` for 5 and ``1``
    for true; :func:`decode_body` refuses those (a 422) and hands Litestar the typed value, which it keeps as is.
    So ``json()`` returns that value (a Struct) on a route whose handler takes ``data``, plain JSON elsewhere.

    msgspec raises ``UnicodeDecodeError`` for a string that is not UTF-8 (a raw 0xff, latin-1 "café") and
    ``RecursionError`` for arrays nested past the stack. Both were 500s for a body the client got wrong."""

    async def json(self) -> Any:
        data = self.route_handler.parsed_fn_signature.parameters.get("data")
        try:
            if data is None or data.annotation is Any:
                return await super().json()
            return decode_body(await self.body(), data.annotation, self.route_handler.resolve_type_decoders())
        except UnicodeDecodeError as exc:
            raise BadRequest(
                f"the request body is not UTF-8 JSON: it holds bytes that are not UTF-8 ({exc.reason})"
            ) from None
        except RecursionError:
            raise BadRequest("the request body is nested too deeply to parse") from None


def _problem_response(error: MemosError) -> Response[bytes]:
    return Response(
        msgspec.json.encode(error.problem()),
        status_code=error.status,
        media_type=PROBLEM_JSON,
        headers=error.headers,
    )


def _on_memos_error(_: Request[Any, Any, Any], exc: MemosError) -> Response[bytes]:
    return _problem_response(exc)


_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _field_of(key: str, message: str) -> str:
    """The dotted path of the field a validation message is about (``data`` is Litestar's name for the body)."""
    path = "" if key in ("data", "body", "") else key.removeprefix("data.")
    # Query parameters whose name is reserved by Litestar (``state``) are declared as ``state_``.
    path = path.removesuffix("_")
    if match := _NAMED_FIELD.search(message):
        path = f"{path}.{match.group(1)}" if path else match.group(1)
    return path or "body"


_MISSING_PARAMETER = re.compile(r"Missing required (query|header|cookie) parameter '([^']+)'")


def _on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """Litestar's parse errors: malformed JSON is 400, a well-formed body that breaks the schema is 422."""
    messages = exc.extra if isinstance(exc.extra, list) else []
    errors = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        text = str(m.get("message", "invalid"))
        if text == "'data'":
            # An empty body never reaches the decoder: Litestar leaves ``data`` out and reports the KeyError.
            text = "a JSON body is required; the request had none"
        if "malformed" in text.lower():
            return _problem_response(BadRequest(f"the request body is not valid JSON: {text}"))
        errors.append(FieldError(field=_field_of(str(m.get("key") or ""), text), message=text))
    if not errors:
        missing = _MISSING_PARAMETER.match(str(exc.detail))
        if missing is not None:
            # A required parameter left out is a field of the request like any other: 422 naming it.
            return _problem_response(Invalid.field(missing.group(2), f"required {missing.group(1)} parameter"))
        return _problem_response(BadRequest(str(exc.detail)))
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return _problem_response(Invalid(detail, errors=errors))


_HTTP_PROBLEMS = {
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
}


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if exc.status_code == 413:
        # The limit is the route's (JSON bodies: MEMOS_MAX_BODY_BYTES, KV imports: MEMOS_MAX_KV_BYTES): say it.
        handler = request.scope.get("route_handler")
        limit = handler.resolve_request_max_body_size() if isinstance(handler, HTTPRouteHandler) else None
        within = f": at most {limit} bytes" if limit else ""
        return _problem_response(TooLarge(f"the request body is larger than this server accepts{within}"))
    if exc.status_code == 400:
        return _problem_response(BadRequest(exc.detail))
    slug, title = _HTTP_PROBLEMS.get(exc.status_code, ("http", "HTTP error"))
    problem = Problem(type=PROBLEM_BASE + slug, title=title, status=exc.status_code, detail=exc.detail)
    return Response(
        msgspec.json.encode(problem),
        status_code=exc.status_code,
        media_type=PROBLEM_JSON,
        headers=exc.headers,
    )


def _on_integrity(_: Request[Any, Any, Any], exc: IntegrityError) -> Response[bytes]:
    # Services translate the conflicts they expect; this is the net for the ones they did not.
    log.warning("unmapped integrity error", extra={"error": str(exc.orig)})
    return _problem_response(Conflict("the change conflicts with existing data"))


def _on_data_error(_: Request[Any, Any, Any], exc: DataError) -> Response[bytes]:
    if getattr(exc.orig, "sqlstate", None) == "22P05":  # untranslatable character: a database not in UTF8
        return _problem_response(Invalid("the text holds a character this database's encoding cannot store"))
    log.warning("unmapped data error", extra={"error": str(exc.orig)})
    return _problem_response(Invalid("a value is out of the range the database accepts"))


def _on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    problem = Problem(
        type=PROBLEM_BASE + "internal",
        title="Internal error",
        status=500,
        detail=f"something went wrong on our side; quote request id {request_id_var.get()} when reporting it",
    )
    return Response(msgspec.json.encode(problem), status_code=HTTP_500_INTERNAL_SERVER_ERROR, media_type=PROBLEM_JSON)


def _log_load_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the embedding model failed to load; writes and searches answer 503", exc_info=exc)


def _freeze_after_load(task: asyncio.Task[None]) -> None:
    """Once the embedding model has loaded, take every object alive (torch, transformers, the model, the app:
    about half a million) out of the garbage collector's passes, once per process.

    A full (generation 2) collection walks every tracked object and holds the GIL meanwhile: with the model
    loaded it took 276-288 ms, and a 20-client soak on the 2-core AMD box ran two of them in its first 30 s,
    each a stall of the event loop (2026-12-06). Frozen objects are never freed, so the garbage of loading is
    collected first (one such pause, at start)."""
    if gc.get_freeze_count() > 0 or task.cancelled() or task.exception() is not None:
        return  # already frozen (another app of this process), or nothing loaded
    gc.collect()
    gc.freeze()


async def _settled(task: asyncio.Task[None]) -> None:
    """Wait until ``task`` has finished, however it finished (its own callback reports a failure)."""
    await asyncio.wait({task})


@get("/healthz", summary="200 while the process runs", tags=["operations"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


# Load balancers and uptime checks often probe with HEAD: it was a 405 (found by a new user).
@head("/healthz", summary="As GET /healthz, without the body", tags=["operations"])
async def healthz_head() -> Response[None]:
    return _no_body()


@get(
    "/readyz",
    summary="200 when the database answers, its schema is current and the embedding model has not failed, else 503",
    tags=["operations"],
    responses=errors(503),
)
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    db = await _ready(request)
    worker: EmbedWorker = request.app.state.embed_worker
    return Response({"status": "ready", "schema": db.head, "embedder": str(worker.state)})


@head("/readyz", summary="As GET /readyz, without the body", tags=["operations"], responses=errors(503))
async def readyz_head(request: Request[Any, Any, Any]) -> Response[None]:
    try:
        await _ready(request)
    except Unavailable as exc:  # its status and Retry-After, not its problem body (a HEAD answer has none)
        return _no_body(exc.status, exc.headers)
    return _no_body()


def _no_body(status: int = 200, headers: dict[str, str] | None = None) -> Response[None]:
    """A HEAD answer: the status, and no body (so a length of 0, not the length of ``null``)."""
    return Response(None, status_code=status, headers={**(headers or {}), "Content-Length": "0"})


async def _ready(request: Request[Any, Any, Any]) -> Database:
    """The database, if it answers and its schema is current, and an embedding model that has not failed; else 503.

    A model still loading is ready (it takes seconds; writes wait for it). One that failed stays failed until a
    restart, and every write or search that embeds text answers 503 (all but reads, deletes and text search):
    /readyz was 200 all the same, so a load balancer kept sending such an instance its traffic (found by an
    operator)."""
    db: Database = request.app.state.db
    if not await db.ready():
        raise Unavailable("the database is not answering or its schema is not current", headers={"Retry-After": "1"})
    worker: EmbedWorker = request.app.state.embed_worker
    if worker.state is WorkerState.FAILED:
        raise Unavailable(
            "the embedding model failed to load: writes and searches that embed text cannot run (the server's log "
            "says why; fix MEMOS_EMBED_MODEL and restart)",
            headers={"Retry-After": "30"},
        )
    return db


@get(
    "/metrics",
    summary="The server's figures in the Prometheus text format (the operator key, unless MEMOS_METRICS_PUBLIC)",
    tags=["operations"],
    responses=errors(401, 403),
    media_type=METRICS_CONTENT_TYPE,
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    figures: Metrics = request.app.state.metrics
    return Response(figures.render(), media_type=METRICS_CONTENT_TYPE)


def _cors(origins: tuple[str, ...]) -> CORSConfig | None:
    """CORS for browser pages on ``origins``; none without any.

    Litestar answers a preflight (``OPTIONS`` with ``Origin``) before routing, so it needs no key: a browser
    never sends one on it. Keys are bearer tokens, not cookies, so credentials stay off.
    """
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "If-Match", "X-Request-Id"],
        expose_headers=[
            "ETag",
            "Location",
            "Retry-After",
            "X-Request-Id",
            "X-Memos-Fingerprint",
            "X-Memos-SHA256",
            "X-Memos-Activation",
            "X-Memos-Repaired",
        ],
    )


def create_app(settings: Settings | None = None, *, embedder_factory: Callable[[], Embedder] | None = None) -> Litestar:
    """Build the application; the database starts (embedded or external) when the app starts.

    The embedder loads in the embed worker's thread while the service starts serving; by default it is
    the configured model, ``embedder_factory`` replaces that (tests share one loaded model across apps).
    """
    settings = settings or Settings.from_env()
    db = Database(settings)
    model = settings.embed_model
    chosen = embedder_factory or (lambda: load_embedder(model))

    def factory() -> Embedder:
        # A model of another width loaded and every write then failed in Postgres: a 422 "out of the range the
        # database accepts" for the server's own misconfiguration (found by an operator). Now the embedder has
        # failed to load, as /readyz says, and writes and searches are 503 saying why.
        embedder = chosen()
        if (why := misfit(embedder, EMBEDDING_DIMS)) is not None:
            raise EmbedderLoadError(f"{why}: MEMOS_EMBED_MODEL must name an encoder of {EMBEDDING_DIMS} dimensions")
        return embedder

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        one_blas_thread()
        worker = EmbedWorker(factory, lanes=settings.embed_lanes)
        kv_worker = KVWorker()
        # Loading torch and the model takes seconds: serve meanwhile (writes and searches wait, bounded, or get 503).
        loading = asyncio.create_task(worker.start())
        loading.add_done_callback(_log_load_failure)
        loading.add_done_callback(_freeze_after_load)
        try:
            # One memos at a time starts a data directory's embedded server and migrates it: two at once on a
            # new one both migrated it, and one died (found in review).
            async with one_start_at_a_time(settings.data_dir) if settings.embedded else contextlib.nullcontext():
                await db.start()
            embedding = EmbeddingService(worker, settings.embed_wait_seconds)
            graphs = CubeGraphs(db, sync_seconds=settings.graph_sync_seconds)
            indexes = CacheIndexes(
                db,
                VectorLRU(embedding, settings.cache_query_lru),
                max_cubes=settings.cache_indexes,
                sync_seconds=settings.cache_sync_seconds,
            )
            app.state.db = db
            app.state.embed_worker = worker
            keys = KeyCache(settings.auth_cache_seconds)
            app.state.identity = IdentityService(db, await asyncio.to_thread(load_operator_key, settings), keys)
            if settings.auth_cache_seconds > 0:
                key_listener = KeyListener(db.conninfo, keys, functools.partial(probe, db))
                key_listener.start()
                app.state.key_listener = key_listener
            app.state.cubes = CubeService(db, graphs, listeners=[indexes])
            search = SearchService(db, embedding, graphs, settings.search_pool, settings.graph_wait_seconds)
            memory_service = MemoryService(db, embedding, graphs, listeners=[indexes])
            app.state.memories = memory_service
            app.state.search = search
            semcache = SemCacheService(db, memory_service, indexes, flush_seconds=settings.cache_flush_seconds)
            semcache.start()
            app.state.semcache = semcache
            activations = ActivationService(
                db,
                LocalBlobStore(settings.blob_root),
                ModelRegistry(settings.models, kv_worker, before_load=lambda: _settled(loading)),
                KVTiers(settings.kv_device_bytes, settings.kv_host_bytes),
                memory_service,
                search,
            )
            # A purge erases the KV derived from the text too; the blobs go once nothing else uses them.
            memory_service.release_blobs = activations.release_blobs
            app.state.activations = activations
            scheduler = Scheduler(
                db,
                activations,
                HeatTable(settings.heat_half_life_seconds),
                interval=settings.scheduler_seconds,
                build_heat=settings.build_heat,
            )
            memory_service.on_access = search.on_access = activations.on_access = scheduler.touch
            memory_service.listeners.append(scheduler)  # deleted memories leave the heat table
            app.state.cubes.listeners.append(scheduler)  # so do a deleted cube's
            scheduler.start()
            app.state.scheduler = scheduler
            app.state.rate_limiter = None
            if settings.rate_limit > 0:
                app.state.rate_limiter = RateLimiter(settings.rate_limit, settings.rate_limit_bucket)
                log.info(
                    "rate limiting each API key (per process)",
                    extra={"per_second": settings.rate_limit, "burst": settings.rate_limit_bucket},
                )
            yield
        finally:
            if (listener := getattr(app.state, "key_listener", None)) is not None:
                await listener.close()
            if (scheduler_service := getattr(app.state, "scheduler", None)) is not None:
                await scheduler_service.close()
            if (semcache_service := getattr(app.state, "semcache", None)) is not None:
                await semcache_service.close()
            if (search_service := getattr(app.state, "search", None)) is not None:
                await search_service.close()
            if (memories_service := getattr(app.state, "memories", None)) is not None:
                await memories_service.close()
            kv_worker.close()
            await worker.close()
            await db.stop()

    # KV uploads are large and binary: their own router carries their own body limit.
    kv_uploads = Router(
        path="/", route_handlers=[ActivationImportController], request_max_body_size=settings.max_kv_bytes
    )
    v1 = Router(
        path="/",
        route_handlers=[
            IdentityController,
            CubeController,
            MemoryController,
            SearchController,
            CacheController,
            ActivationController,
            SchedulerController,
            kv_uploads,
        ],
        guards=[require_api_key],
        security=[{"BearerAuth": []}],
        dependencies=dependencies(),
    )

    scraped = Router(
        path="/",
        route_handlers=[metrics],
        guards=[] if settings.metrics_public else [require_operator_key],
        security=[] if settings.metrics_public else [{"BearerAuth": []}],
    )

    # Integer and date-time query parameters written as such (Litestar's lenient reading took 1e2 for 100).
    # The app's before_request: a router or handler that sets its own replaces this one.
    strict_query = StrictQuery()
    app = Litestar(
        cors_config=_cors(settings.cors_origins),
        route_handlers=[healthz, healthz_head, readyz, readyz_head, scraped, v1],
        before_request=strict_query,
        lifespan=[lifespan],
        exception_handlers={
            MemosError: _on_memos_error,
            ValidationException: _on_validation,
            HTTPException: _on_http,
            IntegrityError: _on_integrity,
            DataError: _on_data_error,
            Exception: _on_unexpected,
        },
        request_max_body_size=settings.max_body_bytes,
        request_class=_Request,
        openapi_config=OpenAPIConfig(
            title="memos",
            version=__version__,
            description="A memory operating system for AI agents.",
            components=Components(
                security_schemes={"BearerAuth": SecurityScheme(type="http", scheme="bearer", description="API key")}
            ),
        ),
        plugins=[StrictStructSchemaPlugin()],
        # memos configures logging itself (JSON lines with request ids); Litestar must not replace it.
        logging_config=None,
        debug=False,
    )
    strict_query.learn(app)
    # Around the whole app, not per route: a request no route matches gets its id, log line and count too.
    app.asgi_handler = request_id_middleware(app.asgi_handler)
    app.state.metrics = Metrics()
    app.state.metrics.watch(app.state)
    complete(app.openapi_schema)
    config_in = app.openapi_schema.components.schemas["ConfigIn"]
    assert isinstance(config_in, Schema)
    assert config_in.properties is not None
    config_in.properties["categories"] = categories_schema()
    return app

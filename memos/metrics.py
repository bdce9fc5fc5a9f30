"""``GET /metrics``: the service's figures in the Prometheus text format.

Two kinds of figures:

- counted per request by the request-id middleware (``observe``): requests by method, route *template*
  (``/v1/memories/{memory_id}``, never an id: no tenant's data in a label, and a bounded number of
  series) and status, and their durations;
- read at scrape time from what the service holds in memory (``ServiceCollector``): the embedder, the
  database pool, the KV tiers and their hits, the scheduler's passes and moves, the graphs and cache
  indexes in memory. A scrape runs no SQL, so scraping a busy service costs it almost nothing.

Plus the process collectors of ``prometheus_client`` (CPU, memory, file descriptors, GC). Each app has
its own registry: several apps in one process (the tests) do not add into each other's figures. The
figures are this process's: with several memos processes, scrape each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# No `_created` sample beside every counter and histogram series: it doubles a scrape's size and a
# scraper learns resets from the counters themselves. (A process-wide switch of prometheus_client.)
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4"
"""The classic text format, which every scraper reads (the names here need none of 1.0.0's escaping); the
response adds ``charset=utf-8``."""
UNMATCHED = "unmatched"
"""The route label of a request no route matched (its path could be anything: never a label)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Request durations, seconds: from a cached GET (about 1 ms) to a generation or a big batch."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memos_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "memos_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method and route template.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # The GC collector has no constructor for another registry: register the default one's instance.
        self.registry.register(GC_COLLECTOR)

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        # The method is what the client sent (any token, under some HTTP parsers): a fixed set, or "other".
        verb = method if method in METHODS else "other"
        label = route or UNMATCHED
        self.requests.labels(verb, label, str(status)).inc()
        self.duration.labels(verb, label).observe(seconds)

    def watch(self, state: Any) -> None:
        """Read the service's in-memory figures from ``state`` (the app's state) at every scrape."""
        self.registry.register(ServiceCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServiceCollector(Collector):
    """Figures the services keep anyway, read when scraped. A part not started yet is left out."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        for part in (self._embedder, self._database, self._keys, self._kv, self._scheduler, self._memory_structures):
            try:
                yield from list(part())
            except Exception as exc:  # one part failing (starting, stopping) must not fail the whole scrape
                log.warning("a metrics part failed", extra={"part": part.__name__, "error": repr(exc)})

    def _embedder(self) -> Iterator[Metric]:
        worker = getattr(self.state, "embed_worker", None)
        if worker is None:
            return
        yield GaugeMetricFamily("memos_embedder_ready", "1 once the embedding model has loaded.", value=worker.ready)
        yield GaugeMetricFamily(
            "memos_embedder_queued_texts", "Texts waiting for the embed worker.", value=worker.queued_texts
        )

    def _database(self) -> Iterator[Metric]:
        db = getattr(self.state, "db", None)
        state = None if db is None else db.pool_state()
        if state is None:  # not started, or stopped
            return
        in_use, idle, limit = state
        connections = GaugeMetricFamily(
            "memos_db_pool_connections", "Connections of the database pool, by state.", labels=["state"]
        )
        connections.add_metric(["in_use"], in_use)
        connections.add_metric(["idle"], idle)
        yield connections
        yield GaugeMetricFamily(
            "memos_db_pool_max_connections", "The most connections the pool opens when busy.", value=limit
        )

    def _keys(self) -> Iterator[Metric]:
        identity = getattr(self.state, "identity", None)
        if identity is None:
            return
        keys = identity.keys
        yield GaugeMetricFamily(
            "memos_auth_cache_live", "1 while checked API keys may be reused (revocations are heard).", value=keys.live
        )
        yield GaugeMetricFamily("memos_auth_cache_keys", "API keys this process remembers.", value=keys.size)
        lookups = CounterMetricFamily(
            "memos_auth_cache_lookups", "API key checks, by whether the cache answered.", labels=["outcome"]
        )
        lookups.add_metric(["hit"], keys.stats.hits)
        lookups.add_metric(["miss"], keys.stats.misses)
        yield lookups

    def _kv(self) -> Iterator[Metric]:
        activations = getattr(self.state, "activations", None)
        if activations is None:
            return
        tiers = activations.tiers
        budget = GaugeMetricFamily("memos_kv_tier_budget_bytes", "A KV tier's byte budget.", labels=["tier"])
        used = GaugeMetricFamily("memos_kv_tier_used_bytes", "Bytes of KV held in a tier.", labels=["tier"])
        items = GaugeMetricFamily("memos_kv_tier_items", "KV chunks held in a tier.", labels=["tier"])
        for tier in tiers.stats():
            budget.add_metric([tier.name], tier.budget_bytes)
            used.add_metric([tier.name], tier.used_bytes)
            items.add_metric([tier.name], tier.items)
        yield from (budget, used, items)
        lookups, hits = tiers.counters()
        yield CounterMetricFamily(
            "memos_kv_lookups", "KV lookups by generations (each then answered by a tier).", value=lookups
        )
        answered = CounterMetricFamily(
            "memos_kv_hits", "KV lookups answered by a tier (store: read from the blob store).", labels=["tier"]
        )
        for tier, count in hits.items():
            answered.add_metric([tier], count)
        yield answered

    def _scheduler(self) -> Iterator[Metric]:
        scheduler = getattr(self.state, "scheduler", None)
        if scheduler is None:
            return
        passes = CounterMetricFamily("memos_scheduler_passes", "Scheduler passes, by outcome.", labels=["outcome"])
        passes.add_metric(["done"], scheduler.passes)
        passes.add_metric(["failed"], scheduler.failed_passes)
        yield passes
        yield CounterMetricFamily(
            "memos_scheduler_pass_seconds", "Time spent in scheduler passes.", value=scheduler.pass_seconds
        )
        moves = CounterMetricFamily(
            "memos_scheduler_moves", "What the scheduler's passes did, by kind.", labels=["kind"]
        )
        for kind, count in scheduler.moves().items():
            moves.add_metric([kind], count)
        yield moves
        yield GaugeMetricFamily(
            "memos_scheduler_queued_memories", "Hot memories waiting for a KV build.", value=scheduler.queue
        )
        yield GaugeMetricFamily("memos_heat_memories", "Memories the heat table tracks.", value=len(scheduler.heat))

    def _memory_structures(self) -> Iterator[Metric]:
        search = getattr(self.state, "search", None)
        if search is not None:
            cubes, nodes = search.graphs.sizes()
            yield GaugeMetricFamily("memos_graph_cubes", "Cube graphs held in memory.", value=cubes)
            yield GaugeMetricFamily("memos_graph_nodes", "Nodes of the cube graphs held in memory.", value=nodes)
        semcache = getattr(self.state, "semcache", None)
        if semcache is not None:
            cubes, entries = semcache.indexes.sizes()
            yield GaugeMetricFamily("memos_cache_index_cubes", "Semantic-cache cube indexes in memory.", value=cubes)
            yield GaugeMetricFamily(
                "memos_cache_index_entries", "Cached answers in the in-memory cache indexes.", value=entries
            )

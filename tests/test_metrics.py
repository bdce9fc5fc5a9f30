"""``GET /metrics``: the Prometheus text format, behind the operator key, with route templates (never ids)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import OPERATOR_KEY, Factory, bearer
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from memos.app import create_app
from memos.embed.base import Embedder
from memos.settings import Settings


def scrape(client: TestClient[Litestar], key: str | None = OPERATOR_KEY) -> dict[str, Any]:
    r = client.get("/metrics", headers=bearer(key) if key else {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    return {"text": r.text, **families}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels (0 when absent: a counter not yet incremented)."""
    family = families.get(name.removesuffix("_total").removesuffix("_count").removesuffix("_sum"))
    for sample in family.samples if family is not None else []:
        if sample.name == name and sample.labels == labels:
            return float(sample.value)
    return 0.0


def test_metrics_need_the_operator_key(client: TestClient[Litestar], factory: Factory) -> None:
    r = client.get("/metrics")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    tenant = factory.tenant()
    r = client.get("/metrics", headers=bearer(tenant.admin_key))
    assert r.status_code == 403 and "operator key" in r.json()["detail"]


def test_requests_are_counted_by_route_template_and_status(client: TestClient[Litestar], factory: Factory) -> None:
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    memory = factory.memory(tenant.admin_key, cube["id"], "Evan bought a vintage camera.")
    route = "/v1/memories/{memory_id}"
    before = scrape(client)
    labels = {"method": "GET", "route": route}
    for _ in range(2):
        assert client.get(f"/v1/memories/{memory['id']}", headers=bearer(tenant.admin_key)).status_code == 200
    r = client.get(f"/v1/memories/{cube['id']}", headers=bearer(tenant.admin_key))
    assert r.status_code == 404  # a memory id nobody can read: counted on the same route, as a 404
    after = scrape(client)
    ok = value(after, "memos_http_requests_total", **labels, status="200")
    assert ok - value(before, "memos_http_requests_total", **labels, status="200") == 2
    missing = value(after, "memos_http_requests_total", **labels, status="404")
    assert missing - value(before, "memos_http_requests_total", **labels, status="404") == 1
    timed = value(after, "memos_http_request_duration_seconds_count", **labels)
    assert timed - value(before, "memos_http_request_duration_seconds_count", **labels) == 3
    assert value(after, "memos_http_request_duration_seconds_sum", **labels) > 0
    # Labels carry templates: no id, no tenant's data.
    for secret in (memory["id"], cube["id"], tenant.id, memory["content"]):
        assert secret not in after["text"]


def test_the_services_figures_are_read_at_scrape_time(client: TestClient[Litestar], settings: Settings) -> None:
    figures = scrape(client)
    assert value(figures, "memos_embedder_ready") == 1
    assert value(figures, "memos_embedder_queued_texts") == 0
    assert value(figures, "memos_db_pool_max_connections") == 2 * settings.db_pool_size
    assert value(figures, "memos_db_pool_connections", state="in_use") >= 0
    assert value(figures, "memos_kv_tier_budget_bytes", tier="device") == settings.kv_device_bytes
    assert value(figures, "memos_kv_tier_budget_bytes", tier="host") == settings.kv_host_bytes
    assert value(figures, "memos_kv_lookups_total") >= 0 and "memos_kv_hits" in figures
    assert "memos_scheduler_passes" in figures and "memos_scheduler_queued_memories" in figures
    assert "memos_graph_cubes" in figures and "memos_cache_index_entries" in figures
    assert {"memos_auth_cache_live", "memos_auth_cache_keys", "memos_auth_cache_lookups"} <= set(figures)
    assert value(figures, "process_cpu_seconds_total") > 0  # the process collectors are there
    assert "_created" not in figures["text"]  # no creation-time sample beside every series


@pytest.fixture(scope="module")
def public(settings: Settings, embedder: Embedder) -> Iterator[TestClient[Litestar]]:
    app = create_app(dataclasses.replace(settings, metrics_public=True), embedder_factory=lambda: embedder)
    with TestClient(app) as c:
        yield c


def test_metrics_public_opens_them_to_a_scraper_without_a_key(public: TestClient[Litestar]) -> None:
    figures = scrape(public, key=None)
    assert value(figures, "memos_embedder_ready") in (0, 1)
    # Everything else still needs its key.
    assert public.get("/v1/cubes").status_code == 401


def test_a_path_no_route_matches_is_counted_without_its_path(client: TestClient[Litestar]) -> None:
    before = scrape(client)
    r = client.get("/v1/no-such-thing/3f2a9c", headers=bearer(OPERATOR_KEY))
    assert r.status_code == 404
    assert r.headers["x-request-id"]  # answered like any other request
    after = scrape(client)
    assert "no-such-thing" not in after["text"]
    labels = {"method": "GET", "route": "unmatched", "status": "404"}
    assert (
        value(after, "memos_http_requests_total", **labels) - value(before, "memos_http_requests_total", **labels) == 1
    )


def test_a_method_a_client_made_up_is_not_a_label(client: TestClient[Litestar]) -> None:
    """Some HTTP parsers pass any token as the method: it must not make a series of its own."""
    before = scrape(client)
    for method in ("BREW", "PROPFIND", "X-ANYTHING"):
        client.request(method, "/v1/cubes")
    after = scrape(client)
    assert "BREW" not in after["text"] and "PROPFIND" not in after["text"]
    labels = {"method": "other", "route": "unmatched", "status": "405"}
    grew = value(after, "memos_http_requests_total", **labels) - value(before, "memos_http_requests_total", **labels)
    assert grew == 3


def test_a_scrape_while_the_database_is_stopped_still_answers(settings: Settings, embedder: Embedder) -> None:
    app = create_app(settings, embedder_factory=lambda: embedder)
    with TestClient(app) as c:
        db = app.state.db
        c.blocking_portal.call(db.stop)
        try:
            figures = scrape(c)  # the pool's figures are left out, the rest is there
            assert "memos_db_pool_connections" not in figures and "memos_kv_tier_budget_bytes" in figures
        finally:
            c.blocking_portal.call(db.start)

"""CORS for browser pages (MEMOS_CORS_ORIGINS): preflights answered without a key, off by default."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from conftest import Factory, bearer
from litestar import Litestar
from litestar.testing import TestClient

from memos.app import create_app
from memos.embed.base import Embedder
from memos.settings import Settings, SettingsError

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "PATCH",
    "Access-Control-Request-Headers": "authorization, content-type, if-match",
}


@pytest.fixture(scope="module")
def browser(settings: Settings, embedder: Embedder) -> Iterator[TestClient[Litestar]]:
    app = create_app(dataclasses.replace(settings, cors_origins=(ORIGIN,)), embedder_factory=lambda: embedder)
    with TestClient(app) as c:
        yield c


def test_a_preflight_from_an_allowed_origin_needs_no_key(browser: TestClient[Litestar]) -> None:
    # A browser sends no Authorization on a preflight: answering it 401 would block every cross-origin call.
    r = browser.options("/v1/memories/3f2a9c1e-0000-4000-8000-000000000000", headers=PREFLIGHT)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "PATCH" in r.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "if-match"} <= allowed
    assert "access-control-allow-credentials" not in r.headers  # bearer keys, not cookies


def test_a_preflight_from_another_origin_is_refused(browser: TestClient[Litestar]) -> None:
    r = browser.options("/v1/cubes", headers={**PREFLIGHT, "Origin": "https://evil.example.com"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_responses_to_an_allowed_origin_expose_the_headers_clients_read(browser: TestClient[Litestar]) -> None:
    factory = Factory(browser)
    tenant = factory.tenant()
    cube = factory.cube(tenant.admin_key)
    r = browser.post(
        f"/v1/cubes/{cube['id']}/memories",
        json={"kind": "plaintext", "content": "Ana moved to Lisbon in May."},
        headers={**bearer(tenant.admin_key), "Origin": ORIGIN},
    )
    assert r.status_code == 201, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location", "retry-after", "x-request-id"} <= exposed
    # A key is still needed for everything but the preflight.
    assert browser.get("/v1/cubes", headers={"Origin": ORIGIN}).status_code == 401


def test_without_origins_there_are_no_cors_headers(client: TestClient[Litestar], factory: Factory) -> None:
    tenant = factory.tenant()
    r = client.get("/v1/cubes", headers={**bearer(tenant.admin_key), "Origin": ORIGIN})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    preflight = client.options("/v1/cubes", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_are_read_from_the_environment_and_checked() -> None:
    s = Settings.from_env({"MEMOS_CORS_ORIGINS": f" {ORIGIN} , HTTP://LocalHost:5173 ,"})
    assert s.cors_origins == (ORIGIN, "http://localhost:5173")  # browsers send them lowercase
    assert Settings.from_env({"MEMOS_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    # A "*" inside is a wildcard to Litestar ("https://*example.com" matched evilexample.com): refused.
    for bad in (f"{ORIGIN}/", "app.example.com", f"{ORIGIN}/path", "https://", "https://*example.com", "https://u@h"):
        with pytest.raises(SettingsError, match="MEMOS_CORS_ORIGINS"):
            Settings.from_env({"MEMOS_CORS_ORIGINS": bad})

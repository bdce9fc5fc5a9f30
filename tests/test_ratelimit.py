"""Per-API-key rate limiting: the token bucket itself, its settings, and 429s through the real API."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from memos.app import create_app
from memos.embed.base import Embedder
from memos.errors import TooManyRequests
from memos.identity.principal import OPERATOR, Principal
from memos.identity.ratelimit import RateLimiter
from memos.settings import Settings, SettingsError
from tests.conftest import OPERATOR_KEY, Factory, bearer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_grants_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(0.5)  # one token comes back every 0.5 s
    clock.now += 0.5
    assert limiter.acquire("k") == 0.0
    assert limiter.acquire("k") > 0
    # Idle long enough, the bucket is full again, and never fuller than the burst.
    clock.now += 60
    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") > 0


def test_refused_requests_do_not_drain_the_bucket_further() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.acquire("k") == 0.0
    for _ in range(100):
        assert limiter.acquire("k") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.acquire("k") == 0.0


def test_keys_have_separate_buckets_and_old_ones_are_evicted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock, max_buckets=2)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("b") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("c") == 0.0  # evicts b, the least recently used
    assert limiter.acquire("b") == 0.0  # b starts full again
    assert len(limiter._buckets) == 2


def test_check_raises_429_with_retry_after_and_spares_the_operator() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.25, burst=1, clock=clock)
    agent = Principal(role="agent", key_prefix="abc")
    limiter.check(agent)
    with pytest.raises(TooManyRequests) as err:
        limiter.check(agent)
    assert err.value.status == 429
    assert err.value.headers["Retry-After"] == "4"
    for _ in range(100):
        limiter.check(OPERATOR)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MEMOS_RATE_LIMIT": "fast"}, "MEMOS_RATE_LIMIT"),
        ({"MEMOS_RATE_LIMIT": "-1"}, "MEMOS_RATE_LIMIT"),
        ({"MEMOS_RATE_LIMIT": "nan"}, "MEMOS_RATE_LIMIT"),
        ({"MEMOS_RATE_LIMIT": "1e308"}, "MEMOS_RATE_LIMIT"),  # finite, and overflowed sizing the bucket at start
        ({"MEMOS_RATE_LIMIT": "5", "MEMOS_RATE_LIMIT_BURST": "0"}, "MEMOS_RATE_LIMIT_BURST"),
        ({"MEMOS_RATE_LIMIT_BURST": "lots"}, "MEMOS_RATE_LIMIT_BURST"),
    ],
)
def test_bad_rate_limit_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_rate_limit_settings() -> None:
    assert Settings.from_env({}).rate_limit == 0.0  # off unless configured
    s = Settings.from_env({"MEMOS_RATE_LIMIT": "2.5"})
    assert (s.rate_limit, s.rate_limit_bucket) == (2.5, 5)
    s = Settings.from_env({"MEMOS_RATE_LIMIT": "10", "MEMOS_RATE_LIMIT_BURST": "3"})
    assert (s.rate_limit, s.rate_limit_bucket) == (10.0, 3)
    assert Settings.from_env({"MEMOS_RATE_LIMIT": "0.1"}).rate_limit_bucket == 1


@pytest.fixture(scope="module")
def limited(settings: Settings, embedder: Embedder) -> Iterator[TestClient[Litestar]]:
    """The app with 1 request/s per key and bursts of 3."""
    app = create_app(
        dataclasses.replace(settings, rate_limit=1.0, rate_limit_burst=3), embedder_factory=lambda: embedder
    )
    with TestClient(app) as c:
        yield c


def test_a_key_over_its_limit_gets_429_and_recovers(
    limited: TestClient[Litestar], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limiter's clock, not real time: the requests between a 429 and its refill take real time on
    # real Postgres, and a slow runner would let a token come back before the test expects it.
    clock = FakeClock()
    monkeypatch.setattr(limited.app.state.rate_limiter, "_clock", clock)
    factory = Factory(limited)
    tenant = factory.tenant()  # the operator: never limited
    other = factory.agent(tenant)  # spends one of the admin's three tokens
    clock.now += 1.05
    me = bearer(tenant.admin_key)
    assert [limited.get("/v1/agents/me", headers=me).status_code for _ in range(3)] == [200, 200, 200]
    r = limited.get("/v1/agents/me", headers=me)
    assert r.status_code == 429
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/too-many-requests")
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["x-request-id"]

    # Another key of the same tenant has its own bucket.
    assert limited.get("/v1/agents/me", headers=bearer(other.key)).status_code == 200

    # The operator is not limited, even right after a throttled tenant.
    op = bearer(OPERATOR_KEY)
    statuses = {limited.post("/v1/tenants", json={"name": f"t-{i}"}, headers=op).status_code for i in range(8)}
    assert statuses == {201}

    # Unknown keys are 401 before any bucket is touched.
    assert limited.get("/v1/agents/me", headers=bearer("memos_000000000000_nope")).status_code == 401

    clock.now += 1.05  # one token back
    assert limited.get("/v1/agents/me", headers=me).status_code == 200
    assert limited.get("/v1/agents/me", headers=me).status_code == 429


def test_limiting_is_off_by_default(client: TestClient[Litestar], factory: Factory) -> None:
    tenant = factory.tenant()
    statuses = {client.get("/v1/agents/me", headers=bearer(tenant.admin_key)).status_code for _ in range(50)}
    assert statuses == {200}

"""Per-API-key rate limiting: one token bucket per key, in this process's memory.

A key may send ``burst`` requests at once and ``rate`` per second after that; the request
that finds the bucket empty is 429 with ``Retry-After`` (whole seconds until a token is
back). The operator is never limited: it must be able to act while tenants are throttled.

The buckets live in one process. Behind N service processes a key gets N times the rate;
put a shared limiter at the edge for a hard cap (docs/reliability.md).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from memos.errors import TooManyRequests
from memos.identity.principal import Principal

MAX_BUCKETS = 100_000
"""Buckets kept at most; the least recently used go first (a key that comes back starts full)."""


class RateLimiter:
    """Token buckets keyed by API key prefix. Not thread-safe: it lives on the event loop."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_buckets = max_buckets
        # prefix -> (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when granted, else the seconds until one is back."""
        now = self._clock()
        tokens, since = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)
        return wait

    def check(self, principal: Principal) -> None:
        """Raise 429 when the caller's key has no token left; the operator passes."""
        if principal.role == "operator" or principal.key_prefix is None:
            return
        wait = self.acquire(principal.key_prefix)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise TooManyRequests(
                f"this API key is limited to {self.rate:g} requests per second (bursts of {self.burst});"
                f" retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

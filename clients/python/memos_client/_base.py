"""What the sync and async clients share: configuration, request building, the retry rule, decoding.

The clients differ only in how they send a request and how they wait; everything that decides
*what* to send and *whether* to retry lives here, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from memos_client._errors import InvalidResponse, MemosError, Timeout, TransportError, error_for, parse_retry_after

__version__ = "0.1.0"

T = TypeVar("T")

log = logging.getLogger("memos_client")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
"""60 s to read: a write or search waits up to 30 s (server side) while the embedding model loads."""

Id = str | uuid.UUID
"""An id as a UUID string or a ``uuid.UUID``."""

RETRY_STATUSES = frozenset({429, 503})
# Not DELETE: memos writes a new version on a delete, so a repeat of one that landed answers 404
# (or 412 under If-Match) and would report a failure for a delete that happened.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT"})
# The request never left this machine: safe to send again whatever it does.
_NOT_SENT: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The connection broke; the server may have acted: only an idempotent request may be sent again.
_CONNECTION_LOST: tuple[type[httpx.TransportError], ...] = (httpx.NetworkError, httpx.RemoteProtocolError)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Retried: a 429 or 503 answer, or a lost connection, for idempotent requests (GET, PUT, and
    ``search``, a POST that only reads); for other POSTs, PATCH and DELETE only a connection that
    failed before the request was sent (connect error, connect or pool timeout). Nothing else is
    retried: not 500, not a read timeout, not a 4xx.

    The wait before retry ``n`` (0-based) is ``backoff * 2**n``, capped at ``max_backoff``, with
    jitter (a random 50 to 100 % of it). A ``Retry-After`` header is honoured: the wait is at least
    that long; when it asks for more than ``max_retry_after`` seconds, the error is raised at once
    (its ``retry_after`` says when to come back).
    """

    max_retries: int = 3
    """Retries after the first attempt; 0 disables retrying."""
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError(f"retry settings must not be negative: {self}")

    def wait(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``attempt`` (0-based), or ``None``: give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        ceiling = min(self.max_backoff, self.backoff * 2.0**attempt)
        jittered = ceiling * (0.5 + random.random() / 2)  # noqa: S311 -- jitter spreads clients out; not security
        return max(jittered, retry_after or 0.0)


def decoder(kind: type[T]) -> Callable[[bytes], T]:
    return msgspec.json.Decoder(kind).decode


def no_content(_: bytes) -> None:
    return None


_any_json = msgspec.json.Decoder()


def any_json(content: bytes) -> Any:
    """Any JSON body as Python values; ``None`` for an empty body (204)."""
    return _any_json.decode(content) if content else None


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, described: what to send and how to read the answer."""

    method: str
    path: str
    decode: Callable[[bytes], T]
    params: QueryParams | None = None
    body: Any = None
    """Encoded to JSON with msgspec; ``None``: no body."""
    content: bytes | None = None
    """Raw body bytes (``request()`` only)."""
    headers: Mapping[str, str] | None = None
    idempotent: bool | None = None
    """``None``: decided by the method. ``True`` for a POST that only reads (search)."""
    digest_header: str | None = None
    """A response header carrying the body's SHA-256 (hex): the body is checked against it."""

    @property
    def repeatable(self) -> bool:
        """Whether sending the call twice has the effect of sending it once (so a 503 or lost connection may retry)."""
        return self.idempotent if self.idempotent is not None else self.method in IDEMPOTENT_METHODS


def path(*segments: object) -> str:
    """``/v1/...`` with every segment percent-encoded, so an id can never change the route."""
    return "/v1/" + "/".join(_segment(str(s)) for s in segments)


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    # quote() leaves "." alone, and an HTTP client resolves "." and ".." segments: "grants/.." would
    # become the cube itself. Escaped, they reach the server as the ids they are (and are not found).
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def _check_digest(call: Call[Any], response: httpx.Response) -> None:
    """A body that is not the one the server hashed (cut short or altered on the way) is an error, not data."""
    assert call.digest_header is not None
    expected = response.headers.get(call.digest_header)
    actual = hashlib.sha256(response.content).hexdigest()
    if expected is None or not hmac.compare_digest(expected.strip().lower(), actual):
        raise InvalidResponse(
            f"{call.method} {call.path}: the body's SHA-256 is {actual}, {call.digest_header} says {expected}",
            status=response.status_code,
            request_id=response.headers.get("X-Request-ID"),
            headers=response.headers,
        )


def time_param(name: str, value: datetime | str) -> str:
    """A datetime for the wire (RFC 3339); a naive datetime is refused, since its zone would be a guess."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware (for example datetime.now(timezone.utc))")
        return value.isoformat()
    return value


def compact(**fields: Any) -> dict[str, Any]:
    """A JSON object of the fields that were given (``None`` means "not sent")."""
    return {k: v for k, v in fields.items() if v is not None}


QueryParams = tuple[tuple[str, str], ...]


def query(**fields: Any) -> QueryParams:
    """Query parameters: ``None`` left out, lists repeated, booleans as ``true``/``false``."""
    params: list[tuple[str, str]] = []
    for key, value in fields.items():
        values: Iterable[Any] = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is None:
                continue
            params.append((key, "true" if v is True else "false" if v is False else str(v)))
    return tuple(params)


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


class BaseClient:
    """Configuration and the request/response logic both clients share."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        timeout: float | httpx.Timeout | None,
        retries: int | RetryPolicy,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = (base_url or _env("MEMOS_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key or _env("MEMOS_API_KEY")
        if not key:
            raise ValueError("no API key: pass api_key= or set MEMOS_API_KEY")
        self._api_key = key
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry_policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_retries=retries)
        self._headers = {
            "Authorization": f"Bearer {key}",
            "User-Agent": f"memos-client/{__version__}",
            "Accept": "application/json",
            **(headers or {}),
        }

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _http_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "timeout": self.timeout, "headers": self._headers}

    @staticmethod
    def _content(call: Call[Any]) -> tuple[bytes | None, dict[str, str]]:
        headers = dict(call.headers or {})
        if call.content is not None:
            return call.content, headers
        if call.body is None:
            return None, headers
        headers["Content-Type"] = "application/json"
        return msgspec.json.encode(call.body), headers

    def _retry_wait(
        self,
        call: Call[Any],
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: httpx.RequestError | None = None,
    ) -> float | None:
        """How long to wait before sending ``call`` again after this outcome; ``None``: do not retry."""
        if response is not None:
            if response.status_code not in RETRY_STATUSES or not call.repeatable:
                return None
            wait = self.retry_policy.wait(attempt, parse_retry_after(response.headers.get("Retry-After")))
        elif isinstance(error, _NOT_SENT) or (isinstance(error, _CONNECTION_LOST) and call.repeatable):
            wait = self.retry_policy.wait(attempt)
        else:
            return None
        if wait is not None:
            outcome = response.status_code if response is not None else type(error).__name__
            log.info("retrying %s %s in %.2fs after %s", call.method, call.path, wait, outcome)
        return wait

    @staticmethod
    def _result(call: Call[T], response: httpx.Response) -> T:
        if not response.is_success:
            raise error_for(response)
        if call.digest_header is not None:
            _check_digest(call, response)
        try:
            return call.decode(response.content)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidResponse(
                f"{call.method} {call.path}: unexpected response body: {exc}",
                status=response.status_code,
                request_id=response.headers.get("X-Request-ID"),
                headers=response.headers,
            ) from exc

    @staticmethod
    def _transport_error(call: Call[Any], error: httpx.RequestError) -> MemosError:
        cls = Timeout if isinstance(error, httpx.TimeoutException) else TransportError
        return cls(f"{call.method} {call.path}: {type(error).__name__}: {error}")

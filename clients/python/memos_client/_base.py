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
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

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
# Not DELETE: a DELETE writes (a new version, an audit row, or a whole cube's tombstone), and the SDK does not
# repeat a write that may have reached the server. A repeat of a memory delete that landed would answer 204
# without If-Match, but 412 under If-Match (the delete moved the version) and 404 for a cube: a failure
# reported for a delete that happened.
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


def ident(name: str, value: object) -> str:
    """An id argument as sent: a ``str`` or a ``uuid.UUID``; anything else is a ``TypeError`` naming ``name``.

    ``str()`` of any object would send *something* (a ``Cube``'s repr, ``"None"``, ``"123"``), and the
    server would answer a misleading 404 or 422.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if value is None:
        raise TypeError(f"{name} must be an id (a UUID string or uuid.UUID), not None")
    kind = type(value).__name__
    if isinstance(getattr(value, "id", None), str):
        raise TypeError(f"{name} must be an id (a UUID string or uuid.UUID), not a {kind}: pass its .id")
    raise TypeError(f"{name} must be an id (a UUID string or uuid.UUID), not {kind}")


def seconds(name: str, value: object) -> int:
    """A number of seconds: an ``int``, or a ``timedelta`` rounded up to whole seconds."""
    if isinstance(value, timedelta):
        whole = value.days * 86400 + value.seconds
        return whole + 1 if value.microseconds else whole
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (seconds) or a timedelta, not {type(value).__name__}")
    return value


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


def _naive(value: datetime) -> bool:
    return value.tzinfo is None or value.utcoffset() is None


def _naive_error(name: str) -> ValueError:
    return ValueError(f"{name} must be timezone-aware (for example datetime.now(timezone.utc))")


def time_param(name: str, value: datetime | str) -> str:
    """A datetime for the wire (RFC 3339); a naive datetime is refused, since its zone would be a guess."""
    if isinstance(value, datetime):
        if _naive(value):
            raise _naive_error(name)
        return value.isoformat()
    return value


_LEAVES = frozenset({str, int, float, bool, type(None), bytes})
"""Types that hold no datetime: skipped without a look (a 1 MiB body of strings and numbers is walked in ms)."""


def check_times(body: Any) -> None:
    """Refuse a naive ``datetime`` anywhere in a JSON body (``metadata={"time": datetime.now()}``), naming its
    path (``items[0].metadata.time``): encoded as it is, the server would read it as UTC, a guess.

    A loop, not recursion (a deeply nested body cannot exhaust the stack); each container is walked once (a
    body that contains itself ends the walk, and msgspec then refuses it); leaves are never stacked."""
    stack: list[tuple[Any, str]] = [(body, "")]
    seen: set[int] = set()
    while stack:
        value, where = stack.pop()
        if isinstance(value, datetime):
            if _naive(value):
                raise _naive_error(where or "the body")
            continue
        # A container of leaves only (the common case: a vector, a list of tags) is passed over with one C-level
        # scan of its element types, not a Python step per element.
        if isinstance(value, Mapping):
            if set(map(type, value.values())) <= _LEAVES:
                continue
            children = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list | tuple | set | frozenset):
            if set(map(type, value)) <= _LEAVES:
                continue
            children = ((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, msgspec.Struct):
            children = ((f"{where}.{f}" if where else f, getattr(value, f)) for f in value.__struct_fields__)
        else:
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        stack.extend((child, name) for name, child in children if type(child) not in _LEAVES)


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
            if isinstance(v, datetime):
                v = time_param(key, v)
            params.append((key, "true" if v is True else "false" if v is False else str(v)))
    return tuple(params)


_HEADER_SAFE = re.compile(r"[ -~]+")
"""Printable ASCII: what a header value can carry (an operator key may hold spaces; memos's own keys hold none)."""


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def root_url(url: str) -> str:
    """The server's root: a trailing ``/`` and a trailing ``/v1`` (the API's prefix, which every call adds) dropped.

    ``http://host:8000/v1`` is the API's own address as docs and logs show it; kept, every call would go
    to ``/v1/v1/...`` and answer a bare 404.
    """
    parts = urlsplit(url.strip())
    root = parts.path.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    result = urlunsplit(parts._replace(path=root))
    try:
        httpx.URL(result)
    except httpx.InvalidURL as exc:  # an httpx exception must not escape the SDK, at construction either
        raise ValueError(f"base_url {url!r} is not a valid URL: {exc}") from exc
    return result


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
        self.base_url = root_url(base_url or _env("MEMOS_URL") or DEFAULT_BASE_URL)
        # Stripped as MEMOS_API_KEY is (a key read from a file ends in a newline), and checked before it goes in a
        # header: one with a space or a newline inside made httpx's error, and so this client's, quote the whole
        # key (found in an SDK review).
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key= is blank: pass the key, or leave it out to use MEMOS_API_KEY")
        key = (api_key or "").strip() or _env("MEMOS_API_KEY")
        if not key:
            raise ValueError("no API key: pass api_key= or set MEMOS_API_KEY")
        if not _HEADER_SAFE.fullmatch(key):
            raise ValueError("the API key holds a control or a non-ASCII character: check how it was copied")
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
        check_times(call.body)
        headers["Content-Type"] = "application/json"
        return msgspec.json.encode(call.body), headers

    @staticmethod
    def _closed(call: Call[Any]) -> MemosError:
        """What a call on a closed client raises (httpx's own ``RuntimeError`` would escape the SDK's errors)."""
        return MemosError(
            f"{call.method} {call.path}: this client is closed (close() was called, or its with block ended); "
            "create a new client"
        )

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

    def _transport_error(self, call: Call[Any], error: httpx.RequestError) -> MemosError:
        cls = Timeout if isinstance(error, httpx.TimeoutException) else TransportError
        # httpx's text may quote a header it refused: never the key.
        text = str(error).replace(self._api_key, "<the API key>")
        return cls(f"{call.method} {call.path}: {type(error).__name__}: {text}")

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        """The request for ``call``. A path httpx cannot use (a newline in it) raised httpx's InvalidURL, which the
        docs promise never escapes: it is the caller's ``ValueError``, raised before anything is sent."""
        content, headers = self._content(call)
        try:
            return http.build_request(call.method, call.path, params=call.params, content=content, headers=headers)
        except httpx.InvalidURL as exc:
            raise ValueError(f"{call.method} {call.path!r}: not a usable path: {exc}") from None

"""The exception tree: one class per problem type the server answers with, plus transport failures."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec


class FieldError(msgspec.Struct, frozen=True):
    """One invalid field of a request: a dotted path (``items[1].metadata.query``) and what is wrong with it."""

    field: str
    message: str


class MemosError(Exception):
    """Base of everything this package raises.

    ``status`` is the HTTP status (``None`` when no response came back), ``problem`` the RFC 9457 body
    as the server sent it (``{type, title, status, detail, errors?, extra?}``), ``field_errors`` its
    ``errors`` list, and ``request_id`` the server's ``X-Request-ID`` (quote it when reporting a 500).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        field_errors: list[FieldError] | None = None,
        request_id: str | None = None,
        headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.problem: dict[str, Any] = problem or {}
        self.field_errors: list[FieldError] = field_errors or []
        self.request_id = request_id
        self.headers = headers if headers is not None else httpx.Headers()

    @property
    def detail(self) -> str:
        """The problem's ``detail``: a sentence saying what went wrong."""
        detail = self.problem.get("detail")
        return detail if isinstance(detail, str) else self.message

    @property
    def extra(self) -> dict[str, Any]:
        """The problem's ``extra`` object (a stale ``If-Match`` puts ``current_version`` there)."""
        extra = self.problem.get("extra")
        return extra if isinstance(extra, dict) else {}


class BadRequest(MemosError):
    """400: the body is not JSON."""


class Unauthorized(MemosError):
    """401: no key, an unknown key or a revoked key."""


class Forbidden(MemosError):
    """403: the key's role or grant does not allow this (a read grant used to write, the operator key on /v1)."""


class NotFound(MemosError):
    """404: no such resource, or one the key may not see (memos never confirms that it exists)."""


class Conflict(MemosError):
    """409: a duplicate name or link, or a write to a deleted or purged memory."""


class PreconditionFailed(MemosError):
    """412: ``if_version`` is stale; nothing changed. ``extra["current_version"]`` holds the current one."""


class TooLarge(MemosError):
    """413: the request body is larger than the server accepts."""


class Invalid(MemosError):
    """422: the request breaks the schema; ``field_errors`` names the fields."""


class PreconditionRequired(MemosError):
    """428: a PATCH without ``If-Match`` (only reachable through ``request()``: ``update`` always sends it)."""


class RateLimited(MemosError):
    """429: too many requests; ``retry_after`` says how long the server asked to wait."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"))


class ServerError(MemosError):
    """5xx: the server failed; ``request_id`` identifies the request in its logs."""


class Unavailable(ServerError):
    """503: the database is not answering or the embedding model is loading; ``retry_after`` says when to retry."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"))


class InvalidResponse(MemosError):
    """A successful response whose body is not what this client expects (a server of another version?)."""


class TransportError(MemosError):
    """No usable response: the connection failed (after the retries the policy allows), or the answer could not
    be read (a broken compressed body, say). ``status`` is ``None``; ``__cause__`` is the httpx exception."""


class Timeout(TransportError):
    """A connect, read, write or pool timeout of the client's ``timeout`` setting."""


_BY_STATUS: dict[int, type[MemosError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: TooLarge,
    422: Invalid,
    428: PreconditionRequired,
    429: RateLimited,
    503: Unavailable,
}

_problem_decoder = msgspec.json.Decoder(dict[str, Any])
_field_errors_type = list[FieldError]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds form); ``None`` when absent or not a number.

    The HTTP-date form is not parsed: memos sends seconds, and a date is treated as absent.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_for(response: httpx.Response) -> MemosError:
    """The exception for an error response: its class from the status, its fields from the problem body."""
    status = response.status_code
    try:
        problem = _problem_decoder.decode(response.content)
    except msgspec.DecodeError:
        # Not a problem document (a proxy's HTML page, say): keep a short excerpt as the detail.
        problem = {"status": status, "title": response.reason_phrase, "detail": response.text[:500]}
    try:
        field_errors = msgspec.convert(problem.get("errors") or [], _field_errors_type)
    except msgspec.ValidationError:
        field_errors = []
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else MemosError)
    title = problem.get("title") or response.reason_phrase
    detail = problem.get("detail") or ""
    message = f"{status} {title}: {detail}" if detail else f"{status} {title}"
    return cls(
        message,
        status=status,
        problem=problem,
        field_errors=field_errors,
        request_id=response.headers.get("X-Request-ID"),
        headers=response.headers,
    )

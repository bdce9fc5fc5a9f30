"""The domain error tree, and its one mapping to RFC 9457 problem+json.

Services raise these; ``app.py`` turns every one of them (and Litestar's own
client errors) into ``application/problem+json`` in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Self

import msgspec

PROBLEM_BASE = "https://memos.dev/problems/"


class FieldError(msgspec.Struct, frozen=True):
    """One invalid field: a dotted path into the request and what is wrong with it."""

    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    extra: dict[str, Any] | None = None


class MemosError(Exception):
    """Base of every error a user can cause; carries its HTTP status."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.extra = extra
        self.headers = headers or {}

    def within(self, prefix: str) -> MemosError:
        """This error as one about the part of a request at ``prefix`` (a field holding a request of its own, as
        generate's ``search``): its fields, and the detail that names the first, put under it."""
        if self.errors:
            first = self.errors[0].field
            if self.detail.startswith(f"{first}:"):
                self.detail = f"{prefix}.{self.detail}"
            self.errors = [FieldError(f"{prefix}.{e.field}", e.message) for e in self.errors]
        return self

    def problem(self) -> Problem:
        return Problem(
            type=PROBLEM_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            errors=self.errors,
            extra=self.extra,
        )


class BadRequest(MemosError):
    status = 400
    slug = "bad-request"
    title = "Bad request"


class Unauthorized(MemosError):
    status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class Forbidden(MemosError):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFound(MemosError):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(MemosError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class PreconditionFailed(MemosError):
    status = 412
    slug = "precondition-failed"
    title = "Precondition failed"


class PreconditionRequired(MemosError):
    status = 428
    slug = "precondition-required"
    title = "Precondition required"


class TooLarge(MemosError):
    status = 413
    slug = "too-large"
    title = "Request too large"


class Invalid(MemosError):
    status = 422
    slug = "invalid"
    title = "Invalid request"

    @classmethod
    def field(cls, field: str, message: str) -> Self:
        return cls(f"{field}: {message}", errors=[FieldError(field, message)])


class BeyondDatabaseLimit(Invalid):
    """Postgres refused a value as past one of its own limits (SQLSTATE class 54, "program limit exceeded"): a
    memory whose words make a full-text vector over 1 MiB, though the body is under the size limit. It was taken for
    a lost database (an OperationalError): 503 with Retry-After, which a client retries for ever (found in review).
    Writes that know the field name it (``MemoryService``)."""


class TooManyRequests(MemosError):
    status = 429
    slug = "too-many-requests"
    title = "Too many requests"


class Unavailable(MemosError):
    status = 503
    slug = "unavailable"
    title = "Service unavailable"

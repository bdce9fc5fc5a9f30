"""Bearer-key authentication (and the per-key rate limit) for every ``/v1`` route, as a router guard.

A guard rather than a middleware: guards run inside Litestar's handler error mapping, so a 401 is
answered like every other error (problem+json, ``X-Request-ID``, the right status in the access log).
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from memos.errors import Forbidden, Unauthorized
from memos.identity.principal import Principal
from memos.identity.ratelimit import RateLimiter
from memos.identity.service import IdentityService

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="memos"'}


async def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Resolve ``Authorization: Bearer <key>`` to a ``Principal`` on the connection; anything else is 401."""
    header = connection.headers.get("authorization")
    scheme, _sep, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    identity: IdentityService = connection.app.state.identity
    principal = await identity.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)", headers=_CHALLENGE)
    limiter: RateLimiter | None = connection.app.state.rate_limiter
    if limiter is not None:
        limiter.check(principal)
    connection.state.principal = principal


async def require_operator_key(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The operator key, and nothing else (``/metrics``: figures of the whole server, not of a tenant)."""
    await require_api_key(connection, handler)
    if current_principal(connection).role != "operator":
        raise Forbidden("this needs the operator key (or MEMOS_METRICS_PUBLIC=1 for a scraper without one)")


def current_principal(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal: Principal = connection.state.principal
    return principal

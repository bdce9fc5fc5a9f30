"""Bearer-key authentication for every ``/v1`` route, and the ``principal`` dependency."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from memos.errors import Unauthorized
from memos.identity.service import IdentityService

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="memos"'}


class BearerKeyAuth(AbstractAuthenticationMiddleware):
    """Resolves ``Authorization: Bearer <key>`` to a ``Principal``; anything else is 401."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        if not header:
            raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
        identity: IdentityService = connection.app.state.identity
        principal = await identity.authenticate(token.strip())
        if principal is None:
            raise Unauthorized("the API key is not valid (unknown or revoked)", headers=_CHALLENGE)
        return AuthenticationResult(user=principal, auth=principal.key_prefix)

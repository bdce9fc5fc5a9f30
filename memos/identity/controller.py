"""HTTP endpoints for tenants, agents and API keys."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.params import FromPath, JSONBody

from memos.deps import CurrentPrincipal, Identity
from memos.errors import Forbidden
from memos.http import Cursor, Limit, parse_id
from memos.identity import schemas
from memos.openapi import errors
from memos.pagination import DEFAULT_LIMIT, Page


class IdentityController(Controller):
    path = "/v1"
    tags = ["identity"]

    @post("/tenants", summary="Create a tenant (operator key only); returns its admin key once", responses=errors(409))
    async def create_tenant(
        self, data: JSONBody[schemas.TenantIn], principal: CurrentPrincipal, identity: Identity
    ) -> schemas.TenantCreated:
        if principal.role != "operator":
            raise Forbidden("only the operator key creates tenants")
        return await identity.create_tenant(principal, data)

    @post(
        "/agents",
        summary="Create an agent or admin of the caller's tenant; returns its key once",
        responses=errors(409),
    )
    async def create_agent(
        self, data: JSONBody[schemas.AgentIn], principal: CurrentPrincipal, identity: Identity
    ) -> schemas.AgentCreated:
        return await identity.create_agent(principal, data)

    @get("/agents", summary="List the agents of the caller's tenant (tenant admin), oldest first")
    async def list_agents(
        self, principal: CurrentPrincipal, identity: Identity, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
    ) -> Page[schemas.Agent]:
        return await identity.list_agents(principal, limit, cursor)

    @get("/agents/me", summary="Who the caller's key belongs to")
    async def me(self, principal: CurrentPrincipal, identity: Identity) -> schemas.Me:
        return await identity.me(principal)

    @post("/agents/{agent_id:str}/keys", summary="Issue a new key for an agent (tenant admin)")
    async def rotate_key(
        self, agent_id: FromPath[str], principal: CurrentPrincipal, identity: Identity
    ) -> schemas.KeyCreated:
        return await identity.rotate_key(principal, parse_id(agent_id, "agent"))

    @get(
        "/agents/{agent_id:str}/keys",
        summary="List an agent's keys by prefix, revoked ones included (tenant admin, or the agent itself)",
    )
    async def list_keys(
        self,
        agent_id: FromPath[str],
        principal: CurrentPrincipal,
        identity: Identity,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[schemas.ApiKey]:
        return await identity.list_keys(principal, parse_id(agent_id, "agent"), limit, cursor)

    @delete("/keys/{prefix:str}", summary="Revoke a key by its prefix")
    async def revoke_key(self, prefix: FromPath[str], principal: CurrentPrincipal, identity: Identity) -> None:
        await identity.revoke_key(principal, prefix)

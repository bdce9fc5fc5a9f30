"""HTTP endpoints for memories, their versions, provenance and links."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from litestar import Controller, Response, delete, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from memos.deps import CurrentPrincipal, Memories
from memos.errors import PreconditionRequired
from memos.http import Cursor, IfMatch, Limit, RequiredIfMatch, memory_response, parse_id, parse_if_match
from memos.memories import schemas
from memos.memories.service import ListFilters
from memos.openapi import ETAG, LOCATION, errors
from memos.pagination import DEFAULT_LIMIT, Page

KindFilter = Literal["plaintext", "response", "activation"]
StateFilter = Literal["active", "archived", "deleted"]


class MemoryController(Controller):
    path = "/v1"
    tags = ["memories"]

    @post(
        "/cubes/{cube_id:str}/memories",
        summary="Add a memory to a cube (version 1)",
        response_headers=[ETAG, LOCATION],
    )
    async def create_memory(
        self,
        cube_id: FromPath[str],
        data: JSONBody[schemas.MemoryIn],
        principal: CurrentPrincipal,
        memories: Memories,
    ) -> Response[schemas.Memory]:
        memory = await memories.create(principal, parse_id(cube_id, "cube"), data)
        return memory_response(memory, 201)

    @post("/cubes/{cube_id:str}/memories/batch", summary="Add up to 1000 memories at once (all or nothing)")
    async def create_batch(
        self,
        cube_id: FromPath[str],
        data: JSONBody[schemas.BatchIn],
        principal: CurrentPrincipal,
        memories: Memories,
    ) -> schemas.MemoryList:
        return schemas.MemoryList(items=await memories.create_batch(principal, parse_id(cube_id, "cube"), data))

    @get("/cubes/{cube_id:str}/memories", summary="List a cube's memories, oldest first")
    async def list_memories(
        self,
        cube_id: FromPath[str],
        principal: CurrentPrincipal,
        memories: Memories,
        kind: FromQuery[KindFilter | None] = None,
        tag: Annotated[list[str] | None, QueryParameter(description="Repeat to require several tags")] = None,
        state_: Annotated[StateFilter, QueryParameter(name="state")] = "active",
        since: Annotated[datetime | None, QueryParameter(description="Created at or after (RFC 3339)")] = None,
        until: Annotated[datetime | None, QueryParameter(description="Created before (RFC 3339)")] = None,
        include_expired: FromQuery[bool] = False,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[schemas.Memory]:
        filters = ListFilters(
            kind=kind, tags=tag or (), state=state_, since=since, until=until, include_expired=include_expired
        )
        return await memories.list(principal, parse_id(cube_id, "cube"), filters, limit, cursor)

    @get("/memories/{memory_id:str}", summary="Read a memory's current version", response_headers=[ETAG])
    async def get_memory(
        self,
        memory_id: FromPath[str],
        principal: CurrentPrincipal,
        memories: Memories,
        include_expired: FromQuery[bool] = False,
    ) -> Response[schemas.Memory]:
        return memory_response(await memories.get(principal, parse_id(memory_id, "memory"), include_expired))

    @patch(
        "/memories/{memory_id:str}",
        summary="Change a memory: a new version (If-Match required)",
        response_headers=[ETAG],
        responses=errors(409, 412, 428),
    )
    async def update_memory(
        self,
        memory_id: FromPath[str],
        data: JSONBody[schemas.MemoryPatch],
        principal: CurrentPrincipal,
        memories: Memories,
        if_match: RequiredIfMatch = None,
    ) -> Response[schemas.Memory]:
        if if_match is None:
            raise PreconditionRequired('send If-Match with the ETag of the version you read, e.g. If-Match: "3"')
        memory = await memories.update(principal, parse_id(memory_id, "memory"), data, parse_if_match(if_match))
        return memory_response(memory)

    @delete(
        "/memories/{memory_id:str}",
        summary="Soft-delete a memory; ?purge=true (tenant admin) erases it",
        responses=errors(412),
    )
    async def delete_memory(
        self,
        memory_id: FromPath[str],
        principal: CurrentPrincipal,
        memories: Memories,
        purge: FromQuery[bool] = False,
        if_match: IfMatch = None,
    ) -> None:
        await memories.delete(principal, parse_id(memory_id, "memory"), parse_if_match(if_match), purge)

    @get("/memories/{memory_id:str}/versions", summary="A memory's versions, oldest first")
    async def versions(
        self,
        memory_id: FromPath[str],
        principal: CurrentPrincipal,
        memories: Memories,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
        include_expired: FromQuery[bool] = False,
    ) -> Page[schemas.Version]:
        return await memories.versions(principal, parse_id(memory_id, "memory"), limit, cursor, include_expired)

    @get("/memories/{memory_id:str}/versions/{n:int}", summary="One version of a memory")
    async def version(
        self,
        memory_id: FromPath[str],
        n: FromPath[int],
        principal: CurrentPrincipal,
        memories: Memories,
        include_expired: FromQuery[bool] = False,
    ) -> schemas.Version:
        return await memories.version(principal, parse_id(memory_id, "memory"), n, include_expired)

    @post(
        "/memories/{memory_id:str}/restore",
        status_code=200,
        summary="A new version equal to an old one",
        response_headers=[ETAG],
        responses=errors(409, 412),
    )
    async def restore(
        self,
        memory_id: FromPath[str],
        data: JSONBody[schemas.RestoreIn],
        principal: CurrentPrincipal,
        memories: Memories,
        if_match: IfMatch = None,
    ) -> Response[schemas.Memory]:
        memory = await memories.restore(
            principal, parse_id(memory_id, "memory"), data.version, parse_if_match(if_match)
        )
        return memory_response(memory)

    @get("/memories/{memory_id:str}/provenance", summary="Ancestors and descendants by derivation")
    async def provenance(
        self,
        memory_id: FromPath[str],
        principal: CurrentPrincipal,
        memories: Memories,
        include_expired: FromQuery[bool] = False,
    ) -> schemas.ProvenanceGraph:
        return await memories.provenance(principal, parse_id(memory_id, "memory"), include_expired)

    @post(
        "/memories/{memory_id:str}/links",
        summary="Link a memory to another (typed, weighted edge)",
        responses=errors(409),
    )
    async def link(
        self,
        memory_id: FromPath[str],
        data: JSONBody[schemas.LinkIn],
        principal: CurrentPrincipal,
        memories: Memories,
    ) -> schemas.Link:
        return await memories.link(principal, parse_id(memory_id, "memory"), data)

"""HTTP endpoints of the semantic cache (API.md "Semantic cache")."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, post, put
from litestar.params import JSONBody, QueryParameter

from memos.deps import CurrentPrincipal, SemCache
from memos.http import memory_response, parse_id
from memos.memories import schemas as memory_schemas
from memos.openapi import ETAG, LOCATION, errors
from memos.semcache import schemas

CubeId = Annotated[str, QueryParameter(description="The cube's id")]
# An int defaulting to 0 ("any age"), not an optional one: Litestar documents no lower bound of 0 on an optional.
OlderThan = Annotated[
    int,
    QueryParameter(
        ge=0, le=10 * 365 * 24 * 3600, description="Only entries stored at least this many seconds ago (0: any age)"
    ),
]


class CacheController(Controller):
    path = "/v1/cache"
    tags = ["cache"]

    @post(
        "/lookup",
        status_code=200,
        responses=errors(404),
        summary="Serve a cached answer for a query, or miss; says why",
    )
    async def lookup(
        self, data: JSONBody[schemas.LookupIn], principal: CurrentPrincipal, semcache: SemCache
    ) -> schemas.LookupOut:
        return await semcache.lookup(principal, data)

    @post(
        "/",
        responses=errors(404),
        response_headers=[ETAG, LOCATION],
        summary="Cache an answer: a response memory (version 1)",
    )
    async def store(
        self, data: JSONBody[schemas.StoreIn], principal: CurrentPrincipal, semcache: SemCache
    ) -> Response[memory_schemas.Memory]:
        memory = await semcache.store(principal, data)
        return memory_response(memory, 201)

    @post(
        "/feedback",
        status_code=204,
        responses=errors(404, 409),
        summary="Report a served answer as right or wrong (adapts thresholds)",
    )
    async def feedback(
        self, data: JSONBody[schemas.FeedbackIn], principal: CurrentPrincipal, semcache: SemCache
    ) -> None:
        await semcache.feedback(principal, data)

    @delete(
        "/",
        status_code=200,
        responses=errors(404),
        summary="Invalidate a cube's cached answers (all, one category, or by age)",
    )
    async def invalidate(
        self,
        cube_id: CubeId,
        principal: CurrentPrincipal,
        semcache: SemCache,
        category: Annotated[str | None, QueryParameter(min_length=1, max_length=64)] = None,
        older_than: OlderThan = 0,
    ) -> schemas.Invalidated:
        count = await semcache.invalidate(principal, parse_id(cube_id, "cube"), category, older_than or None)
        return schemas.Invalidated(invalidated=count)

    @get(
        "/stats",
        responses=errors(404),
        summary="Per category: entries, hits, misses, reported false hits, threshold, TTL",
    )
    async def stats(self, cube_id: CubeId, principal: CurrentPrincipal, semcache: SemCache) -> schemas.StatsOut:
        return await semcache.stats(principal, parse_id(cube_id, "cube"))

    @get(
        "/config", responses=errors(404), summary="A cube's cache categories: thresholds, TTLs, context policy, quotas"
    )
    async def get_config(self, cube_id: CubeId, principal: CurrentPrincipal, semcache: SemCache) -> schemas.ConfigOut:
        return await semcache.get_config(principal, parse_id(cube_id, "cube"))

    @put("/config", responses=errors(404), summary="Replace a cube's cache categories (owner or tenant admin)")
    async def put_config(
        self, data: JSONBody[schemas.ConfigIn], principal: CurrentPrincipal, semcache: SemCache
    ) -> schemas.ConfigOut:
        return await semcache.put_config(principal, data)

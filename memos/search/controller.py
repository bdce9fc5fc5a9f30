"""HTTP endpoint for search."""

from __future__ import annotations

from litestar import Controller, post
from litestar.params import JSONBody

from memos.deps import CurrentPrincipal, Search
from memos.openapi import errors
from memos.search import schemas


class SearchController(Controller):
    path = "/v1/search"
    tags = ["search"]

    @post(
        "/",
        status_code=200,
        summary="Find memories: vector, text, hybrid (default) or graph-augmented",
        responses=errors(404),  # a cube_ids entry the caller cannot read
    )
    async def search(
        self, data: JSONBody[schemas.SearchRequest], principal: CurrentPrincipal, search_service: Search
    ) -> schemas.SearchResponse:
        return await search_service.search(principal, data)

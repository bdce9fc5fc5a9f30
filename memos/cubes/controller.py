"""HTTP endpoints for MemCubes and their grants."""

from __future__ import annotations

from litestar import Controller, Response, delete, get, patch, post, put
from litestar.params import FromPath, JSONBody

from memos.cubes import schemas
from memos.deps import Cubes, CurrentPrincipal
from memos.http import Cursor, Limit, created, parse_id
from memos.openapi import LOCATION, errors
from memos.pagination import DEFAULT_LIMIT, Page


class CubeController(Controller):
    path = "/v1/cubes"
    tags = ["cubes"]

    @post("/", summary="Create a cube owned by the caller", responses=errors(409), response_headers=[LOCATION])
    async def create_cube(
        self, data: JSONBody[schemas.CubeIn], principal: CurrentPrincipal, cubes: Cubes
    ) -> Response[schemas.Cube]:
        cube = await cubes.create(principal, data)
        return created(cube, f"/v1/cubes/{cube.id}")

    @get("/", summary="Cubes the caller owns or is granted (all of the tenant's for an admin)")
    async def list_cubes(
        self,
        principal: CurrentPrincipal,
        cubes: Cubes,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[schemas.Cube]:
        return await cubes.list(principal, limit, cursor)

    @get("/{cube_id:str}", summary="Read a cube")
    async def get_cube(self, cube_id: FromPath[str], principal: CurrentPrincipal, cubes: Cubes) -> schemas.Cube:
        return await cubes.get(principal, parse_id(cube_id, "cube"))

    @patch("/{cube_id:str}", summary="Rename or describe a cube (owner or tenant admin)", responses=errors(409))
    async def update_cube(
        self,
        cube_id: FromPath[str],
        data: JSONBody[schemas.CubePatch],
        principal: CurrentPrincipal,
        cubes: Cubes,
    ) -> schemas.Cube:
        return await cubes.update(principal, parse_id(cube_id, "cube"), data)

    @delete("/{cube_id:str}", summary="Tombstone a cube and its memories (owner or tenant admin)")
    async def delete_cube(self, cube_id: FromPath[str], principal: CurrentPrincipal, cubes: Cubes) -> None:
        await cubes.delete(principal, parse_id(cube_id, "cube"))

    @put("/{cube_id:str}/grants/{agent_id:str}", summary="Share a cube with an agent of the tenant")
    async def grant(
        self,
        cube_id: FromPath[str],
        agent_id: FromPath[str],
        data: JSONBody[schemas.GrantIn],
        principal: CurrentPrincipal,
        cubes: Cubes,
    ) -> schemas.Grant:
        return await cubes.grant(principal, parse_id(cube_id, "cube"), parse_id(agent_id, "agent"), data)

    @delete("/{cube_id:str}/grants/{agent_id:str}", summary="Stop sharing a cube with an agent")
    async def revoke(
        self, cube_id: FromPath[str], agent_id: FromPath[str], principal: CurrentPrincipal, cubes: Cubes
    ) -> None:
        await cubes.revoke(principal, parse_id(cube_id, "cube"), parse_id(agent_id, "agent"))

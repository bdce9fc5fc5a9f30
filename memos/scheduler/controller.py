"""HTTP endpoints of the scheduler: its state, and pinning a memory's KV to a tier."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.params import JSONBody

from memos.deps import CurrentPrincipal, SchedulerDep
from memos.openapi import errors
from memos.scheduler import schemas


class SchedulerController(Controller):
    path = "/v1/scheduler"
    tags = ["scheduler"]

    @get("", summary="KV tiers (budget, use, hit rate), the build queue, and the hottest memories the caller can read")
    async def state(self, principal: CurrentPrincipal, scheduler: SchedulerDep) -> schemas.SchedulerState:
        return await scheduler.state(principal)

    @post(
        "/pin",
        status_code=200,
        summary="Keep a memory's KV for a model in a tier (building it if needed); tier store lifts the pin",
        responses=errors(404, 409),  # 404: a memory_id the caller cannot read
    )
    async def pin(
        self, data: JSONBody[schemas.PinIn], principal: CurrentPrincipal, scheduler: SchedulerDep
    ) -> schemas.Pin:
        return await scheduler.pin(principal, data)

"""The scheduler: heat per memory, and the KV tiers kept in step with it.

Every read that uses a memory warms it (``HeatTable``): a read by id or a place in a generation's prompt
counts 1, a search result 1 / (rank + 1). A background task (``run``, every ``MEMOS_SCHEDULER_SECONDS``)
then, for each causal LM the service has loaded:

1. pins: the activations pinned to a tier (``POST /v1/scheduler/pin``, kept in ``activations.tier``) are
   held there, reloaded from the store after a restart;
2. promotion: the hottest memories' fresh activations, hottest first, are loaded (store -> host) and moved
   to the device tier while they fit its budget; chunks there that are no longer among them go down to
   host (demotion), where the least recently used leave memory first when it is full;
3. building (only with ``MEMOS_BUILD_HEAT`` > 0): a hot plaintext memory with no fresh activation gets one
   built, on behalf of its cube's owner, a few per pass (the ``queue`` counts those still waiting).

and writes heat to ``memory_heat`` where it moved (what ``GET /v1/memories/{id}`` shows). Everything here
runs off the request path; requests only read the tiers. KV is keyed by its bytes, so all agents that share
a cube share the chunks the scheduler keeps: one agent's use warms the KV the next one reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.activations.schemas import BuildIn
from memos.activations.service import ActivationService
from memos.activations.tiers import KVTiers
from memos.cubes.access import readable_cube_ids
from memos.errors import Conflict, MemosError
from memos.identity.principal import Principal
from memos.scheduler import schemas
from memos.scheduler.heat import HeatTable
from memos.store.db import Database
from memos.store.models import HEAT_SQL, activations, cubes, memories

if TYPE_CHECKING:
    from memos.kv.runtime import LoadedModel

log = logging.getLogger(__name__)

HOT = 256
"""Memories the scheduler looks at per pass, hottest first."""
SHOWN = 20
"""Hot memories ``GET /v1/scheduler`` lists (of those the caller can read)."""
BUILDS_PER_PASS = 2
HEAT_EVERY = 30.0
"""Seconds between writes of heat to the database (every pass moves KV; heat rows are written less often:
under a stream of searches, writing every two seconds cost graph search about 10 % at the median on the
2-core box, the Postgres work of the row updates beside the queries)."""
STORE_SECONDS = 30.0
"""How long ``GET /v1/scheduler`` reuses the blob store's totals."""
WRITE_BATCH = 1000
"""Heat rows written per pass at most (the rest wait for the next)."""
WRITE_FROM = 0.75
"""Heat from which a memory's heat is first written to the database: about one read by id or one first search
result (a little decayed), not the tail of one wide search."""
PIN_SHARE = 0.5
"""Pinned KV may take at most this share of a tier's budget: the rest stays for what is hot now."""

_WRITE_HEAT = text(
    """
    INSERT INTO memory_heat (memory_id, heat)
    SELECT u.id, u.heat
    FROM unnest(CAST(:ids AS uuid[]), CAST(:heats AS float8[])) AS u(id, heat)
    JOIN memories m ON m.id = u.id
    ORDER BY u.id
    FOR KEY SHARE OF m
    ON CONFLICT (memory_id) DO UPDATE SET heat = EXCLUDED.heat
    WHERE memory_heat.heat IS DISTINCT FROM EXCLUDED.heat
    """
)
"""Heat into its narrow table (migration 0008; cold ones as 0, so an older ``memories.heat`` never shows again).
The join skips a memory deleted since it was read. Its rows are locked (key share, in id order) first: a memory
whose deletion is in flight is then skipped once it commits, instead of failing the whole write on the foreign
key (found in review: the join's snapshot still saw the row)."""

# A constant fragment (HEAT_SQL) only; the limit is a bound parameter.
_SEED_SQL = f"""
    SELECT id, heat, tenant_id FROM (
        SELECT m.id, {HEAT_SQL} AS heat, m.tenant_id FROM memories m WHERE m.state <> 'deleted'
    ) AS known
    WHERE heat > 0 ORDER BY heat DESC LIMIT :n
    """  # noqa: S608
_SEED = text(_SEED_SQL)


@dataclasses.dataclass(slots=True)
class PassReport:
    """What one pass did (tests and the log)."""

    heat_written: int = 0
    pinned: int = 0
    promoted: int = 0
    demoted: int = 0
    built: int = 0
    queued: int = 0


class Scheduler:
    def __init__(
        self,
        db: Database,
        kv: ActivationService,
        heat: HeatTable,
        *,
        interval: float,
        build_heat: float = 0.0,
    ) -> None:
        self.db = db
        self.kv = kv
        self.heat = heat
        self.interval = interval
        self.build_heat = build_heat
        self.queue = 0
        self.passes = 0
        self.failed_passes = 0
        self.pass_seconds = 0.0
        self._totals = PassReport()
        """What every pass so far did, summed (``/metrics``)."""
        self._task: asyncio.Task[None] | None = None
        self._pass_lock = asyncio.Lock()
        """Held by a pass and by a pin: a pin never lands between a pass's reading of the pins and its sweep."""
        self._seeded = False
        self.heat_every = HEAT_EVERY
        self._heat_written_at = -math.inf
        self._store: tuple[float, tuple[int, int]] | None = None
        """When the blob store's (files, bytes) were last counted, and what they were."""

    @property
    def tiers(self) -> KVTiers:
        return self.kv.tiers

    def touch(self, tenant: uuid.UUID | None, accesses: list[tuple[uuid.UUID, float]]) -> None:
        self.heat.touch(accesses, tenant=tenant)

    # -- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="memos-scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # What moved since the last pass still reaches the database (a failure is logged, not raised: closing).
        try:
            await self.write_heat()
        except Exception as exc:
            log.warning("writing heat at shutdown failed", extra={"error": repr(exc)})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next pass tries again; requests never depend on it
                self.failed_passes += 1
                log.warning("scheduler pass failed", extra={"error": repr(exc)})

    async def run_pass(self) -> PassReport:
        """One pass: heat to the database, then pins, promotion and builds over every loaded model's KV."""
        async with self._pass_lock:
            started = time.perf_counter()
            if not self._seeded:
                await self._seed()
            report = PassReport()
            if time.monotonic() - self._heat_written_at >= self.heat_every:
                try:
                    report.heat_written = await self.write_heat()
                    self._heat_written_at = time.monotonic()
                except MemosError as exc:  # the database is down: the KV in memory can still be arranged
                    log.warning("writing heat failed; retried next pass", extra={"error": exc.detail})
                except DBAPIError as exc:  # any other refusal: the same, the KV work of this pass still runs
                    log.warning("writing heat failed; retried next pass", extra={"error": type(exc.orig).__name__})
            # Scans of the whole table (up to 100k memories): off the event loop.
            await asyncio.to_thread(self.heat.shrink)
            loaded = [lm for name in sorted(self.kv.models.specs) if (lm := self.kv.models.loaded(name)) is not None]
            if loaded:
                hot = await asyncio.to_thread(self.heat.hottest, HOT)
                pinned = await self._pins(loaded, report)
                fresh = {lm.name: await self.kv.fresh_for_memories([m for m, _ in hot], lm) for lm in loaded}
                await self._promote(loaded, hot, fresh, pinned, report)
                if self.build_heat > 0:
                    for lm in loaded:
                        candidates = [m for m, h in hot if h >= self.build_heat and m not in fresh[lm.name]]
                        await self._build(lm, candidates, report)
            self.queue = report.queued
            self.passes += 1
            self.pass_seconds += time.perf_counter() - started
            for move in dataclasses.fields(report):
                setattr(self._totals, move.name, getattr(self._totals, move.name) + getattr(report, move.name))
            return report

    def moves(self) -> dict[str, int]:
        """What the passes so far did, summed: heat rows written, pins held, promotions, demotions, builds."""
        totals = dataclasses.asdict(self._totals)
        del totals["queued"]  # a level (``queue``), not a count of moves
        return totals

    async def write_heat(self) -> int:
        """Write what ``HeatTable.changes`` says to ``memory_heat`` (at most ``WRITE_BATCH`` rows a pass, in id
        order); they count as written only once committed, so a failed write is tried again next pass."""
        changes = await asyncio.to_thread(self.heat.changes, None, WRITE_FROM, WRITE_BATCH)
        if not changes:
            return 0
        async with self.db.transaction() as conn:
            await conn.execute(_WRITE_HEAT, {"ids": list(changes), "heats": list(changes.values())})
        self.heat.written(changes)
        return len(changes)

    async def _seed(self) -> None:
        """After a start, the heat the database holds (the hottest memories) seeds the table, so the hot set
        survives a restart and those rows are written again as they cool."""
        async with self.db.read() as conn:
            rows = (await conn.execute(_SEED, {"n": self.heat.max_entries // 2})).all()
        self.heat.seed((r.id, float(r.heat), r.tenant_id) for r in rows)
        self._seeded = True

    async def _store_totals(self) -> tuple[int, int]:
        """(files, bytes) in the blob store, each stored file once however many activations share it: a scan of
        ``activations``, so counted at most every ``STORE_SECONDS`` (for ``GET /v1/scheduler``), never per pass."""
        if self._store is not None and time.monotonic() - self._store[0] < STORE_SECONDS:
            return self._store[1]
        blobs = (
            select(activations.c.sha256, func.max(activations.c.bytes).label("bytes"))
            .group_by(activations.c.sha256)
            .subquery()
        )
        async with self.db.read() as conn:
            items, size = (await conn.execute(select(func.count(), func.coalesce(func.sum(blobs.c.bytes), 0)))).one()
        self._store = (time.monotonic(), (int(items), int(size)))
        return self._store[1]

    # -- a listener of memory writes (deleted memories leave the heat table) ------------------------

    def memories_written(self, cube_id: uuid.UUID, rows: Any) -> None:
        return None

    def memories_removed(self, cube_id: uuid.UUID, ids: Any) -> None:
        self.heat.forget(ids)

    async def _pins(self, loaded: list[LoadedModel], report: PassReport) -> set[str]:
        """Hold every pinned activation in its tier; lift the pins no activation asks for any more (unpinned,
        or gone stale). The pinned keys."""
        pinned: set[str] = set()
        for lm in loaded:
            for row in await self.kv.pinned(lm):
                if await self.kv.hold(lm, row.sha256, row.tier) and self.tiers.move(row.sha256, row.tier, pinned=True):
                    pinned.add(row.sha256)
                    report.pinned += 1
        for tier in ("device", "host"):
            for key in self.tiers.keys(tier):
                if key not in pinned:
                    self.tiers.unpin(key)
        return pinned

    async def _promote(
        self,
        loaded: list[LoadedModel],
        hot: list[tuple[uuid.UUID, float]],
        fresh: dict[str, dict[uuid.UUID, Row[Any]]],
        pinned: set[str],
        report: PassReport,
    ) -> None:
        """The device tier gets the hottest memories' KV (any loaded model) that fits beside the pins."""
        room = self.tiers.budgets["device"] - self.tiers.pinned_bytes("device")
        wanted: dict[str, tuple[LoadedModel, Row[Any]]] = {}
        for memory_id, _ in hot:
            for lm in loaded:
                row = fresh[lm.name].get(memory_id)
                if row is None or row.sha256 in wanted or row.sha256 in pinned:
                    continue
                if _chunk_bytes(lm, row.tokens) > room:
                    continue  # too big for what is left; a smaller, cooler one may still fit
                wanted[row.sha256] = (lm, row)
                room -= _chunk_bytes(lm, row.tokens)
        # Down first, so the hot chunks find their room.
        for key in self.tiers.keys("device"):
            if key not in wanted and key not in pinned and self.tiers.move(key, "host"):
                report.demoted += 1
        for key, (lm, row) in wanted.items():
            if self.tiers.tier_of(key) == "device":
                continue
            if await self.kv.hold(lm, row.sha256, "device") and self.tiers.move(key, "device"):
                report.promoted += 1

    async def _build(self, lm: LoadedModel, candidates: list[uuid.UUID], report: PassReport) -> None:
        if not candidates:
            return
        async with self.db.read() as conn:
            owners = await _buildable(conn, candidates)
        for memory_id in candidates:
            owner = owners.get(memory_id)
            if owner is None:
                continue
            if report.built >= BUILDS_PER_PASS:
                report.queued += 1
                continue
            tenant_id, agent_id = owner
            principal = Principal(role="admin", tenant_id=tenant_id, agent_id=agent_id)
            try:
                await self.kv.build(principal, memory_id, BuildIn(model=lm.name))
            except MemosError as exc:  # changed or deleted meanwhile, store full...: not this pass's problem
                log.info("scheduler build skipped", extra={"memory_id": str(memory_id), "error": exc.detail})
                continue
            report.built += 1

    # -- the API -------------------------------------------------------------------------------

    async def state(self, principal: Principal) -> schemas.SchedulerState:
        tenant_id, _ = principal.tenant_member()
        # The caller's tenant's hottest only: filtered after a server-wide top, another tenant's reads could push
        # every one of them out of it and empty this list (found in review).
        hot = await asyncio.to_thread(self.heat.hottest, HOT, tenant=tenant_id)
        async with self.db.read() as conn:
            readable = await _readable(conn, principal, [m for m, _ in hot])
            shown = [(m, h) for m, h in hot if m in readable][:SHOWN]
            keys = await _keys(conn, [m for m, _ in shown])
        store_items, store_bytes = await self._store_totals()
        tiers = [
            schemas.TierState(
                name=t.name, budget_bytes=t.budget_bytes, used_bytes=t.used_bytes, items=t.items, hit_rate=t.hit_rate
            )
            for t in self.tiers.stats()
        ]
        tiers.append(
            schemas.TierState(
                name="store",
                budget_bytes=None,
                used_bytes=store_bytes,
                items=store_items,
                hit_rate=self.tiers.store_hit_rate(),
            )
        )
        return schemas.SchedulerState(
            tiers=tiers,
            queue=self.queue,
            hot=[
                schemas.HotMemory(memory_id=m, heat=round(h, 4), tier=_best_tier(self.tiers, keys.get(m, [])))
                for m, h in shown
            ],
        )

    async def pin(self, principal: Principal, body: schemas.PinIn) -> schemas.Pin:
        """Keep the memory's KV for ``body.model`` in ``body.tier``, building it first if there is none; ``store``
        lifts the memory's pins for that model (and builds nothing). 409 when the tier's share for pins is full.
        Under the pass lock: the limit check, the load and the pin happen as one step, and a pass never sweeps
        a pin that is landing."""
        if body.tier == "store":
            return await self._unpin(principal, body)
        activation, _ = await self.kv.build(principal, body.memory_id, BuildIn(model=body.model))
        lm = await self.kv.models.get(body.model)
        key = activation.sha256
        async with self._pass_lock:
            size = _chunk_bytes(lm, activation.tokens)
            limit = int(self.tiers.budgets[body.tier] * PIN_SHARE)
            already = self.tiers.pinned_bytes(body.tier)
            if self.tiers.is_pinned(key) and self.tiers.tier_of(key) == body.tier:
                already -= size  # pinned there already: pinning again takes nothing more
            if already + size > limit:
                raise Conflict(
                    f"the {body.tier} tier has room for {limit} bytes of pinned KV and {already} are pinned; "
                    f"this KV is {size} bytes",
                    extra={"tier": body.tier, "pinned_bytes": already, "pin_limit_bytes": limit, "bytes": size},
                )
            if not await self.kv.hold(lm, key, body.tier) or not self.tiers.move(key, body.tier, pinned=True):
                raise Conflict(
                    f"the KV could not be held in the {body.tier} tier (its stored file failed its check, or the "
                    "tier has no room beside what is pinned there)",
                    extra={"tier": body.tier, "bytes": size},
                )
            await self.kv.set_pin(activation.id, body.tier)
        return schemas.Pin(
            memory_id=body.memory_id, model=body.model, tier=body.tier, activation_id=activation.id, bytes=size
        )

    async def _unpin(self, principal: Principal, body: schemas.PinIn) -> schemas.Pin:
        self.kv.models.spec(body.model)
        async with self._pass_lock:
            rows = await self.kv.unpin(principal, body.memory_id, body.model)
            for row in rows:
                self.tiers.unpin(row.sha256)
        newest = rows[0] if rows else None
        return schemas.Pin(
            memory_id=body.memory_id,
            model=body.model,
            tier="store",
            activation_id=None if newest is None else newest.id,
            bytes=0,
        )


def _chunk_bytes(lm: LoadedModel, tokens: int) -> int:
    """What an activation of ``tokens`` tokens takes in a memory tier (decoded: no file header, no token ids)."""
    return int(tokens) * lm.kv_bytes_per_token


def _best_tier(tiers: KVTiers, keys: list[str]) -> schemas.Tier | None:
    """The nearest tier holding any of a memory's KV: device, host, store; None without an activation."""
    found = {tiers.tier_of(k) for k in keys}
    for tier in ("device", "host"):
        if tier in found:
            return tier
    return "store" if keys else None


async def _readable(conn: AsyncConnection, principal: Principal, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    rows = await conn.execute(
        select(memories.c.id).where(
            memories.c.id.in_(ids),
            memories.c.tenant_id == principal.tenant_id,
            memories.c.cube_id.in_(readable_cube_ids(principal)),
            memories.c.state != "deleted",
        )
    )
    return {r.id for r in rows}


async def _keys(conn: AsyncConnection, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """The blob keys of each memory's activations (any model; stale ones too: they show where KV sits)."""
    if not ids:
        return {}
    out: dict[uuid.UUID, list[str]] = {}
    for r in await conn.execute(
        select(activations.c.memory_id, activations.c.sha256).where(activations.c.memory_id.in_(ids))
    ):
        out.setdefault(r.memory_id, []).append(r.sha256)
    return out


async def _buildable(conn: AsyncConnection, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID]]:
    """Of ``ids``, the live plaintext memories, with (tenant, owner of their cube): who a build acts for."""
    rows = await conn.execute(
        select(memories.c.id, memories.c.tenant_id, cubes.c.owner_agent_id)
        .join(cubes, cubes.c.id == memories.c.cube_id)
        .where(
            memories.c.id.in_(ids),
            memories.c.kind == "plaintext",
            memories.c.state == "active",
            memories.c.content.is_not(None),
            cubes.c.deleted_at.is_(None),
        )
    )
    return {r.id: (r.tenant_id, r.owner_agent_id) for r in rows}

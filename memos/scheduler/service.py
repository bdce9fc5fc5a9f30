"""The scheduler: heat per memory, and the KV tiers kept in step with it.

Every read that uses a memory warms it (``HeatTable``): a read by id or a place in a generation's prompt
counts 1, a search result 1 / (rank + 1). A background task (``run``, every ``MEMOS_SCHEDULER_SECONDS``)
then, for each causal LM the service has loaded:

1. pins: the activations pinned to a tier (``POST /v1/scheduler/pin``, kept in ``activations.tier``) are
   held there, reloaded from the store after a restart, up to ``PIN_SHARE`` of the tier (``_admit``);
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
import datetime
import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, or_, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.activations.freshness import SOURCE_LIVE, is_fresh, with_freshness
from memos.activations.schemas import BuildIn
from memos.activations.service import PINNED, ActivationService
from memos.activations.tiers import KVTiers, ResidentTier
from memos.cubes.access import readable_cube_ids
from memos.errors import Conflict, MemosError
from memos.identity.principal import Principal
from memos.memories.service import not_expired
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
"""Builds a pass tries, failed ones included (a failure tokenizes up to 1 MiB of text in the KV worker too)."""
FAILED_BUILD_WAIT_S = 300.0
"""How long a memory whose build failed (too long for the model, no tokens...) waits before a pass tries it again:
every pass retried every failing hot memory, in the worker generations wait on (found in review)."""
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
    INSERT INTO memory_heat (memory_id, heat, updated_at)
    SELECT u.id, u.heat, now()
    FROM unnest(CAST(:ids AS uuid[]), CAST(:heats AS float8[])) AS u(id, heat)
    JOIN memories m ON m.id = u.id
    ORDER BY u.id
    FOR KEY SHARE OF m
    ON CONFLICT (memory_id) DO UPDATE SET heat = EXCLUDED.heat, updated_at = EXCLUDED.updated_at
    """
)
"""Heat into its narrow table (migration 0008; cold ones as 0, so an older ``memories.heat`` never shows again),
with when it was true (migration 0009: a restart decays it by the time since; an unchanged value is stamped
again too, it was true again now). The join skips a memory deleted since it was read. Its rows are locked (key
share, in id order) first: a memory whose deletion is in flight is then skipped once it commits, instead of
failing the whole write on the foreign key (found in review: the join's snapshot still saw the row)."""

# A constant fragment (HEAT_SQL) only; the limit and the half-life are bound parameters.
_SEED_SQL = f"""
    SELECT id, heat, tenant_id, age FROM (
        SELECT m.id, {HEAT_SQL} AS heat, m.tenant_id,
               coalesce(
                   (SELECT CAST(extract(epoch FROM now() - h.updated_at) AS float8)
                    FROM memory_heat h WHERE h.memory_id = m.id),
                   0
               ) AS age
        FROM memories m WHERE m.state <> 'deleted'
    ) AS known
    WHERE heat > 0
    ORDER BY ln(heat) - greatest(age, 0) * ln(2) / :half_life DESC, id
    LIMIT :n
    """  # noqa: S608
_SEED = text(_SEED_SQL)
"""The hottest memories the database knows, as they are now: ranked by heat decayed for the seconds since it was
written (in logarithms: a power of 2 of a long downtime underflows, which Postgres reports as an error). Heat
with no ``memory_heat`` row (``memories.heat``, imported or written before migration 0008) has no time: age 0."""


@dataclasses.dataclass(slots=True)
class _Pin:
    """One stored KV file that pinned activations ask a memory tier to hold (several activations may share it)."""

    key: str
    tier: ResidentTier
    """``device`` if any of its activations asks for it, else ``host``: the nearer tier serves every one of them."""
    bytes: int
    since: datetime.datetime
    """The oldest of its activations' ``created_at``: the order pins are held in when they do not all fit."""
    lm: LoadedModel | None
    """Its model, when loaded (None: counted at its stored size until the model is loaded)."""


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
        self._shrinking: asyncio.Task[None] | None = None
        self._skipped_pins: frozenset[str] = frozenset()
        """Pinned files the last pass could not hold (over their tier's share): logged when this changes."""
        self._failed_builds: dict[tuple[uuid.UUID, str], float] = {}
        """(memory, model) -> monotonic time its build failed (``FAILED_BUILD_WAIT_S``)."""

    @property
    def tiers(self) -> KVTiers:
        return self.kv.tiers

    def touch(self, tenant: uuid.UUID | None, accesses: list[tuple[uuid.UUID, float]]) -> None:
        self.heat.touch(accesses, tenant=tenant)
        # The bound holds with the loop off (MEMOS_SCHEDULER_SECONDS=0) too: past it, one shrink in a thread,
        # off this request (it ranks the whole table); a request only pays for the length check.
        if self.heat.over() and (self._shrinking is None or self._shrinking.done()):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a caller outside the event loop: it has no request to hold up
                self.heat.shrink()
                return
            self._shrinking = loop.create_task(asyncio.to_thread(self.heat.shrink), name="memos-heat-shrink")

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
        if self._shrinking is not None:
            with contextlib.suppress(Exception):
                await self._shrinking
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
            await self._load_pinned_models()
            loaded = self._loaded()
            if loaded:
                hot = await asyncio.to_thread(self.heat.hottest, HOT)
                pinned = await self._pins(loaded, report)
                fresh = {name: await self.kv.fresh_for_memories([m for m, _ in hot], lm) for name, lm in loaded.items()}
                await self._promote(list(loaded.values()), hot, fresh, pinned, report)
                if self.build_heat > 0:
                    for lm in loaded.values():
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
        """After a start, the heat the database holds (the hottest memories, decayed for the time since it was
        written) seeds the table, so the hot set survives a restart and those rows are written again as they
        cool."""
        params = {"n": self.heat.max_entries // 2, "half_life": self.heat.half_life}
        async with self.db.read() as conn:
            rows = (await conn.execute(_SEED, params)).all()
        self.heat.seed((r.id, float(r.heat), r.tenant_id, float(r.age)) for r in rows)
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

    # -- a listener of memory writes and of cube deletions (deleted memories leave the heat table) --------

    def memories_written(self, cube_id: uuid.UUID, rows: Any) -> None:
        return None

    def memories_removed(self, cube_id: uuid.UUID, ids: Any) -> None:
        self.heat.forget(ids)

    def drop(self, cube_id: uuid.UUID, memory_ids: Sequence[uuid.UUID]) -> None:
        """A cube was deleted (committed): the memories its deletion deleted leave the heat table."""
        self.heat.forget(memory_ids)

    # -- pins ---------------------------------------------------------------------------------------

    async def _load_pinned_models(self) -> None:
        """Load the configured models that pins on record ask for. After a restart a pass did nothing until some
        request loaded a model, so pins (counted against the limit all along) held nothing (found in review)."""
        waiting = [name for name in sorted(self.kv.models.specs) if self.kv.models.loaded(name) is None]
        if not waiting:
            return
        query = select(activations.c.model).where(PINNED, activations.c.model.in_(waiting)).distinct()
        async with self.db.read() as conn:
            names = (await conn.scalars(query)).all()
        for name in names:
            try:
                await self.kv.models.get(name)
            except MemosError as exc:  # fails to load (remembered by the registry for its Retry-After): next pass
                log.warning("a pinned model did not load", extra={"model": name, "error": exc.detail})

    def _loaded(self) -> dict[str, LoadedModel]:
        return {name: lm for name in sorted(self.kv.models.specs) if (lm := self.kv.models.loaded(name)) is not None}

    def _pin_limits(self) -> dict[ResidentTier, int]:
        return {tier: int(budget * PIN_SHARE) for tier, budget in self.tiers.budgets.items()}

    async def _pin_plan(self, loaded: dict[str, LoadedModel], keys: list[str] | None = None) -> dict[str, _Pin]:
        """What the pins on record ask the tiers to hold (``_plan``); ``keys``: only those files."""
        return _plan(await self._pinned_rows(keys), loaded)

    async def _pinned_rows(self, keys: list[str] | None = None, *, also: uuid.UUID | None = None) -> list[Row[Any]]:
        """The fresh pinned activations (``activations.tier`` device or host) of configured models, and ``also``
        that one, pinned or not (a pin being made). An expired memory's pins count for nothing and are not held
        (its activations are 404 like it: they were held, and counted against everyone's pin limit, for ever;
        found in review); they come back if a PATCH extends its TTL."""
        pinned = PINNED if also is None else or_(PINNED, activations.c.id == also)
        query = with_freshness().where(pinned, SOURCE_LIVE, activations.c.model.in_(sorted(self.kv.models.specs)))
        if keys is not None:
            query = query.where(activations.c.sha256.in_(keys))
        async with self.db.read() as conn:
            return [r for r in (await conn.execute(query)).all() if is_fresh(r)]

    async def _pins(self, loaded: dict[str, LoadedModel], report: PassReport) -> set[str]:
        """Hold every pinned activation's file in its tier, as far as the tier's pin share goes (``_admit``);
        lift the pins no activation asks for any more (unpinned, or gone stale). The pinned keys, each once."""
        plan = await self._pin_plan(loaded)
        held, skipped = _admit(plan.values(), self._pin_limits())
        wanted = {p.key for p in held if p.lm is not None}
        # Pins lifted first: the room they held is there for the ones to hold.
        for tier in ("device", "host"):
            for key in self.tiers.keys(tier):
                if key not in wanted:
                    self.tiers.unpin(key)
        pinned: set[str] = set()
        for pin in held:
            if pin.lm is None:
                continue  # its model is not loaded: nothing of it can be in memory
            if await self.kv.hold(pin.lm, pin.key, pin.tier) and self.tiers.move(pin.key, pin.tier, pinned=True):
                pinned.add(pin.key)
                report.pinned += 1
            else:
                self.tiers.unpin(pin.key)
        over = frozenset(p.key for p in skipped if p.lm is not None)
        if over and over != self._skipped_pins:
            # Only where the pins on record exceed a share (its budget was lowered since): the newest wait.
            log.warning(
                "pinned KV over the tiers' pin share is not held",
                extra={
                    "skipped": sorted(over),
                    "pin_limit_bytes": self._pin_limits(),
                    "skipped_bytes": sum(p.bytes for p in skipped if p.key in over),
                },
            )
        self._skipped_pins = over
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
        now = time.monotonic()
        self._failed_builds = {k: t for k, t in self._failed_builds.items() if now - t < FAILED_BUILD_WAIT_S}
        tried = 0
        for memory_id in candidates:
            owner = owners.get(memory_id)
            if owner is None or (memory_id, lm.name) in self._failed_builds:
                continue
            if tried >= BUILDS_PER_PASS:
                report.queued += 1
                continue
            tried += 1
            tenant_id, agent_id = owner
            principal = Principal(role="admin", tenant_id=tenant_id, agent_id=agent_id)
            try:
                await self.kv.build(principal, memory_id, BuildIn(model=lm.name))
            except MemosError as exc:  # changed or deleted meanwhile, store full...: not this pass's problem
                log.info("scheduler build skipped", extra={"memory_id": str(memory_id), "error": exc.detail})
                self._failed_builds[(memory_id, lm.name)] = now
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
        principal.tenant_member()  # the operator is 403 before the model or the memory is looked at
        if body.tier == "store":
            return await self._unpin(principal, body)
        activation, _ = await self.kv.build(principal, body.memory_id, BuildIn(model=body.model))
        lm = await self.kv.models.get(body.model)
        key = activation.sha256
        async with self._pass_lock:
            size = _chunk_bytes(lm, activation.tokens)
            # Counted from the database, not from what is in memory: after a restart the pins on record are not
            # loaded until a pass, and each still takes its room then (found in review). The check is the plan
            # with this pin in it, as the next pass will hold it: every pin held now must stay held, and this
            # one be held too. Checking only the tier the file sat in let a pin moved from device to host skip
            # the host limit, and the next pass dropped another tenant's host pin (found in review).
            loaded, limits = self._loaded(), self._pin_limits()
            rows = await self._pinned_rows(also=activation.id)
            before, _ = _admit(_plan(rows, loaded).values(), limits)
            held_before = {p.key for p in before}
            plan = _plan(rows, loaded, after=(activation.id, body.tier))
            held, _ = _admit(plan.values(), limits)
            kept = {p.key for p in held}
            # The file may be pinned by another memory with the same KV too: it stays in device if any asks.
            tier: ResidentTier = plan[key].tier if key in plan else body.tier
            if key not in kept or not held_before <= kept:
                already = sum(p.bytes for p in plan.values() if p.tier == tier and p.key != key)
                raise Conflict(
                    f"the {tier} tier has room for {limits[tier]} bytes of pinned KV and {already} are "
                    f"pinned; this KV is {size} bytes",
                    extra={"tier": tier, "pinned_bytes": already, "pin_limit_bytes": limits[tier], "bytes": size},
                )
            held_now = await self.kv.hold(lm, key, tier) and self.tiers.move(key, tier, pinned=True)
            if not await self.kv.is_current(activation.id):
                # Its memory was purged, deleted or changed while this pin built and loaded it: not a damaged
                # file (it said so), and not a pin to answer 200 for, stale already (found in review).
                if held_now and key not in held_before:
                    self.tiers.unpin(key)  # pinned just now for this pin alone
                raise Conflict(
                    "the memory changed or was deleted while its KV was being pinned; retry",
                    extra={"tier": tier, "bytes": size},
                )
            if not held_now:
                raise Conflict(
                    f"the KV could not be held in the {tier} tier (its stored file failed its check, or the "
                    "tier has no room beside what is pinned there)",
                    extra={"tier": tier, "bytes": size},
                )
            await self.kv.set_pin(activation.id, body.tier)
        return schemas.Pin(
            memory_id=body.memory_id, model=body.model, tier=body.tier, activation_id=activation.id, bytes=size
        )

    async def _unpin(self, principal: Principal, body: schemas.PinIn) -> schemas.Pin:
        """Lift the memory's pins. Its file stays pinned while another memory's pin asks for it (the same text,
        in any cube of the tenant: one file): lifting one's own pin must not lift another's (found in review)."""
        self.kv.models.spec(body.model)
        async with self._pass_lock:
            rows = await self.kv.unpin(principal, body.memory_id, body.model)
            keys = sorted({row.sha256 for row in rows})
            still = await self._pin_plan(self._loaded(), keys) if keys else {}
            for key in keys:
                pin = still.get(key)
                if pin is None:
                    self.tiers.unpin(key)
                elif self.tiers.is_pinned(key) and self.tiers.tier_of(key) != pin.tier:
                    self.tiers.move(key, pin.tier, pinned=True)  # where the pins left ask; else the next pass
        newest = rows[0] if rows else None
        return schemas.Pin(
            memory_id=body.memory_id,
            model=body.model,
            tier="store",
            activation_id=None if newest is None else newest.id,
            bytes=0,
        )


def _plan(
    rows: Iterable[Row[Any]], loaded: dict[str, LoadedModel], after: tuple[uuid.UUID, ResidentTier] | None = None
) -> dict[str, _Pin]:
    """Every stored file that ``rows`` (``_pinned_rows``) ask a tier to hold, once each, in the order pins are
    held (oldest first, then by key): what the pin limit counts, loaded or not (after a restart none are until a
    pass reloads them). A loaded model's files count at their size in a tier (tokens x its KV bytes per token),
    and only those of its current fingerprint (any other is never held); a model not loaded yet counts its files
    at their stored size, which is no smaller. ``after``: with that activation pinned to that tier (a pin being
    made, checked before it is recorded); a row not pinned otherwise asks for nothing."""
    plan: dict[str, _Pin] = {}
    for row in rows:
        lm = loaded.get(row.model)
        if lm is not None and row.fingerprint != lm.fingerprint:
            continue
        asked = after[1] if after is not None and row.id == after[0] else row.tier
        if asked not in ("device", "host"):
            continue
        size = int(row.bytes) if lm is None else _chunk_bytes(lm, row.tokens)
        tier: ResidentTier = "device" if asked == "device" else "host"
        have = plan.get(row.sha256)
        if have is None:
            plan[row.sha256] = _Pin(row.sha256, tier, size, row.created_at, lm)
            continue
        # Two pins of one file that ask for different tiers: device, which serves both.
        if tier == "device":
            have.tier = "device"
        have.since = min(have.since, row.created_at)
        have.bytes = max(have.bytes, size)
    return dict(sorted(plan.items(), key=lambda item: (item[1].since, item[0])))


def _admit(plan: Iterable[_Pin], limits: dict[ResidentTier, int]) -> tuple[list[_Pin], list[_Pin]]:
    """The pins held and those not, in ``plan``'s order (``_pin_plan``): per tier, pins are held until the next
    would pass its share; it and every later pin of that tier wait. Stopping there, not skipping to a smaller
    one, keeps what is held from changing when a pin is lifted or added under the limit."""
    used: dict[ResidentTier, int] = dict.fromkeys(limits, 0)
    full: set[ResidentTier] = set()
    held: list[_Pin] = []
    skipped: list[_Pin] = []
    for pin in plan:
        if pin.tier not in full and used[pin.tier] + pin.bytes <= limits[pin.tier]:
            used[pin.tier] += pin.bytes
            held.append(pin)
        else:
            full.add(pin.tier)
            skipped.append(pin)
    return held, skipped


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
            not_expired(),  # as GET /v1/memories/{id} answers: an expired memory is not listed hot
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

"""Heat: how much a memory is being used now. Each access adds its weight; heat halves every half-life.

A memory's heat is kept as (value, when) and decayed on read: h(t) = value x 2^-((t - when) / half_life),
so nothing has to touch every entry as time passes. The table is bounded: past ``max_entries`` the
coldest fall out (``shrink``, run off the request path as soon as a touch takes the table past its bound: a
memory that has cooled that far is as good as never used).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable

FLOOR = 0.01
"""Heat below which a memory counts as cold: it leaves the table (and is written as 0)."""


class HeatTable:
    def __init__(
        self, half_life: float, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if half_life <= 0 or max_entries < 1:
            raise ValueError("half_life must be > 0 and max_entries >= 1")
        self.half_life = half_life
        self.max_entries = max_entries
        self._clock = clock
        self._heat: dict[uuid.UUID, tuple[float, float]] = {}
        self._tenant: dict[uuid.UUID, uuid.UUID] = {}
        """Whose memory each is, when known: a tenant's hottest are its own, whatever other tenants read."""
        self._written: dict[uuid.UUID, float] = {}
        """What the database holds, per memory whose heat was written and not yet written back to 0."""
        self._read: dict[uuid.UUID, int] = {}
        """Memories read since their heat was last written, each with the number of its last touch."""
        self._touches = 0
        self._seen: dict[uuid.UUID, int | None] = {}
        """What the last ``changes`` saw of each memory it returned (its ``_read`` number, None if unread): a
        memory touched again while its write was in flight stays marked as read, so that read is written too."""
        # Touched from request handlers on the event loop and read by the scheduler's task; a lock keeps the
        # bounded eviction and the change scan consistent if a caller ever runs in a thread.
        self._lock = threading.Lock()

    def _decayed(self, value: float, when: float, now: float) -> float:
        return value * math.pow(2.0, -(now - when) / self.half_life)

    def touch(
        self, accesses: Iterable[tuple[uuid.UUID, float]], now: float | None = None, *, tenant: uuid.UUID | None = None
    ) -> None:
        """Record accesses: each (memory id, weight) adds its weight to the memory's heat. ``tenant``: whose
        memories they are (every access of a request is to its tenant's memories)."""
        at = self._clock() if now is None else now
        with self._lock:
            for memory_id, weight in accesses:
                if weight <= 0:
                    continue
                old = self._heat.get(memory_id)
                value = weight if old is None else self._decayed(*old, at) + weight
                self._heat[memory_id] = (value, at)
                self._touches += 1
                self._read[memory_id] = self._touches
                if tenant is not None:
                    self._tenant[memory_id] = tenant

    def value(self, memory_id: uuid.UUID, now: float | None = None) -> float:
        at = self._clock() if now is None else now
        with self._lock:
            entry = self._heat.get(memory_id)
            return 0.0 if entry is None else self._decayed(*entry, at)

    def hottest(
        self, n: int, now: float | None = None, minimum: float = FLOOR, *, tenant: uuid.UUID | None = None
    ) -> list[tuple[uuid.UUID, float]]:
        """The ``n`` hottest memories at ``minimum`` heat or more, hottest first (ties by id, for a stable order);
        with ``tenant``, that tenant's only."""
        at = self._clock() if now is None else now
        with self._lock:
            current = (
                (self._decayed(v, w, at), memory_id)
                for memory_id, (v, w) in self._heat.items()
                if tenant is None or self._tenant.get(memory_id) == tenant
            )
            best = heapq.nlargest(n, ((h, m) for h, m in current if h >= minimum), key=lambda x: (x[0], x[1].int))
        return [(memory_id, heat) for heat, memory_id in best]

    def changes(self, now: float | None = None, minimum: float = 0.0, most: int = 1000) -> dict[uuid.UUID, float]:
        """What the database's copy of heat should be told, at most ``most`` memories, by id: each memory read
        since its heat was last written (at ``minimum`` heat or more, for one not written yet: a write per
        memory that one wide search touched once would cost more than it tells), each one that has cooled to
        half of what was written, and 0 for each one that went cold or left the table. Nothing is marked as
        written here: call ``written`` once the write has committed, so a failed write is tried again."""
        at = self._clock() if now is None else now
        out: dict[uuid.UUID, float] = {}
        with self._lock:
            for memory_id, last in self._written.items():
                entry = self._heat.get(memory_id)
                heat = 0.0 if entry is None else self._decayed(*entry, at)
                if heat < FLOOR:
                    out[memory_id] = 0.0
                elif memory_id in self._read or heat <= last / 2:
                    out[memory_id] = round(heat, 4)
            for memory_id in self._read:
                if memory_id not in self._written and (entry := self._heat.get(memory_id)) is not None:
                    heat = self._decayed(*entry, at)
                    if heat >= minimum and heat >= FLOOR:
                        out[memory_id] = round(heat, 4)
            # By id: concurrent writers of the same rows take their locks in one order.
            chosen = {m: out[m] for m in sorted(out, key=lambda m: m.int)[:most]}
            self._seen = {m: self._read.get(m) for m in chosen}
        return chosen

    def written(self, heats: dict[uuid.UUID, float]) -> None:
        """The database now holds ``heats`` (from ``changes``). A memory touched since ``changes`` looked at it
        stays marked as read: its heat moved after the value written was taken."""
        at = self._clock()
        with self._lock:
            for memory_id, heat in heats.items():
                seen = self._seen.pop(memory_id, None)
                if seen is not None and self._read.get(memory_id) == seen:
                    del self._read[memory_id]
                if heat == 0.0:
                    self._written.pop(memory_id, None)
                    entry = self._heat.get(memory_id)
                    if entry is not None and self._decayed(*entry, at) < FLOOR:  # cold: out of the table too
                        del self._heat[memory_id]
                        self._tenant.pop(memory_id, None)
                else:
                    self._written[memory_id] = heat

    def seed(self, heats: Iterable[tuple[uuid.UUID, float, uuid.UUID | None, float]], now: float | None = None) -> None:
        """Start from heats the database holds (after a restart), (memory, heat, tenant, seconds since it was
        written): each decayed by its age, as if the service had kept counting while it was down. One that
        has gone cold meanwhile stays out of the table; its row is written as 0 at the next write."""
        at = self._clock() if now is None else now
        with self._lock:
            for memory_id, heat, tenant, age in heats:
                if heat <= 0 or memory_id in self._heat:
                    continue
                self._written[memory_id] = heat  # what the database holds: moved on from at the next write
                current = self._decayed(heat, 0.0, max(0.0, age))
                if current < FLOOR:
                    continue
                self._heat[memory_id] = (current, at)
                if tenant is not None:
                    self._tenant[memory_id] = tenant

    def over(self) -> bool:
        """Past ``max_entries``: time to ``shrink`` (a length check, cheap enough for every request)."""
        return len(self._heat) > self.max_entries

    def shrink(self, now: float | None = None) -> None:
        """Past ``max_entries``, keep the hottest half (``touch`` never does it: it runs inside requests).

        Ranked on a copy, outside the lock: ranking 100k entries takes ~85 ms, and a request's ``touch`` on the
        event loop waited for it all (found in review). Only the copying and the removals hold the lock; an
        entry touched meanwhile (a new value) stays, whatever its rank was."""
        at = self._clock() if now is None else now
        with self._lock:
            if len(self._heat) <= self.max_entries:
                return
            snapshot = list(self._heat.items())
        keep = max(1, self.max_entries // 2)
        ranked = heapq.nlargest(keep, snapshot, key=lambda item: self._decayed(item[1][0], item[1][1], at))
        kept = {memory_id for memory_id, _ in ranked}
        with self._lock:
            for memory_id, entry in snapshot:
                # ``is``: touched since the copy, the entry is a new tuple, and it is hot again.
                if memory_id not in kept and self._heat.get(memory_id) is entry:
                    del self._heat[memory_id]
                    self._tenant.pop(memory_id, None)
                    self._read.pop(memory_id, None)
                    self._seen.pop(memory_id, None)

    def forget(self, ids: Iterable[uuid.UUID]) -> None:
        """Drop memories (deleted, purged): they are not hot any more, whatever their accesses. (Their rows keep
        the heat last written: it is not shown for a deleted memory's ranking.)"""
        with self._lock:
            for memory_id in ids:
                self._heat.pop(memory_id, None)
                self._tenant.pop(memory_id, None)
                self._written.pop(memory_id, None)
                self._read.pop(memory_id, None)
                self._seen.pop(memory_id, None)

    def __len__(self) -> int:
        return len(self._heat)

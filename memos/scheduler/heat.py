"""Heat: how much a memory is being used now. Each access adds its weight; heat halves every half-life.

A memory's heat is kept as (value, when) and decayed on read: h(t) = value x 2^-((t - when) / half_life),
so nothing has to touch every entry as time passes. The table is bounded: past ``max_entries`` the
coldest fall out (a memory that has cooled that far is as good as never used).
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
        self._written: dict[uuid.UUID, float] = {}
        """The heat last handed out by ``changes`` (what the database holds), per memory."""
        # Touched from request handlers on the event loop and read by the scheduler's task; a lock keeps the
        # bounded eviction and the change scan consistent if a caller ever runs in a thread.
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._clock()

    def _decayed(self, value: float, when: float, now: float) -> float:
        return value * math.pow(2.0, -(now - when) / self.half_life)

    def touch(self, accesses: Iterable[tuple[uuid.UUID, float]], now: float | None = None) -> None:
        """Record accesses: each (memory id, weight) adds its weight to the memory's heat."""
        at = self._clock() if now is None else now
        with self._lock:
            for memory_id, weight in accesses:
                if weight <= 0:
                    continue
                old = self._heat.get(memory_id)
                value = weight if old is None else self._decayed(*old, at) + weight
                self._heat[memory_id] = (value, at)
            if len(self._heat) > self.max_entries:
                self._shrink(at)

    def value(self, memory_id: uuid.UUID, now: float | None = None) -> float:
        at = self._clock() if now is None else now
        with self._lock:
            entry = self._heat.get(memory_id)
            return 0.0 if entry is None else self._decayed(*entry, at)

    def hottest(self, n: int, now: float | None = None, minimum: float = FLOOR) -> list[tuple[uuid.UUID, float]]:
        """The ``n`` hottest memories at ``minimum`` heat or more, hottest first (ties by id, for a stable order)."""
        at = self._clock() if now is None else now
        with self._lock:
            current = ((self._decayed(v, w, at), memory_id) for memory_id, (v, w) in self._heat.items())
            best = heapq.nlargest(n, ((h, m) for h, m in current if h >= minimum), key=lambda x: (x[0], x[1].int))
        return [(memory_id, heat) for heat, memory_id in best]

    def changes(self, now: float | None = None, tolerance: float = 0.1) -> dict[uuid.UUID, float]:
        """The memories whose heat moved by more than ``tolerance`` (relative) since the last call, with their
        heat now (0 for one that went cold: it also leaves the table), for the database's copy."""
        at = self._clock() if now is None else now
        out: dict[uuid.UUID, float] = {}
        with self._lock:
            for memory_id, (v, w) in list(self._heat.items()):
                heat = self._decayed(v, w, at)
                if heat < FLOOR:
                    del self._heat[memory_id]
                    heat = 0.0
                last = self._written.get(memory_id, 0.0)
                if abs(heat - last) > tolerance * max(last, FLOOR):
                    out[memory_id] = round(heat, 4)
            for memory_id, heat in out.items():
                if heat == 0.0:
                    self._written.pop(memory_id, None)
                else:
                    self._written[memory_id] = heat
            # A memory dropped by _shrink still has a heat in the database: it is written as 0 here.
            for memory_id in [m for m in self._written if m not in self._heat]:
                out[memory_id] = 0.0
                del self._written[memory_id]
        return out

    def forget(self, ids: Iterable[uuid.UUID]) -> None:
        """Drop memories (deleted, purged): they are not hot any more, whatever their accesses."""
        with self._lock:
            for memory_id in ids:
                self._heat.pop(memory_id, None)
                self._written.pop(memory_id, None)

    def __len__(self) -> int:
        return len(self._heat)

    def _shrink(self, at: float) -> None:
        """Keep the hottest half of ``max_entries``: shrinking once per half a table's worth of new memories."""
        keep = max(1, self.max_entries // 2)
        ranked = heapq.nlargest(keep, self._heat.items(), key=lambda item: self._decayed(item[1][0], item[1][1], at))
        self._heat = dict(ranked)

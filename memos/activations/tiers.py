"""The KV tiers in memory: ``device`` and ``host``, each a byte budget of decoded KV chunks (the third tier,
``store``, is the blob store: every activation's file is there whatever else holds it).

- ``device``: chunks on their model's device, ready to be injected (GPU memory with a GPU; on a CPU-only
  machine the same code, with the CPU as the device).
- ``host``: chunks in host RAM. With a GPU, using one costs a copy to the device; without, nothing more
  than a device-tier chunk, but both skip the blob store's read, checksum and decode.

Keys are blob keys (the sha256 of the memos-kv/1 file), so activations that share bytes share one entry,
and every agent that reads a shared memory uses the same chunk. Within a tier the least recently used
chunk goes first; a chunk leaving ``device`` moves to ``host`` (copied to the CPU when it was on a GPU), a
chunk leaving ``host`` is dropped (its file is still in the store). Pinned chunks (``pin``) never leave
their tier to make room. Entries are never mutated (generation composes copies), so handing the same chunk
to two requests is safe. The scheduler (``memos.scheduler``) moves chunks between tiers by heat; requests
only read, and put what they loaded from the store.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Literal

ResidentTier = Literal["device", "host"]
TIERS: tuple[ResidentTier, ...] = ("device", "host")


@dataclasses.dataclass(slots=True)
class _Entry:
    chunk: Any
    nbytes: int
    device: str
    """Where the chunk's model computes ("cuda:0", "cpu"): a device-tier chunk lives there."""
    pinned: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    budget_bytes: int
    used_bytes: int
    items: int
    hit_rate: float | None
    """Lookups this tier answered, over every lookup since the start (None before the first)."""


class KVTiers:
    def __init__(self, device_budget: int, host_budget: int) -> None:
        self.budgets: dict[ResidentTier, int] = {"device": device_budget, "host": host_budget}
        self._items: dict[ResidentTier, OrderedDict[str, _Entry]] = {t: OrderedDict() for t in TIERS}
        self._used: dict[ResidentTier, int] = dict.fromkeys(TIERS, 0)
        self._hits: dict[ResidentTier, int] = dict.fromkeys(TIERS, 0)
        self._lookups = 0
        self._store_hits = 0
        # Touched from the event loop and from worker threads.
        self._lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """The chunk, from whichever tier holds it (counted as that tier's hit), or None (a miss)."""
        with self._lock:
            self._lookups += 1
            for tier in TIERS:
                entry = self._items[tier].get(key)
                if entry is not None:
                    self._items[tier].move_to_end(key)
                    self._hits[tier] += 1
                    return entry.chunk
            return None

    def put(self, key: str, chunk: Any, nbytes: int, device: Any, tier: ResidentTier | None = None) -> bool:
        """Keep a chunk just loaded or built (on its model's ``device``) in ``tier``; by default ``device`` when it
        is on a GPU (it is there already), else ``host``. False (nothing kept) when it does not fit."""
        if tier is None:
            tier = "device" if str(device).startswith("cuda") else "host"
        with self._lock:
            if self._holder(key) is not None:
                return True
            entry = _Entry(chunk, nbytes, str(device))
            if tier == "host":  # loaded onto the model's device; host RAM keeps a CPU copy
                entry.chunk = _on(entry, tier)
            return self._place(tier, key, entry)

    def tier_of(self, key: str) -> ResidentTier | None:
        with self._lock:
            return self._holder(key)

    def discard(self, key: str) -> None:
        with self._lock:
            for tier in TIERS:
                entry = self._items[tier].pop(key, None)
                if entry is not None:
                    self._used[tier] -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            for tier in TIERS:
                self._items[tier].clear()
                self._used[tier] = 0

    # -- the scheduler -------------------------------------------------------------------------

    def move(self, key: str, tier: ResidentTier, *, pinned: bool | None = None) -> bool:
        """Move a held chunk to ``tier`` (copying it to or from its model's GPU), pinned or not there; False
        when nothing holds it or it does not fit (pinned chunks are not moved out to make room)."""
        with self._lock:
            holder = self._holder(key)
            if holder is None:
                return False
            entry = self._items[holder][key]
            if holder == tier:
                self._items[tier].move_to_end(key)
                if pinned is not None:
                    entry.pinned = pinned
                return True
            if entry.nbytes > self._room(tier):
                return False  # nothing changed, its pin neither
            del self._items[holder][key]
            self._used[holder] -= entry.nbytes
            moved = dataclasses.replace(entry, chunk=_on(entry, tier))
            if pinned is not None:
                moved.pinned = pinned
            return self._place(tier, key, moved)

    def unpin(self, key: str) -> None:
        with self._lock:
            holder = self._holder(key)
            if holder is not None:
                self._items[holder][key].pinned = False

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            holder = self._holder(key)
            return holder is not None and self._items[holder][key].pinned

    def pinned_bytes(self, tier: ResidentTier) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._items[tier].values() if e.pinned)

    def keys(self, tier: ResidentTier) -> list[str]:
        """The tier's keys, least recently used first."""
        with self._lock:
            return list(self._items[tier])

    def stats(self) -> list[TierStats]:
        with self._lock:
            return [
                TierStats(
                    name=tier,
                    budget_bytes=self.budgets[tier],
                    used_bytes=self._used[tier],
                    items=len(self._items[tier]),
                    hit_rate=None if self._lookups == 0 else round(self._hits[tier] / self._lookups, 4),
                )
                for tier in TIERS
            ]

    def store_hit(self) -> None:
        """A lookup that missed both tiers was answered from the blob store."""
        with self._lock:
            self._store_hits += 1

    def counters(self) -> tuple[int, dict[str, int]]:
        """Lookups since the start, and how many each tier answered (``store``: read from the blob store)."""
        with self._lock:
            hits: dict[str, int] = {tier: self._hits[tier] for tier in TIERS}
            return self._lookups, hits | {"store": self._store_hits}

    def store_hit_rate(self) -> float | None:
        with self._lock:
            return None if self._lookups == 0 else round(self._store_hits / self._lookups, 4)

    # -- inside the lock -----------------------------------------------------------------------

    def _holder(self, key: str) -> ResidentTier | None:
        return next((t for t in TIERS if key in self._items[t]), None)

    def _room(self, tier: ResidentTier) -> int:
        """Bytes ``tier`` could hold for a new chunk: its budget less what is pinned there."""
        return self.budgets[tier] - sum(e.nbytes for e in self._items[tier].values() if e.pinned)

    def _place(self, tier: ResidentTier, key: str, entry: _Entry) -> bool:
        if entry.nbytes > self._room(tier):
            return False
        items = self._items[tier]
        items[key] = entry
        self._used[tier] += entry.nbytes
        # Make room: the least recently used unpinned chunks go (down a tier, or out of memory).
        for old in list(items):
            if self._used[tier] <= self.budgets[tier]:
                break
            victim = items[old]
            if victim.pinned or old == key:
                continue
            del items[old]
            self._used[tier] -= victim.nbytes
            if tier == "device":
                self._place("host", old, dataclasses.replace(victim, chunk=_on(victim, "host")))
        return True


def _on(entry: _Entry, tier: ResidentTier) -> Any:
    """The entry's chunk where ``tier`` keeps it: the model's device, or the CPU."""
    target = entry.device if tier == "device" else "cpu"
    if entry.device == "cpu" or not hasattr(entry.chunk, "to"):
        return entry.chunk  # a CPU model: both tiers are the same memory
    return entry.chunk.to(target)

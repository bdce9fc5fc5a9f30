"""Process-wide caches that every tenant shares: which entry to give up when one is full.

The per-cube graphs (``memos.search.graphs``) and cache indexes (``memos.semcache.index``) are held for at
most 32 cubes each. Plain LRU let one tenant that touched many cubes in turn evict every other tenant's
entries, and each of those is rebuilt from Postgres on its next use (a 100k-memory cube's graph: about 20 s
of CPU). So each tenant present keeps a few entries however old (its *reserve*: the capacity over twice the
tenants present, at least one), and the entry given up is the least recently used of a tenant holding more
than that: with one tenant it is plain LRU, a tenant churning through many cubes gives up its own entries,
and entries nobody uses still age out down to their tenant's reserve. Favouring "the tenant holding the
most" instead let idle tenants keep their entries for ever while an active one rebuilt its graphs on every
use (found in review).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import TypeVar

K = TypeVar("K")


def fair_victim(owners: Iterable[tuple[K, Hashable]], capacity: int) -> K:
    """The key to evict from a cache of ``capacity`` entries: the least recently used whose owner holds more
    than its reserve (``capacity // (2 * owners present)``, at least 1); the least recently used of all when
    every owner is within it.

    ``owners``: (key, owner) for every entry, least recently used first (an ``OrderedDict``'s order)."""
    entries = list(owners)
    if not entries:
        raise ValueError("nothing to evict")
    held = Counter(owner for _, owner in entries)
    reserve = max(1, capacity // (2 * len(held)))
    return next((key for key, owner in entries if held[owner] > reserve), entries[0][0])

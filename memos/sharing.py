"""Process-wide caches that every tenant shares: which entry to give up when one is full.

The per-cube graphs (``memos.search.graphs``) and cache indexes (``memos.semcache.index``) are held for at
most 32 cubes each. Plain LRU let one tenant that touched many cubes in turn evict every other tenant's
entries, and each of those is rebuilt from Postgres on its next use (a 100k-memory cube's graph: about 20 s
of CPU). Evicting the least recently used entry *of the tenant holding the most* keeps one tenant's churn
among its own entries: with a single tenant it is plain LRU, and a tenant holding few entries keeps them
while others hold more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import TypeVar

K = TypeVar("K")


def fair_victim(owners: Iterable[tuple[K, Hashable]]) -> K:
    """The key to evict: the least recently used of those whose owner holds the most.

    ``owners``: (key, owner) for every entry, least recently used first (an ``OrderedDict``'s order)."""
    entries = list(owners)
    if not entries:
        raise ValueError("nothing to evict")
    held = Counter(owner for _, owner in entries)
    most = max(held.values())
    return next(key for key, owner in entries if held[owner] == most)

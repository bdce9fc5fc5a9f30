"""Caches every tenant shares (per-cube graphs and cache indexes): one tenant's churn evicts its own entries.

Plain LRU let a tenant that searched many cubes in turn evict every other tenant's graph and cache index, each
rebuilt from Postgres on its next use (a 100k-memory cube's graph: about 20 s of CPU).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

import pytest
from conftest import Factory

from memos.search.graphs import CubeGraphs
from memos.semcache.index import CacheIndexes, VectorLRU
from memos.sharing import fair_victim


def test_fair_victim_is_the_least_recently_used_beyond_each_tenants_reserve() -> None:
    # Capacity 4, two owners: each keeps 1 however old; B's oldest goes before A's only one.
    assert fair_victim([("a1", "A"), ("b1", "B"), ("b2", "B"), ("b3", "B")], 4) == "b1"
    assert fair_victim([("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")], 4) == "a1"  # both over: plain LRU
    assert fair_victim([("x", None), ("y", None)], 2) == "x"  # one owner: plain LRU
    assert fair_victim([("a", "A"), ("b", "B"), ("c", "C")], 2) == "a"  # everyone within: plain LRU
    with pytest.raises(ValueError, match="nothing to evict"):
        fair_victim([], 1)


def misses(uses: list[tuple[str, str]], capacity: int = 32) -> int:
    """Rebuilds a cache of ``capacity`` evicting by fair_victim makes over ``uses`` (key, owner), in order."""
    held: OrderedDict[str, str] = OrderedDict()
    count = 0
    for key, owner in uses:
        if key in held:
            held.move_to_end(key)
            continue
        count += 1
        held[key] = owner
        while len(held) > capacity:
            del held[fair_victim(held.items(), capacity)]
    return count


def test_idle_tenants_do_not_pin_their_entries_while_an_active_one_churns() -> None:
    """Found in review: evicting from "the tenant holding the most" kept idle tenants' entries for ever, and an
    active tenant whose cubes did not fit in what was left rebuilt on every use."""
    churn = [(f"b{i}", "B") for _ in range(50) for i in range(40)]
    quiet = [("a0", "A")]
    # One tenant churning through 40 cubes does not evict another's one graph (once built, it stays).
    assert misses([u for r in range(50) for u in quiet + churn[r * 40 : (r + 1) * 40]]) - 50 * 40 <= 1
    # A tenant that touched 16 cubes and went idle leaves room for an active one's 20.
    idle = [(f"b{i}", "B") for i in range(16)]
    assert misses(idle + [(f"a{i}", "A") for _ in range(100) for i in range(20)]) == 16 + 20
    # Ten small idle tenants of 3 cubes each leave room for one active tenant's 8.
    small = [(f"t{t}.{i}", f"T{t}") for t in range(10) for i in range(3)]
    assert misses(small + [(f"big{i}", "BIG") for _ in range(100) for i in range(8)]) == 30 + 8


def cubes(factory: Factory, key: str, n: int) -> list[uuid.UUID]:
    made = []
    for i in range(n):
        cube = factory.cube(key, name=f"shared-{i}")
        factory.memory(key, cube["id"], f"Note {i} about the shared caches.")
        made.append(uuid.UUID(cube["id"]))
    return made


def test_one_tenants_graphs_do_not_evict_anothers(client, app, factory: Factory) -> None:
    quiet, busy = factory.tenant(), factory.tenant()
    (kept,) = cubes(factory, quiet.admin_key, 1)
    many = cubes(factory, busy.admin_key, 4)
    graphs = CubeGraphs(app.state.db, max_cubes=3)
    call = client.blocking_portal.call
    assert call(graphs.get_within, kept, 30.0, uuid.UUID(quiet.id)) is not None
    for cube_id in many:
        assert call(graphs.get_within, cube_id, 30.0, uuid.UUID(busy.id)) is not None
    held = list(graphs._graphs)
    assert kept in held, "the quiet tenant's graph stays"
    assert held == [kept, many[2], many[3]]  # the busy tenant gave up its own least recently used
    graphs.drop(many[3])
    assert set(graphs._tenants) == set(graphs._graphs), "a dropped graph's tenant is forgotten with it"


def test_one_tenants_cache_indexes_do_not_evict_anothers(client, app, factory: Factory) -> None:
    quiet, busy = factory.tenant(), factory.tenant()
    (kept,) = cubes(factory, quiet.admin_key, 1)
    many = cubes(factory, busy.admin_key, 4)
    indexes = CacheIndexes(app.state.db, VectorLRU(app.state.semcache.vectors.embedder, 16), max_cubes=3)
    call = client.blocking_portal.call
    call(indexes.state, kept, uuid.UUID(quiet.id))
    for cube_id in many:
        call(indexes.state, cube_id, uuid.UUID(busy.id))
    assert list(indexes._states) == [kept, many[2], many[3]]

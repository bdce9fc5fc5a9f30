"""Caches every tenant shares (per-cube graphs and cache indexes): one tenant's churn evicts its own entries.

Plain LRU let a tenant that searched many cubes in turn evict every other tenant's graph and cache index, each
rebuilt from Postgres on its next use (a 100k-memory cube's graph: about 20 s of CPU).
"""

from __future__ import annotations

import uuid

import pytest
from conftest import Factory

from memos.search.graphs import CubeGraphs
from memos.semcache.index import CacheIndexes, VectorLRU
from memos.sharing import fair_victim


def test_fair_victim_is_the_least_recently_used_of_the_tenant_holding_most() -> None:
    assert fair_victim([("a1", "A"), ("b1", "B"), ("b2", "B"), ("a2", "A"), ("b3", "B")]) == "b1"
    assert fair_victim([("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B")]) == "a1"  # a tie: plain LRU
    assert fair_victim([("x", None), ("y", None)]) == "x"  # one owner: plain LRU
    with pytest.raises(ValueError, match="nothing to evict"):
        fair_victim([])


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

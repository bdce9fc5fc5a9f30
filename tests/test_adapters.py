"""The framework adapters over the real app: LangGraph's ``BaseStore`` and the mem0-compatible ``Memory``.

Both run through the SDK against the module's app in-process (the same transport as tests/test_sdk.py),
so every call is real HTTP into the real service on the real database.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import pytest
from conftest import Factory
from langgraph.store.base import BaseStore, InvalidNamespaceError, Item, SearchItem
from litestar import Litestar
from litestar.testing import TestClient
from memos_client import Conflict, MemosClient, NotFound
from memos_client.compat.langgraph import MemosStore
from memos_client.compat.mem0 import Memory
from test_sdk import BASE, InProcess


@pytest.fixture
def connect(client: TestClient[Litestar]) -> Iterator[Callable[[str], MemosClient]]:
    made: list[MemosClient] = []

    def make(key: str) -> MemosClient:
        sdk = MemosClient(BASE, api_key=key, transport=InProcess(client))
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        sdk.close()


@pytest.fixture
def store(factory: Factory, connect: Callable[[str], MemosClient]) -> MemosStore:
    return MemosStore(connect(factory.tenant().admin_key))


# --- LangGraph ------------------------------------------------------------------------------------


def test_store_is_a_langgraph_base_store(store: MemosStore) -> None:
    assert isinstance(store, BaseStore)


def test_put_get_update_delete(store: MemosStore) -> None:
    ns = ("users", "u1", "prefs")
    assert store.get(ns, "theme") is None
    store.put(ns, "theme", {"text": "prefers dark mode", "level": 3})
    item = store.get(ns, "theme")
    assert isinstance(item, Item)
    assert (item.namespace, item.key, item.value) == (ns, "theme", {"text": "prefers dark mode", "level": 3})

    store.put(ns, "theme", {"text": "prefers light mode now"})
    updated = store.get(ns, "theme")
    assert updated is not None and updated.value == {"text": "prefers light mode now"}
    assert updated.created_at == item.created_at and updated.updated_at > item.updated_at

    store.delete(ns, "theme")
    assert store.get(ns, "theme") is None
    store.delete(ns, "theme")  # deleting what is gone is not an error


def test_update_is_a_new_memos_version(store: MemosStore, connect: Callable[[str], MemosClient]) -> None:
    ns = ("history",)
    store.put(ns, "k", {"text": "one"})
    store.put(ns, "k", {"text": "two"})
    sdk = store._client
    cube = next(c for c in sdk.cubes.list() if c.name == 'langgraph:["history"]')
    (memory,) = list(sdk.memories.list(cube.id))
    assert memory.version == 2
    assert [v.metadata["value"]["text"] for v in sdk.memories.versions(memory.id)] == ["one", "two"]


def test_keys_are_exact_and_namespaces_separate(store: MemosStore) -> None:
    store.put(("a",), "key", {"v": 1})
    store.put(("a",), "key ", {"v": 2})  # a different key, however similar
    store.put(("b",), "key", {"v": 3})
    assert store.get(("a",), "key").value == {"v": 1}  # type: ignore[union-attr]
    assert store.get(("a",), "key ").value == {"v": 2}  # type: ignore[union-attr]
    assert store.get(("b",), "key").value == {"v": 3}  # type: ignore[union-attr]
    assert store.get(("c",), "key") is None


def test_semantic_search_under_a_prefix(store: MemosStore) -> None:
    store.put(("users", "u2", "facts"), "coffee", {"text": "Dana drinks espresso every morning"})
    store.put(("users", "u2", "facts"), "city", {"text": "Dana lives in Lisbon"})
    store.put(("users", "u2", "notes"), "car", {"text": "The car needs new tyres"})
    store.put(("users", "u3", "facts"), "coffee", {"text": "Eli drinks espresso too"})

    hits = store.search(("users", "u2"), query="what coffee does Dana like?", limit=2)
    assert hits and all(isinstance(h, SearchItem) for h in hits)
    assert hits[0].key == "coffee" and hits[0].namespace == ("users", "u2", "facts")
    assert hits[0].score is not None
    assert all(h.namespace[:2] == ("users", "u2") for h in hits)  # u3 is outside the prefix


def test_search_filters_and_listing(store: MemosStore) -> None:
    ns = ("tasks",)
    for i in range(5):
        store.put(ns, f"t{i}", {"text": f"task number {i}", "priority": i, "team": "red" if i % 2 else "blue"})
    red = store.search(ns, filter={"team": "red"}, limit=10)
    assert sorted(h.key for h in red) == ["t1", "t3"]
    high = store.search(ns, filter={"priority": {"$gte": 3}}, limit=10)
    assert sorted(h.key for h in high) == ["t3", "t4"]
    queried = store.search(ns, query="task number", filter={"team": "blue", "priority": {"$lt": 4}}, limit=10)
    assert sorted(h.key for h in queried) == ["t0", "t2"]
    page = store.search(ns, limit=2, offset=1)
    assert len(page) == 2


def test_two_puts_of_a_new_key_at_once_leave_one_item(store: MemosStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both puts found no item and both added one: the key had two items, search listed it twice (found in an SDK
    review). Here the second put looks before the first one's item lands; it then gives way to the older item
    and writes its value over it."""
    ns = ("race",)
    store.put(ns, "k", {"text": "first writer"})
    real_find = MemosStore._find
    looked: list[str] = []

    def too_early(self: MemosStore, cube_id: str, key: str) -> object:
        looked.append(key)
        return None if len(looked) == 1 else real_find(self, cube_id, key)

    monkeypatch.setattr(MemosStore, "_find", too_early)
    store.put(ns, "k", {"text": "second writer"})
    monkeypatch.undo()
    items = store.search(ns, limit=10)
    assert [(i.key, i.value) for i in items] == [("k", {"text": "second writer"})]
    item = store.get(ns, "k")
    assert item is not None and item.value == {"text": "second writer"}


def test_a_put_whose_item_is_the_oldest_deletes_a_younger_twin(
    store: MemosStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order of the race: the second put looked before this one's item landed and kept its own; this
    one, whose item is the oldest, sees the younger twin and deletes it."""
    client = store._client
    real_add = client.memories.add

    def add_then_a_twin(cube_id: str, **fields: object) -> object:
        mine = real_add(cube_id, **fields)
        real_add(cube_id, **{**fields, "metadata": {**fields["metadata"], "value": {"text": "twin"}}})  # type: ignore[dict-item]
        return mine

    monkeypatch.setattr(client.memories, "add", add_then_a_twin)
    store.put(("race2",), "k", {"text": "mine"})
    monkeypatch.undo()
    assert [(i.key, i.value) for i in store.search(("race2",), limit=10)] == [("k", {"text": "mine"})]


def test_search_with_a_query_over_many_namespaces_and_its_paging_limit(
    store: MemosStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query over more than 100 namespaces was a 422 (the server's cap on cube_ids; found in an SDK review). The
    cubes go in groups (2 here), merged by rank: each search scales its own scores."""
    from memos_client.compat import langgraph

    monkeypatch.setattr(langgraph, "_SEARCH_MAX_CUBES", 2)
    for who in ("ana", "ben", "cy"):
        store.put(("people", who), "coffee", {"text": f"{who} drinks espresso every morning"})
    hits = store.search(("people",), query="who drinks espresso?", limit=10)
    assert sorted(h.namespace for h in hits) == [("people", "ana"), ("people", "ben"), ("people", "cy")]
    # Merged by rank: each group's best first (its own scale puts it near 1), then each one's second.
    best = {h.namespace for h in hits[:2]}
    assert len(best) == 2 and ("people", "cy") in best, hits  # the third cube is alone in its group
    assert store.search(("people",), query="espresso", offset=200, limit=10) == []


def test_index_fields_decide_what_is_searched(store: MemosStore) -> None:
    ns = ("docs",)
    store.put(ns, "a", {"title": "Quarterly volcano report", "body": "irrelevant"}, index=["title"])
    store.put(ns, "b", {"title": "Gardening tips", "body": "volcano ash helps tomatoes"}, index=False)
    hits = store.search(ns, query="volcano", limit=5)
    assert hits[0].key == "a"
    assert "b" not in {h.key for h in hits[:1]}


def test_list_namespaces(store: MemosStore) -> None:
    for ns in [("org", "x", "mem"), ("org", "y", "mem"), ("org", "y", "cache"), ("solo",)]:
        store.put(ns, "k", {"v": 1})
    assert store.list_namespaces(prefix=("org",)) == [("org", "x", "mem"), ("org", "y", "cache"), ("org", "y", "mem")]
    assert store.list_namespaces(suffix=("mem",)) == [("org", "x", "mem"), ("org", "y", "mem")]
    assert store.list_namespaces(prefix=("org", "*", "mem")) == [("org", "x", "mem"), ("org", "y", "mem")]
    assert store.list_namespaces(prefix=("org",), max_depth=2) == [("org", "x"), ("org", "y")]
    assert ("solo",) in store.list_namespaces()


def test_ttl_becomes_the_memory_expiry(store: MemosStore) -> None:
    store.put(("ttl",), "k", {"v": 1}, ttl=2.0)
    cube = next(c for c in store._client.cubes.list() if c.name == 'langgraph:["ttl"]')
    (memory,) = list(store._client.memories.list(cube.id))
    assert memory.expires_at is not None
    assert 110 <= (memory.expires_at - memory.created_at).total_seconds() <= 130


def test_bad_namespaces_are_refused(store: MemosStore) -> None:
    with pytest.raises(InvalidNamespaceError):
        store.put(("a.b",), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        store.put(("langgraph", "x"), "k", {"v": 1})


async def test_async_methods(store: MemosStore) -> None:
    await store.aput(("async",), "k", {"text": "asynchronous hello"})
    item = await store.aget(("async",), "k")
    assert item is not None and item.value == {"text": "asynchronous hello"}
    hits = await store.asearch(("async",), query="hello")
    assert hits[0].key == "k"
    await store.adelete(("async",), "k")
    assert await store.aget(("async",), "k") is None


def test_stores_of_two_tenants_do_not_see_each_other(factory: Factory, connect: Callable[[str], MemosClient]) -> None:
    mine, theirs = MemosStore(connect(factory.tenant().admin_key)), MemosStore(connect(factory.tenant().admin_key))
    mine.put(("shared-name",), "secret", {"text": "the vault code is 1234"})
    assert theirs.get(("shared-name",), "secret") is None
    assert theirs.search(("shared-name",), query="vault code") == []
    assert ("shared-name",) not in theirs.list_namespaces()


# --- mem0 -----------------------------------------------------------------------------------------


@pytest.fixture
def mem0(factory: Factory, connect: Callable[[str], MemosClient]) -> Memory:
    return Memory(connect(factory.tenant().admin_key))


def test_mem0_add_search_get_all(mem0: Memory) -> None:
    added = mem0.add("I like dark roast coffee", user_id="alice", metadata={"source": "chat"})
    assert [r["event"] for r in added["results"]] == ["ADD"]
    mem0.add(
        [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "My sister is called Mara"},
            {"role": "assistant", "content": "Nice, I will remember Mara"},
        ],
        user_id="alice",
    )
    mem0.add("I like green tea", user_id="bob")

    everything = mem0.get_all(user_id="alice")["results"]
    assert sorted(r["memory"] for r in everything) == [
        "I like dark roast coffee",
        "My sister is called Mara",
        "Nice, I will remember Mara",
    ]
    assert all(r["user_id"] == "alice" for r in everything)
    first = next(r for r in everything if r["memory"] == "I like dark roast coffee")
    assert first["metadata"] == {"source": "chat"} and first["role"] == "user" and len(first["hash"]) == 32

    found = mem0.search("what coffee does she like?", user_id="alice", limit=2)["results"]
    assert found[0]["memory"] == "I like dark roast coffee" and "score" in found[0]
    assert all(r["user_id"] == "alice" for r in found)
    # mem0 2.x passes the ids inside filters
    assert mem0.search("tea", filters={"user_id": "bob"})["results"][0]["memory"] == "I like green tea"
    assert mem0.get_all(filters={"user_id": "alice", "source": "chat"})["results"] == [first]


def test_mem0_update_history_delete(mem0: Memory) -> None:
    (added,) = mem0.add("Lives in Porto", user_id="carol")["results"]
    memory_id = added["id"]
    assert mem0.update(memory_id, "Lives in Lisbon") == {"message": "Memory updated successfully!"}
    got = mem0.get(memory_id)
    assert got is not None and got["memory"] == "Lives in Lisbon"
    mem0.delete(memory_id)
    assert mem0.get(memory_id) is None
    history = mem0.history(memory_id)
    assert [(h["event"], h["old_memory"], h["new_memory"]) for h in history] == [
        ("ADD", None, "Lives in Porto"),
        ("UPDATE", "Lives in Porto", "Lives in Lisbon"),
        ("DELETE", "Lives in Lisbon", None),
    ]


def test_mem0_delete_all_is_scoped(mem0: Memory) -> None:
    mem0.add("fact one", user_id="dan")
    mem0.add("fact two", user_id="dan", run_id="r1")
    mem0.add("fact three", user_id="erin")
    mem0.delete_all(user_id="dan")
    assert mem0.get_all(user_id="dan")["results"] == []
    assert [r["memory"] for r in mem0.get_all(user_id="erin")["results"]] == ["fact three"]


def test_mem0_delete_all_and_search_apply_the_other_filters(mem0: Memory) -> None:
    """delete_all deleted every memory of the user whatever the other filters said, and search applied them to the
    top k afterwards, missing a match ranked lower (found in an SDK review)."""
    mem0.add("alice drinks oat milk coffee", user_id="alice", metadata={"topic": "food"})
    mem0.add("alice drinks black coffee at breakfast", user_id="alice", metadata={"topic": "food"})
    mem0.add("alice files reports on Fridays", user_id="alice", metadata={"topic": "work"})
    found = mem0.search("what coffee does alice drink", filters={"user_id": "alice", "topic": "work"}, limit=1)
    assert [r["memory"] for r in found["results"]] == ["alice files reports on Fridays"]
    mem0.delete_all(filters={"user_id": "alice", "topic": "work"})
    left = mem0.get_all(user_id="alice")["results"]
    assert sorted(r["memory"] for r in left) == [
        "alice drinks black coffee at breakfast",
        "alice drinks oat milk coffee",
    ]


def test_mem0_bad_input(mem0: Memory) -> None:
    with pytest.raises(ValueError, match="user_id"):
        mem0.add("no scope")
    with pytest.raises(ValueError, match="whitespace"):
        mem0.add("x", user_id="a b")
    with pytest.raises(ValueError, match="query"):
        mem0.search("  ", user_id="a")
    with pytest.raises(NotFound):
        mem0.update("00000000-0000-0000-0000-000000000000", "x")
    assert mem0.get("00000000-0000-0000-0000-000000000000") is None


def test_a_cube_name_another_agent_holds_is_a_clear_error(
    factory: Factory, connect: Callable[[str], MemosClient]
) -> None:
    """Cube names are unique per tenant: the second agent's default cube cannot be created, nor seen."""
    tenant = factory.tenant()
    first, second = factory.agent(tenant), factory.agent(tenant)
    Memory(connect(first.key)).add("I like dark roast coffee", user_id="alice")
    with pytest.raises(Conflict, match="this key cannot read it") as mem0_error:
        Memory(connect(second.key)).add("I like green tea", user_id="bob")
    assert "cube=" in str(mem0_error.value)
    assert Memory(connect(second.key), cube="mem0-bob").add("I like green tea", user_id="bob")["results"]

    MemosStore(connect(first.key)).put(("notes",), "k", {"text": "first"})
    with pytest.raises(Conflict, match="this key cannot read it") as store_error:
        MemosStore(connect(second.key)).put(("notes",), "k", {"text": "second"})
    assert "cube_prefix=" in str(store_error.value)


def test_mem0_search_with_a_none_filter_value_matches_as_get_all_does(mem0: Memory) -> None:
    """{"topic": None} went to the server as containment, which needs the key; get_all and delete_all take a
    memory without it too (a review)."""
    mem0.add("bob drinks green tea", user_id="bob")
    found = mem0.search("what does bob drink?", filters={"user_id": "bob", "topic": None})["results"]
    assert [r["memory"] for r in found] == ["bob drinks green tea"]
    assert [r["memory"] for r in mem0.get_all(filters={"user_id": "bob", "topic": None})["results"]] == [
        "bob drinks green tea"
    ]

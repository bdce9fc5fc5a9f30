"""Findings of a new user's walkthrough of the SDK and its adapters: arguments the SDK must refuse (or accept)
before anything is sent, a closed client, a base URL ending in /v1, and the LangGraph and mem0 adapters.

Everything here is decided on this side of the wire, so the client talks to an ``httpx.MockTransport`` that
records what was sent (and answers like the server where an answer is needed).
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import httpx
import msgspec
import pytest
from memos_client import AsyncMemosClient, Cube, Memory, MemoryIn, MemosClient, MemosError

BASE = "http://memos.test"
CUBE_ID = "11111111-1111-1111-1111-111111111111"
MEMORY_ID = "22222222-2222-2222-2222-222222222222"
NOW = "2026-05-20T12:00:00Z"
MEMORY = {
    "id": MEMORY_ID,
    "cube_id": CUBE_ID,
    "kind": "plaintext",
    "state": "active",
    "version": 1,
    "content": "x",
    "metadata": {},
    "tags": [],
    "provenance": {},
    "created_at": NOW,
    "updated_at": NOW,
    "expires_at": None,
    "created_by": "33333333-3333-3333-3333-333333333333",
    "heat": 0.0,
}
CUBE = {
    "id": CUBE_ID,
    "name": "notes",
    "description": "",
    "metadata": {},
    "owner_agent_id": "33333333-3333-3333-3333-333333333333",
    "created_at": NOW,
    "updated_at": NOW,
    "stats": {"memories": 0, "activations": 0},
    "access": "manage",
}
ME = {"id": "a", "name": "n", "role": "agent", "tenant_id": "t"}


class Recorder:
    """A fake server: records each request and answers what a real one would, closely enough for the SDK."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.endswith("/memories/batch"):
            return httpx.Response(201, json={"items": [MEMORY]})
        if path == "/v1/cubes" and request.method == "GET":
            return httpx.Response(200, json={"items": [], "next_cursor": None})
        if path.startswith("/v1/cubes/") and request.method == "GET" and path.count("/") == 3:
            return httpx.Response(200, json=CUBE)
        if path == "/v1/agents/me":
            return httpx.Response(200, json=ME)
        if path == "/v1/search":
            return httpx.Response(200, json={"results": [], "took_ms": 1.0})
        return httpx.Response(200 if request.method != "POST" else 201, json=MEMORY)

    def body(self, n: int = -1) -> Any:
        return json.loads(self.requests[n].content)


@pytest.fixture
def server() -> Recorder:
    return Recorder()


@pytest.fixture
def sdk(server: Recorder) -> Any:
    with MemosClient(BASE, api_key="k", retries=0, transport=httpx.MockTransport(server)) as client:
        yield client


# --- 1. ids ---------------------------------------------------------------------------------------


def test_an_id_that_is_not_a_string_or_uuid_is_a_type_error_naming_the_argument(
    sdk: MemosClient, server: Recorder
) -> None:
    """str() of a Cube, None or 123 was sent as the id: the server answered a misleading 404 or 422."""
    cube = msgspec.convert(CUBE, Cube, strict=False)
    memory = msgspec.convert(MEMORY, Memory, strict=False)
    with pytest.raises(
        TypeError, match=r"^cube_id must be an id \(a UUID string or uuid.UUID\), not a Cube: pass its .id$"
    ):
        sdk.cubes.get(cube)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^memory_id must be an id .*, not a Memory: pass its .id$"):
        sdk.memories.get(memory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^cube_id must be an id .*, not None$"):
        sdk.memories.add(None, content="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^cube_id must be an id .*, not int$"):
        sdk.cubes.get(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^to must be an id .*, not a Memory: pass its .id$"):
        sdk.memories.link(MEMORY_ID, to=memory, type="supports")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^cube_ids\[1\] must be an id .*, not a Cube: pass its .id$"):
        sdk.search("x", cube_ids=[CUBE_ID, cube])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^cube_id must be an id"):
        sdk.cache.lookup(cube, "q")  # type: ignore[arg-type]
    # A pager checks its arguments when it is made, not in the loop.
    with pytest.raises(TypeError, match=r"^memory_id must be an id .*: pass its .id$"):
        sdk.memories.versions(memory)  # type: ignore[arg-type]
    assert server.requests == []
    # What sdk.md promises still works: a UUID string, or a uuid.UUID.
    assert sdk.cubes.get(uuid.UUID(CUBE_ID)).id == CUBE_ID
    assert server.requests[-1].url.path == f"/v1/cubes/{CUBE_ID}"


# --- 2. naive datetimes ---------------------------------------------------------------------------


def test_a_naive_datetime_anywhere_in_a_body_is_a_value_error(sdk: MemosClient, server: Recorder) -> None:
    """metadata={"time": datetime.now()} was sent as it is and read as UTC; sdk.md says a naive datetime is a
    ValueError, and now it is, wherever the SDK serializes one, with its place named."""
    naive = datetime(2026, 5, 20, 12, 0)
    with pytest.raises(ValueError, match=r"^metadata\.time must be timezone-aware"):
        sdk.memories.add(CUBE_ID, content="x", metadata={"time": naive})
    with pytest.raises(ValueError, match=r"^items\[1\]\.metadata\.when\[0\] must be timezone-aware"):
        sdk.memories.add_many(CUBE_ID, [{"content": "a"}, {"content": "b", "metadata": {"when": [naive]}}])
    with pytest.raises(ValueError, match=r"^items\[0\]\.metadata\.time must be timezone-aware"):
        sdk.memories.add_many(CUBE_ID, [MemoryIn(content="a", metadata={"time": naive})])
    with pytest.raises(ValueError, match=r"^metadata\.time must be timezone-aware"):
        sdk.memories.update(MEMORY_ID, if_version=1, metadata={"time": naive})
    with pytest.raises(ValueError, match=r"^filters\.time must be timezone-aware"):
        sdk.search("x", filters={"time": naive})
    with pytest.raises(ValueError, match=r"^a\.b must be timezone-aware"):
        sdk.request("POST", "/v1/anything", json={"a": {"b": naive}})
    with pytest.raises(ValueError, match=r"^since must be timezone-aware"):
        sdk.request("GET", "/v1/anything", params={"since": naive})
    assert server.requests == []
    # Aware ones are sent, with their offset, in the body and in a query string alike.
    aware = naive.replace(tzinfo=timezone(timedelta(hours=5)))
    sdk.memories.add(CUBE_ID, content="x", metadata={"time": aware})
    assert server.body()["metadata"] == {"time": "2026-05-20T12:00:00+05:00"}
    sdk.request("GET", "/v1/anything", params={"since": aware})
    assert server.requests[-1].url.params["since"] == "2026-05-20T12:00:00+05:00"


# --- 3. Python-internal TypeErrors ----------------------------------------------------------------


def test_wrong_argument_types_are_type_errors_naming_the_argument(sdk: MemosClient, server: Recorder) -> None:
    """Not "cannot convert dictionary update sequence element #0 to a sequence" or "'str' object is not a mapping"."""
    with pytest.raises(TypeError, match=r"^metadata must be a dict, not list$"):
        sdk.memories.add(CUBE_ID, content="x", metadata=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^metadata must be a dict, not str$"):
        sdk.memories.update(MEMORY_ID, if_version=1, metadata="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^metadata must be a dict, not list$"):
        sdk.cubes.create("c", metadata=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^items\[0\] must be a MemoryIn or a dict of its fields, not str$"):
        sdk.memories.add_many(CUBE_ID, ["a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^items must be a list of MemoryIn or dicts, not a single dict"):
        sdk.memories.add_many(CUBE_ID, {"content": "a"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"^items\[0\]\.metadata must be a dict, not list$"):
        sdk.memories.add_many(CUBE_ID, [{"content": "a", "metadata": [1]}])
    with pytest.raises(TypeError, match=r"^ttl_seconds must be an int \(seconds\) or a timedelta, not float$"):
        sdk.memories.add(CUBE_ID, content="x", ttl_seconds=1.5)  # type: ignore[arg-type]
    assert server.requests == []


def test_a_timedelta_ttl_is_sent_as_whole_seconds(sdk: MemosClient, server: Recorder) -> None:
    """ttl_seconds=timedelta(hours=1) was encoded as "PT3600S" and refused ("got str"): now it is 3600."""
    sdk.memories.add(CUBE_ID, content="x", ttl_seconds=timedelta(hours=1))
    assert server.body()["ttl_seconds"] == 3600
    sdk.memories.add(CUBE_ID, content="x", ttl_seconds=timedelta(seconds=1, milliseconds=500))
    assert server.body()["ttl_seconds"] == 2  # rounded up: it never expires early
    sdk.memories.update(MEMORY_ID, if_version=1, ttl_seconds=timedelta(days=1))
    assert server.body() == {"ttl_seconds": 86400}
    sdk.memories.update(MEMORY_ID, if_version=1, ttl_seconds=None)
    assert server.body() == {"ttl_seconds": None}  # None clears the expiry, as documented
    sdk.memories.add_many(
        CUBE_ID,
        [
            MemoryIn(content="a", ttl_seconds=timedelta(minutes=2)),
            {"content": "b", "ttl_seconds": timedelta(minutes=1)},
        ],
    )
    assert [item["ttl_seconds"] for item in server.body()["items"]] == [120, 60]
    sdk.cache.store(CUBE_ID, "q", "r", ttl_seconds=timedelta(hours=2))
    assert server.body()["ttl_seconds"] == 7200


# --- 4. a closed client ---------------------------------------------------------------------------


def test_a_closed_client_raises_the_sdks_own_error(server: Recorder) -> None:
    """httpx's RuntimeError escaped, though sdk.md says no httpx exception does."""
    client = MemosClient(BASE, api_key="k", transport=httpx.MockTransport(server))
    client.close()
    with pytest.raises(MemosError, match="this client is closed") as closed:
        client.cubes.get(CUBE_ID)
    assert closed.value.status is None
    with pytest.raises(MemosError, match="this client is closed"):
        list(client.cubes.list())
    assert server.requests == []


async def test_a_closed_async_client_raises_the_sdks_own_error(server: Recorder) -> None:
    client = AsyncMemosClient(BASE, api_key="k", transport=httpx.MockTransport(server))
    await client.aclose()
    with pytest.raises(MemosError, match="this client is closed"):
        await client.agents.me()
    assert server.requests == []


# --- 5. a base URL ending in /v1 ------------------------------------------------------------------


@pytest.mark.parametrize("url", [f"{BASE}/v1", f"{BASE}/v1/", f"{BASE}/"])
def test_a_base_url_ending_in_v1_is_the_servers_root(url: str, server: Recorder) -> None:
    """http://host:8000/v1 sent every call to /v1/v1/... and got a bare 404 "Not Found"."""
    with MemosClient(url, api_key="k", transport=httpx.MockTransport(server)) as client:
        assert client.base_url == BASE
        assert client.agents.me().id == "a"
    assert str(server.requests[0].url) == f"{BASE}/v1/agents/me"


def test_a_v1_that_is_not_the_last_segment_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MemosClient("http://proxy.test/memos/v1", api_key="k").base_url == "http://proxy.test/memos"
    assert MemosClient("http://v1", api_key="k").base_url == "http://v1"  # a host named v1
    assert MemosClient("http://h.test/v1x", api_key="k").base_url == "http://h.test/v1x"
    monkeypatch.setenv("MEMOS_URL", "http://env.test:8000/v1/")
    assert MemosClient(api_key="k").base_url == "http://env.test:8000"
    with pytest.raises(ValueError, match=r"^base_url 'http://h.test:port/v1' is not a valid URL: Invalid port"):
        MemosClient("http://h.test:port/v1", api_key="k")  # was httpx.InvalidURL


# --- 6. the adapters ------------------------------------------------------------------------------


def test_langgraph_refuses_a_filter_operator_it_does_not_apply(sdk: MemosClient, server: Recorder) -> None:
    """{"$in": [...]} was taken for a plain value to compare with, and every search answered []."""
    from memos_client.compat.langgraph import MemosStore

    store = MemosStore(sdk)
    with pytest.raises(ValueError, match=r"unsupported filter operator '\$in' \(in filter\['team'\]\)"):
        store.search(("team",), filter={"team": {"$in": ["red", "blue"]}})
    with pytest.raises(ValueError, match=r"'\$exists'"):
        store.search(("team",), query="x", filter={"score": {"$gt": 1, "$exists": True}})
    assert server.requests == []
    assert store.search(("team",), filter={"score": {"$gte": 1}}) == []  # the supported ones still work


def test_langgraph_refuses_a_value_that_is_not_a_dict(sdk: MemosClient, server: Recorder) -> None:
    """store.put(ns, key, "a string") failed with "dictionary update sequence element #0 ..."."""
    from memos_client.compat.langgraph import MemosStore

    store = MemosStore(sdk)
    with pytest.raises(
        TypeError, match=r"^value must be a dict \(a LangGraph item's value is a JSON object\), not str"
    ):
        store.put(("users",), "k", "just a string")  # type: ignore[arg-type]
    assert server.requests == []


def test_mem0_from_config_reads_its_section_and_refuses_what_it_does_not_understand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mem0 config was ignored: the adapter used the environment's server, whatever vector_store said."""
    from memos_client.compat.mem0 import Memory as Mem0

    monkeypatch.setenv("MEMOS_API_KEY", "k-env")
    monkeypatch.setenv("MEMOS_URL", "http://env.test")
    with pytest.raises(ValueError, match=r"from_config does not understand vector_store: .*\"memos\""):
        Mem0.from_config({"vector_store": {"provider": "qdrant", "config": {"host": "db"}}})
    with pytest.raises(ValueError, match=r"does not understand embedder, llm"):
        Mem0.from_config({"memos": {"url": "http://x"}, "llm": {}, "embedder": {}})
    with pytest.raises(
        ValueError, match=r'unknown keys in config_dict\["memos"\]: base_url \(known: url, api_key, cube\)'
    ):
        Mem0.from_config({"memos": {"base_url": "http://x"}})
    with pytest.raises(TypeError, match=r'config_dict\["memos"\]\["cube"\] must be a str, not int'):
        Mem0.from_config({"memos": {"cube": 5}})
    m = Mem0.from_config({"memos": {"url": "http://conf.test/v1", "api_key": "k-conf", "cube": "notes"}})
    assert (m._client.base_url, m._client._api_key, m._cube_name) == ("http://conf.test", "k-conf", "notes")
    m = Mem0.from_config({})
    assert (m._client.base_url, m._client._api_key, m._cube_name) == ("http://env.test", "k-env", "mem0")


def test_the_datetime_check_ends_on_a_body_that_contains_itself_and_walks_big_bodies_once(
    sdk: MemosClient, server: Recorder
) -> None:
    """The first check walked a self-containing body forever (msgspec had refused it at once), and a value
    shared by two places, or a big list of numbers, cost a Python step per element (found in review)."""
    import threading

    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            sdk.memories.add(CUBE_ID, content="x", metadata=cyclic)
        except BaseException as exc:  # what ends the call is the point
            outcome.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the check never ended"
    assert outcome and not isinstance(outcome[0], ValueError)  # msgspec's refusal, as before the check
    # A naive datetime behind a shared value is still found, once.
    naive = datetime(2026, 5, 20, 12, 0)
    shared = {"when": naive}
    with pytest.raises(ValueError, match=r"must be timezone-aware"):
        sdk.memories.add(CUBE_ID, content="x", metadata={"a": shared, "b": shared})
    assert server.requests == []


def test_langgraph_applies_operators_nested_in_a_filter_as_langgraph_does(sdk: MemosClient, server: Recorder) -> None:
    """{"a": {"b": {"$gt": 1}}} was sent to the server as a value to equal, and matched nothing, where
    LangGraph's InMemoryStore matches; {"a": {"b": {"$in": [...]}}} matched nothing where it raises."""
    from memos_client.compat.langgraph import MemosStore, _matches

    store = MemosStore(sdk)
    with pytest.raises(ValueError, match=r"'\$in' \(in filter\['a'\]\['b'\]\)"):
        store.search(("team",), filter={"a": {"b": {"$in": [5]}}})
    assert server.requests == []
    assert _matches({"a": {"b": 5, "c": 1}}, {"a": {"b": {"$gt": 1}}})
    assert not _matches({"a": {"b": 0}}, {"a": {"b": {"$gt": 1}}})
    assert _matches({"a": {"b": 5, "c": 1}}, {"a": {"b": 5}})  # a nested object matches the keys it names
    assert not _matches({"tags": ["x", "y"]}, {"tags": ["x"]})  # a list, element by element


# --- the API key in errors, a path httpx cannot use (an SDK review) -------------------------------------------


def test_a_key_with_a_newline_or_a_space_never_shows_in_an_error(server: Recorder) -> None:
    """A key with a trailing newline (read from a file) or a space reached the header, and httpx's refusal, which
    this client passed on, quoted the whole key. It is stripped as MEMOS_API_KEY is, and one with a control or a
    non-ASCII character inside is refused at once, without quoting it."""
    secret = "memos_0123456789ab_SECRETSECRETSECRET"
    with MemosClient(BASE, api_key=secret + "\n", transport=httpx.MockTransport(server)) as client:
        client.agents.me()
    assert server.requests[-1].headers["authorization"] == f"Bearer {secret}"
    for bad in (secret[:10] + "\t" + secret[10:], secret[:10] + "\n" + secret[10:], secret + "é"):
        with pytest.raises(ValueError, match="the API key holds") as refused:
            MemosClient(BASE, api_key=bad, transport=httpx.MockTransport(server))
        assert secret[12:] not in str(refused.value)

    def leaks(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused header b'Bearer {secret}'", request=request)

    client = MemosClient(BASE, api_key=secret, retries=0, transport=httpx.MockTransport(leaks))
    with client, pytest.raises(MemosError) as failed:
        client.agents.me()
    assert secret not in str(failed.value) and "<the API key>" in str(failed.value)


async def test_a_path_httpx_cannot_use_is_a_value_error_sync_and_async(server: Recorder) -> None:
    """httpx's InvalidURL escaped request(), though sdk.md says no httpx exception does."""
    client = MemosClient(BASE, api_key="k", transport=httpx.MockTransport(server))
    with client, pytest.raises(ValueError, match="not a usable path"):
        client.request("GET", "/v1/agents/me\n")
    aclient = AsyncMemosClient(BASE, api_key="k", transport=httpx.MockTransport(server))
    async with aclient:
        with pytest.raises(ValueError, match="not a usable path"):
            await aclient.request("GET", "/v1/agents/me\n")
    assert server.requests == []


async def test_models_reads_every_page_sync_and_async() -> None:
    """GET /v1/models pages (50 a page by default), and models() returned the first page only (an SDK review)."""

    def model(i: int) -> dict[str, Any]:
        return {
            "name": f"m{i:02d}",
            "fingerprint": None,
            "layers": None,
            "kv_heads": None,
            "head_dim": None,
            "dtype": "float32",
            "device": "cpu",
            "kv_bytes_per_token": None,
            "rope_shiftable": None,
            "status": "unavailable",
            "reason": "x",
        }

    def pages(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        if request.url.params.get("cursor") == "page-2":
            return httpx.Response(200, json={"items": [model(i) for i in range(50, 60)], "next_cursor": None})
        return httpx.Response(200, json={"items": [model(i) for i in range(50)], "next_cursor": "page-2"})

    with MemosClient(BASE, api_key="k", transport=httpx.MockTransport(pages)) as client:
        assert [m.name for m in client.models()] == [f"m{i:02d}" for i in range(60)]
    async with AsyncMemosClient(BASE, api_key="k", transport=httpx.MockTransport(pages)) as aclient:
        assert len(await aclient.models()) == 60


def test_a_set_of_tags_to_list_is_sent_as_tags() -> None:
    """memories.list(cube, tag={"a"}) sent ?tag={'a'} and found nothing (an SDK review)."""
    sent: list[httpx.Request] = []

    def empty(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    with MemosClient(BASE, api_key="k", transport=httpx.MockTransport(empty)) as client:
        list(client.memories.list(CUBE_ID, tag={"a"}))
        list(client.memories.list(CUBE_ID, tag=("a", "b")))
        with pytest.raises(TypeError, match="tag must be a list"):
            list(client.memories.list(CUBE_ID, tag={"a": 1}))  # type: ignore[arg-type]
    assert [r.url.params.get_list("tag") for r in sent] == [["a"], ["a", "b"]]


def test_a_blank_api_key_given_is_refused_not_replaced_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """api_key="   " silently fell back to MEMOS_API_KEY once keys were stripped (a review): a caller who passed a
    key, and got it blank, is told so."""
    monkeypatch.setenv("MEMOS_API_KEY", "memos_env_key")
    with pytest.raises(ValueError, match="api_key= is blank"):
        MemosClient(BASE, api_key="   ")
    with MemosClient(BASE) as client:
        assert client._api_key == "memos_env_key"

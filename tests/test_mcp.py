"""``memos mcp``: the MCP server driven in-process by the MCP client library, against the real app.

The app runs in the test's event loop (its lifespan in one task, as in test_sdk.py); the MCP server
talks to it through ``AsyncMemosClient`` over ``httpx.ASGITransport``, and ``mcp.Client`` talks to
the MCP server in memory (JSON-RPC framing included: ``mode="legacy"``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# The SDK is its own package; until the dev install includes it, import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import httpx
import pytest
from conftest import OPERATOR_KEY
from litestar import Litestar
from mcp.client import Client
from memos_client import AsyncMemosClient

from memos.app import create_app
from memos.embed.base import Embedder
from memos.mcp_server import NOT_FOUND, ConfigError, create_server, resolve
from memos.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BASE = "http://memos.test"
MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
async def async_app(settings: Settings, embedder: Embedder) -> AsyncIterator[Litestar]:
    app = create_app(settings, embedder_factory=lambda: embedder)
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(serve())
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()
    assert started.is_set(), "the app did not start"
    yield app
    stop.set()
    await task


def connect(app: Litestar, key: str) -> AsyncMemosClient:
    return AsyncMemosClient(BASE, api_key=key, transport=httpx.ASGITransport(app=app))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def agent_key_and_cube(async_app: Litestar) -> tuple[str, str]:
    """A fresh tenant, an agent in it, and a cube the agent owns, all made through the SDK."""
    async with connect(async_app, OPERATOR_KEY) as operator:
        tenant = await operator.tenants.create(f"mcp-{uuid.uuid4().hex[:8]}")
    async with connect(async_app, tenant.admin_key) as admin:
        agent = await admin.agents.create("mcp-agent")
    async with connect(async_app, agent.api_key) as sdk:
        cube = await sdk.cubes.create(f"mcp-{uuid.uuid4().hex[:8]}")
    return agent.api_key, cube.id


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    return data


def text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


async def test_tools_round_trip(async_app: Litestar, agent_key_and_cube: tuple[str, str]) -> None:
    key, cube_id = agent_key_and_cube
    async with connect(async_app, key) as sdk, Client(create_server(sdk, cube_id), mode="legacy") as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert set(tools) == {"remember", "recall", "forget", "history", "cache_lookup", "cache_store"}
        assert set(tools["remember"].input_schema["properties"]) == {"content", "tags", "metadata"}
        assert tools["remember"].input_schema["required"] == ["content"]
        assert set(tools["recall"].input_schema["properties"]) == {"query", "k", "mode"}
        # The bounds a model must respect are in the schema it reads, not only in the errors it gets back.
        k = tools["recall"].input_schema["properties"]["k"]
        assert (k["minimum"], k["maximum"], k["default"]) == (1, 200, 10)
        over = await mcp.call_tool("recall", {"query": "tea", "k": 201})
        assert over.is_error and "200" in over.content[0].text

        saved = structured(
            await mcp.call_tool(
                "remember",
                {"content": "Ada prefers jasmine tea", "tags": ["prefs"], "metadata": {"speaker": "Ada"}},
            )
        )
        assert saved["version"] == 1
        assert saved["cube_id"] == cube_id
        memory_id = saved["id"]
        structured(await mcp.call_tool("remember", {"content": "The office moved to Lisbon in May"}))

        found = structured(await mcp.call_tool("recall", {"query": "what tea does Ada like", "k": 5}))
        top = found["results"][0]
        assert top["id"] == memory_id
        assert top["content"] == "Ada prefers jasmine tea"
        assert top["via"]
        assert top["score"] > 0
        assert top["tags"] == ["prefs"]
        assert top["metadata"] == {"speaker": "Ada"}

        by_text = structured(await mcp.call_tool("recall", {"query": "jasmine", "mode": "text"}))
        assert [r["id"] for r in by_text["results"]] == [memory_id]

        versions = structured(await mcp.call_tool("history", {"memory_id": memory_id}))["versions"]
        assert [(v["version"], v["op"], v["content"]) for v in versions] == [(1, "create", "Ada prefers jasmine tea")]
        assert versions[0]["created_at"]

        assert structured(await mcp.call_tool("forget", {"memory_id": memory_id})) == {
            "id": memory_id,
            "state": "deleted",
        }
        found = structured(await mcp.call_tool("recall", {"query": "what tea does Ada like", "k": 5}))
        assert memory_id not in [r["id"] for r in found["results"]]

        versions = structured(await mcp.call_tool("history", {"memory_id": memory_id}))["versions"]
        assert [(v["version"], v["op"]) for v in versions] == [(1, "create"), (2, "delete")]


async def test_cache_tools(async_app: Litestar, agent_key_and_cube: tuple[str, str]) -> None:
    key, cube_id = agent_key_and_cube
    async with connect(async_app, key) as sdk, Client(create_server(sdk, cube_id), mode="legacy") as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert tools["cache_lookup"].input_schema["required"] == ["query"]
        assert tools["cache_store"].input_schema["required"] == ["query", "response"]
        ttl = tools["cache_store"].input_schema["properties"]["ttl_seconds"]
        assert {"type": "integer", "minimum": 1} in ttl["anyOf"]

        miss = structured(await mcp.call_tool("cache_lookup", {"query": "How long do I boil an egg?"}))
        assert (miss["hit"], miss["response"]) == (False, None)
        assert miss["reason"].startswith("miss:")

        saved = structured(
            await mcp.call_tool("cache_store", {"query": "How long do I boil an egg?", "response": "Seven minutes."})
        )
        assert (saved["version"], saved["cube_id"]) == (1, cube_id)
        hit = structured(await mcp.call_tool("cache_lookup", {"query": "How long should I boil an egg?"}))
        assert (hit["hit"], hit["response"], hit["memory_id"]) == (True, "Seven minutes.", saved["id"])
        assert hit["similarity"] >= hit["threshold"]

        history = ["I'm booking the Riverside hotel for May.", "The Riverside has a double at £140 or a suite at £260."]
        structured(
            await mcp.call_tool(
                "cache_store", {"query": "book the cheaper one", "response": "Double booked.", "context": history}
            )
        )
        same = structured(await mcp.call_tool("cache_lookup", {"query": "Book the cheaper one", "context": history}))
        assert same["hit"] is True
        elsewhere = ["I need a rental car in May.", "A Fiat 500 is £30 a day, a Golf £45. Which one?"]
        other = structured(await mcp.call_tool("cache_lookup", {"query": "Book the cheaper one", "context": elsewhere}))
        assert other["hit"] is False

        result = await mcp.call_tool("cache_store", {"query": "Anything?", "response": ""})
        assert result.is_error
        assert "response" in text(result)
        result = await mcp.call_tool("cache_lookup", {"query": "x", "category": "nowhere"})
        assert result.is_error
        assert "category" in text(result)


async def test_api_problems_are_tool_errors(async_app: Litestar, agent_key_and_cube: tuple[str, str]) -> None:
    key, cube_id = agent_key_and_cube
    async with connect(async_app, key) as sdk, Client(create_server(sdk, cube_id)) as mcp:
        result = await mcp.call_tool("forget", {"memory_id": MISSING})
        assert result.is_error
        message = text(result)
        assert "404 Not found: no such memory" in message, message
        assert "Traceback" not in message

        result = await mcp.call_tool("history", {"memory_id": "not-a-uuid"})
        assert result.is_error
        assert "Traceback" not in text(result)

        result = await mcp.call_tool("recall", {"query": "tea", "k": 0})
        assert result.is_error
        assert "k" in text(result)

        result = await mcp.call_tool("remember", {"content": ""})
        assert result.is_error
        assert "content" in text(result)


async def test_recall_returns_memories_not_cached_answers(
    async_app: Litestar, agent_key_and_cube: tuple[str, str]
) -> None:
    """recall is memory search: a cached answer (kind "response", from cache_store) is cache_lookup's, not recall's
    (found in review: recall returned it as a memory)."""
    key, _ = agent_key_and_cube
    async with connect(async_app, key) as sdk:
        cube = await sdk.cubes.create(f"recall-{uuid.uuid4().hex[:8]}")
        async with Client(create_server(sdk, cube.id), mode="legacy") as mcp:
            cached = structured(
                await mcp.call_tool("cache_store", {"query": "Which tea does Ada drink?", "response": "Jasmine tea."})
            )
            kept = structured(await mcp.call_tool("remember", {"content": "Ada drinks jasmine tea"}))
            for mode in ("hybrid", "text", "vector"):
                found = structured(await mcp.call_tool("recall", {"query": "Ada jasmine tea", "mode": mode}))
                assert [r["id"] for r in found["results"]] == [kept["id"]], mode
        # The cached answer is there, and in the search the API answers without the tool's default.
        everything = await sdk.search("Ada jasmine tea", cube_ids=[cube.id], mode="text")
        assert cached["id"] in [r.memory.id for r in everything.results]


async def test_other_cubes_are_out_of_reach(async_app: Litestar, agent_key_and_cube: tuple[str, str]) -> None:
    """The key may see other cubes, but the server acts on its own cube only."""
    key, cube_id = agent_key_and_cube
    async with connect(async_app, key) as sdk:
        other = await sdk.cubes.create(f"other-{uuid.uuid4().hex[:8]}")
        elsewhere = await sdk.memories.add(other.id, content="Grace takes her coffee black")
        async with Client(create_server(sdk, cube_id)) as mcp:
            found = structured(await mcp.call_tool("recall", {"query": "how does Grace take coffee"}))
            assert elsewhere.id not in [r["id"] for r in found["results"]]
            for tool in ("forget", "history"):
                result = await mcp.call_tool(tool, {"memory_id": elsewhere.id})
                assert result.is_error
                # word for word what an id that names nothing gets (found in review: it said "not in this cube")
                assert text(result) == text(await mcp.call_tool(tool, {"memory_id": MISSING}))
                assert text(result).endswith(NOT_FOUND)
        assert (await sdk.memories.get(elsewhere.id)).state == "active"
        # the server's cube given in upper case is still its own cube (found in review: every id was "elsewhere")
        mine = await sdk.memories.add(cube_id, content="The boiler is serviced every October")
        async with Client(create_server(sdk, cube_id.upper())) as mcp:
            assert structured(await mcp.call_tool("history", {"memory_id": mine.id}))


def test_options_and_environment() -> None:
    env = {"MEMOS_URL": "http://memos:9000", "MEMOS_API_KEY": "k-env", "MEMOS_CUBE_ID": "c-env"}
    assert resolve(None, None, None, env) == ("http://memos:9000", "k-env", "c-env")
    assert resolve("http://x", "k", "c", env) == ("http://x", "k", "c")
    assert resolve(None, "k", "c", {}) == ("http://127.0.0.1:8000", "k", "c")
    with pytest.raises(ConfigError, match="API key"):
        resolve(None, None, "c", {})
    with pytest.raises(ConfigError, match="cube"):
        resolve(None, "k", None, {})


def test_app_does_not_import_mcp() -> None:
    code = "import sys, memos.app, memos.cli.main; print(sorted(m for m in ('mcp', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_cli_refuses_a_missing_cube() -> None:
    code = "import sys; from memos.cli.main import main; sys.exit(main(['mcp', '--api-key', 'k']))"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2
    assert "a cube is required" in out.stderr


async def test_a_url_that_does_not_parse_is_a_config_error() -> None:
    """`memos mcp --url 'http://[::1'` was a ValueError traceback, exit 1; mcp.md says a wrong URL is a message on
    stderr and exit 2 (found in an SDK review)."""
    from memos.mcp_server import serve

    with pytest.raises(ConfigError, match="Invalid IPv6 URL"):
        await serve("http://[::1", "k", "c")

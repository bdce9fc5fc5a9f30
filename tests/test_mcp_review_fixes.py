"""Findings of a new user's walkthrough of ``memos mcp``: how bad tool arguments reach the agent.

Arguments are checked before any API call, so the MCP server's SDK client talks to an ``httpx.MockTransport``
that records what would have been sent (and answers a 422 like the server's where one is needed).
tests/test_mcp.py covers the tools against the real app.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import httpx
import pytest
from mcp.client import Client
from memos_client import AsyncMemosClient

from memos.mcp_server import create_server

CUBE_ID = "11111111-1111-1111-1111-111111111111"
INVALID_CONTENT = {
    "type": "https://memos.dev/problems/invalid",
    "title": "Invalid request",
    "status": 422,
    "detail": "content: Expected `str` of length >= 1",
    "errors": [{"field": "content", "message": "Expected `str` of length >= 1"}],
}


class Api:
    """Records what the MCP server sends to the API; answers a 422 on content, as memos does for an empty one."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(422, json=INVALID_CONTENT)


@pytest.fixture
def api() -> Api:
    return Api()


@asynccontextmanager
async def session(api: Callable[[httpx.Request], httpx.Response]) -> AsyncIterator[Client]:
    """An MCP client on the memos MCP server, in-process (entered and left in the test's own task, as the MCP
    client's task group requires)."""
    async with (
        AsyncMemosClient("http://memos.test", api_key="k", transport=httpx.MockTransport(api)) as sdk,
        Client(create_server(sdk, CUBE_ID)) as client,
    ):
        yield client


def text(result: Any) -> str:
    assert result.is_error, result
    return " ".join(getattr(block, "text", "") for block in result.content)


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("recall", {"query": "tea", "k": 0}, "k: must be from 1 to 200, not 0"),
        ("recall", {"query": "tea", "k": 201}, "k: must be from 1 to 200, not 201"),
        ("recall", {"query": "tea", "k": "ten"}, "k: must be an integer, not a string"),
        # Coerced before (the REST API answers 422 for each): found by a new-user walkthrough.
        ("recall", {"query": "tea", "k": "3"}, "k: must be an integer, not a string"),
        ("recall", {"query": "tea", "k": True}, "k: must be an integer, not a boolean"),
        ("recall", {"query": "tea", "k": 2.5}, "k: must be an integer, not a number"),
        ("remember", {"content": 5}, "content: must be a string, not a number"),
        (
            "recall",
            {"query": "tea", "mode": "fuzzy"},
            "mode: must be one of 'hybrid', 'vector', 'text', 'graph', not 'fuzzy'",
        ),
        ("remember", {"content": "x", "tags": "food"}, "tags: must be a list of strings, not a string"),
        ("remember", {"content": "x", "tags": ["ok", 1]}, "tags[1]: must be a string, not a number"),
        ("remember", {"content": "x", "metadata": "notadict"}, "metadata: must be an object, not a string"),
        ("remember", {}, "content: required"),
        ("cache_store", {"query": "q", "response": "r", "ttl_seconds": -5}, "ttl_seconds: must be at least 1, not -5"),
        ("forget", {"memory_id": None}, "memory_id: must be a string, not null"),
    ],
)
async def test_bad_arguments_are_one_short_line_naming_the_argument(
    api: Api, tool: str, arguments: dict[str, Any], message: str
) -> None:
    """They reached the agent as pydantic's report: "1 validation error for recallArguments ... https://errors..."."""
    async with session(api) as mcp:
        result = await mcp.call_tool(tool, arguments)
    assert text(result) == f"Error executing tool {tool}: {message}"
    assert api.requests == []


async def test_a_whole_number_written_as_a_float_is_an_integer(api: Api) -> None:
    """JSON Schema's integer includes 3.0 and the REST API takes it; strict argument types refused it (review)."""
    async with session(api) as mcp:
        await mcp.call_tool("recall", {"query": "tea", "k": 3.0})
    (sent,) = api.requests  # past the arguments' check, to the API (which this fake answers 422)
    assert json.loads(sent.content)["k"] == 3


async def test_several_bad_arguments_are_all_named(api: Api) -> None:
    async with session(api) as mcp:
        result = await mcp.call_tool("recall", {"query": "tea", "k": 0, "mode": "fuzzy"})
    assert text(result) == (
        "Error executing tool recall: k: must be from 1 to 200, not 0; "
        "mode: must be one of 'hybrid', 'vector', 'text', 'graph', not 'fuzzy'"
    )


async def test_an_unknown_argument_is_an_error_naming_it(api: Api) -> None:
    """An argument a tool does not take was dropped silently (the REST API answers 422 for an unknown field)."""
    async with session(api) as mcp:
        result = await mcp.call_tool("remember", {"content": "x", "extra": 1})
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
    assert (
        text(result) == "Error executing tool remember: extra: unknown argument; remember takes content, tags, metadata"
    )
    assert api.requests == []  # nothing was stored
    # The published schema says so too, and is otherwise what it was.
    for tool in tools.values():
        assert tool.input_schema["additionalProperties"] is False, tool.name
    assert set(tools["remember"].input_schema["properties"]) == {"content", "tags", "metadata"}
    k = tools["recall"].input_schema["properties"]["k"]
    assert (k["minimum"], k["maximum"], k["default"]) == (1, 200, 10)


async def test_a_rejected_field_is_named_once(api: Api) -> None:
    """It read "content: Expected ... (content: Expected ...)": the detail already names the field."""
    async with session(api) as mcp:
        result = await mcp.call_tool("remember", {"content": ""})
    assert text(result) == "Error executing tool remember: 422 Invalid request: content: Expected `str` of length >= 1"
    assert len(api.requests) == 1


async def test_recall_searches_memories_not_cached_answers() -> None:
    """recall returned the semantic cache's "response" entries as if they were memories."""
    seen: list[httpx.Request] = []

    def search(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"results": [], "took_ms": 1.0})

    async with session(search) as mcp:
        assert not (await mcp.call_tool("recall", {"query": "tea"})).is_error
    assert json.loads(seen[0].content)["kinds"] == ["plaintext"]

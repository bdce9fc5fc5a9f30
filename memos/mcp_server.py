"""``memos mcp``: an MCP server that gives an agent memory and cache tools on one cube.

The server is bound at start to one memos URL, one API key and one cube; every tool call goes to
the memos REST API through the SDK (``memos_client.AsyncMemosClient``), never to the database.
Tools: ``remember`` (add), ``recall`` (search), ``forget`` (soft delete), ``history`` (versions),
``cache_lookup`` and ``cache_store`` (the semantic cache: reuse an answer a model gave before).
An API problem comes back as an MCP tool error (``is_error``) carrying the problem's status, title
and detail, never a traceback; so do bad arguments, one short line per argument (an unknown argument
included), never pydantic's report.

Only ``memos mcp`` imports this module: ``import memos.app`` must not pull in ``mcp``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase

# The SDK (clients/python) is installed editable, through an import hook mypy cannot follow: it is typed (py.typed)
# when mypy finds it (mypy_path = "clients/python"), and Any, not an error, when it does not.
from memos_client import AsyncMemosClient, MemosError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from memos.search.schemas import MAX_K

if TYPE_CHECKING:
    from mcp.server.mcpserver.context import Context

T = TypeVar("T")

Mode = Literal["hybrid", "vector", "text", "graph"]
Transport = Literal["stdio", "http"]

INSTRUCTIONS = (
    "Long-term memory backed by memos. Use `remember` to store a fact worth keeping, `recall` to find "
    "what was stored (best first), `history` to see how a memory changed, and `forget` to delete one. "
    "Before asking a model a question, `cache_lookup` may return an answer given before to the same question "
    "(in a compatible conversation); after getting a new answer worth reusing, `cache_store` keeps it. "
    "Everything happens in one memory cube chosen when this server was started."
)


# --- tool results -------------------------------------------------------------------------------


class Remembered(BaseModel):
    id: str = Field(description="The memory's id: pass it to forget or history.")
    version: int = Field(description="The memory's version (1 for a new memory).")
    cube_id: str


class Hit(BaseModel):
    id: str = Field(description="The memory's id.")
    content: str | None = Field(description="The memory's text (null once purged).")
    score: float = Field(description="Relevance, higher is better.")
    via: str = Field(description="Why it matched: vector, text, text+vector or graph:<edge><-<seed id>.")
    tags: list[str]
    metadata: dict[str, Any]
    version: int
    created_at: datetime


class Recalled(BaseModel):
    results: list[Hit] = Field(description="Matching memories, best first.")


class Forgotten(BaseModel):
    id: str
    state: str = Field(description="`deleted`: the memory no longer appears in recall; its history is kept.")


class VersionEntry(BaseModel):
    version: int
    op: str = Field(description="create, update, restore or delete.")
    state: str
    content: str | None
    tags: list[str]
    metadata: dict[str, Any]
    created_at: datetime


class History(BaseModel):
    id: str
    versions: list[VersionEntry] = Field(description="Every version, oldest first.")


class CacheAnswer(BaseModel):
    hit: bool = Field(description="True when a cached answer to the same question was found and may be used.")
    response: str | None = Field(description="The cached answer (null on a miss).")
    memory_id: str | None = Field(description="The cached entry's memory id (null on a miss).")
    similarity: float | None = Field(description="Similarity of the cached question to this one.")
    threshold: float = Field(description="The similarity the entry had to reach.")
    reason: str = Field(description="Why it hit or missed.")


class Cached(BaseModel):
    id: str = Field(description="The cached entry's memory id.")
    version: int
    cube_id: str


# --- errors -------------------------------------------------------------------------------------


def _problem_text(exc: MemosError) -> str:
    """The problem detail as one readable line for the model: status, title, detail and field errors.

    A 422's detail already lists its fields (``content: Expected ...``): a field error is added only
    when the detail does not say it already, so nothing is said twice.
    """
    text = str(exc.message)
    missing = [f"{e.field}: {e.message}" for e in exc.field_errors if f"{e.field}: {e.message}" not in text]
    if missing:
        text += " (" + "; ".join(missing) + ")"
    return text


# --- tool arguments -------------------------------------------------------------------------------


_JSON_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES.items() if isinstance(value, kind)), type(value).__name__)


def _non_null(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """An optional argument's schema without its ``null`` arm."""
    arms = [a for a in schema.get("anyOf", ()) if a.get("type") != "null"]
    return cast(Mapping[str, Any], arms[0]) if len(arms) == 1 else schema


def _schema_at(schema: Mapping[str, Any], loc: tuple[int | str, ...]) -> Mapping[str, Any]:
    node = schema
    for part in loc:
        node = _non_null(node)
        node = node.get("items", {}) if isinstance(part, int) else node.get("properties", {}).get(part, {})
    return _non_null(node)


def _expected(schema: Mapping[str, Any]) -> str:
    """What a JSON schema asks for, in words: ``a list of strings``, ``an integer``, ``one of 'a', 'b'``."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        items = _expected(_non_null(schema.get("items", {})))
        return "a list" if items == "a value" else f"a list of {items.removeprefix('a ').removeprefix('an ')}s"
    return {
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "object": "an object",
    }.get(str(kind), "a value")


def _where(loc: tuple[int | str, ...]) -> str:
    """``("tags", 0)`` as ``tags[0]``, the way the REST API names a field."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _argument_error(tool: Tool, error: ErrorDetails) -> str:
    loc = error["loc"]
    schema = _schema_at(tool.parameters, loc)
    value, kind = error.get("input"), error["type"]
    if kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        message = f"unknown argument; {tool.name} takes {', '.join(tool.parameters.get('properties', {}))}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            message = f"must be from {low} to {high}, not {value!r}"
        elif low is not None:
            message = f"must be at least {low}, not {value!r}"
        else:
            message = error["msg"].replace("Input should be", "must be") + f", not {value!r}"
    elif kind in ("literal_error", "enum"):
        message = f"must be {_expected(schema)}, not {value!r}"
    elif kind == "int_from_float":
        message = f"must be a whole number, not {value!r}"
    elif kind.endswith(("_type", "_parsing")):
        message = f"must be {_expected(schema)}, not {_json_type(value)}"
    else:
        message = error["msg"].replace("Input should be", "must be")
    return f"{_where(loc) or 'arguments'}: {message}"


class _Tool(Tool):
    """A tool whose bad arguments are told in one short line per argument, named as the REST API names fields
    (``k: must be from 1 to 200, not 0``), not in pydantic's report with its links."""

    async def run(self, arguments: dict[str, Any], context: Context[Any, Any], convert_result: bool = False) -> Any:
        try:
            return await super().run(arguments, context, convert_result)
        except ToolError as exc:
            # The base run validates the arguments once and raises a plain ToolError caused by pydantic's
            # ValidationError when they do not fit; only that one is reworded (a crash is UnexpectedToolError).
            cause = exc.__cause__
            if type(exc) is not ToolError or not isinstance(cause, ValidationError):
                raise
            errors = dict.fromkeys(_argument_error(self, e) for e in cause.errors(include_url=False))
            raise ToolError(f"Error executing tool {self.name}: {'; '.join(errors)}") from cause


def _tool(fn: Callable[..., Any]) -> Tool:
    """``fn`` as a tool that refuses unknown arguments (as the REST API refuses unknown fields: 422), and says
    so in the schema it publishes (``additionalProperties: false``), and takes each argument only as the type
    its schema gives (strict: ``"k": "3"`` or ``true`` was read as a number, where the REST API answers 422)."""
    tool = _Tool.from_function(fn)
    loose = tool.fn_metadata.arg_model
    integers = {
        name
        for name, spec in loose.model_json_schema(by_alias=True).get("properties", {}).items()
        if "integer" in {spec.get("type"), *(option.get("type") for option in spec.get("anyOf", []))}
    }

    def whole_numbers(cls: type[BaseModel], data: Any) -> Any:
        # JSON Schema's integer includes 5.0, and the REST API takes it: so does a tool (strict refuses it).
        if not isinstance(data, dict):
            return data
        return {k: int(v) if k in integers and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}

    namespace = {
        "__module__": loose.__module__,
        "model_config": ConfigDict(extra="forbid", strict=True),
        "whole_numbers": model_validator(mode="before")(classmethod(whole_numbers)),  # type: ignore[arg-type]
    }
    strict = cast(type[ArgModelBase], type(loose.__name__, (loose,), namespace))
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool


async def _call(op: Callable[[], Awaitable[T]]) -> T:
    """Run one SDK call; API problems and bad arguments become ``ToolError`` (an MCP tool error)."""
    try:
        return await op()
    except MemosError as exc:
        raise ToolError(_problem_text(exc)) from exc
    except (ValueError, TypeError) as exc:  # the SDK's own argument checks, worded like the server's
        raise ToolError(str(exc)) from exc


# --- the server ---------------------------------------------------------------------------------


NOT_FOUND = "404 Not found: no such memory"
"""What the API answers (through the SDK) for a memory id that names nothing."""


def _canonical_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value  # not an id at all: the start-up check (``serve``) names the problem


def create_server(client: AsyncMemosClient, cube_id: str, *, name: str = "memos") -> MCPServer:
    """An MCP server whose tools act on ``cube_id`` through ``client``; the caller owns the client's lifecycle."""
    cube_id = _canonical_id(cube_id)  # the API writes ids in lower case: "ABC..." must still match them

    async def _in_cube(memory_id: str) -> None:
        """A memory of another cube is reported exactly as a memory that does not exist: this server sees only
        its own cube, and must not tell the model that the id names something elsewhere."""
        memory = await _call(lambda: client.memories.get(memory_id))
        if memory.cube_id != cube_id:
            raise ToolError(NOT_FOUND)

    async def remember(
        content: str,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Remembered:
        """Store a new memory (a fact, preference or event worth keeping) and return its id and version."""
        memory = await _call(lambda: client.memories.add(cube_id, content=content, tags=tags, metadata=metadata))
        return Remembered(id=memory.id, version=memory.version, cube_id=memory.cube_id)

    # k: the search API's own bounds, published in the tool's schema so a model sees them.
    async def recall(query: str, k: Annotated[int, Field(ge=1, le=MAX_K)] = 10, mode: Mode = "hybrid") -> Recalled:
        """Search the memories for `query`; return up to `k` of them, best first.

        `mode`: hybrid (default: text and vector together), vector (by meaning), text (by words) or graph
        (hybrid, then follow links between memories). Cached answers (`cache_store`) are not memories: they
        are never returned here.
        """
        # kinds: the memories an agent stored; the cache's "response" entries answer cache_lookup only.
        found = await _call(lambda: client.search(query, cube_ids=[cube_id], k=k, mode=mode, kinds=["plaintext"]))
        return Recalled(
            results=[
                Hit(
                    id=r.memory.id,
                    content=r.memory.content,
                    score=r.score,
                    via=r.via,
                    tags=r.memory.tags,
                    metadata=r.memory.metadata,
                    version=r.memory.version,
                    created_at=r.memory.created_at,
                )
                for r in found.results
            ]
        )

    async def forget(memory_id: str) -> Forgotten:
        """Delete a memory: it stops appearing in recall, but its history is kept."""
        await _in_cube(memory_id)
        await _call(lambda: client.memories.delete(memory_id))
        return Forgotten(id=memory_id, state="deleted")

    async def history(memory_id: str) -> History:
        """Every version of a memory, oldest first: what it said, and whether it was created, updated or deleted."""
        await _in_cube(memory_id)

        async def versions() -> list[VersionEntry]:
            return [
                VersionEntry(
                    version=v.version,
                    op=v.op,
                    state=v.state,
                    content=v.content,
                    tags=v.tags,
                    metadata=v.metadata,
                    created_at=v.created_at,
                )
                async for v in client.memories.versions(memory_id)
            ]

        return History(id=memory_id, versions=await _call(versions))

    async def cache_lookup(query: str, context: list[str] | None = None, category: str | None = None) -> CacheAnswer:
        """Look for an answer given before to the same question; use `response` when `hit` is true.

        `context`: the conversation turns before the question, oldest first, alternating and ending with the
        assistant's (needed when the question refers back to them, like "cancel it"). `category`: a cache
        category configured for the cube (default: the cube's default).
        """
        found = await _call(lambda: client.cache.lookup(cube_id, query, category=category, context=context))
        return CacheAnswer(
            hit=found.hit,
            response=found.response,
            memory_id=found.memory_id,
            similarity=found.similarity,
            threshold=found.threshold,
            reason=found.reason,
        )

    async def cache_store(
        query: str,
        response: str,
        context: list[str] | None = None,
        category: str | None = None,
        ttl_seconds: Annotated[int, Field(ge=1)] | None = None,
    ) -> Cached:
        """Keep `response` as the answer to `query` (asked after `context`), so the same question is answered
        from the cache next time. `ttl_seconds`: forget it after this long (answers that go stale)."""
        memory = await _call(
            lambda: client.cache.store(
                cube_id, query, response, category=category, context=context, ttl_seconds=ttl_seconds
            )
        )
        return Cached(id=memory.id, version=memory.version, cube_id=memory.cube_id)

    tools = [_tool(fn) for fn in (remember, recall, forget, history, cache_lookup, cache_store)]
    return MCPServer(name=name, instructions=INSTRUCTIONS, log_level="WARNING", tools=tools)


# --- running it ---------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A missing or bad option of ``memos mcp``: no key or cube, or a key or cube the API refuses."""


def resolve(
    url: str | None, api_key: str | None, cube_id: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, str, str]:
    """URL, key and cube from the options, else ``MEMOS_URL`` / ``MEMOS_API_KEY`` / ``MEMOS_CUBE_ID``."""
    env = os.environ if env is None else env
    url = url or env.get("MEMOS_URL") or "http://127.0.0.1:8000"
    api_key = api_key or env.get("MEMOS_API_KEY")
    cube_id = cube_id or env.get("MEMOS_CUBE_ID")
    if not api_key:
        raise ConfigError("an API key is required: --api-key or MEMOS_API_KEY")
    if not cube_id:
        raise ConfigError("a cube is required: --cube or MEMOS_CUBE_ID")
    return url, api_key, cube_id


async def serve(
    url: str,
    api_key: str,
    cube_id: str,
    *,
    transport: Transport = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
) -> None:
    """Check the key and the cube once, then serve MCP on stdio or streamable HTTP (``http://host:port/mcp``)."""
    try:
        client = AsyncMemosClient(url, api_key=api_key)
    except ValueError as exc:  # a URL that does not parse, a key no header can carry: a traceback before (review)
        raise ConfigError(f"cannot use the URL or the API key given: {exc}") from None
    async with client:
        try:
            await client.cubes.get(cube_id)  # a bad URL, key or cube fails here, not on the first tool call
        except MemosError as exc:
            raise ConfigError(f"cannot use cube {cube_id} at {url}: {exc}") from exc
        server = create_server(client, cube_id)
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=host, port=port)

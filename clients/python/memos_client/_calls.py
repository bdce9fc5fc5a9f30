"""Every API call as a ``Call``: the path, verb, parameters and body, and the type of the answer.

Pure functions, shared by the sync and async resources, so the two clients cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import msgspec

from memos_client._base import (
    Call,
    Id,
    QueryParams,
    any_json,
    compact,
    decoder,
    ident,
    no_content,
    path,
    query,
    seconds,
    time_param,
)
from memos_client._models import (
    Activation,
    Agent,
    AgentCreated,
    ApiKey,
    CacheConfig,
    CacheLookup,
    CacheStats,
    Cube,
    Generation,
    Grant,
    KeyCreated,
    Link,
    LinkIn,
    Me,
    Memory,
    MemoryIn,
    Model,
    Page,
    Pin,
    Provenance,
    ProvenanceGraph,
    SchedulerState,
    SearchResponse,
    TenantCreated,
    Turn,
    Version,
)

T = TypeVar("T")

# Decoders are built once per type: msgspec compiles each one.
_TENANT_CREATED = decoder(TenantCreated)
_AGENT_CREATED = decoder(AgentCreated)
_AGENT_PAGE = decoder(Page[Agent])
_ME = decoder(Me)
_KEY_CREATED = decoder(KeyCreated)
_KEY_PAGE = decoder(Page[ApiKey])
_CUBE = decoder(Cube)
_CUBE_PAGE = decoder(Page[Cube])
_GRANT = decoder(Grant)
_MEMORY = decoder(Memory)
_MEMORY_PAGE = decoder(Page[Memory])
_VERSION = decoder(Version)
_VERSION_PAGE = decoder(Page[Version])
_PROVENANCE = decoder(ProvenanceGraph)
_LINK = decoder(Link)
_SEARCH = decoder(SearchResponse)
_CACHE_LOOKUP = decoder(CacheLookup)
_CACHE_STATS = decoder(CacheStats)
_CACHE_CONFIG = decoder(CacheConfig)


class _Invalidated(msgspec.Struct):
    invalidated: int


_INVALIDATED = decoder(_Invalidated)
_MODEL_PAGE = decoder(Page[Model])
_ACTIVATION = decoder(Activation)
_ACTIVATION_PAGE = decoder(Page[Activation])
_GENERATION = decoder(Generation)
_SCHEDULER = decoder(SchedulerState)
_PIN = decoder(Pin)


class _Items(msgspec.Struct):
    items: list[Memory]


_MEMORY_ITEMS = decoder(_Items)


def _if_match(if_version: int | None) -> dict[str, str] | None:
    if if_version is None:
        return None
    if isinstance(if_version, bool) or not isinstance(if_version, int):
        raise TypeError(f"if_version must be an int (a memory's version), not {type(if_version).__name__}")
    return {"If-Match": f'"{if_version}"'}


# --- identity -----------------------------------------------------------------------------------


def create_tenant(name: str) -> Call[TenantCreated]:
    return Call("POST", path("tenants"), _TENANT_CREATED, body={"name": name})


def create_agent(name: str, role: str) -> Call[AgentCreated]:
    return Call("POST", path("agents"), _AGENT_CREATED, body={"name": name, "role": role})


def me() -> Call[Me]:
    return Call("GET", path("agents", "me"), _ME)


def list_agents(cursor: str | None, page_size: int | None) -> Call[Page[Agent]]:
    return Call("GET", path("agents"), _AGENT_PAGE, params=query(limit=page_size, cursor=cursor))


def rotate_key(agent_id: Id) -> Call[KeyCreated]:
    return Call("POST", path("agents", ident("agent_id", agent_id), "keys"), _KEY_CREATED)


def list_keys(agent_id: Id, cursor: str | None, page_size: int | None) -> Call[Page[ApiKey]]:
    return Call(
        "GET",
        path("agents", ident("agent_id", agent_id), "keys"),
        _KEY_PAGE,
        params=query(limit=page_size, cursor=cursor),
    )


def revoke_key(prefix: str) -> Call[None]:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (KeyCreated.prefix), not {type(prefix).__name__}")
    return Call("DELETE", path("keys", prefix), no_content)


# --- cubes --------------------------------------------------------------------------------------


def create_cube(name: str, description: str | None, metadata: Mapping[str, Any] | None) -> Call[Cube]:
    body = compact(name=name, description=description, metadata=_dict("metadata", metadata))
    return Call("POST", path("cubes"), _CUBE, body=body)


def list_cubes(cursor: str | None, page_size: int | None) -> Call[Page[Cube]]:
    return Call("GET", path("cubes"), _CUBE_PAGE, params=query(limit=page_size, cursor=cursor))


def get_cube(cube_id: Id) -> Call[Cube]:
    return Call("GET", path("cubes", ident("cube_id", cube_id)), _CUBE)


def update_cube(
    cube_id: Id, name: str | None, description: str | None, metadata: Mapping[str, Any] | None
) -> Call[Cube]:
    body = compact(name=name, description=description, metadata=_dict("metadata", metadata))
    return Call("PATCH", path("cubes", ident("cube_id", cube_id)), _CUBE, body=body)


def delete_cube(cube_id: Id) -> Call[None]:
    return Call("DELETE", path("cubes", ident("cube_id", cube_id)), no_content)


def grant(cube_id: Id, agent_id: Id, access: str) -> Call[Grant]:
    route = path("cubes", ident("cube_id", cube_id), "grants", ident("agent_id", agent_id))
    return Call("PUT", route, _GRANT, body={"access": access})


def revoke(cube_id: Id, agent_id: Id) -> Call[None]:
    return Call("DELETE", path("cubes", ident("cube_id", cube_id), "grants", ident("agent_id", agent_id)), no_content)


# --- memories -----------------------------------------------------------------------------------


def _dict(name: str, value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object argument as a dict; anything but a mapping is a ``TypeError`` naming the argument."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, not {type(value).__name__}")
    return dict(value)


def provenance_body(
    value: Provenance | Mapping[str, Any] | None, name: str = "provenance"
) -> Provenance | dict[str, Any] | None:
    return value if value is None or isinstance(value, Provenance) else _dict(name, value)


def _link(name: str, value: object) -> LinkIn | dict[str, Any]:
    if isinstance(value, LinkIn):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{name} must be a LinkIn or a dict, not {type(value).__name__}")


def ttl(name: str, value: int | timedelta | None) -> int | None:
    """``ttl_seconds``: an int, or a ``timedelta`` rounded up to whole seconds; ``None``: not sent."""
    return None if value is None else seconds(name, value)


def _list(name: str, values: Iterable[Any] | None) -> list[Any] | None:
    """The values as a list; one string is refused, since iterating it gives its characters."""
    if values is None:
        return None
    if isinstance(values, str | bytes):
        raise TypeError(f"{name} must be a list, not a single {type(values).__name__}: wrap it in [...]")
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list, not {type(values).__name__}")
    return list(values)


def _each(name: str, values: Iterable[Any] | None, check: Callable[[str, Any], T]) -> list[T] | None:
    """``_list``, then each element through ``check``, which is given the element's name (``links[2]``) for its
    error."""
    listed = _list(name, values)
    return None if listed is None else [check(f"{name}[{i}]", v) for i, v in enumerate(listed)]


def memory_body(
    *,
    content: str,
    kind: str,
    metadata: Mapping[str, Any] | None,
    tags: Sequence[str] | None,
    provenance: Provenance | Mapping[str, Any] | None,
    links: Iterable[LinkIn | Mapping[str, Any]] | None,
    ttl_seconds: int | timedelta | None,
    where: str = "",
) -> dict[str, Any]:
    """A memory's body; ``where`` prefixes the names in errors (``items[3].``)."""
    return {
        "kind": kind,
        **compact(
            content=content,
            metadata=_dict(f"{where}metadata", metadata),
            tags=_list(f"{where}tags", tags),
            provenance=provenance_body(provenance, f"{where}provenance"),
            links=_each(f"{where}links", links, _link),
            ttl_seconds=ttl(f"{where}ttl_seconds", ttl_seconds),
        ),
    }


def _item_body(name: str, item: MemoryIn | Mapping[str, Any]) -> dict[str, Any]:
    where = f"{name}."
    if isinstance(item, MemoryIn):
        return memory_body(
            content=item.content,
            kind=item.kind,
            metadata=item.metadata,
            tags=item.tags,
            provenance=item.provenance,
            links=item.links,
            ttl_seconds=item.ttl_seconds,
            where=where,
        )
    if not isinstance(item, Mapping):
        raise TypeError(f"{name} must be a MemoryIn or a dict of its fields, not {type(item).__name__}")
    # A dict is sent as given (a misspelt key is the server's 422, naming it); the values the SDK
    # converts for memories.add are converted here too.
    body = {"kind": "plaintext", **item}
    if body.get("metadata") is not None:
        body["metadata"] = _dict(f"{where}metadata", body["metadata"])
    if body.get("tags") is not None:
        body["tags"] = _list(f"{where}tags", body["tags"])
    if body.get("ttl_seconds") is not None:
        body["ttl_seconds"] = ttl(f"{where}ttl_seconds", body["ttl_seconds"])
    return body


def add_memory(cube_id: Id, body: dict[str, Any]) -> Call[Memory]:
    return Call("POST", path("cubes", ident("cube_id", cube_id), "memories"), _MEMORY, body=body)


def add_many(cube_id: Id, items: Iterable[MemoryIn | Mapping[str, Any]]) -> Call[_Items]:
    if isinstance(items, MemoryIn | Mapping):
        kind = type(items).__name__
        raise TypeError(f"items must be a list of MemoryIn or dicts, not a single {kind}: wrap it in [...]")
    bodies = _each("items", items, _item_body)
    assert bodies is not None
    body = {"items": bodies}
    return Call("POST", path("cubes", ident("cube_id", cube_id), "memories", "batch"), _MEMORY_ITEMS, body=body)


def list_memories(
    cube_id: Id,
    *,
    kind: str | None,
    tag: str | Iterable[str] | None,
    state: str | None,
    since: datetime | str | None,
    until: datetime | str | None,
    include_expired: bool | None,
    cursor: str | None,
    page_size: int | None,
) -> Call[Page[Memory]]:
    params = query(
        kind=kind,
        tag=[tag] if isinstance(tag, str) else _list("tag", tag),  # a set was sent as its repr (an SDK review)
        state=state,
        since=since,  # query() writes a datetime as RFC 3339 (a naive one is a ValueError naming it)
        until=until,
        include_expired=include_expired,
        limit=page_size,
        cursor=cursor,
    )
    return Call("GET", path("cubes", ident("cube_id", cube_id), "memories"), _MEMORY_PAGE, params=params)


def _memory(memory_id: Id, *rest: object) -> str:
    return path("memories", ident("memory_id", memory_id), *rest)


def _expired(include_expired: bool) -> QueryParams | None:
    return query(include_expired=True) if include_expired else None


def get_memory(memory_id: Id, include_expired: bool) -> Call[Memory]:
    return Call("GET", _memory(memory_id), _MEMORY, params=_expired(include_expired))


def memory_patch(
    content: str | None,
    metadata: Mapping[str, Any] | None,
    tags: Sequence[str] | None,
    provenance: Provenance | Mapping[str, Any] | None,
    state: str | None,
    ttl_seconds: int | timedelta | msgspec.UnsetType | None,
) -> dict[str, Any]:
    """A PATCH body: the fields given. ``ttl_seconds`` is the exception: ``None`` is sent (as null, clearing the
    expiry); only ``msgspec.UNSET``, its default, leaves it out."""
    patch = compact(
        content=content,
        metadata=_dict("metadata", metadata),
        tags=_list("tags", tags),
        provenance=provenance_body(provenance),
        state=state,
    )
    if ttl_seconds is not msgspec.UNSET:
        patch["ttl_seconds"] = ttl("ttl_seconds", ttl_seconds)  # None is sent as null: it clears the expiry
    return patch


def update_memory(memory_id: Id, if_version: int, patch: dict[str, Any]) -> Call[Memory]:
    return Call("PATCH", _memory(memory_id), _MEMORY, body=patch, headers=_if_match(if_version))


def delete_memory(memory_id: Id, purge: bool, if_version: int | None) -> Call[None]:
    params = query(purge=True) if purge else None
    return Call("DELETE", _memory(memory_id), no_content, params=params, headers=_if_match(if_version))


def versions(
    memory_id: Id, cursor: str | None, page_size: int | None, include_expired: bool = False
) -> Call[Page[Version]]:
    params = query(limit=page_size, cursor=cursor, include_expired=True if include_expired else None)
    return Call("GET", _memory(memory_id, "versions"), _VERSION_PAGE, params=params)


def version(memory_id: Id, n: int, include_expired: bool = False) -> Call[Version]:
    return Call("GET", _memory(memory_id, "versions", n), _VERSION, params=_expired(include_expired))


def restore(memory_id: Id, version: int, if_version: int | None) -> Call[Memory]:
    return Call(
        "POST",
        _memory(memory_id, "restore"),
        _MEMORY,
        body={"version": version},
        headers=_if_match(if_version),
    )


def provenance(memory_id: Id, include_expired: bool = False) -> Call[ProvenanceGraph]:
    return Call("GET", _memory(memory_id, "provenance"), _PROVENANCE, params=_expired(include_expired))


def link(memory_id: Id, to: Id, type: str, weight: float | None) -> Call[Link]:
    body = compact(to=ident("to", to), type=type, weight=weight)
    return Call("POST", _memory(memory_id, "links"), _LINK, body=body)


# --- search -------------------------------------------------------------------------------------


def search(
    query_text: str,
    *,
    cube_ids: Iterable[Id] | None,
    k: int | None,
    mode: str | None,
    kinds: Sequence[str] | None,
    tags: Sequence[str] | None,
    filters: Mapping[str, Any] | None,
    since: datetime | str | None,
    until: datetime | str | None,
    states: Sequence[str] | None,
    diversity: float | None,
) -> Call[SearchResponse]:
    body = compact(
        query=query_text,
        cube_ids=_each("cube_ids", cube_ids, ident),
        k=k,
        mode=mode,
        kinds=_list("kinds", kinds),
        tags=_list("tags", tags),
        filters=_dict("filters", filters),
        since=None if since is None else time_param("since", since),
        until=None if until is None else time_param("until", until),
        states=_list("states", states),
        diversity=diversity,
    )
    # Search only reads: retrying it on 429/503 is as safe as retrying a GET.
    return Call("POST", path("search"), _SEARCH, body=body, idempotent=True)


# --- semantic cache -----------------------------------------------------------------------------


def _turn(name: str, value: object) -> str | Turn | dict[str, Any]:
    if isinstance(value, str | Turn):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{name} must be a string, a Turn or a dict, not {type(value).__name__}")


def _context(value: Iterable[str | Turn | Mapping[str, Any]] | None) -> list[str | Turn | dict[str, Any]] | None:
    if isinstance(value, str):
        raise TypeError("context must be a list of turns (strings or Turn), not a string")
    return _each("context", value, _turn)


def cache_lookup(
    cube_id: Id, query_text: str, category: str | None, context: Iterable[str | Turn | Mapping[str, Any]] | None
) -> Call[CacheLookup]:
    body = compact(cube_id=ident("cube_id", cube_id), query=query_text, category=category, context=_context(context))
    # A lookup writes nothing but counters: retrying it on 429/503 is safe.
    return Call("POST", path("cache", "lookup"), _CACHE_LOOKUP, body=body, idempotent=True)


def cache_store(
    cube_id: Id,
    query_text: str,
    response: str,
    category: str | None,
    context: Iterable[str | Turn | Mapping[str, Any]] | None,
    ttl_seconds: int | timedelta | None,
) -> Call[Memory]:
    body = compact(
        cube_id=ident("cube_id", cube_id),
        query=query_text,
        response=response,
        category=category,
        context=_context(context),
        ttl_seconds=ttl("ttl_seconds", ttl_seconds),
    )
    return Call("POST", path("cache"), _MEMORY, body=body)


def cache_feedback(memory_id: Id, query_text: str, correct: bool, scope: str | None) -> Call[None]:
    body = compact(memory_id=ident("memory_id", memory_id), query=query_text, correct=correct, scope=scope)
    return Call("POST", path("cache", "feedback"), no_content, body=body)


def cache_invalidate(cube_id: Id, category: str | None, older_than: int | timedelta | None) -> Call[_Invalidated]:
    age = ttl("older_than", older_than)
    params = query(cube_id=ident("cube_id", cube_id), category=category, older_than=age)
    return Call("DELETE", path("cache"), _INVALIDATED, params=params)


def cache_stats(cube_id: Id) -> Call[CacheStats]:
    return Call("GET", path("cache", "stats"), _CACHE_STATS, params=query(cube_id=ident("cube_id", cube_id)))


def cache_config(cube_id: Id) -> Call[CacheConfig]:
    return Call("GET", path("cache", "config"), _CACHE_CONFIG, params=query(cube_id=ident("cube_id", cube_id)))


def cache_configure(cube_id: Id, categories: Mapping[str, Any], default: str | None) -> Call[CacheConfig]:
    body = compact(cube_id=ident("cube_id", cube_id), categories=_dict("categories", categories), default=default)
    return Call("PUT", path("cache", "config"), _CACHE_CONFIG, body=body)


# --- KV activations and generation --------------------------------------------------------------


def _raw_bytes(content: bytes) -> bytes:
    return content


def list_models(cursor: str | None = None) -> Call[Page[Model]]:
    return Call("GET", path("models"), _MODEL_PAGE, params=query(cursor=cursor))


def build_activation(memory_id: Id, model: str) -> Call[Activation]:
    return Call("POST", _memory(memory_id, "activations"), _ACTIVATION, body={"model": model})


def list_activations(memory_id: Id, cursor: str | None, page_size: int | None) -> Call[Page[Activation]]:
    params = query(limit=page_size, cursor=cursor)
    return Call("GET", _memory(memory_id, "activations"), _ACTIVATION_PAGE, params=params)


def get_activation(activation_id: Id) -> Call[Activation]:
    return Call("GET", path("activations", ident("activation_id", activation_id)), _ACTIVATION)


def download_kv(activation_id: Id) -> Call[bytes]:
    headers = {"Accept": "application/octet-stream"}
    return Call(
        "GET",
        path("activations", ident("activation_id", activation_id), "kv"),
        _raw_bytes,
        headers=headers,
        digest_header="X-Memos-SHA256",
    )


def import_kv(memory_id: Id, model: str, data: bytes) -> Call[Activation]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be the bytes of a memos-kv/1 file, not {type(data).__name__}")
    return Call(
        "POST",
        path("activations", "import"),
        _ACTIVATION,
        params=query(memory_id=ident("memory_id", memory_id), model=model),
        content=bytes(data),
        headers={"Content-Type": "application/octet-stream"},
    )


def generate(
    model: str,
    prompt: str,
    *,
    memory_ids: Iterable[Id] | None,
    search: Mapping[str, Any] | None,
    max_new_tokens: int | None,
    use_activations: bool | None,
    recompute_ratio: float | None,
) -> Call[Generation]:
    body = compact(
        model=model,
        prompt=prompt,
        memory_ids=_each("memory_ids", memory_ids, ident),
        search=_dict("search", search),
        max_new_tokens=max_new_tokens,
        use_activations=use_activations,
        recompute_ratio=recompute_ratio,
    )
    return Call("POST", path("generate"), _GENERATION, body=body)


def scheduler_state() -> Call[SchedulerState]:
    return Call("GET", path("scheduler"), _SCHEDULER)


def pin(memory_id: Id, model: str, tier: str) -> Call[Pin]:
    return Call(
        "POST",
        path("scheduler", "pin"),
        _PIN,
        body={"memory_id": ident("memory_id", memory_id), "model": model, "tier": tier},
    )


# --- anything else ------------------------------------------------------------------------------


def raw(
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    content: bytes | None,
    headers: Mapping[str, str] | None,
) -> Call[Any]:
    if not url.startswith("/"):
        # An absolute URL would carry this client's API key to another host.
        raise ValueError(f"request() takes a path on the memos server, like /v1/agents/me, not {url!r}")
    return Call(
        method.upper(),
        url,
        any_json,
        params=None if params is None else query(**params),
        body=json,
        content=content,
        headers=headers,
    )

"""``client.tenants``, ``client.agents``, ``client.cubes``, ``client.memories`` and ``client.cache``, sync and async.

Each method describes its call with ``_calls`` and hands it to the client; the sync and async
classes differ only in ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from memos_client import _calls
from memos_client._base import Call, Id
from memos_client._models import (
    Access,
    Activation,
    Agent,
    AgentCreated,
    ApiKey,
    CacheConfig,
    CacheLookup,
    CacheStats,
    Cube,
    Grant,
    KeyCreated,
    Kind,
    Link,
    LinkIn,
    Me,
    Memory,
    MemoryIn,
    Page,
    Provenance,
    ProvenanceGraph,
    Role,
    SettableState,
    State,
    TenantCreated,
    Turn,
    Version,
)
from memos_client._pagination import AsyncPager, Pager

T = TypeVar("T")


class _Sender(Protocol):
    def _send(self, call: Call[T]) -> T: ...


class _AsyncSender(Protocol):
    async def _send(self, call: Call[T]) -> T: ...


_PageCall = Callable[[str | None], Call[Page[T]]]
"""A list's request for the page at a cursor (``None``: the first page)."""


class _Resource:
    """What every sync resource holds: the client that sends its calls."""

    def __init__(self, client: _Sender) -> None:
        self._client = client

    def _pager(self, call: _PageCall[T], cursor: str | None) -> Pager[T]:
        call(cursor)  # built once now, so a bad argument raises here rather than in the loop
        return Pager(lambda c: self._client._send(call(c)), cursor)


class _AsyncResource:
    """What every async resource holds: the client that sends its calls."""

    def __init__(self, client: _AsyncSender) -> None:
        self._client = client

    def _pager(self, call: _PageCall[T], cursor: str | None) -> AsyncPager[T]:
        call(cursor)  # built once now, so a bad argument raises here rather than in the loop
        return AsyncPager(lambda c: self._client._send(call(c)), cursor)


# --- sync ---------------------------------------------------------------------------------------


class Tenants(_Resource):
    """Tenants: the operator key's only job."""

    def create(self, name: str) -> TenantCreated:
        """Create a tenant and its admin agent; the admin key in the answer is shown once."""
        return self._client._send(_calls.create_tenant(name))


class Agents(_Resource):
    """Agents of the caller's tenant, and their keys."""

    def create(self, name: str, *, role: Role = "agent") -> AgentCreated:
        """Create an agent (tenant admin only); its key in the answer is shown once."""
        return self._client._send(_calls.create_agent(name, role))

    def me(self) -> Me:
        """Who this client's key belongs to."""
        return self._client._send(_calls.me())

    def list(self, *, page_size: int | None = None, cursor: str | None = None) -> Pager[Agent]:
        """Every agent of the tenant, oldest first (tenant admin only)."""
        return self._pager(lambda c: _calls.list_agents(c, page_size), cursor)

    def rotate_key(self, agent_id: Id) -> KeyCreated:
        """Issue an additional key for an agent; its older keys stay valid until revoked."""
        return self._client._send(_calls.rotate_key(agent_id))

    def list_keys(self, agent_id: Id, *, page_size: int | None = None, cursor: str | None = None) -> Pager[ApiKey]:
        """An agent's keys by prefix, revoked ones included, oldest first (tenant admin, or the agent itself)."""
        return self._pager(lambda c: _calls.list_keys(agent_id, c, page_size), cursor)

    def revoke_key(self, prefix: str) -> None:
        """Revoke a key by its prefix (``KeyCreated.prefix``, or the 12 hex after ``memos_``)."""
        self._client._send(_calls.revoke_key(prefix))


class Cubes(_Resource):
    """MemCubes: named containers of memories, owned by an agent and shared by grants."""

    def create(self, name: str, *, description: str | None = None, metadata: Mapping[str, Any] | None = None) -> Cube:
        return self._client._send(_calls.create_cube(name, description, metadata))

    def list(self, *, page_size: int | None = None, cursor: str | None = None) -> Pager[Cube]:
        """The cubes the caller owns or is granted (every cube of the tenant for an admin), oldest first."""
        return self._pager(lambda c: _calls.list_cubes(c, page_size), cursor)

    def get(self, cube_id: Id) -> Cube:
        return self._client._send(_calls.get_cube(cube_id))

    def update(
        self,
        cube_id: Id,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Cube:
        """Change the fields given (``None``: left as it is); ``metadata`` replaces the stored object."""
        return self._client._send(_calls.update_cube(cube_id, name, description, metadata))

    def delete(self, cube_id: Id) -> None:
        """Tombstone the cube and every memory in it."""
        self._client._send(_calls.delete_cube(cube_id))

    def grant(self, cube_id: Id, agent_id: Id, access: Access = "read") -> Grant:
        """Create or change an agent's grant on the cube (owner or tenant admin)."""
        return self._client._send(_calls.grant(cube_id, agent_id, access))

    def revoke(self, cube_id: Id, agent_id: Id) -> None:
        """Remove an agent's grant on the cube."""
        self._client._send(_calls.revoke(cube_id, agent_id))


class Memories(_Resource):
    """Memories: versioned, with provenance and links."""

    def add(
        self,
        cube_id: Id,
        *,
        content: str,
        kind: Kind = "plaintext",
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        provenance: Provenance | Mapping[str, Any] | None = None,
        links: Iterable[LinkIn | Mapping[str, Any]] | None = None,
        ttl_seconds: int | timedelta | None = None,
    ) -> Memory:
        """Add a memory (version 1). A ``"response"`` memory needs ``metadata["query"]``.

        ``ttl_seconds``: an int, or a ``timedelta`` (rounded up to whole seconds).
        """
        body = _calls.memory_body(
            content=content,
            kind=kind,
            metadata=metadata,
            tags=tags,
            provenance=provenance,
            links=links,
            ttl_seconds=ttl_seconds,
        )
        return self._client._send(_calls.add_memory(cube_id, body))

    def add_many(self, cube_id: Id, items: Iterable[MemoryIn | Mapping[str, Any]]) -> list[Memory]:
        """Add up to 1000 memories at once, all or nothing. Items are ``MemoryIn`` or dicts of the same fields."""
        return self._client._send(_calls.add_many(cube_id, items)).items

    def get(self, memory_id: Id, *, include_expired: bool = False) -> Memory:
        """The current version (a soft-deleted memory too, with ``state == "deleted"``)."""
        return self._client._send(_calls.get_memory(memory_id, include_expired))

    def list(
        self,
        cube_id: Id,
        *,
        kind: str | None = None,
        tag: str | Iterable[str] | None = None,
        state: State | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        include_expired: bool | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> Pager[Memory]:
        """A cube's memories, oldest first; ``state`` defaults (server side) to ``"active"``.

        Several tags must all be present. ``since`` (inclusive) and ``until`` (exclusive) apply to
        ``created_at``.
        """
        return self._pager(
            lambda c: _calls.list_memories(
                cube_id,
                kind=kind,
                tag=tag,
                state=state,
                since=since,
                until=until,
                include_expired=include_expired,
                cursor=c,
                page_size=page_size,
            ),
            cursor,
        )

    def update(
        self,
        memory_id: Id,
        *,
        if_version: int,
        content: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        provenance: Provenance | Mapping[str, Any] | None = None,
        state: SettableState | None = None,
        ttl_seconds: int | timedelta | msgspec.UnsetType | None = msgspec.UNSET,
    ) -> Memory:
        """Write a new version, if the memory is still at ``if_version``; otherwise ``PreconditionFailed``.

        ``if_version`` is required: an update always says which version it was based on, so it cannot
        silently overwrite someone else's. Fields left ``None`` stay as they are; ``metadata``,
        ``tags`` and ``provenance`` replace the stored value. ``ttl_seconds=None`` clears the expiry.
        """
        patch = _calls.memory_patch(content, metadata, tags, provenance, state, ttl_seconds)
        return self._client._send(_calls.update_memory(memory_id, if_version, patch))

    def delete(self, memory_id: Id, *, purge: bool = False, if_version: int | None = None) -> None:
        """Soft-delete (history kept); ``purge=True`` (tenant admin) erases the content of every version."""
        self._client._send(_calls.delete_memory(memory_id, purge, if_version))

    def versions(
        self,
        memory_id: Id,
        *,
        page_size: int | None = None,
        cursor: str | None = None,
        include_expired: bool = False,
    ) -> Pager[Version]:
        """Every version of the memory, oldest first (an expired memory's only with ``include_expired``)."""
        return self._pager(lambda c: _calls.versions(memory_id, c, page_size, include_expired), cursor)

    def version(self, memory_id: Id, n: int, *, include_expired: bool = False) -> Version:
        return self._client._send(_calls.version(memory_id, n, include_expired))

    def restore(self, memory_id: Id, version: int, *, if_version: int | None = None) -> Memory:
        """Write a new version equal to version ``version`` (this also undeletes and unarchives)."""
        return self._client._send(_calls.restore(memory_id, version, if_version))

    def provenance(self, memory_id: Id, *, include_expired: bool = False) -> ProvenanceGraph:
        """Ancestors and descendants by ``derived_from``, with their edges."""
        return self._client._send(_calls.provenance(memory_id, include_expired))

    def link(self, memory_id: Id, *, to: Id, type: str, weight: float | None = None) -> Link:
        """Add a typed, weighted edge from this memory to another."""
        return self._client._send(_calls.link(memory_id, to, type, weight))


Context = Iterable[str | Turn | Mapping[str, Any]]
CacheScope = Literal["category", "entry"]


class Cache(_Resource):
    """The semantic cache: answers stored as ``response`` memories, served for queries that mean the same."""

    def lookup(
        self, cube_id: Id, query: str, *, category: str | None = None, context: Context | None = None
    ) -> CacheLookup:
        """A cached answer for ``query`` (``hit``, ``response``), or a miss; ``reason`` says why either way.

        ``context``: the turns before the query, oldest first (strings, taken to alternate and end with
        the assistant's, or ``Turn`` values).
        """
        return self._client._send(_calls.cache_lookup(cube_id, query, category, context))

    def store(
        self,
        cube_id: Id,
        query: str,
        response: str,
        *,
        category: str | None = None,
        context: Context | None = None,
        ttl_seconds: int | timedelta | None = None,
    ) -> Memory:
        """Cache ``response`` as the answer to ``query`` (asked after ``context``): a new response memory."""
        return self._client._send(_calls.cache_store(cube_id, query, response, category, context, ttl_seconds))

    def feedback(self, memory_id: Id, query: str, *, correct: bool, scope: CacheScope | None = None) -> None:
        """Report an answer served for ``query`` as right or wrong; a wrong one raises the thresholds."""
        self._client._send(_calls.cache_feedback(memory_id, query, correct, scope))

    def invalidate(self, cube_id: Id, *, category: str | None = None, older_than: int | timedelta | None = None) -> int:
        """Delete cached answers of a cube (of one category, or stored at least ``older_than`` seconds ago)."""
        return self._client._send(_calls.cache_invalidate(cube_id, category, older_than)).invalidated

    def stats(self, cube_id: Id) -> CacheStats:
        """Per category: entries, hits, misses, reported false hits, the threshold in force, the TTL."""
        return self._client._send(_calls.cache_stats(cube_id))

    def config(self, cube_id: Id) -> CacheConfig:
        """The cube's categories and their settings."""
        return self._client._send(_calls.cache_config(cube_id))

    def configure(self, cube_id: Id, categories: Mapping[str, Any], *, default: str | None = None) -> CacheConfig:
        """Replace the cube's category configuration (owner or tenant admin); bad settings are ``Invalid``."""
        return self._client._send(_calls.cache_configure(cube_id, categories, default))


class Activations(_Resource):
    """KV activations: a memory's KV cache for a model, built, listed, downloaded and imported."""

    def build(self, memory_id: Id, *, model: str) -> Activation:
        """Build the memory's KV for ``model`` now, or get the fresh one that exists for its current version."""
        return self._client._send(_calls.build_activation(memory_id, model))

    def list(self, memory_id: Id, *, page_size: int | None = None, cursor: str | None = None) -> Pager[Activation]:
        """The memory's activations, oldest first (stale ones included, with ``stale=True``)."""
        return self._pager(lambda c: _calls.list_activations(memory_id, c, page_size), cursor)

    def get(self, activation_id: Id) -> Activation:
        return self._client._send(_calls.get_activation(activation_id))

    def download(self, activation_id: Id) -> bytes:
        """The ``memos-kv/1`` file (safetensors bytes), checksum-verified by the server before sending."""
        return self._client._send(_calls.download_kv(activation_id))

    def import_(self, memory_id: Id, data: bytes, *, model: str) -> Activation:
        """Store a ``memos-kv/1`` file as the memory's activation for ``model`` (checked before it is accepted)."""
        return self._client._send(_calls.import_kv(memory_id, model, data))


# --- async --------------------------------------------------------------------------------------


class AsyncTenants(_AsyncResource):
    """Tenants: the operator key's only job."""

    async def create(self, name: str) -> TenantCreated:
        """Create a tenant and its admin agent; the admin key in the answer is shown once."""
        return await self._client._send(_calls.create_tenant(name))


class AsyncAgents(_AsyncResource):
    """Agents of the caller's tenant, and their keys."""

    async def create(self, name: str, *, role: Role = "agent") -> AgentCreated:
        """Create an agent (tenant admin only); its key in the answer is shown once."""
        return await self._client._send(_calls.create_agent(name, role))

    async def me(self) -> Me:
        """Who this client's key belongs to."""
        return await self._client._send(_calls.me())

    def list(self, *, page_size: int | None = None, cursor: str | None = None) -> AsyncPager[Agent]:
        """Every agent of the tenant, oldest first (tenant admin only)."""
        return self._pager(lambda c: _calls.list_agents(c, page_size), cursor)

    async def rotate_key(self, agent_id: Id) -> KeyCreated:
        """Issue an additional key for an agent; its older keys stay valid until revoked."""
        return await self._client._send(_calls.rotate_key(agent_id))

    def list_keys(self, agent_id: Id, *, page_size: int | None = None, cursor: str | None = None) -> AsyncPager[ApiKey]:
        """An agent's keys by prefix, revoked ones included, oldest first (tenant admin, or the agent itself)."""
        return self._pager(lambda c: _calls.list_keys(agent_id, c, page_size), cursor)

    async def revoke_key(self, prefix: str) -> None:
        """Revoke a key by its prefix (``KeyCreated.prefix``, or the 12 hex after ``memos_``)."""
        await self._client._send(_calls.revoke_key(prefix))


class AsyncCubes(_AsyncResource):
    """MemCubes: named containers of memories, owned by an agent and shared by grants."""

    async def create(
        self, name: str, *, description: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Cube:
        return await self._client._send(_calls.create_cube(name, description, metadata))

    def list(self, *, page_size: int | None = None, cursor: str | None = None) -> AsyncPager[Cube]:
        """The cubes the caller owns or is granted (every cube of the tenant for an admin), oldest first."""
        return self._pager(lambda c: _calls.list_cubes(c, page_size), cursor)

    async def get(self, cube_id: Id) -> Cube:
        return await self._client._send(_calls.get_cube(cube_id))

    async def update(
        self,
        cube_id: Id,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Cube:
        """Change the fields given (``None``: left as it is); ``metadata`` replaces the stored object."""
        return await self._client._send(_calls.update_cube(cube_id, name, description, metadata))

    async def delete(self, cube_id: Id) -> None:
        """Tombstone the cube and every memory in it."""
        await self._client._send(_calls.delete_cube(cube_id))

    async def grant(self, cube_id: Id, agent_id: Id, access: Access = "read") -> Grant:
        """Create or change an agent's grant on the cube (owner or tenant admin)."""
        return await self._client._send(_calls.grant(cube_id, agent_id, access))

    async def revoke(self, cube_id: Id, agent_id: Id) -> None:
        """Remove an agent's grant on the cube."""
        await self._client._send(_calls.revoke(cube_id, agent_id))


class AsyncMemories(_AsyncResource):
    """Memories: versioned, with provenance and links."""

    async def add(
        self,
        cube_id: Id,
        *,
        content: str,
        kind: Kind = "plaintext",
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        provenance: Provenance | Mapping[str, Any] | None = None,
        links: Iterable[LinkIn | Mapping[str, Any]] | None = None,
        ttl_seconds: int | timedelta | None = None,
    ) -> Memory:
        """Add a memory (version 1). A ``"response"`` memory needs ``metadata["query"]``.

        ``ttl_seconds``: an int, or a ``timedelta`` (rounded up to whole seconds).
        """
        body = _calls.memory_body(
            content=content,
            kind=kind,
            metadata=metadata,
            tags=tags,
            provenance=provenance,
            links=links,
            ttl_seconds=ttl_seconds,
        )
        return await self._client._send(_calls.add_memory(cube_id, body))

    async def add_many(self, cube_id: Id, items: Iterable[MemoryIn | Mapping[str, Any]]) -> list[Memory]:
        """Add up to 1000 memories at once, all or nothing. Items are ``MemoryIn`` or dicts of the same fields."""
        return (await self._client._send(_calls.add_many(cube_id, items))).items

    async def get(self, memory_id: Id, *, include_expired: bool = False) -> Memory:
        """The current version (a soft-deleted memory too, with ``state == "deleted"``)."""
        return await self._client._send(_calls.get_memory(memory_id, include_expired))

    def list(
        self,
        cube_id: Id,
        *,
        kind: str | None = None,
        tag: str | Iterable[str] | None = None,
        state: State | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        include_expired: bool | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> AsyncPager[Memory]:
        """A cube's memories, oldest first; ``state`` defaults (server side) to ``"active"``.

        Several tags must all be present. ``since`` (inclusive) and ``until`` (exclusive) apply to
        ``created_at``.
        """
        return self._pager(
            lambda c: _calls.list_memories(
                cube_id,
                kind=kind,
                tag=tag,
                state=state,
                since=since,
                until=until,
                include_expired=include_expired,
                cursor=c,
                page_size=page_size,
            ),
            cursor,
        )

    async def update(
        self,
        memory_id: Id,
        *,
        if_version: int,
        content: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        provenance: Provenance | Mapping[str, Any] | None = None,
        state: SettableState | None = None,
        ttl_seconds: int | timedelta | msgspec.UnsetType | None = msgspec.UNSET,
    ) -> Memory:
        """Write a new version, if the memory is still at ``if_version``; otherwise ``PreconditionFailed``.

        ``if_version`` is required: an update always says which version it was based on, so it cannot
        silently overwrite someone else's. Fields left ``None`` stay as they are; ``metadata``,
        ``tags`` and ``provenance`` replace the stored value. ``ttl_seconds=None`` clears the expiry.
        """
        patch = _calls.memory_patch(content, metadata, tags, provenance, state, ttl_seconds)
        return await self._client._send(_calls.update_memory(memory_id, if_version, patch))

    async def delete(self, memory_id: Id, *, purge: bool = False, if_version: int | None = None) -> None:
        """Soft-delete (history kept); ``purge=True`` (tenant admin) erases the content of every version."""
        await self._client._send(_calls.delete_memory(memory_id, purge, if_version))

    def versions(
        self,
        memory_id: Id,
        *,
        page_size: int | None = None,
        cursor: str | None = None,
        include_expired: bool = False,
    ) -> AsyncPager[Version]:
        """Every version of the memory, oldest first (an expired memory's only with ``include_expired``)."""
        return self._pager(lambda c: _calls.versions(memory_id, c, page_size, include_expired), cursor)

    async def version(self, memory_id: Id, n: int, *, include_expired: bool = False) -> Version:
        return await self._client._send(_calls.version(memory_id, n, include_expired))

    async def restore(self, memory_id: Id, version: int, *, if_version: int | None = None) -> Memory:
        """Write a new version equal to version ``version`` (this also undeletes and unarchives)."""
        return await self._client._send(_calls.restore(memory_id, version, if_version))

    async def provenance(self, memory_id: Id, *, include_expired: bool = False) -> ProvenanceGraph:
        """Ancestors and descendants by ``derived_from``, with their edges."""
        return await self._client._send(_calls.provenance(memory_id, include_expired))

    async def link(self, memory_id: Id, *, to: Id, type: str, weight: float | None = None) -> Link:
        """Add a typed, weighted edge from this memory to another."""
        return await self._client._send(_calls.link(memory_id, to, type, weight))


class AsyncCache(_AsyncResource):
    """The semantic cache: answers stored as ``response`` memories, served for queries that mean the same."""

    async def lookup(
        self, cube_id: Id, query: str, *, category: str | None = None, context: Context | None = None
    ) -> CacheLookup:
        """A cached answer for ``query`` (``hit``, ``response``), or a miss; ``reason`` says why either way."""
        return await self._client._send(_calls.cache_lookup(cube_id, query, category, context))

    async def store(
        self,
        cube_id: Id,
        query: str,
        response: str,
        *,
        category: str | None = None,
        context: Context | None = None,
        ttl_seconds: int | timedelta | None = None,
    ) -> Memory:
        """Cache ``response`` as the answer to ``query`` (asked after ``context``): a new response memory."""
        return await self._client._send(_calls.cache_store(cube_id, query, response, category, context, ttl_seconds))

    async def feedback(self, memory_id: Id, query: str, *, correct: bool, scope: CacheScope | None = None) -> None:
        """Report an answer served for ``query`` as right or wrong; a wrong one raises the thresholds."""
        await self._client._send(_calls.cache_feedback(memory_id, query, correct, scope))

    async def invalidate(
        self, cube_id: Id, *, category: str | None = None, older_than: int | timedelta | None = None
    ) -> int:
        """Delete cached answers of a cube (of one category, or stored at least ``older_than`` seconds ago)."""
        return (await self._client._send(_calls.cache_invalidate(cube_id, category, older_than))).invalidated

    async def stats(self, cube_id: Id) -> CacheStats:
        """Per category: entries, hits, misses, reported false hits, the threshold in force, the TTL."""
        return await self._client._send(_calls.cache_stats(cube_id))

    async def config(self, cube_id: Id) -> CacheConfig:
        """The cube's categories and their settings."""
        return await self._client._send(_calls.cache_config(cube_id))

    async def configure(self, cube_id: Id, categories: Mapping[str, Any], *, default: str | None = None) -> CacheConfig:
        """Replace the cube's category configuration (owner or tenant admin); bad settings are ``Invalid``."""
        return await self._client._send(_calls.cache_configure(cube_id, categories, default))


class AsyncActivations(_AsyncResource):
    """KV activations: a memory's KV cache for a model, built, listed, downloaded and imported."""

    async def build(self, memory_id: Id, *, model: str) -> Activation:
        """Build the memory's KV for ``model`` now, or get the fresh one that exists for its current version."""
        return await self._client._send(_calls.build_activation(memory_id, model))

    def list(self, memory_id: Id, *, page_size: int | None = None, cursor: str | None = None) -> AsyncPager[Activation]:
        """The memory's activations, oldest first (stale ones included, with ``stale=True``)."""
        return self._pager(lambda c: _calls.list_activations(memory_id, c, page_size), cursor)

    async def get(self, activation_id: Id) -> Activation:
        return await self._client._send(_calls.get_activation(activation_id))

    async def download(self, activation_id: Id) -> bytes:
        """The ``memos-kv/1`` file (safetensors bytes), checksum-verified by the server before sending."""
        return await self._client._send(_calls.download_kv(activation_id))

    async def import_(self, memory_id: Id, data: bytes, *, model: str) -> Activation:
        """Store a ``memos-kv/1`` file as the memory's activation for ``model`` (checked before it is accepted)."""
        return await self._client._send(_calls.import_kv(memory_id, model, data))

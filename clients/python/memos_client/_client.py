"""``MemosClient`` and ``AsyncMemosClient``: one httpx client each, the retry loop, the resources."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx

from memos_client import _calls
from memos_client._base import DEFAULT_TIMEOUT, BaseClient, Call, Id, RetryPolicy
from memos_client._models import Generation, Mode, Model, Pin, SchedulerState, SearchResponse, State
from memos_client._pagination import AsyncPager, Pager
from memos_client._resources import (
    Activations,
    Agents,
    AsyncActivations,
    AsyncAgents,
    AsyncCache,
    AsyncCubes,
    AsyncMemories,
    AsyncTenants,
    Cache,
    Cubes,
    Memories,
    Tenants,
)

T = TypeVar("T")
C = TypeVar("C", bound="MemosClient")
A = TypeVar("A", bound="AsyncMemosClient")

_DEFAULT_RETRIES = RetryPolicy()


class MemosClient(BaseClient):
    """A synchronous memos client.

    ``base_url`` defaults to ``$MEMOS_URL`` (then ``http://127.0.0.1:8000``) and ``api_key`` to
    ``$MEMOS_API_KEY``; both are read once, here. A trailing ``/v1`` of ``base_url`` is dropped (every call
    adds it). ``timeout`` is seconds or an ``httpx.Timeout``
    (default: 5 s to connect, 60 s for the rest; ``None`` waits forever). ``retries`` is a
    ``RetryPolicy`` or a number of retries (see ``RetryPolicy`` for what is retried). ``transport``
    replaces httpx's network transport (an in-process app in tests, a proxy, a mock).

    Use it as a context manager, or call ``close()``::

        with MemosClient() as client:
            cube = client.cubes.create("notes")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = _DEFAULT_RETRIES,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retries=retries, headers=headers)
        self._http = httpx.Client(transport=transport, **self._http_options())
        self.tenants = Tenants(self)
        self.agents = Agents(self)
        self.cubes = Cubes(self)
        self.memories = Memories(self)
        self.cache = Cache(self)
        self.activations = Activations(self)

    def models(self) -> list[Model]:
        """The causal LMs the server is configured with, every page (empty: KV endpoints answer ``Conflict``)."""
        return list(Pager(lambda cursor: self._send(_calls.list_models(cursor))))

    def scheduler(self) -> SchedulerState:
        """The KV tiers (budget, use, hit rate), the build queue and the hottest memories the caller can read."""
        return self._send(_calls.scheduler_state())

    def pin(self, memory_id: Id, *, model: str, tier: str) -> Pin:
        """Keep the memory's KV for ``model`` in ``tier`` (``device``/``host``), building it if needed; ``store``
        lifts the pin."""
        return self._send(_calls.pin(memory_id, model, tier))

    def generate(
        self,
        prompt: str,
        *,
        model: str,
        memory_ids: Iterable[Id] | None = None,
        search: Mapping[str, Any] | None = None,
        max_new_tokens: int | None = None,
        use_activations: bool | None = None,
        recompute_ratio: float | None = None,
    ) -> Generation:
        """Generate after the given memories (or a search's results), reusing their stored KV when fresh.

        ``search`` is a search request body (``{"query": ..., "cube_ids": [...], "k": 3}``).
        ``use_activations=False`` prefills every token, for comparison.
        """
        return self._send(
            _calls.generate(
                model,
                prompt,
                memory_ids=memory_ids,
                search=search,
                max_new_tokens=max_new_tokens,
                use_activations=use_activations,
                recompute_ratio=recompute_ratio,
            )
        )

    def search(
        self,
        query: str,
        *,
        cube_ids: Iterable[Id] | None = None,
        k: int | None = None,
        mode: Mode | None = None,
        kinds: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        filters: Mapping[str, Any] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        states: Sequence[State] | None = None,
        diversity: float | None = None,
    ) -> SearchResponse:
        """Find memories the caller may read, best first. ``None`` leaves a field to the server's default.

        ``since``/``until`` apply to the event time (``metadata.time``, else ``created_at``).
        """
        return self._send(
            _calls.search(
                query,
                cube_ids=cube_ids,
                k=k,
                mode=mode,
                kinds=kinds,
                tags=tags,
                filters=filters,
                since=since,
                until=until,
                states=states,
                diversity=diversity,
            )
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any other endpoint: the decoded JSON answer (``None`` for 204), errors raised as for the rest."""
        return self._send(_calls.raw(method, path, params=params, json=json, content=content, headers=headers))

    def _send(self, call: Call[T]) -> T:
        if self._http.is_closed:
            raise self._closed(call)
        request = self._request(self._http, call)
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.RequestError as exc:  # transport errors, and undecodable or redirect-looping answers
                wait = self._retry_wait(call, attempt, error=exc)
                if wait is None:
                    raise self._transport_error(call, exc) from exc
            else:
                wait = self._retry_wait(call, attempt, response=response)
                if wait is None:
                    return self._result(call, response)
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        """Close the connections; a call made afterwards raises ``MemosError``."""
        self._http.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncMemosClient(BaseClient):
    """The asyncio twin of ``MemosClient``: the same arguments, methods that are awaited.

    Lists are async iterators (``async for m in client.memories.list(cube_id)``). Use it as an async
    context manager, or call ``await client.aclose()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = _DEFAULT_RETRIES,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retries=retries, headers=headers)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())
        self.tenants = AsyncTenants(self)
        self.agents = AsyncAgents(self)
        self.cubes = AsyncCubes(self)
        self.memories = AsyncMemories(self)
        self.cache = AsyncCache(self)
        self.activations = AsyncActivations(self)

    async def models(self) -> list[Model]:
        """The causal LMs the server is configured with, every page (empty: KV endpoints answer ``Conflict``)."""
        return [model async for model in AsyncPager(lambda cursor: self._send(_calls.list_models(cursor)))]

    async def scheduler(self) -> SchedulerState:
        """The KV tiers (budget, use, hit rate), the build queue and the hottest memories the caller can read."""
        return await self._send(_calls.scheduler_state())

    async def pin(self, memory_id: Id, *, model: str, tier: str) -> Pin:
        """Keep the memory's KV for ``model`` in ``tier`` (``device``/``host``), building it if needed; ``store``
        lifts the pin."""
        return await self._send(_calls.pin(memory_id, model, tier))

    async def generate(
        self,
        prompt: str,
        *,
        model: str,
        memory_ids: Iterable[Id] | None = None,
        search: Mapping[str, Any] | None = None,
        max_new_tokens: int | None = None,
        use_activations: bool | None = None,
        recompute_ratio: float | None = None,
    ) -> Generation:
        """Generate after the given memories (or a search's results), reusing their stored KV when fresh."""
        return await self._send(
            _calls.generate(
                model,
                prompt,
                memory_ids=memory_ids,
                search=search,
                max_new_tokens=max_new_tokens,
                use_activations=use_activations,
                recompute_ratio=recompute_ratio,
            )
        )

    async def search(
        self,
        query: str,
        *,
        cube_ids: Iterable[Id] | None = None,
        k: int | None = None,
        mode: Mode | None = None,
        kinds: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        filters: Mapping[str, Any] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        states: Sequence[State] | None = None,
        diversity: float | None = None,
    ) -> SearchResponse:
        """Find memories the caller may read, best first. ``None`` leaves a field to the server's default.

        ``since``/``until`` apply to the event time (``metadata.time``, else ``created_at``).
        """
        return await self._send(
            _calls.search(
                query,
                cube_ids=cube_ids,
                k=k,
                mode=mode,
                kinds=kinds,
                tags=tags,
                filters=filters,
                since=since,
                until=until,
                states=states,
                diversity=diversity,
            )
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any other endpoint: the decoded JSON answer (``None`` for 204), errors raised as for the rest."""
        return await self._send(_calls.raw(method, path, params=params, json=json, content=content, headers=headers))

    async def _send(self, call: Call[T]) -> T:
        if self._http.is_closed:
            raise self._closed(call)
        request = self._request(self._http, call)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.RequestError as exc:  # transport errors, and undecodable or redirect-looping answers
                wait = self._retry_wait(call, attempt, error=exc)
                if wait is None:
                    raise self._transport_error(call, exc) from exc
            else:
                wait = self._retry_wait(call, attempt, response=response)
                if wait is None:
                    return self._result(call, response)
            await asyncio.sleep(wait)
            attempt += 1

    async def aclose(self) -> None:
        """Close the connections; a call made afterwards raises ``MemosError``."""
        await self._http.aclose()

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

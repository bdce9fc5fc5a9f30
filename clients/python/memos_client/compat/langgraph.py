"""A LangGraph ``BaseStore`` over memos: swap one object and a LangGraph agent's long-term memory lives in memos.

Install with ``pip install "./clients/python[langgraph]"`` (from a checkout of memos)::

    from memos_client import MemosClient
    from memos_client.compat.langgraph import MemosStore

    store = MemosStore(MemosClient())            # MEMOS_URL / MEMOS_API_KEY
    graph = builder.compile(store=store)         # or use it directly:
    store.put(("users", "u1", "prefs"), "theme", {"text": "prefers dark mode"})
    store.search(("users", "u1"), query="what colours does the user like?")

How LangGraph's model maps onto memos:

- **A namespace is a cube**, named ``<cube_prefix>:<JSON list of the labels>`` and created on the
  first ``put``. Grants, isolation and deletion are memos' own, per namespace.
- **An item is a memory** whose metadata holds ``{"langgraph": {"key": key}, "value": value}`` and
  which carries the tag ``lg-key:<sha256(key)[:32]>`` so ``get`` is one indexed lookup. A ``put``
  on an existing key writes a new version (history and provenance are kept); ``delete`` is memos'
  soft delete.
- **What is searched** is the memory's content: the item's ``index`` fields joined by newlines (the
  whole value as JSON when ``index`` is not given; the key alone for ``index=False``). ``search``
  with a ``query`` is memos' hybrid search over every cube under the prefix (in groups of 100, the
  server's cap, merged by rank; at most 200 ranked, a page past them is empty); ``score`` is memos'
  fused score (not a cosine). Plain-equality ``filter`` entries are applied by the server, ``$ne``,
  ``$gt``, ``$gte``, ``$lt``, ``$lte`` and ``$eq`` here, on the results (nested in objects too, with
  LangGraph's semantics). Any other operator (``$in``,
  ``$exists``, ...) is a ``ValueError`` naming it, as in LangGraph's own stores, never an empty result.
- **Values** are dicts (JSON objects), as LangGraph types them; anything else is a ``TypeError``.
- **TTL** is in minutes, as in LangGraph, and becomes the memory's ``ttl_seconds``; it counts from
  the last write (memos does not refresh it on reads, so ``refresh_ttl`` is ignored).

The async methods run the same calls on a worker thread; the store is safe to share between threads
as ``httpx.Client`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    validate_op_namespace,
)

from memos_client._client import MemosClient
from memos_client._errors import Conflict, NotFound, PreconditionFailed
from memos_client._models import Cube, Memory
from memos_client.compat._cubes import unseen_cube

__all__ = ["MemosStore"]

SearchMode = Literal["vector", "text", "hybrid", "graph"]

_SEARCH_MAX_K = 200  # the server's limit on k
_SEARCH_MAX_CUBES = 100  # and on cube_ids
_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")


class MemosStore(BaseStore):
    """LangGraph's ``BaseStore`` backed by a memos server: namespaces are cubes, items are memories."""

    supports_ttl = True

    def __init__(self, client: MemosClient, *, cube_prefix: str = "langgraph", mode: SearchMode = "hybrid") -> None:
        if not cube_prefix or ":" in cube_prefix:
            raise ValueError("cube_prefix must be a non-empty string without ':'")
        self._client = client
        self._prefix = cube_prefix
        self._mode: SearchMode = mode
        self._cubes: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()

    # --- BaseStore ---------------------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        results: list[Result] = []
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                results.append(self._get(op))
            elif isinstance(op, SearchOp):
                results.append(self._search(op))
            elif isinstance(op, PutOp):
                self._put(op)
                results.append(None)
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op))
            else:  # pragma: no cover - LangGraph's Op union is closed
                raise TypeError(f"unknown store operation {op!r}")
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))

    # --- operations --------------------------------------------------------------------------------

    def _get(self, op: GetOp) -> Item | None:
        cube_id = self._cube_id(op.namespace, create=False)
        if cube_id is None:
            return None
        memory = self._find(cube_id, op.key)
        return None if memory is None else _item(op.namespace, memory)

    def _put(self, op: PutOp) -> None:
        if op.value is not None and not isinstance(op.value, Mapping):
            raise TypeError(
                f"value must be a dict (a LangGraph item's value is a JSON object), not {type(op.value).__name__}: "
                'wrap it, e.g. {"text": ...}'
            )
        if op.value is None:
            cube_id = self._cube_id(op.namespace, create=False)
            memory = None if cube_id is None else self._find(cube_id, op.key)
            if memory is not None:
                with contextlib.suppress(NotFound):  # deleted meanwhile: the outcome the caller asked for
                    self._client.memories.delete(memory.id)
            return
        value = dict(op.value)
        metadata = {"langgraph": {"key": op.key}, "value": value}
        content = _content(op.key, value, op.index)
        ttl_seconds = None if op.ttl is None else max(1, round(op.ttl * 60))
        cube_id = self._cube_id(op.namespace, create=True)
        assert cube_id is not None
        for _ in range(3):  # a concurrent put of the same key moved the version: read it again
            memory = self._find(cube_id, op.key)
            if memory is None:
                added = self._client.memories.add(
                    cube_id, content=content, metadata=metadata, tags=[_key_tag(op.key)], ttl_seconds=ttl_seconds
                )
                # Two puts of a new key at once both added one: the key then had two items (found in review). The
                # oldest is the key's item, as _find reads it, and whichever put sees younger ones deletes them (one
                # may not see the other's yet). A put whose item is not the oldest writes its value over the
                # oldest (the next round's update), as a put on an existing key does.
                winner, *others = self._items(cube_id, op.key) or [added]
                for other in others:
                    with contextlib.suppress(NotFound):
                        self._client.memories.delete(other.id)
                if winner.id == added.id:
                    return
                continue
            try:
                self._client.memories.update(
                    memory.id, if_version=memory.version, content=content, metadata=metadata, ttl_seconds=ttl_seconds
                )
                return
            except PreconditionFailed:
                continue
        raise Conflict(f"key {op.key!r} kept changing under concurrent writes; try again", status=409)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        _check_filter(op.filter)
        cubes = self._cubes_under(op.namespace_prefix)
        if not cubes:
            return []
        wanted = op.offset + op.limit
        if op.query:
            exact = {k: v for k, v in (op.filter or {}).items() if not _has_operator(v)}
            ids = list(cubes)
            # A search takes at most _SEARCH_MAX_CUBES cubes (a 422 over 100 namespaces; found in review): one
            # search per group. Hybrid and graph scores are scaled within each search, so the groups' results are
            # merged by rank (each group's best, then each one's second, ...), not by score. At most k = 200 are
            # ranked: a page past that is empty, as a page past the last is.
            groups = [
                self._client.search(
                    op.query,
                    cube_ids=ids[start : start + _SEARCH_MAX_CUBES],
                    k=min(max(wanted, 1), _SEARCH_MAX_K),
                    mode=self._mode,
                    filters={"value": exact} if exact else None,
                ).results
                for start in range(0, len(ids), _SEARCH_MAX_CUBES)
            ]
            results = [r for row in itertools.zip_longest(*groups) for r in row if r is not None]
            hits = [
                _search_item(cubes[r.memory.cube_id], r.memory, r.score)
                for r in results
                if r.memory.cube_id in cubes and _matches(_value(r.memory), op.filter)
            ]
        else:
            hits = [
                _search_item(namespace, memory, None)
                for cube_id, namespace in cubes.items()
                for memory in self._client.memories.list(cube_id)
                if _matches(_value(memory), op.filter)
            ]
            hits.sort(key=lambda item: item.updated_at, reverse=True)
        return hits[op.offset : op.offset + op.limit]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        found: set[tuple[str, ...]] = set()
        for namespace in self._all_namespaces().values():
            if not all(_condition_holds(namespace, c) for c in op.match_conditions or ()):
                continue
            found.add(namespace if op.max_depth is None else namespace[: op.max_depth])
        return sorted(found)[op.offset : op.offset + op.limit]

    # --- namespaces and keys -----------------------------------------------------------------------

    def _cube_id(self, namespace: tuple[str, ...], *, create: bool) -> str | None:
        with self._lock:
            known = self._cubes.get(namespace)
        if known is not None:
            return known
        self._all_namespaces()  # refreshes the map: another process may have created it
        with self._lock:
            known = self._cubes.get(namespace)
        if known is not None or not create:
            return known
        try:
            cube = self._client.cubes.create(
                self._cube_name(namespace), metadata={"langgraph": {"namespace": list(namespace)}}
            )
        except Conflict as exc:  # created concurrently under the same name, or a cube this key cannot see
            self._all_namespaces()
            with self._lock:
                known = self._cubes.get(namespace)
            if known is None:
                raise unseen_cube(self._cube_name(namespace), "another cube_prefix=", exc) from exc
            return known
        with self._lock:
            self._cubes[namespace] = cube.id
        return cube.id

    def _cubes_under(self, prefix: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        return {cid: ns for cid, ns in self._all_namespaces().items() if ns[: len(prefix)] == prefix}

    def _all_namespaces(self) -> dict[str, tuple[str, ...]]:
        """Every cube of this store the caller can see, as cube id -> namespace (and the cache refreshed)."""
        found = {cube.id: ns for cube in self._client.cubes.list() if (ns := self._namespace_of(cube)) is not None}
        with self._lock:
            self._cubes = {ns: cid for cid, ns in found.items()}
        return found

    def _cube_name(self, namespace: tuple[str, ...]) -> str:
        return f"{self._prefix}:{json.dumps(list(namespace), ensure_ascii=False, separators=(',', ':'))}"

    def _namespace_of(self, cube: Cube) -> tuple[str, ...] | None:
        if not cube.name.startswith(f"{self._prefix}:["):
            return None
        try:
            labels = json.loads(cube.name[len(self._prefix) + 1 :])
        except ValueError:
            return None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            return None
        return tuple(labels)

    def _find(self, cube_id: str, key: str) -> Memory | None:
        """The key's item: the oldest memory holding it."""
        return next(self._holding(cube_id, key), None)

    def _items(self, cube_id: str, key: str) -> list[Memory]:
        """Every memory holding the key, oldest first (more than one only while two puts race)."""
        return list(self._holding(cube_id, key))

    def _holding(self, cube_id: str, key: str) -> Iterator[Memory]:
        listed = self._client.memories.list(cube_id, tag=_key_tag(key), page_size=10)
        return (m for m in listed if m.metadata.get("langgraph", {}).get("key") == key)


# --- items ----------------------------------------------------------------------------------------


def _key_tag(key: str) -> str:
    # Keys are free text of any length; a digest keeps the tag inside memos' tag limit.
    return "lg-key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _value(memory: Memory) -> dict[str, Any]:
    value = memory.metadata.get("value")
    return value if isinstance(value, dict) else {}


def _item(namespace: tuple[str, ...], memory: Memory) -> Item:
    return Item(
        value=_value(memory),
        key=str(memory.metadata.get("langgraph", {}).get("key", "")),
        namespace=namespace,
        created_at=memory.created_at,
        updated_at=memory.updated_at,
    )


def _search_item(namespace: tuple[str, ...], memory: Memory, score: float | None) -> SearchItem:
    return SearchItem(
        namespace=namespace,
        key=str(memory.metadata.get("langgraph", {}).get("key", "")),
        value=_value(memory),
        created_at=memory.created_at,
        updated_at=memory.updated_at,
        score=score,
    )


def _content(key: str, value: Mapping[str, Any], index: Literal[False] | list[str] | None) -> str:
    """The text memos embeds and indexes for an item."""
    if index is False:
        return key
    if index:
        parts = [_text(v) for path in index for v in _select(value, path)]
        text = "\n".join(p for p in parts if p)
        if text.strip():
            return text
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


_STEP = re.compile(r"([^.\[\]]+)|\[(\*|-?\d+)\]")


def _select(value: Any, path: str) -> Iterator[Any]:
    """Values at a LangGraph index path: ``a.b``, ``list[0]``, ``list[-1]``, ``list[*].field``, ``$`` (the whole)."""
    if path in ("$", ""):
        yield value
        return
    current: list[Any] = [value]
    for name, index in _STEP.findall(path):
        following: list[Any] = []
        for node in current:
            if name:
                if isinstance(node, Mapping) and name in node:
                    following.append(node[name])
            elif isinstance(node, Sequence) and not isinstance(node, str):
                if index == "*":
                    following.extend(node)
                elif -len(node) <= int(index) < len(node):
                    following.append(node[int(index)])
        current = following
    yield from current


# --- filters and namespace conditions -------------------------------------------------------------


def _is_operator(condition: Any) -> bool:
    return isinstance(condition, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in condition)


def _has_operator(condition: Any) -> bool:
    """Whether an operator appears anywhere in ``condition`` (a nested ``{"a": {"b": {"$gt": 1}}}`` too)."""
    if _is_operator(condition):
        return True
    return isinstance(condition, Mapping) and any(_has_operator(v) for v in condition.values())


def _check_filter(filters: Mapping[str, Any] | None, where: str = "filter") -> None:
    """An operator this store does not apply, at any depth, is an error, not a filter that quietly matches
    nothing."""
    for key, condition in (filters or {}).items():
        if not isinstance(condition, Mapping):
            continue
        if not _is_operator(condition):
            _check_filter(condition, f"{where}[{key!r}]")
            continue
        for op in condition:
            if op not in _OPERATORS:
                raise ValueError(
                    f"unsupported filter operator {op!r} (in {where}[{key!r}]); MemosStore supports "
                    f"{', '.join(_OPERATORS)} and plain equality"
                )


def _matches(value: Any, filters: Mapping[str, Any] | None) -> bool:
    """LangGraph's filter semantics (its ``InMemoryStore``): a nested object matches the keys it names, a
    list matches element by element, operators compare."""
    return _compare_values(value, dict(filters or {}))


def _compare_values(actual: Any, condition: Any) -> bool:
    if isinstance(condition, Mapping):
        if _is_operator(condition):
            return all(_compare(actual, op, expected) for op, expected in condition.items())
        return isinstance(actual, Mapping) and all(_compare_values(actual.get(k), v) for k, v in condition.items())
    if isinstance(condition, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(condition)
            and all(_compare_values(a, c) for a, c in zip(actual, condition, strict=True))
        )
    return bool(actual == condition)


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if op == "$eq":
        return bool(actual == expected)
    if op == "$ne":
        return bool(actual != expected)
    if actual is None:
        return False
    try:
        if op == "$gt":
            return bool(actual > expected)
        if op == "$gte":
            return bool(actual >= expected)
        if op == "$lt":
            return bool(actual < expected)
        if op == "$lte":
            return bool(actual <= expected)
    except TypeError:  # values of kinds that do not order (str vs int) never match
        return False
    raise ValueError(f"unsupported filter operator {op!r}; use one of {', '.join(_OPERATORS)}")


def _condition_holds(namespace: tuple[str, ...], condition: MatchCondition) -> bool:
    path = tuple(condition.path)
    if len(path) > len(namespace):
        return False
    part = namespace[: len(path)] if condition.match_type == "prefix" else namespace[len(namespace) - len(path) :]
    return all(want in ("*", got) for want, got in zip(path, part, strict=True))

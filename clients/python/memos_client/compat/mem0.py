"""A mem0-compatible ``Memory`` over memos: code written for mem0 runs with an import change.

::

    # from mem0 import Memory
    from memos_client.compat.mem0 import Memory

    m = Memory()                                     # MEMOS_URL / MEMOS_API_KEY, cube "mem0"
    m.add("I like dark roast coffee", user_id="alice")
    m.search("what does alice drink?", user_id="alice")["results"]

The methods and answer shapes follow mem0's open-source ``Memory`` (``add``, ``get``, ``get_all``,
``search``, ``update``, ``delete``, ``delete_all``, ``history``, ``reset``; answers as
``{"results": [...]}`` with ``id``, ``memory``, ``hash``, ``metadata``, ``score``, ``created_at``,
``updated_at``, ``user_id``/``agent_id``/``run_id``). Differences worth knowing:

- **No LLM extraction.** memos stores what it is given: ``add`` stores each non-system message as
  one memory (mem0's ``infer=False``), whatever ``infer`` says. Every add answers ``event: "ADD"``.
- **Scoping.** All memories live in one cube (``cube``, default ``"mem0"``, created on first use).
  ``user_id``, ``agent_id`` and ``run_id`` become tags (``user_id:alice``) and metadata, so
  ``get_all``/``search``/``delete_all`` filter on the server. They may be passed as keywords (mem0
  1.x) or inside ``filters`` (mem0 2.x); at least one is required where mem0 requires one.
- **Scores** are memos' fused hybrid scores, not cosine similarities; ``threshold`` applies to them.
- **History** is memos' version chain: each version is one ``ADD``/``UPDATE``/``DELETE`` event
  with ``old_memory`` and ``new_memory``; nothing is lost on update.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from memos_client._client import MemosClient
from memos_client._errors import Conflict, NotFound
from memos_client._models import Memory as MemosMemory
from memos_client._models import Version
from memos_client.compat._cubes import unseen_cube

__all__ = ["Memory"]

_ENTITY_KEYS = ("user_id", "agent_id", "run_id")
_CONFIG_KEYS = ("url", "api_key", "cube")
_SEARCH_MAX_K = 200  # the server's limit on k


class Memory:
    """mem0's ``Memory`` interface, answered by a memos server."""

    def __init__(self, client: MemosClient | None = None, *, cube: str = "mem0") -> None:
        self._client = client if client is not None else MemosClient()
        self._cube_name = cube
        self._cube_id: str | None = None

    @classmethod
    def from_config(cls, config_dict: Mapping[str, Any]) -> Memory:
        """``{"memos": {"url"?, "api_key"?, "cube"?}}``; a key left out falls back to ``MEMOS_URL``,
        ``MEMOS_API_KEY`` and ``"mem0"``.

        Any other key is a ``ValueError``, mem0's own sections (``vector_store``, ``llm``, ``embedder``, ...)
        included: memos stores and embeds on its server, so such a section would be silently bypassed.
        """
        if not isinstance(config_dict, Mapping):
            raise TypeError(f'config_dict must be a dict ({{"memos": {{...}}}}), not {type(config_dict).__name__}')
        other = sorted(str(k) for k in config_dict if k != "memos")
        if other:
            raise ValueError(
                f"from_config does not understand {', '.join(other)}: memos stores and embeds memories on its "
                "server, so mem0's provider sections do not apply; pass "
                '{"memos": {"url": ..., "api_key": ..., "cube": ...}} (each key optional)'
            )
        conf = config_dict.get("memos") or {}
        if not isinstance(conf, Mapping):
            raise TypeError(f'config_dict["memos"] must be a dict, not {type(conf).__name__}')
        unknown = sorted(str(k) for k in conf if k not in _CONFIG_KEYS)
        if unknown:
            raise ValueError(f'unknown keys in config_dict["memos"]: {", ".join(unknown)} (known: url, api_key, cube)')
        for key, value in conf.items():
            if value is not None and not isinstance(value, str):
                raise TypeError(f'config_dict["memos"]["{key}"] must be a str, not {type(value).__name__}')
        client = MemosClient(conf.get("url"), conf.get("api_key"))
        return cls(client, cube=conf.get("cube") or "mem0")

    # --- writes --------------------------------------------------------------------------------

    def add(
        self,
        messages: str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        infer: bool = True,
        memory_type: str | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """Store each non-system message as a memory (no LLM extraction; see the module notes)."""
        del infer, prompt  # memos does not extract facts with an LLM: every message is stored as given
        scope = _scope(user_id=user_id, agent_id=agent_id, run_id=run_id, required=True)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        elif isinstance(messages, Mapping):
            messages = [messages]
        items = []
        for message in messages:
            content = message.get("content")
            if message.get("role") == "system" or not isinstance(content, str) or not content.strip():
                continue
            meta = {**(metadata or {}), **scope}
            if isinstance(message.get("role"), str):
                meta["role"] = message["role"]
            if memory_type is not None:
                meta["memory_type"] = memory_type
            items.append({"kind": "plaintext", "content": content, "metadata": meta, "tags": _tags(scope)})
        if not items:
            return {"results": []}
        added = self._client.memories.add_many(self._cube(), items)
        return {"results": [{"id": m.id, "memory": m.content, "event": "ADD"} for m in added]}

    def update(self, memory_id: str, data: str, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Replace a memory's text (a new version; the old one stays in ``history``)."""
        current = self._client.memories.get(memory_id)
        merged = None if metadata is None else {**current.metadata, **metadata}
        self._client.memories.update(memory_id, if_version=current.version, content=data, metadata=merged)
        return {"message": "Memory updated successfully!"}

    def delete(self, memory_id: str) -> dict[str, Any]:
        self._client.memories.delete(memory_id)
        return {"message": "Memory deleted successfully!"}

    def delete_all(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        scope = _scope(user_id=user_id, agent_id=agent_id, run_id=run_id, filters=filters, required=True)
        # Only those the other filters match, as get_all and search read them: every memory of the scope went
        # (filters={"user_id": "alice", "topic": "work"} deleted alice's other topics too; found in review).
        doomed = [memory for memory in self._scoped(scope) if _extra_filters_hold(memory, filters)]
        for memory in doomed:
            with contextlib.suppress(NotFound):  # deleted meanwhile
                self._client.memories.delete(memory.id)
        return {"message": "Memories deleted successfully!"}

    def reset(self) -> None:
        """Delete every memory in the cube (soft delete: memos keeps the history)."""
        for memory in list(self._client.memories.list(self._cube())):
            with contextlib.suppress(NotFound):
                self._client.memories.delete(memory.id)

    # --- reads ---------------------------------------------------------------------------------

    def get(self, memory_id: str) -> dict[str, Any] | None:
        try:
            memory = self._client.memories.get(memory_id)
        except NotFound:
            return None
        return None if memory.state == "deleted" else _record(memory)

    def get_all(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
        limit: int = 100,
        top_k: int | None = None,
    ) -> dict[str, Any]:
        scope = _scope(user_id=user_id, agent_id=agent_id, run_id=run_id, filters=filters, required=True)
        wanted = top_k if top_k is not None else limit
        results: list[dict[str, Any]] = []
        for memory in self._scoped(scope):
            if len(results) >= wanted:
                break
            if _extra_filters_hold(memory, filters):
                results.append(_record(memory))
        return {"results": results}

    def search(
        self,
        query: str,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        limit: int = 100,
        top_k: int | None = None,
        filters: Mapping[str, Any] | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("Invalid query: cannot be empty or whitespace-only.")
        scope = _scope(user_id=user_id, agent_id=agent_id, run_id=run_id, filters=filters, required=True)
        wanted = top_k if top_k is not None else limit
        # The other filters go to the server as metadata containment, so they narrow the top k instead of being
        # applied to it afterwards (a matching memory outside the top k was missed; found in review). Containment
        # is looser than equality for a list or an object value: the check below still applies.
        # Not a None value: containment of {"k": null} needs the key, where equality here also takes a memory
        # without it (found in review).
        extra = {k: v for k, v in (filters or {}).items() if k not in _ENTITY_KEYS and v is not None}
        found = self._client.search(
            query,
            cube_ids=[self._cube()],
            k=max(1, min(wanted, _SEARCH_MAX_K)),
            tags=_tags(scope),
            filters=extra or None,
        )
        results = [
            {**_record(r.memory), "score": r.score}
            for r in found.results
            if (threshold is None or r.score >= threshold) and _extra_filters_hold(r.memory, filters)
        ]
        return {"results": results[:wanted]}

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """The memory's versions, oldest first, as mem0 history events."""
        events: list[dict[str, Any]] = []
        previous: str | None = None
        for version in self._client.memories.versions(memory_id):
            events.append(_event(memory_id, version, previous))
            previous = version.content
        return events

    # --- helpers -------------------------------------------------------------------------------

    def _cube(self) -> str:
        if self._cube_id is None:
            for cube in self._client.cubes.list():
                if cube.name == self._cube_name:
                    self._cube_id = cube.id
                    break
            else:
                try:
                    self._cube_id = self._client.cubes.create(self._cube_name).id
                except Conflict as exc:  # created concurrently, or a cube of this key cannot see
                    found = [c.id for c in self._client.cubes.list() if c.name == self._cube_name]
                    if not found:
                        raise unseen_cube(self._cube_name, "another cube=", exc) from exc
                    self._cube_id = found[0]
        return self._cube_id

    def _scoped(self, scope: Mapping[str, str]) -> Iterator[MemosMemory]:
        return iter(self._client.memories.list(self._cube(), tag=_tags(scope)))


def _scope(
    *,
    user_id: str | None,
    agent_id: str | None,
    run_id: str | None,
    filters: Mapping[str, Any] | None = None,
    required: bool,
) -> dict[str, str]:
    given = {"user_id": user_id, "agent_id": agent_id, "run_id": run_id}
    for key in _ENTITY_KEYS:
        if given[key] is None and filters and isinstance(filters.get(key), str):
            given[key] = filters[key]
    scope: dict[str, str] = {}
    for key, value in given.items():
        if value is None:
            continue
        trimmed = value.strip()
        if not trimmed or any(c.isspace() for c in trimmed):
            raise ValueError(f"Invalid {key}: must be a non-empty identifier without whitespace.")
        scope[key] = trimmed
    if required and not scope:
        raise ValueError("At least one of 'user_id', 'agent_id', or 'run_id' must be provided.")
    return scope


def _tags(scope: Mapping[str, str]) -> list[str]:
    return [f"{key}:{value}" for key, value in scope.items()]


def _extra_filters_hold(memory: MemosMemory, filters: Mapping[str, Any] | None) -> bool:
    """Filters other than the entity ids: plain equality on metadata."""
    return all(memory.metadata.get(k) == v for k, v in (filters or {}).items() if k not in _ENTITY_KEYS)


def _record(memory: MemosMemory) -> dict[str, Any]:
    content = memory.content or ""
    promoted = {k: memory.metadata[k] for k in (*_ENTITY_KEYS, "role") if k in memory.metadata}
    record: dict[str, Any] = {
        "id": memory.id,
        "memory": content,
        "hash": hashlib.md5(content.encode(), usedforsecurity=False).hexdigest(),  # mem0's content hash
        "metadata": {k: v for k, v in memory.metadata.items() if k not in promoted},
        "created_at": memory.created_at.isoformat(),
        "updated_at": memory.updated_at.isoformat(),
    }
    record.update(promoted)
    return record


def _event(memory_id: str, version: Version, previous: str | None) -> dict[str, Any]:
    event = {"create": "ADD", "delete": "DELETE"}.get(version.op, "UPDATE")
    return {
        "id": f"{memory_id}:{version.version}",
        "memory_id": memory_id,
        "old_memory": previous,
        "new_memory": None if event == "DELETE" else version.content,
        "event": event,
        "created_at": version.created_at.isoformat(),
        "updated_at": version.created_at.isoformat(),
        "is_deleted": event == "DELETE",
    }

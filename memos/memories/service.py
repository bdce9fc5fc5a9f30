"""Memories: create, read, list, update, delete, purge, restore, provenance and links.

Each public method is one use case and one transaction. Reads and writes are
scoped by tenant and by the caller's cube access; a memory the caller cannot
read does not exist for it (404).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Protocol

import msgspec
import numpy as np
from psycopg.errors import ForeignKeyViolation
from sqlalchemy import Row, Select, Uuid, and_, bindparam, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.cubes.access import Access, access_of, cube_access, locked_access, readable_cube_ids, require
from memos.errors import BeyondDatabaseLimit, Conflict, FieldError, Forbidden, Invalid, NotFound, PreconditionFailed
from memos.identity.principal import Principal
from memos.memories import schemas
from memos.memories.ann import IndexMover, cube_indexed, cube_indexing
from memos.memories.neighbours import KNN_LINK, LinkEdge, link_neighbours
from memos.memories.versioning import content_sha256, insert_new, write_version
from memos.pagination import NOT_ISSUED, Page, decode_cursor, decode_keyset, encode_cursor, encode_keyset, list_tag
from memos.search.embedding import EmbeddingService
from memos.search.graphs import CubeGraphs
from memos.search.indexing import embedding_text, event_time
from memos.semcache.schemas import cached_answer_problems
from memos.store.audit import record
from memos.store.db import Database, driver_sql, past_a_limit
from memos.store.models import (
    HEAT,
    MEMORY_ROW,
    TSV_EXPRESSION,
    TSV_EXPRESSION_NOT_UTF8,
    activations,
    cache_entries,
    cube_grants,
    cubes,
    memories,
    memory_links,
    memory_versions,
)
from memos.validation import reject_nul, same_json, unique_tags

PROVENANCE_LINK = "derived_from"
RESERVED_LINKS = {
    PROVENANCE_LINK: "use provenance.derived_from for provenance",
    KNN_LINK: "memos writes knn links itself",
}
MAX_PROVENANCE_NODES = 500
ACTIVATION = "activation"
ACTIVATION_IS_SERVER_MADE = (
    "an activation memory is made by the server and cannot be changed: delete it, "
    "or build the activation again (POST /v1/memories/{source id}/activations)"
)


class MemoryListener(Protocol):
    """Something kept in step with memories after each committed write (the semantic cache's index).

    Called after the transaction commits, in the writing task, with the rows as written.
    """

    def memories_written(self, cube_id: uuid.UUID, rows: Iterable[Row[Any]]) -> None: ...

    def memories_removed(self, cube_id: uuid.UUID, ids: Iterable[uuid.UUID]) -> None: ...


InTransaction = Callable[[AsyncConnection, list[Row[Any]]], Awaitable[None]]
"""Extra work a caller adds to a create's transaction, given the inserted rows (the cache's own row, its quota)."""


@dataclass(frozen=True, slots=True)
class ListFilters:
    kind: str | None = None
    tags: Sequence[str] = ()
    state: str = "active"
    since: datetime | None = None
    until: datetime | None = None
    include_expired: bool = False


DTO_COLUMNS = [
    *(
        memories.c[name]
        for name in (
            "id",
            "cube_id",
            "kind",
            "state",
            "version",
            "content",
            "metadata",
            "tags",
            "provenance",
            "created_at",
            "updated_at",
            "expires_at",
            "created_by",
        )
    ),
    HEAT,
]
"""What ``to_dto`` reads: reads that only answer with memories select these, not the vector (384 floats to
parse, about 0.35 ms a row here) nor the tsvector."""


def to_dto(row: Row[Any]) -> schemas.Memory:
    return schemas.Memory(
        id=row.id,
        cube_id=row.cube_id,
        kind=row.kind,
        state=row.state,
        version=row.version,
        content=row.content,
        metadata=row.metadata,
        tags=list(row.tags),
        provenance=row.provenance,
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        created_by=row.created_by,
        heat=row.heat,
    )


def _version_dto(row: Row[Any]) -> schemas.Version:
    return schemas.Version(
        memory_id=row.memory_id,
        version=row.version,
        op=row.op,
        state=row.state,
        content=row.content,
        metadata=row.metadata,
        tags=list(row.tags),
        provenance=row.provenance,
        content_sha256=row.content_sha256,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _provenance_json(p: schemas.Provenance) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(p)
    if not out.get("derived_from"):
        out.pop("derived_from", None)
    return out


def _indexed_size(utf8: bool) -> str:
    """The full-text vector a memory's row would get (the generated column's own expression), for one memory.

    A constant of the schema put in; every value is a bound parameter."""
    expression = TSV_EXPRESSION if utf8 else TSV_EXPRESSION_NOT_UTF8
    values = "SELECT CAST(%(content)s AS text) AS content, CAST(%(metadata)s AS jsonb) AS metadata"
    return f"SELECT length({expression}) FROM ({values}) AS m"  # noqa: S608


def _indexed_metadata(metadata: dict[str, Any], key: str) -> str:
    """What ``metadata->>key`` gives the full-text vector: a string as it is, any other value as JSON."""
    value = metadata.get(key)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _check_kind(item: schemas.MemoryIn, where: str) -> None:
    for name in ("content", "metadata", "tags", "provenance"):
        reject_nul(getattr(item, name), f"{where}{name}")
    if item.kind == "response":
        _check_response_query(item.metadata, f"{where}metadata.query")


def _check_response_query(metadata: dict[str, Any], field: str) -> None:
    query = metadata.get("query")
    if not isinstance(query, str) or not query.strip():
        raise Invalid.field(field, "a response memory needs the query it answers")
    category = metadata.get("category")
    if category is not None and not isinstance(category, str):
        # Lookups read a non-string category as none (the default) and stats, quotas and invalidation as its text:
        # the entry answered the default category while counted in another (found in review).
        raise Invalid.field(field.removesuffix("query") + "category", "a cache category is a string (its name)")
    # The cache endpoints' limits, on this path too: a lookup compares the stored query and context with its own,
    # and a 1 MiB context written here blocked the event loop for minutes (found in review).
    if problems := cached_answer_problems(metadata):
        key, why = problems[0]
        raise Invalid.field(field.removesuffix("query") + key, why)


def _expires(ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else datetime.now(UTC) + timedelta(seconds=ttl_seconds)


def not_expired() -> Any:
    return or_(memories.c.expires_at.is_(None), memories.c.expires_at > func.now())


def _load_query(
    columns: Sequence[Any], memory_id: Any, tenant_id: Any, agent_id: Any, include_expired: bool
) -> Select[Any]:
    """A memory's row (``columns`` of it) with what the access check needs: its cube's owner and the caller's
    grant. Live cubes of the caller's tenant only."""
    query = (
        select(*columns, cubes.c.owner_agent_id, cube_grants.c.access.label("grant"))
        .select_from(memories)
        .join(cubes, cubes.c.id == memories.c.cube_id)
        .outerjoin(cube_grants, and_(cube_grants.c.cube_id == cubes.c.id, cube_grants.c.agent_id == agent_id))
        .where(memories.c.id == memory_id, memories.c.tenant_id == tenant_id, cubes.c.deleted_at.is_(None))
    )
    return query if include_expired else query.where(not_expired())


@cache
def _get_sql(include_expired: bool) -> str:
    """``GET /v1/memories/{id}``'s statement as text, compiled once: ``%(memory)s``, ``%(tenant)s``, ``%(agent)s``
    (built on every request, it cost the event loop about 0.5 ms, measured A/B in one process)."""
    query = _load_query(
        DTO_COLUMNS,
        bindparam("memory", type_=Uuid()),
        bindparam("tenant", type_=Uuid()),
        bindparam("agent", type_=Uuid()),
        include_expired,
    )
    return driver_sql(query)


Accesses = Callable[[uuid.UUID | None, list[tuple[uuid.UUID, float]]], None]
"""Told of reads that count as uses of memories (the scheduler's heat): (the reader's tenant, [(memory id,
weight)]), all of them that tenant's memories."""

BlobReleaser = Callable[[Sequence[str]], Awaitable[None]]
"""Called after a purge commits with the blob keys its KV activations used (the activations domain frees them)."""


class MemoryService:
    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        graphs: CubeGraphs,
        listeners: Sequence[MemoryListener] = (),
        release_blobs: BlobReleaser | None = None,
    ) -> None:
        self.db = db
        self.embedder = embedder
        self.graphs = graphs
        self.listeners = list(listeners)
        self.release_blobs = release_blobs
        self.index_mover = IndexMover(db)
        self.on_access: Accesses | None = None
        """Told of each memory read by id (the scheduler's heat)."""

    async def close(self) -> None:
        """Stop moving memories into the HNSW index (a move resumes on the cube's next write)."""
        await self.index_mover.close()

    def notify_written(self, cube_id: uuid.UUID, rows: Sequence[Row[Any]]) -> None:
        """Tell the graphs and the listeners about committed new or changed memories."""
        self.graphs.memories_written(cube_id, rows)
        for listener in self.listeners:
            listener.memories_written(cube_id, rows)

    def notify_removed(self, cube_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> None:
        """Tell the graphs and the listeners about committed deletions."""
        self.graphs.memories_removed(cube_id, ids)
        for listener in self.listeners:
            listener.memories_removed(cube_id, ids)

    # ------------------------------------------------------------------ create

    async def create(
        self,
        principal: Principal,
        cube_id: uuid.UUID,
        body: schemas.MemoryIn,
        *,
        vector: np.ndarray | None = None,
        in_transaction: InTransaction | None = None,
    ) -> schemas.Memory:
        """Add one memory. ``vector``: its embedding when the caller already has it (the cache embeds
        queries itself); ``in_transaction``: more writes that must commit or fail with this one."""
        vectors = None if vector is None else np.asarray(vector, dtype=np.float32).reshape(1, -1)
        (memory,) = await self._create(
            principal, cube_id, [body], single=True, vectors=vectors, in_transaction=in_transaction
        )
        return memory

    async def create_batch(
        self, principal: Principal, cube_id: uuid.UUID, body: schemas.BatchIn
    ) -> list[schemas.Memory]:
        return await self._create(principal, cube_id, body.items, single=False)

    async def _create(
        self,
        principal: Principal,
        cube_id: uuid.UUID,
        items: Sequence[schemas.MemoryIn],
        *,
        single: bool,
        vectors: np.ndarray | None = None,
        in_transaction: InTransaction | None = None,
    ) -> list[schemas.Memory]:
        tenant_id, agent_id = principal.tenant_member()
        times = []
        for i, item in enumerate(items):
            where = "" if single else f"items[{i}]."
            _check_kind(item, where)
            times.append(event_time(item.metadata, f"{where}metadata.time"))
        # Embedding runs before the transaction: no connection is held while the model works.
        if vectors is None:
            vectors = await self.embedder.embed([embedding_text(i.kind, i.content, i.metadata) for i in items])
        indexed_texts = [("" if single else f"items[{n}].", i.content, i.metadata) for n, i in enumerate(items)]
        async with self._naming_what_is_too_large(indexed_texts), self.db.transaction() as conn:
            await cube_access(conn, principal, cube_id, "write")
            indexing = await cube_indexing(conn, cube_id)
            versions = await self._resolve_references(conn, principal, items, single)
            rows: list[dict[str, Any]] = []
            for item, vector, when in zip(items, vectors, times, strict=True):
                provenance = _provenance_json(item.provenance)
                for ref in provenance.get("derived_from", []):
                    ref.setdefault("version", versions[uuid.UUID(ref["memory_id"])])
                rows.append(
                    {
                        "id": uuid.uuid4(),
                        "tenant_id": tenant_id,
                        "cube_id": cube_id,
                        "kind": item.kind,
                        "state": "active",
                        "version": 1,
                        "content": item.content,
                        "metadata": item.metadata,
                        "tags": unique_tags(item.tags),
                        "provenance": provenance,
                        "content_sha256": content_sha256(item.content),
                        "expires_at": _expires(item.ttl_seconds),
                        "created_by": agent_id,
                        "embedding": vector,
                        "embedding_model": self.embedder.model,
                        "event_time": when,
                    }
                )
            inserted = await insert_new(conn, rows, indexed=indexing.indexed)
            if in_transaction is not None:
                await in_transaction(conn, inserted)
            links = [
                {"from_id": row["id"], "to_id": link.to, "type": link.type, "weight": link.weight}
                for row, item in zip(rows, items, strict=True)
                for link in item.links
            ] + [
                {
                    "from_id": row["id"],
                    "to_id": uuid.UUID(ref["memory_id"]),
                    "type": PROVENANCE_LINK,
                    "weight": 1.0,
                    "to_version": ref["version"],
                }
                for row in rows
                for ref in row["provenance"].get("derived_from", [])
            ]
            if links:
                await self._insert_links(conn, principal, links)
            knn = await link_neighbours(
                conn, tenant_id, agent_id, cube_id, [r["id"] for r in rows], indexed=indexing.indexed
            )
            await record(
                conn,
                principal,
                "memory.create" if single else "memory.batch_create",
                "memory" if single else "cube",
                rows[0]["id"] if single else cube_id,
                detail={} if single else {"count": len(rows)},
            )
        self.notify_written(cube_id, inserted)
        self.graphs.links_written(cube_id, [(x["from_id"], x["to_id"], x["type"], x["weight"]) for x in links])
        self.graphs.links_written(cube_id, knn)
        if indexing.move_after(len(rows)):  # every new memory here has an embedding
            self.index_mover.schedule(cube_id)
        return [to_dto(r) for r in inserted]

    @asynccontextmanager
    async def _naming_what_is_too_large(self, texts: list[tuple[str, str, dict[str, Any]]]) -> AsyncIterator[None]:
        """Name the field when Postgres refuses a write as past one of its limits: the full-text vector of a
        memory's words (speaker, content and time) is at most 1 MiB, which a body under the size limit can pass.
        Each memory's text is tried alone, longest first, and only after such a refusal. ``texts``: (the item's
        field prefix, its content, its metadata)."""
        try:
            yield
        except BeyondDatabaseLimit as exc:
            named = await self._too_large_to_index(texts, exc)
            if named is exc:
                raise
            raise named from exc

    async def _too_large_to_index(
        self, texts: list[tuple[str, str, dict[str, Any]]], refused: BeyondDatabaseLimit
    ) -> BeyondDatabaseLimit:
        def size(item: tuple[str, str, dict[str, Any]]) -> int:
            return len(item[1]) + sum(len(_indexed_metadata(item[2], key)) for key in ("speaker", "time"))

        async with self.db.read() as conn:
            for where, content, meta in sorted(texts, key=size, reverse=True):
                try:
                    await conn.exec_driver_sql(
                        _indexed_size(self.db.utf8), {"content": content, "metadata": json.dumps(meta)}
                    )
                except DBAPIError as exc:
                    if (reason := past_a_limit(exc.orig)) is None:
                        raise
                    parts = {"content": content} | {
                        f"metadata.{key}": _indexed_metadata(meta, key) for key in ("speaker", "time")
                    }
                    field = max(parts, key=lambda name: len(parts[name]))
                    return BeyondDatabaseLimit.field(
                        f"{where}{field}", f"too large to index for full-text search ({reason})"
                    )
        return refused

    async def _resolve_references(
        self, conn: AsyncConnection, principal: Principal, items: Sequence[schemas.MemoryIn], single: bool
    ) -> dict[uuid.UUID, int]:
        """Check that every linked or derived-from memory is one the caller can read; their current versions."""
        wanted: dict[uuid.UUID, str] = {}
        for i, item in enumerate(items):
            where = "" if single else f"items[{i}]."
            seen: set[tuple[uuid.UUID, str]] = set()
            for j, link in enumerate(item.links):
                if link.type in RESERVED_LINKS:
                    raise Invalid.field(f"{where}links[{j}].type", RESERVED_LINKS[link.type])
                if (link.to, link.type) in seen:
                    # The body's own mistake, not a conflict with stored state: it was 409 "already exists".
                    raise Invalid.field(f"{where}links[{j}]", "the same link (to and type) is listed twice")
                seen.add((link.to, link.type))
                wanted.setdefault(link.to, f"{where}links[{j}].to")
            sources: set[uuid.UUID] = set()
            for j, ref in enumerate(item.provenance.derived_from):
                if ref.memory_id in sources:  # one provenance link per source: it was a 409 "already exists"
                    field = f"{where}provenance.derived_from[{j}].memory_id"
                    raise Invalid.field(field, "the same source memory is listed twice")
                sources.add(ref.memory_id)
                wanted.setdefault(ref.memory_id, f"{where}provenance.derived_from[{j}].memory_id")
        if not wanted:
            return {}
        found = await self._readable_versions(conn, principal, list(wanted))
        for memory_id, where in wanted.items():
            if memory_id not in found:
                raise NotFound(f"{where}: no such memory", errors=[FieldError(where, "no such memory")])
        for i, item in enumerate(items):
            for j, ref in enumerate(item.provenance.derived_from):
                if ref.version is not None and ref.version > found[ref.memory_id]:
                    where = "" if single else f"items[{i}]."
                    raise Invalid.field(
                        f"{where}provenance.derived_from[{j}].version",
                        f"memory {ref.memory_id} has no version {ref.version} yet",
                    )
        return found

    async def _readable_versions(
        self, conn: AsyncConnection, principal: Principal, ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, int]:
        rows = await conn.execute(
            select(memories.c.id, memories.c.version).where(
                memories.c.id.in_(ids),
                memories.c.tenant_id == principal.tenant_id,
                memories.c.cube_id.in_(readable_cube_ids(principal)),
            )
        )
        return {r.id: r.version for r in rows}

    async def _insert_links(
        self, conn: AsyncConnection, principal: Principal, links: list[dict[str, Any]]
    ) -> list[Row[Any]]:
        for link in links:
            link.setdefault("to_version", None)
            link.update(id=uuid.uuid4(), tenant_id=principal.tenant_id, created_by=principal.agent_id)
        try:
            async with conn.begin_nested():
                return list((await conn.execute(insert(memory_links).returning(memory_links), links)).all())
        except IntegrityError as exc:
            if isinstance(exc.orig, ForeignKeyViolation):
                # Checked readable just before: deleted for good meanwhile (every IntegrityError said "already
                # exists").
                raise Conflict("a memory it links to was deleted meanwhile; retry") from None
            raise Conflict("a link of this type between these memories already exists") from None

    async def _move_provenance_links(
        self,
        conn: AsyncConnection,
        principal: Principal,
        memory_id: uuid.UUID,
        new_links: list[dict[str, Any]],
        dropped: list[uuid.UUID],
    ) -> None:
        """The provenance graph follows the memory's current provenance (``_provenance_link_changes``)."""
        if dropped:
            await conn.execute(
                delete(memory_links).where(
                    memory_links.c.from_id == memory_id,
                    memory_links.c.type == PROVENANCE_LINK,
                    memory_links.c.to_id.in_(dropped),
                )
            )
        if new_links:
            await self._insert_links(conn, principal, new_links)

    async def _relink_neighbours(
        self, conn: AsyncConnection, principal: Principal, memory_id: uuid.UUID, cube_id: uuid.UUID
    ) -> tuple[list[uuid.UUID], list[LinkEdge]]:
        """The memory's embedding changed: replace its knn links. Returns (old neighbours, new links)."""
        old = await conn.execute(
            delete(memory_links)
            .where(memory_links.c.from_id == memory_id, memory_links.c.type == KNN_LINK)
            .returning(memory_links.c.to_id)
        )
        indexed = await cube_indexed(conn, cube_id)
        tenant_id, agent_id = principal.tenant_member()
        return [r.to_id for r in old], await link_neighbours(
            conn, tenant_id, agent_id, cube_id, [memory_id], indexed=indexed
        )

    # ------------------------------------------------------------------ read

    async def _load(
        self,
        conn: AsyncConnection,
        principal: Principal,
        memory_id: uuid.UUID,
        needed: Access,
        *,
        include_expired: bool = True,
        lock: bool = False,
        columns: Sequence[Any] = MEMORY_ROW,
    ) -> Row[Any]:
        """The memory's current row (``columns`` of it: all by default), if the caller has ``needed`` access to its
        cube (404 if it cannot read it)."""
        tenant_id, agent_id = principal.tenant_member()
        if lock:
            # The cube first, shared, then the memory: the order a cube's deletion takes them in (the cube, then
            # its memories). Locking the memory first deadlocked with it (a KV build, found in review), and
            # locking it alone let a delete of the memory answer 204 in a cube deleted meanwhile.
            await conn.execute(
                select(cubes.c.id)
                .select_from(memories)
                .join(cubes, cubes.c.id == memories.c.cube_id)
                .where(memories.c.id == memory_id, memories.c.tenant_id == tenant_id)
                .with_for_update(read=True, of=cubes)
            )
        query = _load_query(columns, memory_id, tenant_id, agent_id, include_expired)
        if lock:
            query = query.with_for_update(of=memories)
        elif needed != "read":
            # As in cube_access: the cube cannot be deleted between this check and the write's commit.
            query = query.with_for_update(read=True, of=cubes)
        row: Row[Any] | None = (await conn.execute(query)).first()
        access = None if row is None else access_of(principal, row.owner_agent_id, row.grant)
        if row is not None and needed != "read" and not lock:  # with lock, the cube was locked a statement ago
            access = await locked_access(conn, principal, row.cube_id, row.owner_agent_id, access)
        if row is None or access is None:
            raise NotFound("no such memory")
        require(access, needed, "memory's cube")
        return row

    async def load_row(
        self, conn: AsyncConnection, principal: Principal, memory_id: uuid.UUID, needed: Access, *, lock: bool = False
    ) -> Row[Any]:
        """For other domains: the memory's current row in ``conn``, checked like every memory endpoint
        (404 if the caller cannot read it, 403 below ``needed``); ``lock`` holds the row until commit."""
        return await self._load(conn, principal, memory_id, needed, lock=lock)

    async def get(self, principal: Principal, memory_id: uuid.UUID, include_expired: bool = False) -> schemas.Memory:
        tenant_id, agent_id = principal.tenant_member()
        params = {"memory": memory_id, "tenant": tenant_id, "agent": agent_id}
        async with self.db.read() as conn:
            row = (await conn.exec_driver_sql(_get_sql(include_expired), params)).first()
        # As _load for "read": any access to the cube reads it; none, and the memory does not exist for the caller.
        if row is None or access_of(principal, row.owner_agent_id, row.grant) is None:
            raise NotFound("no such memory")
        memory = to_dto(row)
        # A deleted memory is read for its history, not used: warming it would put it back among the hot.
        if self.on_access is not None and row.state != "deleted":
            self.on_access(principal.tenant_id, [(memory_id, 1.0)])
        return memory

    async def list(
        self, principal: Principal, cube_id: uuid.UUID, filters: ListFilters, limit: int, cursor: str | None
    ) -> Page[schemas.Memory]:
        tag = list_tag("memories", cube_id)
        after = decode_keyset(cursor, tag)
        reject_nul(list(filters.tags), "tag")  # ?tag=%00: Postgres' DataError named no parameter
        query = select(*DTO_COLUMNS).where(memories.c.cube_id == cube_id, memories.c.state == filters.state)
        if filters.kind is not None:
            query = query.where(memories.c.kind == filters.kind)
        if filters.tags:
            query = query.where(memories.c.tags.contains(unique_tags(filters.tags)))
        if filters.since is not None:
            query = query.where(memories.c.created_at >= filters.since)
        if filters.until is not None:
            query = query.where(memories.c.created_at < filters.until)
        if not filters.include_expired:
            query = query.where(not_expired())
        if after is not None:
            query = query.where(func.row(memories.c.created_at, memories.c.id) > func.row(*after))
        query = query.order_by(memories.c.created_at, memories.c.id).limit(limit + 1)
        async with self.db.read() as conn:
            await cube_access(conn, principal, cube_id, "read")
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[to_dto(r) for r in rows],
            next_cursor=encode_keyset(rows[-1].created_at, rows[-1].id, tag) if more else None,
        )

    async def versions(
        self,
        principal: Principal,
        memory_id: uuid.UUID,
        limit: int,
        cursor: str | None,
        include_expired: bool = False,
    ) -> Page[schemas.Version]:
        tag = list_tag("versions", memory_id)
        after = decode_cursor(cursor, 1, tag)
        start = 0
        if after is not None:
            # Only a version number this server could have handed out: a forged ["x"], [1.5] or [true] was
            # read as "from the start", and [2**70] reached Postgres as a DataError that named no field.
            if type(after[0]) is not int or not 1 <= after[0] <= schemas.MAX_VERSION:
                raise Invalid.field("cursor", NOT_ISSUED)
            start = after[0]
        async with self.db.read() as conn:
            await self._load(conn, principal, memory_id, "read", include_expired=include_expired)
            rows = (
                await conn.execute(
                    select(memory_versions)
                    .where(memory_versions.c.memory_id == memory_id, memory_versions.c.version > start)
                    .order_by(memory_versions.c.version)
                    .limit(limit + 1)
                )
            ).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[_version_dto(r) for r in rows],
            next_cursor=encode_cursor([rows[-1].version], tag) if more else None,
        )

    async def version(
        self, principal: Principal, memory_id: uuid.UUID, n: int, include_expired: bool = False
    ) -> schemas.Version:
        async with self.db.read() as conn:
            await self._load(conn, principal, memory_id, "read", include_expired=include_expired)
            if not 1 <= n <= schemas.MAX_VERSION:
                # Found by fuzzing: a number past the column's range was a DataError (422), not "no such version".
                raise NotFound(f"this memory has no version {n}")
            row = (
                await conn.execute(
                    select(memory_versions).where(
                        memory_versions.c.memory_id == memory_id, memory_versions.c.version == n
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"this memory has no version {n}")
        return _version_dto(row)

    # ------------------------------------------------------------------ change

    async def update(
        self, principal: Principal, memory_id: uuid.UUID, patch: schemas.MemoryPatch, if_match: frozenset[int] | None
    ) -> schemas.Memory:
        """A new version with the sent fields changed; none if nothing changes. Stale ``if_match`` is 412.

        The change is planned and embedded outside the transaction (no connection waits on the model);
        the transaction then re-checks access and claims the version it planned from.
        """
        async with self.db.read() as conn:
            current = await self._load(conn, principal, memory_id, "write")
            if current.kind == ACTIVATION:
                # Found in review: a PATCH rewrote an activation memory's text and provenance (the edge to its
                # source went) while its KV stayed fresh and was still injected.
                sent = [f.name for f in msgspec.structs.fields(patch) if getattr(patch, f.name) is not msgspec.UNSET]
                if sent:
                    raise Invalid(
                        f"{', '.join(sent)}: {ACTIVATION_IS_SERVER_MADE}",
                        errors=[FieldError(f, ACTIVATION_IS_SERVER_MADE) for f in sent],
                    )
            _check_writable(current)
            _check_match(current.version, if_match)
            for name in ("content", "metadata", "tags", "provenance"):
                if (value := getattr(patch, name)) is not msgspec.UNSET:
                    reject_nul(value, name)
            values: dict[str, Any] = {}
            if patch.content is not msgspec.UNSET and patch.content != current.content:
                values["content"] = patch.content
            if patch.metadata is not msgspec.UNSET and not same_json(patch.metadata, current.metadata):
                if current.kind == "response":
                    _check_response_query(patch.metadata, "metadata.query")
                values["metadata"] = patch.metadata
            if patch.tags is not msgspec.UNSET and (tags := unique_tags(patch.tags)) != list(current.tags):
                values["tags"] = tags
            if patch.state is not msgspec.UNSET and patch.state != current.state:
                values["state"] = patch.state
            if patch.ttl_seconds is not msgspec.UNSET and not (
                patch.ttl_seconds is None and current.expires_at is None
            ):
                values["expires_at"] = _expires(patch.ttl_seconds)
            new_links: list[dict[str, Any]] = []
            dropped: list[uuid.UUID] = []
            if patch.provenance is not msgspec.UNSET:
                provenance = _provenance_json(patch.provenance)
                for j, ref in enumerate(patch.provenance.derived_from):
                    if ref.memory_id == memory_id:  # as a link to itself is (found in review: a self-loop edge)
                        field = f"provenance.derived_from[{j}].memory_id"
                        raise Invalid.field(field, "a memory cannot be derived from itself")
                if patch.provenance.derived_from:
                    item = schemas.MemoryIn(kind="plaintext", content="-", provenance=patch.provenance)
                    found = await self._resolve_references(conn, principal, [item], single=True)
                    for ref in provenance["derived_from"]:
                        ref.setdefault("version", found[uuid.UUID(ref["memory_id"])])
                if not same_json(provenance, current.provenance):
                    values["provenance"] = provenance
                    new_links, dropped = _provenance_link_changes(memory_id, current.provenance, provenance)
        if not values:
            return to_dto(current)
        if "content" in values or "metadata" in values:
            new_content = values.get("content", current.content)
            new_metadata = values.get("metadata", current.metadata)
            if "metadata" in values:  # a content-only PATCH must not fail on a time stored under older rules
                values["event_time"] = event_time(new_metadata)
            indexed = embedding_text(current.kind, new_content, new_metadata)
            if indexed != embedding_text(current.kind, current.content, current.metadata):
                values["embedding"] = (await self.embedder.embed([indexed]))[0]
                values["embedding_model"] = self.embedder.model
        indexed_texts = [("", values.get("content", current.content), values.get("metadata", current.metadata))]
        async with self._naming_what_is_too_large(indexed_texts), self.db.transaction() as conn:
            # Access may have changed meanwhile. Made active again, the memory is locked: its edges are read below
            # for the graph, and a link to it committing meanwhile (its foreign key takes a lock this one blocks)
            # was in neither that read nor, with no node yet, the graph (found in a concurrency review).
            await self._load(conn, principal, memory_id, "write", lock=values.get("state") == "active")
            # The compare-and-set on the planned version answers 412 if anyone wrote in between.
            row = await write_version(conn, memory_id, current.version, "update", principal, values)
            if row is None:
                raise PreconditionFailed("the memory changed since you read it; fetch it and retry")
            await _stale_activations(conn, memory_id)
            await self._move_provenance_links(conn, principal, memory_id, new_links, dropped)
            knn = (
                await self._relink_neighbours(conn, principal, memory_id, current.cube_id)
                if "embedding" in values
                else None
            )
            # Archiving took the memory's edges out of the in-memory graph; making it active brings them back.
            revived = await _edges_of(conn, memory_id) if values.get("state") == "active" else []
            await record(
                conn,
                principal,
                "memory.update",
                "memory",
                memory_id,
                detail={"version": row.version, "fields": sorted(values)},
            )
        self.notify_written(row.cube_id, [row])
        self.graphs.links_removed(row.cube_id, [(memory_id, d, PROVENANCE_LINK) for d in dropped])
        self.graphs.links_written(row.cube_id, [(x["from_id"], x["to_id"], x["type"], x["weight"]) for x in new_links])
        if knn is not None:
            self.graphs.links_removed(row.cube_id, [(memory_id, other, KNN_LINK) for other in knn[0]])
            self.graphs.links_written(row.cube_id, knn[1])
        self.graphs.links_written(row.cube_id, revived)
        return to_dto(row)

    async def delete(
        self, principal: Principal, memory_id: uuid.UUID, if_match: frozenset[int] | None, purge: bool = False
    ) -> None:
        """Soft delete (a ``delete`` version; history kept), or purge: erase the content of every version."""
        if purge and not principal.is_admin:
            raise Forbidden("purge needs a tenant admin key")
        async with self.db.transaction() as conn:
            current = await self._load(conn, principal, memory_id, "write", lock=True)
            _check_match(current.version, if_match)
            if current.state != "deleted":
                row = await write_version(conn, memory_id, current.version, "delete", principal, {"state": "deleted"})
                if row is None:
                    raise PreconditionFailed("the memory changed since you read it; fetch it and retry")
                await _stale_activations(conn, memory_id)
            derived: list[uuid.UUID] = []
            blob_keys: list[str] = []
            if purge:
                derived, blob_keys = await _drop_activations(conn, memory_id)
                erased: dict[str, Any] = {
                    "content": None,
                    "content_sha256": None,
                    "metadata": {},
                    "tags": [],
                    "embedding": None,
                    "event_time": None,
                    # Provenance notes and sources are free text too.
                    "provenance": {},
                }
                await conn.execute(
                    update(memory_versions).where(memory_versions.c.memory_id == memory_id).values(**erased)
                )
                await conn.execute(
                    update(memories).where(memories.c.id == memory_id).values(**erased, purged_at=func.now())
                )
                # A cached answer's context embedding is derived from its text: it goes too.
                await conn.execute(delete(cache_entries).where(cache_entries.c.memory_id == memory_id))
            await record(
                conn,
                principal,
                "memory.purge" if purge else "memory.delete",
                "memory",
                memory_id,
                detail={"activations_erased": len(derived)} if derived else None,
            )
        self.notify_removed(current.cube_id, [memory_id, *derived])
        if blob_keys and self.release_blobs is not None:
            await self.release_blobs(blob_keys)

    async def restore(
        self, principal: Principal, memory_id: uuid.UUID, version: int, if_match: frozenset[int] | None
    ) -> schemas.Memory:
        """A new version whose content, metadata, tags and provenance equal version ``version``; state active."""
        async with self.db.transaction() as conn:
            # Locked, as a PATCH that makes a memory active: its edges are read for the graph below.
            current = await self._load(conn, principal, memory_id, "write", lock=True)
            if current.kind == ACTIVATION:
                raise Invalid.field("version", ACTIVATION_IS_SERVER_MADE)
            if current.purged_at is not None:
                raise Conflict("this memory was purged; its versions have no content to restore")
            _check_match(current.version, if_match)
            old = (
                await conn.execute(
                    select(memory_versions).where(
                        memory_versions.c.memory_id == memory_id, memory_versions.c.version == version
                    )
                )
            ).first()
            if old is None:
                raise NotFound(f"this memory has no version {version}")
            # A version written before the cache's limits held on every path (or carried in by an import) would come
            # back as a served entry over them (found in review).
            if current.kind == "response" and (problems := cached_answer_problems(old.metadata)):
                key, why = problems[0]
                raise Invalid.field("version", f"version {version}'s metadata.{key} is over the cache's limits: {why}")
            values = {
                "content": old.content,
                "metadata": old.metadata,
                "tags": old.tags,
                "provenance": old.provenance,
                "embedding": old.embedding,
                "embedding_model": old.embedding_model,
                "event_time": old.event_time,
                "state": "active",
            }
            row = await write_version(conn, memory_id, current.version, "restore", principal, values)
            if row is None:
                raise PreconditionFailed("the memory changed since you read it; fetch it and retry")
            await _stale_activations(conn, memory_id)
            # The restored provenance brings its edges back, as a PATCH of provenance would (found in review:
            # /provenance kept showing the edges of the provenance the restore replaced).
            new_links, dropped = _provenance_link_changes(memory_id, current.provenance, old.provenance)
            # Only to sources still in this tenant: a source deleted for good since (an activation memory, whose
            # source was purged), or one outside the tenant (a copy imported into another tenant) was a 409
            # "already exists", or a link across tenants. The provenance itself is restored as it was: history.
            new_links = await _to_tenant_memories(conn, principal.tenant_member()[0], new_links)
            await self._move_provenance_links(conn, principal, memory_id, new_links, dropped)
            knn = await self._relink_neighbours(conn, principal, memory_id, current.cube_id)
            # Deleting took the memory's edges out of the in-memory graph; its links are still in Postgres.
            edges = await _edges_of(conn, memory_id)
            await record(
                conn,
                principal,
                "memory.restore",
                "memory",
                memory_id,
                detail={"from": version, "version": row.version},
            )
        self.notify_written(row.cube_id, [row])
        self.graphs.links_removed(row.cube_id, [(memory_id, d, PROVENANCE_LINK) for d in dropped])
        self.graphs.links_removed(row.cube_id, [(memory_id, other, KNN_LINK) for other in knn[0]])
        self.graphs.links_written(row.cube_id, edges)
        return to_dto(row)

    async def insert_derived(
        self,
        conn: AsyncConnection,
        principal: Principal,
        source: Row[Any],
        *,
        kind: str,
        content: str,
        metadata: dict[str, Any],
        model: str | None = None,
    ) -> Row[Any]:
        """Write a memory memos derives from ``source`` (its current version), in the caller's transaction.

        Used for KV activations: version 1 with provenance ``derived_from`` the source version and the
        provenance edge, no embedding (derived memories are found through their source, not by meaning).
        Call ``derived_written`` after the commit to bring the cube's graph up to date.
        """
        tenant_id, agent_id = principal.tenant_member()
        provenance: dict[str, Any] = {"derived_from": [{"memory_id": str(source.id), "version": source.version}]}
        if model is not None:
            provenance["model"] = model
        (row,) = await insert_new(
            conn,
            [
                {
                    "id": uuid.uuid4(),
                    "tenant_id": tenant_id,
                    "cube_id": source.cube_id,
                    "kind": kind,
                    "state": "active",
                    "version": 1,
                    "content": content,
                    "metadata": metadata,
                    "tags": [],
                    "provenance": provenance,
                    "content_sha256": content_sha256(content),
                    "expires_at": None,
                    "created_by": agent_id,
                    "embedding": None,
                    "embedding_model": None,
                    "event_time": None,
                }
            ],
        )
        await self._insert_links(
            conn,
            principal,
            [
                {
                    "from_id": row.id,
                    "to_id": source.id,
                    "type": PROVENANCE_LINK,
                    "weight": 1.0,
                    "to_version": source.version,
                }
            ],
        )
        return row

    def derived_written(self, row: Row[Any], source_id: uuid.UUID) -> None:
        """After the commit of ``insert_derived``: the new memory and its provenance edge join the graph."""
        self.notify_written(row.cube_id, [row])
        self.graphs.links_written(row.cube_id, [(row.id, source_id, PROVENANCE_LINK, 1.0)])

    async def link(self, principal: Principal, memory_id: uuid.UUID, body: schemas.LinkIn) -> schemas.Link:
        if body.type in RESERVED_LINKS:
            raise Invalid.field("type", RESERVED_LINKS[body.type])
        if body.to == memory_id:
            raise Invalid.field("to", "a memory cannot link to itself")
        async with self.db.transaction() as conn:
            # Locked: a delete or purge committing between the state check and the insert left a link on a
            # deleted memory (found in review; the link's foreign key takes only a key-share lock).
            source = await self._load(conn, principal, memory_id, "write", lock=True)
            if source.kind == ACTIVATION:
                raise Invalid.field("memory_id", ACTIVATION_IS_SERVER_MADE)
            # Found in review: a deleted or purged memory took new links (201) though it cannot be written. The
            # target may be deleted or purged, as a derived_from source may: the link is kept, and search walks
            # through it only while both ends are active.
            _check_writable(source)
            if body.to not in await self._readable_versions(conn, principal, [body.to]):
                raise NotFound("to: no such memory", errors=[FieldError("to", "no such memory")])
            (row,) = await self._insert_links(
                conn,
                principal,
                [{"from_id": memory_id, "to_id": body.to, "type": body.type, "weight": body.weight}],
            )
            await record(
                conn,
                principal,
                "memory.link",
                "memory",
                memory_id,
                detail={"to": str(body.to), "type": body.type},
            )
        self.graphs.links_written(source.cube_id, [(row.from_id, row.to_id, row.type, row.weight)])
        return schemas.Link(
            id=row.id,
            from_id=row.from_id,
            to_id=row.to_id,
            type=row.type,
            weight=row.weight,
            created_at=row.created_at,
        )

    async def provenance(
        self, principal: Principal, memory_id: uuid.UUID, include_expired: bool = False
    ) -> schemas.ProvenanceGraph:
        """Ancestors (what it was derived from) and descendants (what was derived from it) the caller can read.

        An expired memory's versions and provenance are 404 as the memory is (``include_expired`` reads them):
        they hold its content. Writes still reach it (a PATCH extends or clears its TTL)."""
        async with self.db.read() as conn:
            await self._load(conn, principal, memory_id, "read", include_expired=include_expired)
            edges = await _lineage(conn, memory_id, readable_cube_ids(principal))
            depth: dict[uuid.UUID, int] = {memory_id: 0}
            for e in edges:
                depth.setdefault(e.node, e.depth)
            visible = {
                r.id: r
                for r in await conn.execute(
                    select(memories.c.id, memories.c.kind, memories.c.state, memories.c.version).where(
                        memories.c.id.in_(list(depth)),
                        memories.c.cube_id.in_(readable_cube_ids(principal)),
                    )
                )
            }
        # Only what can be reached through memories the caller reads: a memory beyond an unreadable one would
        # show, by its depth and its missing edges, that a hidden step lies between (found in review).
        around: dict[uuid.UUID, set[uuid.UUID]] = {}
        for e in edges:
            if e.from_id in visible and e.to_id in visible:
                around.setdefault(e.from_id, set()).add(e.to_id)
                around.setdefault(e.to_id, set()).add(e.from_id)
        reached = {memory_id: 0}
        frontier = [memory_id]
        while frontier:
            step = []
            for node in frontier:
                for other in around.get(node, ()):
                    if other not in reached:
                        reached[other] = reached[node] + 1
                        step.append(other)
            frontier = step
        nodes = [
            schemas.ProvenanceNode(
                # ancestors negative, descendants positive, as the walk found them
                memory_id=i,
                kind=r.kind,
                state=r.state,
                version=r.version,
                depth=reached[i] * (-1 if depth[i] < 0 else 1),
            )
            for i, r in visible.items()
            if i in reached
        ]
        nodes.sort(key=lambda n: (n.depth, str(n.memory_id)))
        seen: set[tuple[uuid.UUID, uuid.UUID]] = set()
        out_edges = []
        for e in edges:
            key = (e.from_id, e.to_id)
            if e.from_id in reached and e.to_id in reached and key not in seen:
                seen.add(key)
                out_edges.append(schemas.ProvenanceEdge(from_id=e.from_id, to_id=e.to_id, to_version=e.to_version))
        return schemas.ProvenanceGraph(nodes=nodes, edges=out_edges)


async def _stale_activations(conn: AsyncConnection, memory_id: uuid.UUID) -> None:
    """A new version of a memory makes the KV built from its older text stale (never injected again)."""
    await conn.execute(
        update(activations)
        .where(activations.c.memory_id == memory_id, activations.c.stale.is_(False))
        .values(stale=True)
    )


async def _drop_activations(conn: AsyncConnection, memory_id: uuid.UUID) -> tuple[list[uuid.UUID], list[str]]:
    """A purge erases what was derived from the text too: the activation memories go, rows and all.

    KV files hold the token ids, i.e. the text. Returns the erased memory ids and the blob keys they used;
    the caller frees the blobs once the purge has committed (blobs are shared, so only unreferenced ones go).
    """
    rows = (
        await conn.execute(select(activations.c.id, activations.c.sha256).where(activations.c.memory_id == memory_id))
    ).all()
    if not rows:
        return [], []
    ids = [r.id for r in rows]
    # ON DELETE CASCADE takes their versions, links and activation rows with them.
    await conn.execute(delete(memories).where(memories.c.id.in_(ids)))
    return ids, sorted({r.sha256 for r in rows})


def _check_match(current_version: int, if_match: frozenset[int] | None) -> None:
    if if_match is not None and current_version not in if_match:
        named = ", ".join(str(v) for v in sorted(if_match))
        raise PreconditionFailed(
            f"If-Match names version{'s' if len(if_match) > 1 else ''} {named}, the memory is at version "
            f"{current_version}",
            extra={"current_version": current_version},
        )


def _check_writable(current: Row[Any]) -> None:
    if current.purged_at is not None:
        raise Conflict("this memory was purged and cannot change")
    if current.state == "deleted":
        raise Conflict("this memory is deleted; restore a version of it first")


def _provenance_link_changes(
    memory_id: uuid.UUID, old: dict[str, Any], new: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[uuid.UUID]]:
    """Provenance edges to add, and the sources whose edges to drop, when provenance changes."""
    # A source whose version changed is dropped and added again, so the edge carries the new version.
    before = {(ref["memory_id"], ref.get("version")) for ref in old.get("derived_from", [])}
    after = {(ref["memory_id"], ref.get("version")) for ref in new.get("derived_from", [])}
    added = [
        {
            "from_id": memory_id,
            "to_id": uuid.UUID(ref["memory_id"]),
            "type": PROVENANCE_LINK,
            "weight": 1.0,
            "to_version": ref["version"],
        }
        for ref in new.get("derived_from", [])
        if (ref["memory_id"], ref.get("version")) not in before
    ]
    return added, [uuid.UUID(m) for m, _ in before - after]


async def _to_tenant_memories(
    conn: AsyncConnection, tenant_id: uuid.UUID, links: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The ``links`` whose target is a memory of ``tenant_id`` (one that exists, in any state)."""
    if not links:
        return links
    targets = {link["to_id"] for link in links}
    found = set(
        (
            await conn.execute(
                select(memories.c.id).where(memories.c.id.in_(targets), memories.c.tenant_id == tenant_id)
            )
        ).scalars()
    )
    return [link for link in links if link["to_id"] in found]


async def _edges_of(conn: AsyncConnection, memory_id: uuid.UUID) -> list[tuple[uuid.UUID, uuid.UUID, str, float]]:
    """Every link touching a memory, as the graph takes them."""
    rows = await conn.execute(
        select(memory_links.c.from_id, memory_links.c.to_id, memory_links.c.type, memory_links.c.weight).where(
            or_(memory_links.c.from_id == memory_id, memory_links.c.to_id == memory_id)
        )
    )
    return [(r.from_id, r.to_id, r.type, float(r.weight)) for r in rows]


async def _lineage(conn: AsyncConnection, memory_id: uuid.UUID, readable: Select[Any]) -> list[Row[Any]]:
    """Provenance edges reachable from ``memory_id`` through memories of the ``readable`` cubes (a subquery of cube
    ids): upwards (ancestors) and downwards (descendants).

    The walk stops at a memory the caller cannot read. It went through them and cut at ``MAX_PROVENANCE_NODES``
    before the caller's view was applied, so 500 memories derived from one, written in a cube the owner cannot
    read (by an agent with a read grant on it), hid its real descendants from everyone (found in a security
    review). What lies beyond an unreadable memory was never shown anyway."""
    out: list[Row[Any]] = []
    visible = select(memories.c.id).where(memories.c.cube_id.in_(readable))
    for up in (True, False):
        link = memory_links.alias("l")
        near, far = (link.c.from_id, link.c.to_id) if up else (link.c.to_id, link.c.from_id)
        step = -1 if up else 1
        base = select(
            link.c.from_id, link.c.to_id, link.c.to_version, far.label("node"), literal(step).label("depth")
        ).where(link.c.type == PROVENANCE_LINK, near == memory_id, far.in_(visible))
        walk = base.cte("walk", recursive=True)
        link2 = memory_links.alias("l2")
        near2, far2 = (link2.c.from_id, link2.c.to_id) if up else (link2.c.to_id, link2.c.from_id)
        walk = walk.union(
            select(link2.c.from_id, link2.c.to_id, link2.c.to_version, far2, walk.c.depth + step).where(
                link2.c.type == PROVENANCE_LINK,
                near2 == walk.c.node,
                func.abs(walk.c.depth) < 50,
                far2.in_(visible),
            )
        )
        out.extend((await conn.execute(select(walk).limit(MAX_PROVENANCE_NODES))).all())
    return out

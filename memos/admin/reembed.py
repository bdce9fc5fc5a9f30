"""``memos admin reembed``: give every memory that another model embedded a vector of the current model.

After ``MEMOS_EMBED_MODEL`` names another encoder of the same dimensions, the memories the old one
embedded are in another vector space: search's vector leg, write-time knn links, graph mode's diversity
and the semantic cache leave them out (decisions 72) until they are re-embedded. This walks them in id
order, a batch at a time. A batch is embedded first, outside any transaction, then written in one
transaction: a new version of each memory (op ``update``, the only op the API has for a changed stored
value; the audit log names it ``memory.reembed``) with a compare-and-set on the version that was read,
so a memory a client changed meanwhile is skipped, not overwritten (a content change embedded it anew
anyway; a re-run picks up whatever still needs it). A cached answer's context embedding is derived from
its stored context turns: it is recomputed in the same transaction, or the cache would compare a new
lookup's context with an old model's vector. The KV activations built from a re-embedded memory stay
current: their text did not change, so their source version moves with the memory's.

What stays: knn links (they were ranked within one model's space, so they still say "similar"), deleted
memories (a restore copies the vector of the version it restores; re-run the tool after restoring old
versions) and memories that have no embedding by design (derived ones, activations).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.embed.base import Embedder, Vectors
from memos.errors import Unavailable
from memos.identity.principal import OPERATOR
from memos.memories.versioning import write_embeddings
from memos.search.indexing import embedding_text
from memos.semcache.context import context_text
from memos.semcache.index import context_sha256, turns_from
from memos.semcache.store import write_context_embeddings
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import EMBEDDING_DIMS, activations, cache_entries, memories

DEFAULT_BATCH = 256
WRITE_ATTEMPTS = 3


@dataclasses.dataclass(slots=True)
class Report:
    model: str
    pending: dict[str, int] = dataclasses.field(default_factory=dict)
    """Memories that needed it when the run started, by the model that embedded them."""
    reembedded: int = 0
    contexts: int = 0
    """Cached answers whose context embedding was recomputed too."""
    skipped: int = 0
    """Changed by someone else between the read and the write; a re-run picks them up if still needed."""
    unreadable: int = 0
    """Cached answers whose context turns in metadata cannot be read back or no longer hash to the context the
    cache holds (a PATCH changed them): left as they were, so not served; delete and store them again."""
    retries: int = 0
    """Batches written again after the database aborted them (a deadlock with a concurrent write)."""
    batches: int = 0


def misfit(embedder: Embedder) -> str | None:
    """Why ``embedder``'s vectors cannot be stored, or None: the column has fixed dimensions."""
    if embedder.dims == EMBEDDING_DIMS:
        return None
    return (
        f"{embedder.name} gives {embedder.dims}-dimension vectors; the embedding column holds {EMBEDDING_DIMS} "
        "(another size needs a migration)"
    )


def _needs_it(model: str, cube_ids: Sequence[uuid.UUID] | None) -> list[Any]:
    conditions = [
        memories.c.embedding.is_not(None),
        memories.c.embedding_model.is_distinct_from(model),
        memories.c.state != "deleted",
        memories.c.purged_at.is_(None),
    ]
    if cube_ids:
        conditions.append(memories.c.cube_id.in_(list(cube_ids)))
    return conditions


async def pending(conn: AsyncConnection, model: str, cube_ids: Sequence[uuid.UUID] | None = None) -> dict[str, int]:
    """How many memories another model embedded, by that model (``--dry-run`` prints this)."""
    rows = await conn.execute(
        select(memories.c.embedding_model, func.count())
        .where(*_needs_it(model, cube_ids))
        .group_by(memories.c.embedding_model)
        .order_by(memories.c.embedding_model)
    )
    return {str(name): int(count) for name, count in rows}


async def reembed(
    db: Database,
    embedder: Embedder,
    *,
    cube_ids: Sequence[uuid.UUID] | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Re-embed, with ``embedder``, every live memory of ``cube_ids`` (all cubes if None) another model embedded."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if (why := misfit(embedder)) is not None:
        raise ValueError(why)
    report = Report(model=embedder.name)
    async with db.read() as conn:
        report.pending = await pending(conn, embedder.name, cube_ids)
    rows = await _read(db, embedder.name, cube_ids, None, batch)
    embedding = asyncio.ensure_future(_embed(embedder, rows)) if rows else None
    try:
        while embedding is not None:
            ready = await embedding
            following = await _read(db, embedder.name, cube_ids, ready.rows[-1].id, batch)
            # The next batch embeds (in a worker thread) while this one is written: the two overlap.
            embedding = asyncio.ensure_future(_embed(embedder, following)) if following else None
            for attempt in range(1, WRITE_ATTEMPTS + 1):
                try:
                    await _write(db, embedder.name, ready, report)
                    break
                except Unavailable:
                    # A deadlock or a lost connection rolled the batch back; its compare-and-set makes a retry safe.
                    if attempt == WRITE_ATTEMPTS:
                        raise
                    report.retries += 1
                    await asyncio.sleep(0.5 * attempt)
            report.batches += 1
            if progress is not None:
                progress(report)
    finally:
        if embedding is not None and not embedding.done():
            embedding.cancel()
    return report


async def _read(
    db: Database, model: str, cube_ids: Sequence[uuid.UUID] | None, after: uuid.UUID | None, batch: int
) -> list[Row[Any]]:
    """The next ``batch`` memories (by id, after ``after``) that another model embedded."""
    query = (
        select(
            memories.c.id,
            memories.c.tenant_id,
            memories.c.cube_id,
            memories.c.kind,
            memories.c.version,
            memories.c.content,
            memories.c.metadata,
            memories.c.embedding_model,
            cache_entries.c.context_embedding.is_not(None).label("has_context"),
            cache_entries.c.context_sha256,
        )
        .outerjoin(cache_entries, cache_entries.c.memory_id == memories.c.id)
        .where(*_needs_it(model, cube_ids))
        .order_by(memories.c.id)
        .limit(batch)
    )
    if after is not None:
        query = query.where(memories.c.id > after)
    async with db.read() as conn:
        return list(await conn.execute(query))


@dataclasses.dataclass(slots=True)
class _Embedded:
    rows: list[Row[Any]]
    writable: list[Row[Any]]
    """The rows to write: all but cached answers whose context cannot be recovered (they keep the old model)."""
    vectors: Vectors
    """One per writable row."""
    contexts: dict[uuid.UUID, Vectors]
    """The context embedding of each writable cached answer that has a context."""


async def _embed(embedder: Embedder, rows: list[Row[Any]]) -> _Embedded:
    contexts: dict[uuid.UUID, str] = {}
    for row in rows:
        if row.has_context:
            try:
                turns = turns_from(row.metadata.get("context"))
            except ValueError:
                turns = None
            text = context_text(turns) if turns else None
            # Only the text the cache's context was made from: the metadata may have been changed since.
            if text is not None and context_sha256(text) == row.context_sha256:
                contexts[row.id] = text
    texts = [embedding_text(row.kind, row.content, row.metadata) for row in rows]
    # Embedding takes most of the time: it runs before the transaction, so no lock waits on the model.
    vectors = await asyncio.to_thread(embedder.embed, texts + list(contexts.values()))
    keep = [i for i, row in enumerate(rows) if not row.has_context or row.id in contexts]
    return _Embedded(
        rows=rows,
        writable=[rows[i] for i in keep],
        vectors=vectors[keep],
        contexts=dict(zip(contexts, vectors[len(texts) :], strict=True)),
    )


async def _write(db: Database, model: str, batch: _Embedded, report: Report) -> None:
    changed: dict[tuple[uuid.UUID, uuid.UUID], list[Row[Any]]] = {}
    async with db.transaction() as conn:
        written = await write_embeddings(conn, [(row.id, row.version) for row in batch.writable], batch.vectors, model)
        await write_context_embeddings(conn, {k: v for k, v in batch.contexts.items() if k in written})
        for row in batch.writable:
            if row.id in written:
                changed.setdefault((row.tenant_id, row.cube_id), []).append(row)
        await _carry_activations(conn, written)
        for (tenant_id, cube_id), done in changed.items():
            await record(
                conn,
                OPERATOR,
                "memory.reembed",
                "cube",
                cube_id,
                tenant_id=tenant_id,
                detail={"model": model, "memories": len(done), "from": sorted({str(r.embedding_model) for r in done})},
            )
    report.reembedded += len(written)
    report.contexts += sum(k in written for k in batch.contexts)
    report.skipped += len(batch.writable) - len(written)
    report.unreadable += len(batch.rows) - len(batch.writable)


async def _carry_activations(conn: AsyncConnection, written: set[uuid.UUID]) -> None:
    """KV built from a re-embedded memory's current version is built from its current text still."""
    if written:
        await conn.execute(
            update(activations)
            .where(
                activations.c.memory_id == memories.c.id,
                memories.c.id.in_(list(written)),
                activations.c.source_version == memories.c.version - 1,
            )
            .values(source_version=memories.c.version)
        )

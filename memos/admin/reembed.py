"""``memos admin reembed``: give every memory that another model embedded a vector of the current model.

After ``MEMOS_EMBED_MODEL`` names another encoder of the same dimensions, the memories the old one
embedded are in another vector space: search's vector leg, write-time knn links, graph mode's diversity
and the semantic cache leave them out (decisions 72) until they are re-embedded. This walks them in id
order, a batch at a time. A batch is embedded first, outside any transaction, then written in one
transaction: a new version of each memory (op ``update``, the only op the API has for a changed stored
value; the audit log names it ``memory.reembed``) with a compare-and-set on the version that was read,
so a memory a client changed meanwhile is skipped, not overwritten (a content change embedded it anew
anyway; a re-run picks up whatever still needs it). A cached answer's context embedding is derived from
the context turns in its metadata (the ones the cache compares): it is recomputed from them, with their
hash, in the same transaction, or the cache would compare a new lookup's context with an old model's
vector. The KV activations built from a re-embedded memory stay
current: their text did not change, so their source version moves with the memory's.

With ``nfkc``, also the memories whose embedded text (content and speaker; a cached answer's query and context)
is not in NFKC form, whatever model embedded them: before
2026-12-07 (migration 0013) memos embedded text as written, and a ligature or a full-width letter made the
tokenizer's pieces rare or unknown; the same text now embeds NFKC-normalized. Their stored text keeps its form,
so each run with ``nfkc`` embeds them again (it needs a UTF8 database, as NFKC is checked in SQL).

What stays: knn links (they were ranked within one model's space, so they still say "similar"), deleted
memories (a restore copies the vector of the version it restores; re-run the tool after restoring old
versions) and memories that have no embedding by design (derived ones, activations).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Row, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.admin import AdminError, require_cubes
from memos.embed.base import Embedder, Vectors, misfit
from memos.errors import Conflict, Unavailable
from memos.identity.principal import OPERATOR
from memos.memories.versioning import write_embeddings
from memos.search.indexing import embedding_text
from memos.semcache.context import context_text
from memos.semcache.index import turns_from
from memos.semcache.store import write_context_embeddings
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import EMBEDDING_DIMS, activations, memories

DEFAULT_BATCH = 256
ATTEMPTS = 3
T = TypeVar("T")


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
    retries: int = 0
    """Reads or writes tried again after the database aborted them (a deadlock with a concurrent write)."""
    batches: int = 0


# Postgres's SQL-standard predicate (UTF8 databases only); no parameter in it. Over what is embedded
# (memos.search.indexing.embedding_text, memos.semcache.context): the speaker and the content of a memory, the
# query and context turns of a cached answer; not the rest of the metadata, or each run would embed again every
# memory with an ellipsis in some unrelated field.
_NOT_NFKC = text(
    """CASE WHEN memories.kind = 'response'
            THEN coalesce(memories.metadata->>'query', memories.content, '')
                 || coalesce((memories.metadata->'context')::text, '')
            ELSE coalesce(memories.metadata->>'speaker', '') || coalesce(memories.content, '')
       END IS NOT NFKC NORMALIZED"""
)


def _needs_it(model: str, cube_ids: Sequence[uuid.UUID] | None, nfkc: bool = False) -> list[Any]:
    other_model = memories.c.embedding_model.is_distinct_from(model)
    conditions = [
        memories.c.embedding.is_not(None),
        or_(other_model, _NOT_NFKC) if nfkc else other_model,
        memories.c.state != "deleted",
        memories.c.purged_at.is_(None),
    ]
    if cube_ids:
        conditions.append(memories.c.cube_id.in_(list(cube_ids)))
    return conditions


async def pending(
    db: Database, model: str, cube_ids: Sequence[uuid.UUID] | None = None, *, nfkc: bool = False
) -> dict[str, int]:
    """How many memories another model embedded (with ``nfkc``, or whose text is not NFKC), by the model that
    embedded them (``--dry-run`` prints this). An unknown cube id is AdminError, as in verify and kv: a mistyped
    ``--cube`` was answered "0 to re-embed"."""
    if nfkc and not db.utf8:
        raise AdminError("--nfkc needs a UTF8 database (Postgres checks NFKC only there)")
    async with db.read() as conn:
        await require_cubes(conn, cube_ids or ())
        rows = await conn.execute(
            select(memories.c.embedding_model, func.count())
            .where(*_needs_it(model, cube_ids, nfkc))
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
    nfkc: bool = False,
) -> Report:
    """Re-embed, with ``embedder``, every live memory of ``cube_ids`` (all cubes if None) another model embedded
    (with ``nfkc``, also those whose text is not in NFKC form)."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if (why := misfit(embedder, EMBEDDING_DIMS)) is not None:
        raise ValueError(why)
    report = Report(model=embedder.name)
    report.pending = await pending(db, embedder.name, cube_ids, nfkc=nfkc)
    rows = await _again(report, functools.partial(_read, db, embedder.name, cube_ids, nfkc, None, batch))
    embedding = asyncio.ensure_future(_embed(embedder, rows)) if rows else None
    try:
        while embedding is not None:
            ready = await embedding
            following = await _again(
                report, functools.partial(_read, db, embedder.name, cube_ids, nfkc, ready.rows[-1].id, batch)
            )
            # The next batch embeds (in a worker thread) while this one is written: the two overlap.
            embedding = asyncio.ensure_future(_embed(embedder, following)) if following else None
            await _again(report, functools.partial(_write, db, embedder.name, ready, report))
            report.batches += 1
            if progress is not None:
                progress(report)
    finally:
        if embedding is not None:
            if not embedding.done():
                embedding.cancel()
            elif not embedding.cancelled():
                embedding.exception()  # retrieved: the error that ended the run is the one raised
    return report


async def _again(report: Report, step: Callable[[], Awaitable[T]]) -> T:
    """``step``, tried up to ``ATTEMPTS`` times while the database aborts it (a deadlock or serialization
    failure with a concurrent write, which ``Database.transaction`` raises as Conflict; a lost connection,
    Unavailable): a read changes nothing, and a write's compare-and-set makes a retry safe."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await step()
        except (Conflict, Unavailable):
            if attempt == ATTEMPTS:
                raise
            report.retries += 1
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


async def _read(
    db: Database,
    model: str,
    cube_ids: Sequence[uuid.UUID] | None,
    nfkc: bool,
    after: uuid.UUID | None,
    batch: int,
) -> list[Row[Any]]:
    """The next ``batch`` memories (by id, after ``after``) that another model embedded (or, with ``nfkc``,
    whose text is not NFKC)."""
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
        )
        .where(*_needs_it(model, cube_ids, nfkc))
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
    vectors: Vectors
    """One per row."""
    contexts: dict[uuid.UUID, tuple[str, Vectors]]
    """Cached answers' context texts (from their metadata) and their embeddings."""


async def _embed(embedder: Embedder, rows: list[Row[Any]]) -> _Embedded:
    contexts: dict[uuid.UUID, str] = {}
    for row in rows:
        if row.kind != "response":
            continue
        try:
            turns = turns_from(row.metadata.get("context"))
        except ValueError:
            continue  # the cache cannot read it either: it does not serve this answer (semcache/index.py)
        if turns:
            contexts[row.id] = context_text(turns)
    texts = [embedding_text(row.kind, row.content, row.metadata) for row in rows]
    # Embedding takes most of the time: it runs before the transaction, so no lock waits on the model.
    vectors = await asyncio.to_thread(embedder.embed, texts + list(contexts.values()))
    return _Embedded(
        rows=rows,
        vectors=vectors[: len(texts)],
        contexts={mid: (text, vectors[len(texts) + i]) for i, (mid, text) in enumerate(contexts.items())},
    )


async def _write(db: Database, model: str, batch: _Embedded, report: Report) -> None:
    changed: dict[tuple[uuid.UUID, uuid.UUID], list[Row[Any]]] = {}
    async with db.transaction() as conn:
        written = await write_embeddings(conn, [(row.id, row.version) for row in batch.rows], batch.vectors, model)
        await write_context_embeddings(conn, {k: v for k, v in batch.contexts.items() if k in written})
        for row in batch.rows:
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
    report.skipped += len(batch.rows) - len(written)


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

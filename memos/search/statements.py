"""The search's SQL, written out: constant text per shape of request, every value a bound parameter.

Search runs several statements per request on a 2-core box where the query's embedding, Postgres and
the event loop compete for the cores. Building each statement with SQLAlchemy's expression language
cost the event loop about as much CPU as Postgres spent running them (11 ms a hybrid search at 100k
memories), and ``IN`` lists of candidate ids made every statement's text different. Here a statement's
text depends only on which filters the request uses (a handful of shapes, cached), ids travel as one
``uuid[]``, and the query vector as one binary ``real[]`` (``memos.store.arrays``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from psycopg.types.json import Jsonb

from memos.cubes.access import readable_cube_ids_sql
from memos.memories.ann import indexed_sql
from memos.store.models import HEAT_SQL, memories

RESULT_COLUMNS = ", ".join(
    [*(f"m.{c.name}" for c in memories.c if c.name not in ("embedding", "tsv", "heat")), f"{HEAT_SQL} AS heat"]
)
"""Every column a result needs, but not the search columns (a 384-float vector per row is not free)."""

# Per memory: how often each of the query's lexemes occurs in it (BM25's term frequencies), computed in
# Postgres: shipping whole tsvectors to parse them here cost more than the search itself on big pools.
_TERM_COUNTS = """(
    SELECT jsonb_object_agg(u.lexeme, coalesce(array_length(u.positions, 1), 1))
    FROM unnest(m.tsv) AS u(lexeme, positions, weights)
    WHERE u.lexeme = ANY(%(lexemes)s::text[])
)"""


_OPTIONAL = {
    "kinds": "m.kind = ANY(%(kinds)s::text[])",
    "tags": "m.tags @> %(tags)s::text[]",
    "filters": "m.metadata @> %(filters)s::jsonb",
    "since": "coalesce(m.event_time, m.created_at) >= %(since)s::timestamptz",
    "until": "coalesce(m.event_time, m.created_at) < %(until)s::timestamptz",
}
"""The request's optional filters, by parameter name: a statement carries the ones the request sets."""

Shape = tuple[str, ...]
"""The optional filters a request sets, in ``_OPTIONAL``'s order: what a statement's text depends on."""


@dataclass(frozen=True, slots=True)
class Scope:
    """The WHERE clause every leg shares (tenant scope via the cube list, then the request's filters), and
    which of the cubes have memories in the HNSW index (``indexed``)."""

    params: dict[str, Any]

    @property
    def indexed(self) -> bool:
        return bool(self.params["indexed"])

    @property
    def shape(self) -> Shape:
        return tuple(name for name in _OPTIONAL if name in self.params)

    @staticmethod
    def of(
        cubes: list[uuid.UUID],
        indexed: list[uuid.UUID],
        states: list[str],
        kinds: Sequence[str] | None,
        tags: Sequence[str] | None,
        filters: dict[str, Any] | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Scope:
        optional = {
            "kinds": list(kinds) if kinds else None,
            "tags": list(tags) if tags else None,
            "filters": Jsonb(filters) if filters else None,
            "since": since,
            "until": until,
        }
        params = {"cubes": cubes, "states": states, "indexed": indexed}
        return Scope(params=params | {name: value for name, value in optional.items() if value is not None})


@cache
def _where(shape: Shape) -> str:
    parts = [
        "m.cube_id = ANY(%(cubes)s::uuid[])",
        "m.state = ANY(%(states)s::text[])",
        "(m.expires_at IS NULL OR m.expires_at > now())",
    ]
    return " AND ".join(parts + [_OPTIONAL[name] for name in shape])


@cache
def scope_and_lexemes(admin: bool, lexemes: bool) -> str:
    """The cubes the caller may read (``tenant``, ``agent``), those of them whose memories are in the HNSW
    index (``memos.memories.ann``: one index probe a cube) and, with ``lexemes``, the ``query``'s lexemes
    as tsvector text, in one round trip."""
    words = "to_tsvector('english'::regconfig, %(query)s)::text" if lexemes else "NULL"
    return f"""
WITH readable AS ({readable_cube_ids_sql(admin)})
SELECT array(SELECT id FROM readable) AS cubes,
       array(SELECT r.id FROM readable r WHERE {indexed_sql("r.id")}) AS indexed,
       {words} AS lexemes
"""  # noqa: S608


@cache
def text_leg(shape: Shape, vectors: bool) -> str:
    """Memories with any of the lookup words (``words``, a tsquery), at most ``budget`` of them ranked by
    ``ts_rank_cd``, the best ``limit`` kept, with their term counts and, with ``vectors``, their embedding
    (binary, ``vec``) and its model: the leg runs while the query embeds, and their cosine is then taken
    in numpy (for the query's model only) instead of in a second lookup once the query vector exists.

    Ranked and cut in a subquery first: Postgres computes a select list before ORDER BY ... LIMIT, and
    the term counts are worth computing for the kept rows only, not every memory that matched.
    """
    vec, model = ("vector_send(m.embedding)", "m.embedding_model") if vectors else ("NULL::bytea", "NULL::text")
    return f"""
SELECT m.id, m.cube_id, {_TERM_COUNTS} AS tf, length(m.tsv) AS doc_length, {vec} AS vec, {model} AS embedding_model
FROM memories m
JOIN (
    SELECT hit.id FROM (
        SELECT m.id, m.tsv FROM memories m
        WHERE {_where(shape)} AND m.tsv @@ %(words)s::tsquery
        LIMIT %(budget)s
    ) AS hit
    ORDER BY ts_rank_cd(hit.tsv, %(words)s::tsquery, 1) DESC, hit.id
    LIMIT %(limit)s
) AS top ON top.id = m.id
"""  # noqa: S608 (constant fragments of this module; every value is a bound parameter)


@cache
def vector_leg(shape: Shape, lexical: bool, indexed: bool) -> str:
    """The nearest ``limit``, with their cosine distance and, with ``lexical``, their term counts.

    The nearest come from an exact scan of the memories outside the HNSW index and, with ``indexed`` (some
    cubes of the scope are past the size, ``memos.memories.ann``), from HNSW over those cubes' memories in
    it. Only vectors of the query's ``model`` are compared: another model's are in another space. Without
    ``indexed`` the statement has no HNSW part: an index scan filtered to cubes that have no
    memory in the index would walk the whole graph finding nothing.
    """
    tf = f"{_TERM_COUNTS} AS tf, length(m.tsv) AS doc_length" if lexical else "NULL::jsonb AS tf, 1 AS doc_length"
    distance = "m.embedding <=> %(vec)s::real[]::vector"
    exact = f"""
        SELECT m.id, {distance} AS distance FROM memories m
        WHERE {_where(shape)} AND NOT m.ann AND m.embedding IS NOT NULL AND m.embedding_model = %(model)s
        ORDER BY {distance} LIMIT %(limit)s"""  # noqa: S608 (constant fragments; values are bound parameters)
    ann = f"""
        SELECT m.id, {distance} AS distance FROM memories m
        WHERE {_where(shape)} AND m.cube_id = ANY(%(indexed)s::uuid[]) AND m.ann AND m.embedding IS NOT NULL
            AND m.embedding_model = %(model)s
        ORDER BY {distance} LIMIT %(limit)s"""  # noqa: S608 (constant fragments; values are bound parameters)
    both = f"({exact}\n    ) UNION ALL ({ann}\n    )" if indexed else exact
    return f"""
SELECT m.id, m.cube_id, nearest.distance, {tf}
FROM (
    SELECT id, distance FROM ({both}
    ) AS found
    ORDER BY distance LIMIT %(limit)s
) AS nearest
JOIN memories m ON m.id = nearest.id
"""  # noqa: S608


ROWS = (
    f"SELECT {RESULT_COLUMNS} FROM memories m WHERE m.id = ANY(%(ids)s::uuid[])"  # noqa: S608
    " AND m.state = ANY(%(states)s::text[]) AND (m.expires_at IS NULL OR m.expires_at > now())"
)
"""The winners' full rows: only they leave the database whole. Read again with the search's states and expiry:
a memory deleted (or expired) after the ranking read it is left out, not returned as deleted."""

VECTORS = (
    "SELECT m.id, vector_send(m.embedding) AS vec FROM memories m"
    " WHERE m.id = ANY(%(ids)s::uuid[]) AND m.embedding IS NOT NULL AND m.embedding_model = %(model)s"
)
"""Embeddings in pgvector's binary form (``decode_vector``): for diversity among the finalists. Only the
query's ``model``: another model's vectors are in another space (such a finalist counts as unlike the rest)."""


@cache
def within(shape: Shape) -> str:
    """Which of ``ids`` pass the scope and filters (memories reached through the graph)."""
    return f"SELECT m.id, m.cube_id FROM memories m WHERE {_where(shape)} AND m.id = ANY(%(ids)s::uuid[])"  # noqa: S608

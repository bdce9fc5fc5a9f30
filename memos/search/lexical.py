"""BM25 over Postgres full text: Postgres finds and stems, memos adds the IDF that ``ts_rank`` lacks.

``ts_rank`` weighs a word by how often it occurs in a memory, not by how rare it is in the cube, so
"Caroline" (in half the turns) counts as much as "Dolomites" (in one). Candidates come from the GIN
index; their term frequencies come from their ``tsvector``; document frequencies are counted per cube
in one pass over the cube and cached for a few minutes (IDF needs to be about right, not exact); stale
counts keep serving while a background task counts again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy import func, select, true
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.store.models import memories

log = logging.getLogger(__name__)

K1 = 1.2
B = 0.75
_LEXEME = re.compile(r"'((?:[^']|'')+)'(?::([0-9A-D,]+))?")


def parse_tsvector(value: str) -> dict[str, int]:
    """``'word':1,4 'other':2`` -> {word: 2, other: 1} (term frequency = number of positions)."""
    out: dict[str, int] = {}
    for match in _LEXEME.finditer(value):
        positions = match.group(2)
        out[match.group(1).replace("''", "'")] = positions.count(",") + 1 if positions else 1
    return out


def parse_lexemes(value: str | None) -> list[str]:
    """The lexemes of a tsvector's text, in its order."""
    return list(parse_tsvector(value or ""))


def tsquery_literal(lexeme: str) -> str:
    """A single already-normalized lexeme as tsquery text (sent as a bound parameter, cast in SQL)."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class _CubeStats:
    docs: int
    total_length: int
    df: dict[str, int]
    fetched_at: float


class LexicalStats:
    """Per-cube memory counts and the document frequency of every lexeme, refreshed after ``ttl`` seconds.

    One pass over a cube's tsvectors (``unnest``) counts every lexeme at once, so a query's IDF is a
    dictionary lookup; counting per query word would scan the word's postings on every search.

    That pass takes 0.5-0.9 s at 100k memories. Only a cube's first count runs in the query that needs
    it. With ``connect`` (a source of connections), counts past their ``ttl`` keep serving while a
    background task counts again, one per cube; before, one search per cube every ``ttl`` seconds
    waited for the whole pass.
    """

    def __init__(
        self,
        ttl: float = 300.0,
        max_cubes: int = 256,
        connect: Callable[[], AbstractAsyncContextManager[AsyncConnection]] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_cubes = max_cubes
        self._connect = connect
        self._cubes: OrderedDict[uuid.UUID, _CubeStats] = OrderedDict()
        self._refreshing: dict[uuid.UUID, asyncio.Task[None]] = {}

    async def idf(
        self, conn: AsyncConnection, cubes: Sequence[uuid.UUID], lexemes: Iterable[str]
    ) -> tuple[dict[str, float], float, dict[str, float], int]:
        """BM25 IDF of each lexeme over the given cubes, their average memory length, each lexeme's share
        of the memories that contain it (document frequency / memories), and the number of memories."""
        now = time.monotonic()
        words = list(lexemes)
        docs = 0
        total_length = 0
        df: dict[str, int] = dict.fromkeys(words, 0)
        for cube_id in cubes:
            stats = self._cubes.get(cube_id)
            if stats is None:
                stats = await self._load(conn, cube_id, now)
            elif now - stats.fetched_at > self.ttl:
                if self._connect is None:
                    stats = await self._load(conn, cube_id, now)
                else:
                    self._refresh_later(cube_id)
            self._cubes.move_to_end(cube_id)  # least recently used cubes go first
            docs += stats.docs
            total_length += stats.total_length
            for w in words:
                df[w] += stats.df.get(w, 0)
        idf = {w: math.log(1 + (docs - n + 0.5) / (n + 0.5)) for w, n in df.items()}
        share = {w: (n / docs if docs else 0.0) for w, n in df.items()}
        # 0 when no memory counted has a lexeme (none at all, or only stopwords and punctuation): no
        # average to compare a length with, and ``bm25`` then leaves lengths out.
        return idf, (total_length / docs if docs else 0.0), share, docs

    def _refresh_later(self, cube_id: uuid.UUID) -> None:
        if cube_id in self._refreshing:
            return
        task = asyncio.ensure_future(self._refresh(cube_id))
        self._refreshing[cube_id] = task
        task.add_done_callback(lambda _: self._refreshing.pop(cube_id, None))

    async def _refresh(self, cube_id: uuid.UUID) -> None:
        assert self._connect is not None
        try:
            async with self._connect() as conn:
                await self._load(conn, cube_id, time.monotonic())
        except Exception as exc:  # the stale counts keep serving; the next search past the ttl tries again
            log.warning("cannot refresh a cube's word statistics", extra={"cube_id": str(cube_id), "error": repr(exc)})

    async def refreshed(self) -> None:
        """Wait for the background counts under way."""
        while self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop the background counts under way (at shutdown, before the database goes)."""
        for task in list(self._refreshing.values()):
            task.cancel()
        await self.refreshed()

    async def _load(self, conn: AsyncConnection, cube_id: uuid.UUID, now: float) -> _CubeStats:
        live = (memories.c.cube_id == cube_id, memories.c.state == "active")
        row = (
            await conn.execute(
                select(func.count(), func.coalesce(func.sum(func.length(memories.c.tsv)), 0)).where(*live)
            )
        ).one()
        lexeme = func.unnest(memories.c.tsv).table_valued("lexeme", "positions", "weights").render_derived("u")
        rows = await conn.execute(
            select(lexeme.c.lexeme, func.count())
            .select_from(memories)
            .join(lexeme, true())
            .where(*live)
            .group_by(lexeme.c.lexeme)
        )
        if cube_id not in self._cubes and len(self._cubes) >= self.max_cubes:
            self._cubes.popitem(last=False)
        stats = _CubeStats(
            docs=int(row[0]), total_length=int(row[1]), df={str(w): int(n) for w, n in rows}, fetched_at=now
        )
        self._cubes[cube_id] = stats
        return stats


def bm25(tf: dict[str, int], idf: dict[str, float], avg_length: float, length: int) -> float:
    """Okapi BM25 of one memory; its length is its number of distinct lexemes, ``length(tsvector)``.

    An ``avg_length`` of 0 (or less) means no average is known: the counted memories have no lexeme (only
    stopwords, punctuation), or none was counted (a search over archived memories in a cube with no active
    one), or the cached counts predate the memories now found. The length normalization is then neutral
    (the memory counts as of average length), not a division by zero.
    """
    relative = max(length, 1) / avg_length if avg_length > 0 else 1.0
    norm = K1 * (1 - B + B * relative)
    return sum(weight * tf[w] * (K1 + 1) / (tf[w] + norm) for w, weight in idf.items() if w in tf)


COMMON_SHARE = 0.1
"""Words in more than this share of a cube's memories do not generate text candidates (they still score)."""

POSTINGS_BUDGET = 1000
"""Text candidates are looked up by the rarest words first, until their memories add up to about this many."""


def discriminating(share: dict[str, float], docs: int, keep_at_least: int = 2) -> list[str]:
    """The query words worth looking memories up by: rare ones, rarest first, within a postings budget.

    An OR over common words would make Postgres rank a large part of the cube; BM25 gives such words
    little weight anyway, so candidates come from the words that tell memories apart. The budget keeps
    the ranking work bounded in big cubes, where even a word in 1 % of memories has thousands of them.

    A word no active memory has (by the cached counts) comes last, after every word that some have: it finds
    no active memory, so taken first it would fill the lookup's places and leave out the words that do find
    candidates ("zebra unicorn dragon" finding nothing where "zebra" alone finds plenty). It is always looked
    up, and adds nothing to the postings counted against the budget: archived or deleted memories may have it
    (a search over those states), and so may memories written since the counts were taken. Such a word found
    in many memories shares the lookup's ``POSTINGS_BUDGET`` matches with the others.
    """
    ranked = sorted((s == 0, s, w) for w, s in share.items())
    chosen: list[str] = []
    postings = 0.0
    for _, s, w in ranked:
        cost = s * docs
        # Rules that skip a word skip every word with some memories after it too (they come rarest first), but
        # not the words with none, which cost nothing: they were never looked up once a rule stopped the loop,
        # and cached counts up to a few minutes old say "none" of a word a memory written since holds (found in
        # review: "tea coffee piano zanzibar" missed the new Zanzibar memory that "zanzibar" alone found).
        # The budget binds even below ``keep_at_least`` (only the rarest word is always taken): in a big
        # cube, a second, common word would add thousands of memories to rank.
        if chosen and cost and postings + cost > POSTINGS_BUDGET:
            continue
        if len(chosen) >= keep_at_least and s > COMMON_SHARE:
            continue
        chosen.append(w)
        postings += cost
    return chosen

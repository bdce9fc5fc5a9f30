"""The cache decision: given the nearest cached queries, serve one of them or miss, and say why.

:func:`decide` is the whole verification step of a lookup, with no I/O: the caller (the service)
embeds the query, asks its index for the nearest entries and hands them over as :class:`Candidate`
values. Each candidate, nearest first, must pass in turn:

1. freshness: not expired (its own ``expires_at``, or its category's TTL counted from ``created_at``);
2. similarity: cosine to the query at or above the category's threshold (or the entry's own, if higher);
3. guards: no difference in negation, numbers, dates, names, scope, direction or wording
   (:mod:`memos.semcache.guards`);
4. context: the entry's conversation context is compatible with the lookup's
   (:mod:`memos.semcache.context`).

The first candidate that passes is the hit. A candidate that fails does not end the search: a
slightly farther entry may be a true paraphrase where the nearest one differs by a number. The
:class:`Decision` explains the outcome in ``reason``, including why the nearest entry was refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from memos.semcache.context import Turn, as_turns, compare_contexts
from memos.semcache.guards import check
from memos.semcache.policy import CachePolicy, CategoryPolicy

__all__ = ["Candidate", "Decision", "Rejection", "decide"]

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One cached entry offered to :func:`decide`."""

    id: str
    query: str
    """The cached query, as it was asked."""
    vector: Vector | None = None
    """Its embedding (unit length). May be ``None`` when ``similarity`` is given."""
    category: str | None = None
    """Its category; ``None`` means the policy's default category."""
    context: tuple[Turn, ...] | None = None
    """The turns before the cached query, when it was asked in a conversation."""
    context_vec: Vector | None = None
    """Embedding of :func:`memos.semcache.context.context_text` of ``context``."""
    created_at: float | None = None
    """When it was stored (seconds since the epoch); with the category's TTL it gives the expiry."""
    expires_at: float | None = None
    """An explicit expiry (seconds since the epoch), applied on top of the TTL."""
    threshold: float | None = None
    """A per-entry threshold raised by feedback; the stricter of it and the category's applies."""
    similarity: float | None = None
    """A precomputed cosine similarity to the query (from an ANN index); computed from ``vector`` otherwise."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one candidate was not served."""

    candidate_id: str
    similarity: float
    threshold: float
    """The similarity threshold that applied to this candidate; at the ``category`` stage, which comes before any
    similarity test, the lookup's category's."""
    stage: str
    """``expired``, ``threshold``, ``guard``, ``context`` or ``category``."""
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one lookup."""

    hit: bool
    candidate_id: str | None
    """The served entry on a hit; the nearest examined entry on a miss (``None`` when there was none)."""
    similarity: float | None
    """Cosine similarity of ``candidate_id`` to the query."""
    threshold: float | None
    """The threshold that applied to ``candidate_id``."""
    reason: str
    """A sentence explaining the decision."""
    category: str = ""
    """The category the lookup was decided under."""
    rejections: tuple[Rejection, ...] = field(default=())
    """Every candidate examined before the decision and why it was refused, nearest first."""


def _similarity(candidate: Candidate, query_vec: Vector | None) -> float:
    if candidate.similarity is not None:
        return float(candidate.similarity)
    if candidate.vector is None or query_vec is None:
        raise ValueError(f"candidate {candidate.id!r} has neither a similarity nor a vector to compare")
    return float(np.dot(np.asarray(candidate.vector, dtype=np.float32), query_vec))


def _expired(candidate: Candidate, policy: CategoryPolicy, now: float) -> str | None:
    if candidate.expires_at is not None and candidate.expires_at <= now:
        return "expired (its expiry time has passed)"
    ttl = policy.ttl_seconds
    if ttl is not None and candidate.created_at is not None and candidate.created_at + ttl <= now:
        return f"expired (older than the {policy.ttl_seconds} s TTL of category {policy.name!r})"
    return None


def decide(
    query: str,
    query_vec: Vector | None,
    candidates: Iterable[Candidate],
    policy: CachePolicy,
    *,
    category: str | None = None,
    context: Sequence[Turn] | Sequence[dict[str, str]] | None = None,
    context_vec: Vector | None = None,
    now: float | None = None,
    max_candidates: int = 16,
) -> Decision:
    """Serve the first acceptable candidate, nearest first, or miss; explain either way.

    ``category`` is the lookup's category: candidates stored under another category are not served
    (an answer cached as volatile data must not leak into a lookup that expects a stable one), nor are
    candidates of a category the policy does not have. The
    category's threshold, TTL and context policy apply. ``context`` is the conversation before
    ``query`` (oldest first) and ``context_vec`` the embedding of its
    :func:`~memos.semcache.context.context_text`. ``now`` (seconds since the epoch) is required for TTLs
    to apply. At most ``max_candidates`` of the nearest are examined.
    """
    lookup_policy = policy.category(category)
    qvec = None if query_vec is None else np.asarray(query_vec, dtype=np.float32)
    turns = as_turns(context) if context else ()
    scored = sorted(((_similarity(c, qvec), c) for c in candidates), key=lambda sc: -sc[0])
    if not scored:
        return Decision(
            False, None, None, lookup_policy.threshold, "miss: no cached entries to compare", lookup_policy.name
        )

    rejections: list[Rejection] = []
    for similarity, candidate in scored[:max_candidates]:
        if not math.isfinite(similarity):
            continue
        stored_under = candidate.category or policy.default
        if stored_under not in policy.categories:
            # Its category was removed from the config (or it was written through the memories API under a
            # name never configured): its TTL and threshold are unknown, so it is served to no lookup. Read as
            # the default category, it was served to default lookups with no TTL (found in review).
            rejections.append(
                Rejection(
                    candidate.id,
                    similarity,
                    lookup_policy.threshold,
                    "category",
                    f"stored under category {stored_under!r}, which is not configured",
                )
            )
            continue
        cand_policy = policy.categories[stored_under]
        if cand_policy.name != lookup_policy.name:
            # Refused before any similarity test: the threshold in force is the lookup's category's, which the
            # response names. Reporting the entry's category's told a `code` lookup it missed under the
            # default category's 0.75 (found in review).
            rejections.append(
                Rejection(
                    candidate.id,
                    similarity,
                    lookup_policy.threshold,
                    "category",
                    f"stored under category {cand_policy.name!r}",
                )
            )
            continue
        threshold = max(cand_policy.threshold, candidate.threshold or 0.0)
        if now is not None:
            expired = _expired(candidate, cand_policy, now)
            if expired is not None:
                rejections.append(Rejection(candidate.id, similarity, threshold, "expired", expired))
                continue
        if similarity < threshold:
            rejections.append(
                Rejection(
                    candidate.id,
                    similarity,
                    threshold,
                    "threshold",
                    f"similarity {similarity:.3f} < threshold {threshold:.3f}",
                )
            )
            # candidates are sorted, but a per-entry threshold can make a nearer one stricter than the next
            continue
        objection = check(candidate.query, query, disabled=cand_policy.disabled_guards)
        if objection is not None:
            rejections.append(Rejection(candidate.id, similarity, threshold, "guard", objection))
            continue
        verdict = compare_contexts(
            query,
            candidate.context,
            candidate.context_vec,
            turns,
            context_vec,
            policy=cand_policy.context,
            threshold=cand_policy.context_threshold,
        )
        if not verdict.compatible:
            rejections.append(Rejection(candidate.id, similarity, threshold, "context", verdict.reason))
            continue
        skipped = (
            f"; {len(rejections)} nearer entr{'y' if len(rejections) == 1 else 'ies'} refused" if rejections else ""
        )
        reason = (
            f"hit: similarity {similarity:.3f} >= threshold {threshold:.3f} (category {cand_policy.name!r}), "
            f"guards passed, {verdict.reason}{skipped}"
        )
        return Decision(True, candidate.id, similarity, threshold, reason, lookup_policy.name, tuple(rejections))

    nearest = rejections[0] if rejections else None
    if nearest is None:
        return Decision(
            False, None, None, lookup_policy.threshold, "miss: no comparable cached entries", lookup_policy.name
        )
    others = len(rejections) - 1
    tail = f"; {others} other candidate{'s' if others != 1 else ''} refused too" if others else ""
    reason = (
        f"miss: nearest entry ({nearest.similarity:.3f}) refused at the {nearest.stage} stage: {nearest.reason}{tail}"
    )
    return Decision(
        False,
        nearest.candidate_id,
        nearest.similarity,
        nearest.threshold,
        reason,
        lookup_policy.name,
        tuple(rejections),
    )

"""Diversity-aware selection of the final top-k: maximal marginal relevance, or entity coverage without vectors.

It keeps a result list from being ten paraphrases of one fact.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

Candidate = tuple[Hashable, float]
"""``(id, relevance score)``; higher is better."""


def mmr(
    candidates: Sequence[Candidate],
    vectors: Mapping[Hashable, npt.NDArray[np.floating]] | None,
    k: int,
    diversity: float,
    *,
    entities: Mapping[Hashable, set[str]] | None = None,
) -> list[Candidate]:
    """Pick ``k`` candidates, trading relevance for novelty; returns them in pick order with their own scores.

    Each step takes the candidate maximizing ``(1 - diversity) * relevance - diversity * redundancy``,
    where relevance is the score scaled to [0, 1] over the candidates and redundancy the highest
    cosine similarity to anything already picked. ``diversity = 0`` is plain score order (ties keep
    input order); 1 ignores relevance after the first pick. Without ``vectors`` redundancy is the
    Jaccard overlap of ``entities`` (greedy entity coverage); with neither, or for candidates with no
    vector, redundancy is 0.
    """
    if k <= 0 or not candidates:
        return []
    if not 0 <= diversity <= 1:
        raise ValueError("diversity must be within [0, 1]")
    ordered = sorted(enumerate(candidates), key=lambda item: (-item[1][1], item[0]))
    ranked = [candidate for _, candidate in ordered]
    if diversity == 0 or len(ranked) <= 1 or (vectors is None and entities is None):
        return ranked[:k]

    relevance = _scaled([score for _, score in ranked])
    ids = [cid for cid, _ in ranked]
    redundancy_of: Callable[[int], npt.NDArray[np.float64]]
    if vectors is not None:
        redundancy_of = _CosineRedundancy(ids, vectors)
    else:
        assert entities is not None
        redundancy_of = _JaccardRedundancy(ids, entities)

    redundancy = np.zeros(len(ranked))
    available = np.ones(len(ranked), dtype=bool)
    picked: list[Candidate] = []
    for _ in range(min(k, len(ranked))):
        value = (1 - diversity) * relevance - diversity * redundancy
        value[~available] = -np.inf
        best = int(np.argmax(value))  # first maximum: ties go to the better-ranked candidate
        available[best] = False
        picked.append(ranked[best])
        np.maximum(redundancy, redundancy_of(best), out=redundancy)
    return picked


def coverage(
    candidates: Sequence[Candidate], entities: Mapping[Hashable, set[str]], k: int, diversity: float
) -> list[Candidate]:
    """Greedy entity coverage: :func:`mmr` with entity overlap as the redundancy (for memories without vectors)."""
    return mmr(candidates, None, k, diversity, entities=entities)


def _scaled(scores: list[float]) -> npt.NDArray[np.float64]:
    values = np.asarray(scores, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12:
        return np.ones_like(values)
    return (values - low) / (high - low)


class _CosineRedundancy:
    """Similarity of every candidate to one picked candidate, from unit-normalized vectors."""

    def __init__(self, ids: list[Hashable], vectors: Mapping[Hashable, npt.NDArray[np.floating]]) -> None:
        dims = next((np.asarray(v).shape[-1] for v in vectors.values()), 0)
        matrix = np.zeros((len(ids), dims), dtype=np.float32)  # [candidates, dims]; zero rows = no vector
        for row, cid in enumerate(ids):
            vector = vectors.get(cid)
            if vector is not None:
                norm = float(np.linalg.norm(vector))
                if norm > 0:
                    matrix[row] = np.asarray(vector, dtype=np.float32) / norm
        self._matrix = matrix

    def __call__(self, picked: int) -> npt.NDArray[np.float64]:
        similarity: npt.NDArray[np.float64] = (self._matrix @ self._matrix[picked]).astype(np.float64)
        return similarity


class _JaccardRedundancy:
    """Entity overlap of every candidate with one picked candidate."""

    def __init__(self, ids: list[Hashable], entities: Mapping[Hashable, set[str]]) -> None:
        self._sets = [entities.get(cid, set()) for cid in ids]

    def __call__(self, picked: int) -> npt.NDArray[np.float64]:
        chosen = self._sets[picked]
        if not chosen:
            return np.zeros(len(self._sets))
        return np.asarray([len(chosen & other) / len(chosen | other) if other else 0.0 for other in self._sets])

"""The Embedder protocol every text encoder implements, and the helpers they share.

An embedder turns texts into L2-normalized float32 rows, so a dot product is a cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
"""A ``[n, dims]`` float32 matrix whose rows have unit L2 norm (or are all zero)."""


def misfit(embedder: Embedder, dims: int) -> str | None:
    """Why ``embedder``'s vectors cannot be stored in a column of ``dims`` dimensions, or None."""
    if embedder.dims == dims:
        return None
    return (
        f"{embedder.name} gives {embedder.dims}-dimension vectors; the embedding column holds {dims} "
        "(another size needs a migration)"
    )


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors.

    Implementations are not required to be thread-safe: the service calls one from a
    single worker thread (:class:`memos.embed.worker.EmbedWorker`).
    """

    @property
    def name(self) -> str:
        """The model's stable name, recorded with every stored vector."""
        ...

    @property
    def dims(self) -> int:
        """Length of each vector."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` in order: a ``[len(texts), dims]`` float32 array with L2-normalized rows."""
        ...


Threads = int | Callable[[], int] | None
"""A most-CPU-threads limit for one ``embed`` call: a count, a function asked again before each forward pass
of the call (a limit that changes while a long call runs), or None for all the embedder's threads."""


class ThreadLimited(Protocol):
    """An embedder whose ``embed`` also takes a most-CPU-threads limit for one call (the transformers encoder).

    The embed worker's primary lane passes a function (``Threads``) when the embedder has a ``threads`` count
    above one: an embedder that takes a ``threads`` argument must accept that form too."""

    def embed(self, texts: Sequence[str], threads: Threads = None) -> Vectors: ...


def empty(dims: int) -> Vectors:
    """The result of embedding no texts."""
    return np.zeros((0, dims), dtype=np.float32)


def l2_normalize(matrix: npt.NDArray[np.floating]) -> Vectors:
    """Scale each row to unit length; an all-zero row stays zero instead of becoming NaN."""
    out = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    return np.ascontiguousarray(out / norms, dtype=np.float32)


def check_texts(texts: Sequence[str]) -> list[str]:
    """Materialize ``texts`` as a list, refusing a bare string (a common slip that embeds each character)."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not a single str")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return out

"""The service's door to the embed worker: waits a bounded time while the model loads, then answers 503."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from memos.embed.errors import EmbedderUnavailable, EmbedError
from memos.embed.worker import EmbedWorker
from memos.errors import Unavailable


class EmbeddingService:
    def __init__(self, worker: EmbedWorker, wait_seconds: float = 30.0) -> None:
        self.worker = worker
        self.wait_seconds = wait_seconds

    @property
    def model(self) -> str:
        return self.worker.name

    async def embed(self, texts: Sequence[str], threads: int | None = None) -> np.ndarray:
        """float32 [n, dims], L2-normalized. 503 with Retry-After when the embedder cannot take work.

        ``threads``: at most this many CPU threads (see ``EmbedWorker.embed``)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if not self.worker.ready:
            try:
                await asyncio.wait_for(self.worker.wait_ready(), timeout=self.wait_seconds)
            except TimeoutError:
                raise Unavailable(
                    "the embedding model is still loading; retry shortly", headers={"Retry-After": "2"}
                ) from None
            except EmbedError as exc:
                raise _unavailable(exc) from None
        try:
            return await self.worker.embed(texts, threads=threads)
        except EmbedError as exc:
            raise _unavailable(exc) from None

    async def embed_query(self, text: str, threads: int | None = None) -> np.ndarray:
        vectors = await self.embed([text], threads=threads)
        row: np.ndarray = vectors[0]
        return row


def _unavailable(exc: EmbedError) -> Unavailable:
    # A model that failed to load will not come back by itself; still 503 (the service is degraded, not the request).
    retry = max(1, round(exc.retry_after)) if isinstance(exc, EmbedderUnavailable) else 30
    return Unavailable(f"the embedder cannot take work right now: {exc}", headers={"Retry-After": str(retry)})

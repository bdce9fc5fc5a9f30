"""Errors raised by the embedding layer; the service maps the ``EmbedderUnavailable`` family to 503."""

from __future__ import annotations


class EmbedError(Exception):
    """Base of every embedding-layer error."""


class EmbedderLoadError(EmbedError):
    """The model could not be found or loaded (bad path, missing package, corrupt weights)."""


class EmbedderUnavailable(EmbedError):
    """The embedder cannot take this request right now; retrying after ``retry_after`` seconds may work."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EmbedderLoading(EmbedderUnavailable):
    """The model is still loading (or was never started)."""


class EmbedderBusy(EmbedderUnavailable):
    """The worker's queue is full: the caller should shed load instead of piling up latency."""


class EmbedderClosed(EmbedError):
    """The worker was closed; pending and new requests fail with this."""

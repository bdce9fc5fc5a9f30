"""Text embeddings: the Embedder protocol, the default sentence encoder, and the worker that runs it off the loop.

Importing this package is cheap: torch and transformers load only when an encoder is built.
"""

from memos.embed.base import Embedder, Vectors, l2_normalize
from memos.embed.errors import (
    EmbedderBusy,
    EmbedderClosed,
    EmbedderLoadError,
    EmbedderLoading,
    EmbedderUnavailable,
    EmbedError,
)
from memos.embed.registry import load_embedder
from memos.embed.transformers_encoder import DEFAULT_MODEL, TransformersEncoder, bundled_model_dir
from memos.embed.worker import EmbedWorker, WorkerState, WorkerStats

__all__ = [
    "DEFAULT_MODEL",
    "EmbedError",
    "EmbedWorker",
    "Embedder",
    "EmbedderBusy",
    "EmbedderClosed",
    "EmbedderLoadError",
    "EmbedderLoading",
    "EmbedderUnavailable",
    "TransformersEncoder",
    "Vectors",
    "WorkerState",
    "WorkerStats",
    "bundled_model_dir",
    "l2_normalize",
    "load_embedder",
]

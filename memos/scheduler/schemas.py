"""Request and response bodies of the scheduler endpoints (API.md "Scheduler and operations")."""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec

from memos.activations.schemas import ModelName

Tier = Literal["device", "host", "store"]


class TierState(msgspec.Struct):
    name: str
    budget_bytes: int | None
    """null for ``store``: the blob store has no budget of its own (the disk bounds it)."""
    used_bytes: int
    items: int
    hit_rate: float | None
    """Share of KV lookups this tier answered since the process started; null before the first lookup."""


class HotMemory(msgspec.Struct):
    memory_id: uuid.UUID
    heat: float
    tier: Tier | None
    """The nearest tier holding KV of the memory (any model); null when it has no activation."""


class SchedulerState(msgspec.Struct):
    tiers: list[TierState]
    queue: int
    """Hot memories waiting for the scheduler to build their KV (with ``MEMOS_BUILD_HEAT`` set)."""
    hot: list[HotMemory]
    """The hottest memories the caller can read, hottest first."""


class PinIn(msgspec.Struct, forbid_unknown_fields=True):
    memory_id: uuid.UUID
    model: ModelName
    tier: Tier


class Pin(msgspec.Struct):
    memory_id: uuid.UUID
    model: str
    tier: Tier
    activation_id: uuid.UUID | None
    """The activation held (for ``store``: the newest of the memory's for the model; null when it has none)."""
    bytes: int
    """Of decoded KV in the tier (0 for ``store``)."""

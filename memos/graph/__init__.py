"""The memory graph: entity extraction, event-time parsing, graph expansion by personalized PageRank, MMR selection.

Plain ids, texts, vectors and graphs in and out: nothing here knows HTTP or the database.
"""

from memos.graph.entities import Entity, EntityKind, entity_keys, extract_entities
from memos.graph.memgraph import (
    EdgeKind,
    EdgeWeights,
    EntityHub,
    Expansion,
    MemoryGraph,
    MemoryId,
    Spread,
    combine,
    scale_seeds,
)
from memos.graph.select import Candidate, coverage, mmr
from memos.graph.timeparse import format_event_time, parse_event_time

__all__ = [
    "Candidate",
    "EdgeKind",
    "EdgeWeights",
    "Entity",
    "EntityHub",
    "EntityKind",
    "Expansion",
    "MemoryGraph",
    "MemoryId",
    "Spread",
    "combine",
    "coverage",
    "entity_keys",
    "extract_entities",
    "format_event_time",
    "mmr",
    "parse_event_time",
    "scale_seeds",
]

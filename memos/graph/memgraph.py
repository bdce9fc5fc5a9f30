"""The per-cube memory graph: typed weighted edges between memories, and personalized-PageRank expansion.

Expansion runs PageRank only over the seeds' bounded neighbourhood, never over the whole graph, so a
query costs about the same on a cube of a thousand memories as on one of a million.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
from collections.abc import Container, Hashable, Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any, Literal, NamedTuple, TypeAlias

import networkx as nx
import numpy as np

from memos.graph.entities import entity_keys

MemoryId: TypeAlias = Hashable
"""A memory's id as the caller knows it (a UUID or a string)."""

_Adjacency: TypeAlias = dict[Hashable, dict[Hashable, dict[str, float]]]


class EdgeKind(StrEnum):
    LINK = "link"
    """An explicit link between two memories."""
    DERIVED_FROM = "derived_from"
    """Provenance: one memory was made from the other."""
    SEQUENCE = "sequence"
    """Adjacent turns of one session or thread."""
    KNN = "knn"
    """Semantic nearest neighbours; the weight is their cosine similarity."""
    ENTITY = "entity"
    """Both mention one entity (stored through an :class:`EntityHub` node, never as pairwise edges)."""


class EntityHub:
    """The node standing for one entity; its neighbours are the memories that mention it.

    A hub keeps shared-entity edges linear in the mentions (m edges rather than m²/2 pairs). The graph
    makes exactly one hub per key, so hubs compare and hash by identity (cheap in the hot loops) and
    can never equal a memory id.
    """

    __slots__ = ("key", "members")

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: list[int] = []
        """Insertion numbers of the memories mentioning it, ascending."""

    def __repr__(self) -> str:
        return f"EntityHub({self.key!r}, mentions={len(self.members)})"


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeWeights:
    """How much each kind of edge carries in PageRank; applied at query time, so changing them needs no rebuild."""

    link: float = 1.0
    derived_from: float = 1.0
    sequence: float = 0.5
    knn: float = 0.3
    """Multiplies the stored similarity. Low by default: on LoCoMo, strong knn edges pull rank towards
    generic turns similar to many others (centrality), while sequence edges bring in the context that answers."""
    entity: float = 1.0
    """A memory-to-hub edge weighs ``entity / log2(1 + mentions)``: a rare entity binds more than a common one."""

    def by_kind(self) -> dict[str, float]:
        return {kind.value: float(getattr(self, kind.value)) for kind in EdgeKind}


class Expansion(NamedTuple):
    """One result of :meth:`MemoryGraph.expand`."""

    id: MemoryId
    score: float
    via: str
    """``"seed"``, or the edge it was reached over: ``"graph:link<-ID"``, ``"graph:entity(NAME)<-ID"``, …"""


# Kinds that stand for links stored in one direction (``from -> to``): the graph's edge is undirected, so
# it keeps each link's weight apart (the links of one kind between two memories, in either direction and
# of any label, make one edge weighing the largest) and removing one link leaves the others. Sequence
# edges are the graph's own and have no direction.
_DIRECTED = frozenset({EdgeKind.LINK.value, EdgeKind.DERIVED_FROM.value, EdgeKind.KNN.value})

# Which kind explains an edge that has several (a link beats a coincidental knn edge).
_KIND_PRIORITY = (EdgeKind.LINK.value, EdgeKind.DERIVED_FROM.value, EdgeKind.SEQUENCE.value, EdgeKind.KNN.value)


@dataclasses.dataclass(slots=True)
class _Place:
    """Where a memory sits in its session's chain."""

    session: str
    order: tuple[float, int]  # (turn, insertion number): the chain's sort key


class MemoryGraph:
    """The memories of one cube as a graph, updated incrementally and bounded to ``max_nodes`` memories.

    Memory nodes are keyed by the caller's ids; entities are :class:`EntityHub` nodes. A memory-to-memory
    edge keeps one weight per :class:`EdgeKind` (its networkx attribute dict maps kind -> weight). Links
    (``link``, ``derived_from``, ``knn``) have a direction and may carry a label (the type of a user's
    link): the links of one kind between two memories (``add_edge(a, b)``, ``add_edge(b, a)``, and those
    of other labels) make one edge weighing the largest of their weights, and removing one leaves the
    others, so the graph depends only on which links exist, not on the order they came in. When
    full, adding a memory evicts the oldest (by first insertion). Not thread-safe: the owner serializes
    access (and runs ``expand`` on big graphs off the event loop).
    """

    def __init__(
        self,
        *,
        max_nodes: int = 100_000,
        weights: EdgeWeights | None = None,
        knn_floor: float = 0.5,
        hub_max_share: float = 0.25,
        hub_max_mentions: int = 5_000,
        max_links: int = 1_000_000,
    ) -> None:
        """``knn_floor``: :meth:`add_knn` keeps neighbours at least this similar. An entity mentioned by
        more than ``hub_max_mentions`` memories, or (in graphs of 100+ memories) by more than
        ``hub_max_share`` of them, is too common to relate anything and is not traversed.

        ``max_links``: the links (of the link kinds, one per direction and label) the graph holds at most;
        past it :meth:`add_edge` adds no new one (about 370 bytes each: the default, ten per memory of a
        full graph, is about 370 MB). Nothing else bounds them: an agent may write any number of links.
        """
        if max_nodes < 1:
            raise ValueError("max_nodes must be >= 1")
        self.graph: nx.Graph[Hashable] = nx.Graph()
        self.max_nodes = max_nodes
        self.weights = weights or EdgeWeights()
        self.knn_floor = knn_floor
        self.hub_max_share = hub_max_share
        self.hub_max_mentions = hub_max_mentions
        self.max_links = max_links
        self._link_count = 0  # entries of _links plus the labels of _labelled
        self._seq: dict[MemoryId, int] = {}  # memory -> insertion number; dict order = age, oldest first
        self._by_seq: dict[int, MemoryId] = {}
        self._next_seq = 0
        self._hubs: dict[str, EntityHub] = {}
        self._places: dict[MemoryId, _Place] = {}
        self._sessions: dict[str, list[tuple[float, int]]] = {}  # session -> sorted (turn, insertion number)
        self._links: dict[tuple[MemoryId, MemoryId, str], float] = {}  # (from, to, directed kind) -> weight
        # The same for links with a label (few: a user's link types), by label.
        self._labelled: dict[tuple[MemoryId, MemoryId, str], dict[str, float]] = {}
        self._expiry: dict[MemoryId, float] = {}  # memory -> expires_at, for the memories that expire
        self._expiring: list[tuple[float, int, MemoryId]] = []  # heap of (expires_at, insertion number, memory)
        self._expired: set[MemoryId] = set()

    @property
    def _adj(self) -> _Adjacency:
        # Read-only access to networkx's backing dict-of-dicts, as its own algorithms do: the public
        # views wrap every lookup in Mapping machinery and make expansion several times slower.
        # Every write still goes through the Graph API.
        adjacency: _Adjacency = self.graph._adj  # type: ignore[attr-defined]
        return adjacency

    # -- size and lookup -------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of memories (entity hubs not counted)."""
        return len(self._seq)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._seq

    def memory_ids(self) -> Iterator[MemoryId]:
        """Memories from oldest to newest."""
        return iter(self._seq)

    def attrs(self, memory_id: MemoryId) -> dict[str, Any]:
        """The attributes given to :meth:`add_memory` (``KeyError`` if absent)."""
        self._require(memory_id)
        return dict(self.graph.nodes[memory_id])

    def entities(self, memory_id: MemoryId) -> set[str]:
        self._require(memory_id)
        return {node.key for node in self._adj[memory_id] if isinstance(node, EntityHub)}

    @property
    def links(self) -> int:
        """The links held (one per direction, kind and label; see ``max_links``)."""
        return self._link_count

    def mentions(self, key: str) -> int:
        """How many memories mention the entity ``key``."""
        hub = self._hubs.get(key)
        return len(hub.members) if hub else 0

    @property
    def known_entities(self) -> _KnownEntities:
        """The entity keys present, as a container for :func:`memos.graph.entities.extract_entities`."""
        return _KnownEntities(self._hubs)

    def edges(self, memory_id: MemoryId) -> list[tuple[MemoryId, str, float]]:
        """``(other memory, kind, stored weight)`` for every memory-to-memory edge of ``memory_id``."""
        self._require(memory_id)
        return [
            (other, kind, weight)
            for other, data in self._adj[memory_id].items()
            if not isinstance(other, EntityHub)
            for kind, weight in data.items()
        ]

    # -- writes ----------------------------------------------------------------------------

    def add_memory(
        self,
        memory_id: MemoryId,
        *,
        entities: Iterable[str] | None = None,
        text: str | None = None,
        session: str | None = None,
        turn: float | None = None,
        expires_at: float | None = None,
        **attrs: Any,
    ) -> list[MemoryId]:
        """Add a memory, or update one already present; returns the memories evicted to make room.

        ``expires_at`` (seconds since the epoch): from then on :meth:`spread` does not visit the memory.

        ``entities`` are entity keys; given ``text`` instead, they are extracted from it. A ``session``
        puts the memory in that session's chain of ``sequence`` edges, ordered by ``turn`` (insertion
        order when absent). An update replaces entities (when given), the session place and the expiry,
        and merges ``attrs``; it keeps the memory's age.
        """
        if isinstance(memory_id, EntityHub):
            raise TypeError("an EntityHub is not a memory id")
        keys = set(entities) if entities is not None else None
        if keys is None and text is not None:
            keys = set(entity_keys(text, known=self.known_entities))
        seq = self._seq.get(memory_id)
        if seq is not None:
            self.graph.nodes[memory_id].update(attrs)
            place = self._places.get(memory_id)
            if place is None or place.session != session or (turn is not None and place.order[0] != turn):
                self._leave_session(memory_id)
                self._join_session(memory_id, session, turn)
            if keys is not None:
                self._set_entities(memory_id, keys)
            self._set_expiry(memory_id, expires_at)
            return []

        seq = self._next_seq
        self._next_seq += 1
        self.graph.add_node(memory_id, **attrs)
        self._seq[memory_id] = seq
        self._by_seq[seq] = memory_id
        self._join_session(memory_id, session, turn)
        if keys:
            self._set_entities(memory_id, keys)
        self._set_expiry(memory_id, expires_at)
        evicted: list[MemoryId] = []
        while len(self._seq) > self.max_nodes:
            oldest = next(iter(self._seq))
            self.remove_memory(oldest)
            evicted.append(oldest)
        return evicted

    def remove_memory(self, memory_id: MemoryId) -> bool:
        """Drop a memory and its edges (its session neighbours are joined to each other); False if absent."""
        if memory_id not in self._seq:
            return False
        self._leave_session(memory_id)
        self._set_entities(memory_id, set())
        for other, data in self._adj[memory_id].items():
            self._forget_links(memory_id, other, data)
        self._set_expiry(memory_id, None)
        del self._by_seq[self._seq.pop(memory_id)]
        self.graph.remove_node(memory_id)
        return True

    def set_entities(self, memory_id: MemoryId, entities: Iterable[str]) -> None:
        """Replace the entities a memory mentions."""
        self._require(memory_id)
        self._set_entities(memory_id, set(entities))

    def add_edge(
        self, a: MemoryId, b: MemoryId, kind: EdgeKind | str, weight: float = 1.0, *, label: str | None = None
    ) -> bool:
        """Add (or reweigh) an edge of ``kind`` from ``a`` to ``b``; False when either is absent, a == b, or
        it is a new link and the graph holds ``max_links`` already.

        The edge is undirected for PageRank. A link kind (``link``, ``derived_from``, ``knn``) keeps one
        link per direction and ``label`` (a user link's type: links of several types can join two
        memories), and its edge weighs the largest of those links' weights, whatever order they came in.
        """
        kind = EdgeKind(kind)
        if kind is EdgeKind.ENTITY:
            raise ValueError("entity edges come from add_memory(entities=...) or set_entities()")
        if not weight > 0:
            raise ValueError("edge weights must be positive")
        if a == b or a not in self._seq or b not in self._seq:
            return False
        value = float(weight)
        if kind.value in _DIRECTED:
            key = (a, b, kind.value)
            labels = self._labelled.get(key, {})
            is_new = (key not in self._links) if label is None else (label not in labels)
            if is_new:
                if self._link_count >= self.max_links:
                    return False
                self._link_count += 1
            if label is None:
                self._links[key] = value
            else:
                labels[label] = value
                self._labelled[key] = labels
            value = self._link_weight(a, b, kind.value) or value  # never None: the link just stored counts
        data = self._adj[a].get(b)
        if data is None:
            self.graph.add_edge(a, b, **{kind.value: value})
        else:
            data[kind.value] = value  # the attribute dict is shared by both directions
        return True

    def remove_edge(
        self, a: MemoryId, b: MemoryId, kind: EdgeKind | str | None = None, *, label: str | None = None
    ) -> bool:
        """Remove the edge of ``kind`` and ``label`` from ``a`` to ``b`` (every kind and label, both
        directions, when ``kind`` is None); False if none. A link kind's other links between the two (from
        ``b`` to ``a``, or of another label) stay, and the edge weighs the largest of them."""
        if a not in self._seq or b not in self._seq:
            return False
        data = self._adj[a].get(b)
        if data is None:
            return False
        if kind is not None:
            name = EdgeKind(kind).value
            if name in _DIRECTED:
                if not self._drop_link(a, b, name, label):
                    return False
                rest = self._link_weight(a, b, name)
                if rest is not None:
                    data[name] = rest
                    return True
            if data.pop(name, None) is None:
                return False
            if data:
                return True
        else:
            self._forget_links(a, b, data)
        self.graph.remove_edge(a, b)
        return True

    def clear_links(self, memory_id: MemoryId) -> int:
        """Drop every link (``link``, ``derived_from``, ``knn``, either direction, any label) between
        ``memory_id`` and other memories; its entities and session place stay. Returns the edges changed.
        (A catch-up re-reads a memory another process changed with all of its links: its old ones go first.)"""
        self._require(memory_id)
        changed = 0
        for other, data in list(self._adj[memory_id].items()):
            if isinstance(other, EntityHub):
                continue
            names = [name for name in data if name in _DIRECTED]
            if not names:
                continue
            self._forget_links(memory_id, other, dict.fromkeys(names, 0.0))
            for name in names:
                del data[name]
            if not data:
                self.graph.remove_edge(memory_id, other)
            changed += 1
        return changed

    def add_knn(self, memory_id: MemoryId, neighbours: Iterable[tuple[MemoryId, float]]) -> int:
        """Add ``knn`` edges to ``(neighbour, cosine similarity)`` pairs at or above ``knn_floor``; returns how many."""
        return sum(
            1
            for other, similarity in neighbours
            if similarity >= self.knn_floor and self.add_edge(memory_id, other, EdgeKind.KNN, similarity)
        )

    # -- retrieval -------------------------------------------------------------------------

    def expand(
        self,
        seeds: Mapping[MemoryId, float],
        k: int,
        hops: int = 2,
        max_nodes: int = 2000,
        *,
        alpha: float = 0.85,
        seed_weight: float = 0.6,
        seed_scaling: Literal["minmax", "max"] = "minmax",
        fanout: int = 32,
        max_scan: int = 40_000,
        tol: float = 1e-6,
        max_iter: int = 50,
    ) -> list[Expansion]:
        """The ``k`` best memories around ``seeds`` (id -> retrieval score, higher is better), best first.

        The seeds' neighbourhood is gathered breadth-first, best seed first, up to ``hops`` memory hops
        (sharing an entity is one hop), at most ``fanout`` new neighbours per memory per relation
        (heaviest edges first; for an entity, the members nearest in insertion order) and ``max_nodes``
        nodes in all. ``max_scan`` bounds the work on link-dense graphs, where a few thousand nodes can
        carry hundreds of thousands of edges: gathering the neighbourhood reads at most that many
        adjacency entries (the walk stops when they are spent), and so does collecting the edges among
        it (the latest-reached nodes, the weakest, then bring fewer of theirs). Personalized PageRank
        (follow-an-edge probability ``alpha``; restarts go to the seeds in proportion to their scores)
        runs on that subgraph only. A memory scores
        ``seed_weight * seed score + (1 - seed_weight) * inflow``, both scaled to [0, 1], where inflow
        is the rank that reached it over edges: a seed other seeds point to rises, and a memory that
        strong seeds point to can outrank a weak seed. Seeds unknown to the graph keep their seed score.

        ``seed_scaling``: ``"minmax"`` maps the seed scores onto [0, 1] (the weakest seed gets 0), which
        suits fused ranks and cosine scores alike; ``"max"`` divides by the best score. The defaults
        (alpha 0.85, seed_weight 0.6, minmax, knn weight 0.3) were the best of a small grid over dense
        MiniLM seeds on the LoCoMo dev conversations (recall@10 40.6 -> 43.1 over the seeds alone).
        Several graphs (a search over several cubes): :meth:`spread` each, then :func:`combine`.
        """
        if k <= 0 or not seeds:
            return []
        part = self.spread(scale_seeds(seeds, seed_scaling), hops, max_nodes, fanout=fanout, max_scan=max_scan)
        return combine([part], seed_weight, alpha=alpha, tol=tol, max_iter=max_iter)[:k]

    def spread(
        self,
        seeds: Mapping[MemoryId, float],
        hops: int = 2,
        max_nodes: int = 2000,
        *,
        fanout: int = 32,
        max_scan: int = 40_000,
        admit: Container[Hashable] | None = None,
        now: float | None = None,
    ) -> Spread:
        """This graph's part of an expansion from ``seeds`` (id -> score already scaled to [0, 1]): the
        seeds' neighbourhood and its weighted edges. :func:`combine` runs PageRank over one or several parts
        (several graphs: a search over several cubes). See :meth:`expand` for the parameters.

        With ``admit``, only the seeds and the memories in it are visited: an edge to any other memory
        leads nowhere, so neither the walk nor PageRank passes through it (a search admits the memories
        that pass its scope and filters, :meth:`Spread.memories` tells which to check). With ``now``
        (seconds since the epoch), nor are the memories expired by then."""
        ranked = dict(sorted(seeds.items(), key=lambda item: -item[1]))
        kind_weight = self.weights.by_kind()
        reached = self._reach(ranked, hops, max_nodes, fanout, max_scan, kind_weight, admit, now)
        return Spread(seeds=ranked, reached=reached, edges=self._edges(list(reached), kind_weight, max_scan))

    def reach(
        self,
        seeds: Mapping[MemoryId, float],
        hops: int = 2,
        max_nodes: int = 2000,
        *,
        fanout: int = 32,
        max_scan: int = 40_000,
        admit: Container[Hashable] | None = None,
        now: float | None = None,
    ) -> list[MemoryId]:
        """The memories :meth:`spread` would reach from ``seeds`` over an edge (``Spread.memories``), without
        the edges among them: what a filtered search checks before it spreads again with ``admit``."""
        ranked = dict(sorted(seeds.items(), key=lambda item: -item[1]))
        reached = self._reach(ranked, hops, max_nodes, fanout, max_scan, self.weights.by_kind(), admit, now)
        return [node for node, via in reached.items() if via is not None and not isinstance(node, EntityHub)]

    def _reach(
        self,
        ranked: dict[MemoryId, float],
        hops: int,
        max_nodes: int,
        fanout: int,
        max_scan: int,
        kind_weight: dict[str, float],
        admit: Container[Hashable] | None,
        now: float | None,
    ) -> dict[Hashable, str | None]:
        start = [sid for sid in ranked if sid in self._seq]
        expired = self.expired(now) if now is not None else set()
        return self._neighbourhood(start, hops, max_nodes, fanout, max_scan, kind_weight, admit, expired)

    def _neighbourhood(
        self,
        seeds: list[MemoryId],
        hops: int,
        max_nodes: int,
        fanout: int,
        max_scan: int,
        kind_weight: dict[str, float],
        admit: Container[Hashable] | None,
        expired: set[MemoryId],
    ) -> dict[Hashable, str | None]:
        """Node -> how it was reached (None for a seed), breadth-first within hops, fanout and max_nodes,
        reading at most ``max_scan`` adjacency entries (every seed stays, reached or not)."""
        adj = self._adj
        reached: dict[Hashable, str | None] = dict.fromkeys(seeds[:max_nodes])
        frontier = list(reached)
        left = max_scan
        for _ in range(hops):
            found: list[Hashable] = []
            for node in frontier:
                if len(reached) >= max_nodes or left <= 0:
                    break
                neighbours = adj[node]
                steps = self._steps(node, neighbours, fanout, left, reached, kind_weight, admit, expired)
                left -= min(len(neighbours), left)
                for other, via in steps:
                    reached[other] = via
                    if not isinstance(other, EntityHub):
                        found.append(other)
                    if len(reached) >= max_nodes:
                        break
            frontier = found
            if not frontier or len(reached) >= max_nodes or left <= 0:
                break
        return reached

    def _steps(
        self,
        node: MemoryId,
        neighbours: dict[Hashable, dict[str, float]],
        fanout: int,
        scan: int,
        reached: Mapping[Hashable, str | None],
        kind_weight: dict[str, float],
        admit: Container[Hashable] | None,
        expired: set[MemoryId],
    ) -> Iterator[tuple[Hashable, str]]:
        """Unvisited, unexpired (and, with ``admit``, admitted) neighbours of a memory worth visiting, with
        the edge each is reached over; among its first ``scan`` neighbours (in the order they joined) only."""
        memories: list[tuple[float, Hashable, dict[str, float]]] = []
        hubs: list[EntityHub] = []
        for other, data in itertools.islice(neighbours.items(), scan):
            if isinstance(other, EntityHub):
                hubs.append(other)  # even when reached from another memory: its members near this one differ
            elif other not in reached and other not in expired and (admit is None or other in admit):
                memories.append((sum(kind_weight[kind] * w for kind, w in data.items()), other, data))
        for _, other, data in heapq.nlargest(fanout, memories, key=lambda item: item[0]):
            yield other, f"graph:{_explain(data)}<-{node}"
        # Rarer entities first: they say more about what two memories share.
        hubs.sort(key=lambda hub: len(hub.members))
        for hub in hubs:
            if not self._traversable(hub):
                continue
            via = f"graph:entity({hub.key})<-{node}"
            if hub not in reached:
                yield hub, via
            for seq in _nearest(hub.members, self._seq[node], fanout):
                member = self._by_seq[seq]
                if member not in reached and member not in expired and (admit is None or member in admit):
                    yield member, via

    def _edges(
        self, nodes: list[Hashable], kind_weight: dict[str, float], max_scan: int
    ) -> tuple[list[int], list[int], list[float]]:
        """The edges among ``nodes`` as (source, target, weight) lists of positions in ``nodes``, each
        undirected edge once, reading about ``max_scan`` adjacency entries at most: in ``nodes``' order, so
        the last reached lose theirs first. A memory with more neighbours than ``nodes`` has is looked
        up from ``nodes``' side."""
        adj = self._adj
        index = {node: i for i, node in enumerate(nodes)}
        src: list[int] = []
        dst: list[int] = []
        weight: list[float] = []
        left = max_scan
        for i, node in enumerate(nodes):
            if isinstance(node, EntityHub):
                continue  # a hub's edges are collected from the memory side
            if left <= 0:
                break
            neighbours = adj[node]
            left -= min(len(neighbours), len(nodes))
            if len(neighbours) > len(nodes):
                neighbours = {other: data for other in nodes if (data := neighbours.get(other)) is not None}
            for other, data in neighbours.items():
                j = index.get(other)
                if j is None:
                    continue
                if isinstance(other, EntityHub):
                    w = kind_weight[EdgeKind.ENTITY] / math.log2(1 + len(other.members))
                elif j > i:
                    w = sum(kind_weight[kind] * value for kind, value in data.items())
                else:
                    continue  # seen from the other end
                src.append(i)
                dst.append(j)
                weight.append(w)
        return src, dst, weight

    # -- internals -------------------------------------------------------------------------

    def expired(self, now: float) -> set[MemoryId]:
        """The memories whose ``expires_at`` is ``now`` or before (kept as they expire: a heap pops them)."""
        while self._expiring and self._expiring[0][0] <= now:
            moment, _, memory_id = heapq.heappop(self._expiring)
            if self._expiry.get(memory_id) == moment:
                self._expired.add(memory_id)
        return self._expired

    def _set_expiry(self, memory_id: MemoryId, expires_at: float | None) -> None:
        if self._expiry.get(memory_id) == expires_at:
            return  # unchanged (most writes): no second heap entry, and an expired memory stays expired
        self._expired.discard(memory_id)
        if expires_at is None:
            self._expiry.pop(memory_id, None)
            return
        self._expiry[memory_id] = expires_at
        heapq.heappush(self._expiring, (expires_at, self._seq[memory_id], memory_id))

    def _forget_links(self, a: Hashable, b: Hashable, data: Mapping[str, float]) -> None:
        """Drop the directed link weights behind the edge between ``a`` and ``b`` (it is going away)."""
        for name in data:
            if name in _DIRECTED:
                for key in ((a, b, name), (b, a, name)):
                    self._link_count -= (self._links.pop(key, None) is not None) + len(self._labelled.pop(key, {}))

    def _link_weight(self, a: Hashable, b: Hashable, name: str) -> float | None:
        """The largest weight of the links of kind ``name`` between ``a`` and ``b`` (either direction, any
        label); None when there are none."""
        keys = ((a, b, name), (b, a, name))
        weights = [weight for key in keys if (weight := self._links.get(key)) is not None]
        weights.extend(weight for key in keys for weight in self._labelled.get(key, {}).values())
        return max(weights, default=None)

    def _drop_link(self, a: Hashable, b: Hashable, name: str, label: str | None) -> bool:
        """Forget the link of kind ``name`` and ``label`` from ``a`` to ``b``; False if there was none."""
        key = (a, b, name)
        if label is None:
            if self._links.pop(key, None) is None:
                return False
        else:
            labels = self._labelled.get(key)
            if labels is None or labels.pop(label, None) is None:
                return False
            if not labels:
                del self._labelled[key]
        self._link_count -= 1
        return True

    def _require(self, memory_id: MemoryId) -> None:
        if memory_id not in self._seq:
            raise KeyError(memory_id)

    def _traversable(self, hub: EntityHub) -> bool:
        mentions = len(hub.members)
        if mentions > self.hub_max_mentions:
            return False
        return len(self._seq) < 100 or mentions <= self.hub_max_share * len(self._seq)

    def _set_entities(self, memory_id: MemoryId, keys: set[str]) -> None:
        seq = self._seq[memory_id]
        current = {node.key: node for node in self._adj[memory_id] if isinstance(node, EntityHub)}
        for key, hub in current.items():
            if key in keys:
                continue
            self.graph.remove_edge(memory_id, hub)
            del hub.members[bisect.bisect_left(hub.members, seq)]
            if not hub.members:
                del self._hubs[key]
                self.graph.remove_node(hub)
        for key in keys:
            if not key or key in current:
                continue
            joined = self._hubs.get(key)
            if joined is None:
                joined = EntityHub(key)
                self._hubs[key] = joined
            self.graph.add_edge(memory_id, joined)
            bisect.insort(joined.members, seq)

    def _join_session(self, memory_id: MemoryId, session: str | None, turn: float | None) -> None:
        if session is None:
            return
        seq = self._seq[memory_id]
        order = (float(turn) if turn is not None else float(seq), seq)
        chain = self._sessions.setdefault(session, [])
        at = bisect.bisect_left(chain, order)
        before = self._by_seq[chain[at - 1][1]] if at > 0 else None
        after = self._by_seq[chain[at][1]] if at < len(chain) else None
        chain.insert(at, order)
        self._places[memory_id] = _Place(session, order)
        if before is not None and after is not None:
            self.remove_edge(before, after, EdgeKind.SEQUENCE)  # the new memory now sits between them
        for neighbour in (before, after):
            if neighbour is not None:
                self.add_edge(memory_id, neighbour, EdgeKind.SEQUENCE)

    def _leave_session(self, memory_id: MemoryId) -> None:
        place = self._places.pop(memory_id, None)
        if place is None:
            return
        chain = self._sessions[place.session]
        at = bisect.bisect_left(chain, place.order)
        before = self._by_seq[chain[at - 1][1]] if at > 0 else None
        after = self._by_seq[chain[at + 1][1]] if at + 1 < len(chain) else None
        del chain[at]
        if not chain:
            del self._sessions[place.session]
        for neighbour in (before, after):
            if neighbour is not None:
                self.remove_edge(memory_id, neighbour, EdgeKind.SEQUENCE)
        if before is not None and after is not None:
            self.add_edge(before, after, EdgeKind.SEQUENCE)


class _KnownEntities:
    """A read-only ``in`` view of a graph's entity keys."""

    __slots__ = ("_hubs",)

    def __init__(self, hubs: Mapping[str, EntityHub]) -> None:
        self._hubs = hubs

    def __contains__(self, key: object) -> bool:
        return key in self._hubs


@dataclasses.dataclass(slots=True)
class Spread:
    """One graph's part of an expansion (:meth:`MemoryGraph.spread`)."""

    seeds: dict[MemoryId, float]
    """The seeds given to it, scaled, best first (unknown ones too: they keep their seed score)."""
    reached: dict[Hashable, str | None]
    """Every node of the neighbourhood, with how it was reached (None for a seed); entity hubs included."""
    edges: tuple[list[int], list[int], list[float]]
    """(source, target, weight) of each edge among ``reached``, by position in it."""

    def memories(self) -> list[MemoryId]:
        """The memories reached over an edge (not the seeds), in the order they were reached."""
        return [node for node, via in self.reached.items() if via is not None and not isinstance(node, EntityHub)]


def scale_seeds(seeds: Mapping[MemoryId, float], how: Literal["minmax", "max"] = "minmax") -> dict[MemoryId, float]:
    """Seed scores onto [0, 1]: ``minmax`` (the weakest gets 0) or ``max`` (divided by the best); all equal
    (or one seed) -> all 1."""
    if not seeds:
        return {}
    high, low = max(seeds.values()), min(seeds.values())
    if how == "max":
        return {sid: max(score, 0.0) / high if high > 0 else 1.0 for sid, score in seeds.items()}
    if high - low <= 1e-12:
        return dict.fromkeys(seeds, 1.0)
    return {sid: (score - low) / (high - low) for sid, score in seeds.items()}


def combine(
    parts: Iterable[Spread],
    seed_weight: float = 0.6,
    *,
    alpha: float = 0.85,
    tol: float = 1e-6,
    max_iter: int = 50,
) -> list[Expansion]:
    """Personalized PageRank over the neighbourhoods of ``parts`` at once; every seed and reached memory,
    best first.

    The parts' graphs share no edge (they are different cubes'): put side by side, they are one graph, and
    one power iteration ranks all of their memories on one scale, with restarts at every part's seeds in
    proportion to their scores. A memory scores ``seed_weight * seed score + (1 - seed_weight) * inflow``,
    the inflow (the rank that reached it over edges) divided by the largest. Ties keep the seeds' order,
    then the order in which memories were reached. See :meth:`MemoryGraph.expand` for the parameters.
    """
    if not 0 <= seed_weight <= 1:
        raise ValueError("need 0 <= seed_weight <= 1")
    if not 0 <= alpha < 1:
        raise ValueError("need 0 <= alpha < 1")
    parts = list(parts)
    nodes: list[Hashable] = []
    src: list[int] = []
    dst: list[int] = []
    weight: list[float] = []
    for part in parts:
        offset = len(nodes)
        nodes.extend(part.reached)
        src.extend(part.edges[0] if offset == 0 else [i + offset for i in part.edges[0]])
        dst.extend(part.edges[1] if offset == 0 else [j + offset for j in part.edges[1]])
        weight.extend(part.edges[2])
    seeds = dict(sorted(((sid, score) for part in parts for sid, score in part.seeds.items()), key=lambda i: -i[1]))
    inflow = _inflow(nodes, src, dst, weight, seeds, alpha, tol, max_iter)
    top = max(inflow.values(), default=0.0)
    scale = 1 / top if top > 0 else 0.0
    scored: list[tuple[float, int, Expansion]] = []
    for position, (sid, seed_score) in enumerate(seeds.items()):
        score = seed_weight * seed_score + (1 - seed_weight) * inflow.get(sid, 0.0) * scale
        scored.append((score, position, Expansion(sid, score, "seed")))
    position = len(scored)
    for part in parts:
        for node, via in part.reached.items():
            if via is None or isinstance(node, EntityHub):
                continue
            score = (1 - seed_weight) * inflow.get(node, 0.0) * scale
            scored.append((score, position, Expansion(node, score, via)))
            position += 1
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [item[2] for item in scored]


def _inflow(
    nodes: list[Hashable],
    src: list[int],
    dst: list[int],
    weight: list[float],
    seeds: Mapping[MemoryId, float],
    alpha: float,
    tol: float,
    max_iter: int,
) -> dict[Hashable, float]:
    """Personalized PageRank on ``nodes`` joined by the (``src``, ``dst``, ``weight``) edges: each memory's
    inflow, the rank that reached it over edges (restarts go to the ``seeds`` among ``nodes``).

    Power iteration with numpy over an edge list: the neighbourhood is small (``max_nodes``), so this
    beats building a networkx subgraph and a sparse matrix for every query.
    """
    n = len(nodes)
    if n == 0 or not src:
        return {}
    index = {node: i for i, node in enumerate(nodes)}
    restart = np.zeros(n)
    for node, score in seeds.items():
        i_seed = index.get(node)
        if i_seed is not None:
            restart[i_seed] = score
    if restart.sum() <= 0:
        restart[[index[node] for node in seeds if node in index]] = 1.0
    restart /= restart.sum()

    s_idx = np.asarray(src + dst, dtype=np.int64)  # each undirected edge, both directions
    d_idx = np.asarray(dst + src, dtype=np.int64)
    w_arr = np.asarray(weight + weight, dtype=np.float64)
    out_weight = np.bincount(s_idx, weights=w_arr, minlength=n)
    dangling = out_weight == 0
    share = w_arr / out_weight[s_idx]  # transition probability along each directed edge
    rank = restart.copy()
    for _ in range(max_iter):
        spread = np.bincount(d_idx, weights=rank[s_idx] * share, minlength=n)
        # Rank stuck on a node without edges goes back to the seeds, as a restart would.
        new = alpha * (spread + rank[dangling].sum() * restart) + (1 - alpha) * restart
        delta = float(np.abs(new - rank).sum())
        rank = new
        if delta < tol:
            break
    inflow = rank - (1 - alpha) * restart
    is_memory = np.fromiter((not isinstance(node, EntityHub) for node in nodes), dtype=bool, count=n)
    return {nodes[i]: float(inflow[i]) for i in np.flatnonzero(is_memory & (inflow > 0))}


def _explain(data: Mapping[str, float]) -> str:
    for kind in _KIND_PRIORITY:
        if kind in data:
            return kind
    return next(iter(data), EdgeKind.LINK.value)


def _nearest(members: list[int], seq: int, count: int) -> list[int]:
    """Up to ``count`` values of sorted ``members`` nearest to ``seq`` (excluding it): time locality."""
    if len(members) <= count:
        return members
    at = bisect.bisect_left(members, seq)
    lo, hi = at - 1, at
    out: list[int] = []
    while len(out) < count and (lo >= 0 or hi < len(members)):
        if hi < len(members) and members[hi] == seq:
            hi += 1
        elif lo >= 0 and (hi >= len(members) or seq - members[lo] <= members[hi] - seq):
            out.append(members[lo])
            lo -= 1
        else:
            out.append(members[hi])
            hi += 1
    return out

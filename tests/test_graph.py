"""The memory graph package: entity extraction, event times, PageRank expansion and diversity selection."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import full_width

from memos.graph import (
    EdgeKind,
    EdgeWeights,
    EntityKind,
    MemoryGraph,
    combine,
    coverage,
    entity_keys,
    extract_entities,
    format_event_time,
    mmr,
    parse_event_time,
    scale_seeds,
)
from memos.graph.entities import MAX_KEYS

# -- entities -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # proper names: runs of capitalized words, trimmed of stopwords, possessives dropped
        ("Caroline: Hey Mel! I met John Smith at the LGBTQ center.", ["caroline", "mel", "john smith", "lgbtq"]),
        ("Thanks Jon! We saw Caroline's sister in New York City.", ["jon", "caroline", "new york city"]),
        ("I work at the Bank of America now.", ["bank of america"]),
        ("We went to Sweden, Norway and Denmark.", ["sweden", "norway", "denmark"]),
        # a lone capitalized word opening a sentence is not a name unless it recurs
        ("Painting is fun. Yesterday was long.", []),
        ("Woohoo Melanie, bye Caroline!", ["melanie", "caroline"]),
        ("Paris was lovely. I would go back to Paris.", ["paris"]),
        # dates, normalized so different spellings meet
        ("The talk was on 8 May, 2023.", ["2023-05-08"]),
        ("The talk was on May 8th, 2023.", ["2023-05-08"]),
        ("The talk was on 2023-05-08.", ["2023-05-08"]),
        ("See you on May 8 or maybe 9 June.", ["may 8", "june 9"]),
        ("It started in May 2023 and ended last Friday.", ["2023-05", "friday"]),
        ("See you next Tues or on Sat. The sun sat low.", ["tuesday", "saturday"]),
        ("The Beatles split in 1970.", ["beatles", "1970"]),
        ("We may go in March.", ["march"]),
        ("May I ask you something?", []),
        # numbers with units
        ("I ran 5 km and spent $1,200 on gear, 20% more than planned.", ["5 km", "1200 usd", "20%"]),
        ("Her son is three years old; it is a 3-year plan.", ["3 years"]),
        ("It took 2.50 hours and €3.5 for the ticket.", ["2.5 hours", "3.5 eur"]),
        ("I have 3 kids.", []),
        ("We drove 2000 miles in 2019.", ["2000 mi", "2019"]),
    ],
)
def test_entity_keys(text: str, expected: list[str]) -> None:
    assert entity_keys(text) == expected


def test_entities_in_compatibility_forms_meet_their_plain_keys() -> None:
    """Full-width digits and letters: the same keys as the plain text (NFKC first)."""
    wide = full_width("We saw Caroline and Jon on 8 May, 2023")
    assert (
        entity_keys(wide) == entity_keys("We saw Caroline and Jon on 8 May, 2023") == ["caroline", "jon", "2023-05-08"]
    )
    assert entity_keys("I ran \uff15\uff10 km on the \ufb01rst day.") == ["50 km"]


def test_entities_carry_kind_and_surface_form() -> None:
    entities = extract_entities("Melanie ran 10 km on Friday, 8 May 2023, with Melanie's dog.")
    assert [(e.key, e.kind, e.text) for e in entities] == [
        ("melanie", EntityKind.NAME, "Melanie"),
        ("10 km", EntityKind.NUMBER, "10 km"),
        ("friday", EntityKind.DATE, "Friday"),
        ("2023-05-08", EntityKind.DATE, "8 May 2023"),
    ]


def test_known_entities_admit_a_sentence_start() -> None:
    assert entity_keys("Gina opened a store.") == []
    assert entity_keys("Gina opened a store.", known={"gina"}) == ["gina"]


def test_extraction_is_deterministic_and_cheap_on_long_text() -> None:
    text = "Caroline met Mel in Paris on 8 May 2023 and ran 5 km. " * 2000
    assert entity_keys(text) == entity_keys(text) == ["caroline", "mel", "paris", "2023-05-08", "5 km"]


def test_a_memory_gives_the_graph_at_most_its_first_max_keys_entities() -> None:
    """Every entity is an edge each graph search reaching the memory scans: 300 memories of 12,000 shared number
    keys each held the event loop for seconds per graph search and took 500 MB (found in review)."""
    text = " ".join(f"{i} km" for i in range(12_000))
    keys = entity_keys(text)
    assert keys == [f"{i} km" for i in range(MAX_KEYS)]
    assert len(extract_entities(text)) == 12_000, "extraction itself still finds them all"
    graph = MemoryGraph()
    for n in range(3):
        graph.add_memory(f"m{n}", text=text)
    assert len(graph.entities("m0")) == MAX_KEYS
    assert graph.mentions("0 km") == 3 and graph.mentions(f"{MAX_KEYS} km") == 0


# -- event times ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1:56 pm on 8 May, 2023", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("10:37 am on 27 June, 2023", datetime(2023, 6, 27, 10, 37, tzinfo=UTC)),
        ("12:05 am on 1 January, 2024", datetime(2024, 1, 1, 0, 5, tzinfo=UTC)),
        ("7:00 p.m. on 8 May 2023", datetime(2023, 5, 8, 19, 0, tzinfo=UTC)),
        ("8 May 2023", datetime(2023, 5, 8, tzinfo=UTC)),
        ("Monday, May 8th, 2023 at 13:56", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("8 May 2023 1:56pm +02:00", datetime(2023, 5, 8, 11, 56, tzinfo=UTC)),
        ("2023-05-08", datetime(2023, 5, 8, tzinfo=UTC)),
        ("2023-05-08T13:56:00+02:00", datetime(2023, 5, 8, 11, 56, tzinfo=UTC)),
        ("2023-05-08T13:56:00Z", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("2023-05-08 13:56", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("2023/5/8", datetime(2023, 5, 8, tzinfo=UTC)),
        ("May 2023", datetime(2023, 5, 1, tzinfo=UTC)),
        # an ISO date or date-time with a zone word after it, and abbreviated leading weekdays
        ("2023-05-08 UTC", datetime(2023, 5, 8, tzinfo=UTC)),
        ("2023-05-08 13:56 UTC", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("2023-05-08T13:56:00 GMT", datetime(2023, 5, 8, 13, 56, tzinfo=UTC)),
        ("2023-05-08 13:56 +02:00", datetime(2023, 5, 8, 11, 56, tzinfo=UTC)),
        ("Mon, 8 May 2023", datetime(2023, 5, 8, tzinfo=UTC)),
        ("Tue. 9 May 2023", datetime(2023, 5, 9, tzinfo=UTC)),
        ("Thurs May 11, 2023 at 9:00", datetime(2023, 5, 11, 9, 0, tzinfo=UTC)),
        ("2023-05-08T13:56:00+02:00 UTC", None),  # two zones
        ("2023-05/08", None),
        ("", None),
        ("yesterday", None),
        ("8 May", None),
        ("31 February 2023", None),
        ("13:99 on 8 May 2023", None),
        ("a long sentence that mentions 8 May 2023 somewhere " * 4, None),
    ],
)
def test_parse_event_time(raw: str, expected: datetime | None) -> None:
    parsed = parse_event_time(raw)
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is UTC


def test_format_event_time() -> None:
    assert format_event_time(datetime(2023, 5, 8, 13, 56, tzinfo=UTC)) == "Monday 8 May 2023, 13:56 UTC"
    assert format_event_time(datetime(2023, 5, 8, tzinfo=UTC)) == "Monday 8 May 2023"


# -- the graph ------------------------------------------------------------------------------


def via_of(results: list[tuple[object, float, str]]) -> dict[object, str]:
    return {node: via for node, _, via in results}


def test_expand_reaches_a_memory_only_through_a_link() -> None:
    graph = MemoryGraph()
    for name in ("seed", "linked", "other"):
        graph.add_memory(name)
    assert graph.add_edge("seed", "linked", EdgeKind.LINK)
    results = graph.expand({"seed": 1.0}, k=10)
    assert via_of(results) == {"seed": "seed", "linked": "graph:link<-seed"}
    assert [r.id for r in results] == ["seed", "linked"]


def test_expand_reaches_a_memory_only_through_a_shared_entity() -> None:
    graph = MemoryGraph()
    graph.add_memory("seed", text="Caroline moved to Sweden in 2019.")
    graph.add_memory("shares", text="Everyone said Sweden was cold.")
    graph.add_memory("unrelated", text="The soup needs more salt.")
    assert graph.entities("seed") == {"sweden", "2019"}  # a lone sentence-opening word is not a name
    results = graph.expand({"seed": 1.0}, k=10)
    assert via_of(results) == {"seed": "seed", "shares": "graph:entity(sweden)<-seed"}


def test_expand_names_the_edge_and_the_memory_it_came_from() -> None:
    graph = MemoryGraph()
    for name in "abcde":
        graph.add_memory(name)
    graph.add_edge("a", "b", EdgeKind.DERIVED_FROM)
    graph.add_edge("b", "c", EdgeKind.KNN, 0.9)
    graph.add_edge("a", "d", EdgeKind.KNN, 0.7)
    graph.add_edge("a", "d", EdgeKind.LINK)  # two kinds on one edge: the explicit one explains it
    graph.add_edge("c", "e", EdgeKind.LINK)  # three hops away
    vias = via_of(graph.expand({"a": 1.0}, k=10, hops=2))
    assert vias == {"a": "seed", "b": "graph:derived_from<-a", "d": "graph:link<-a", "c": "graph:knn<-b"}
    assert "e" in via_of(graph.expand({"a": 1.0}, k=10, hops=3))


def test_pagerank_stays_in_the_neighbourhood() -> None:
    graph = MemoryGraph()
    for i in range(10):
        graph.add_memory(f"near{i}", session="s1", turn=i)
        graph.add_memory(f"far{i}", session="s2", turn=i)
    graph.add_memory("shared-only-far", entities=["x"])
    graph.add_memory("far-hub", entities=["x"])
    graph.add_edge("far-hub", "far0", EdgeKind.LINK)
    results = graph.expand({"near0": 1.0, "near9": 0.5}, k=100, hops=3)
    found = {r.id for r in results}
    assert not any(str(node).startswith(("far", "shared")) for node in found)
    # hops bound the walk: from near0 and near9 over the chain, three hops reach near1..3 and near6..8 only
    assert found == {"near0", "near1", "near2", "near3", "near6", "near7", "near8", "near9"}
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_max_nodes_bounds_the_neighbourhood() -> None:
    graph = MemoryGraph()
    for i in range(200):
        graph.add_memory(i, session="s", turn=i)
    results = graph.expand({100: 1.0}, k=500, hops=1000, max_nodes=25)
    assert len(results) == 25
    assert {r.id for r in results} == set(range(88, 113))


def dense(n: int) -> MemoryGraph:
    """``n`` memories, each derived from every one before it: n * (n - 1) / 2 edges among n nodes."""
    graph = MemoryGraph()
    for i in range(n):
        graph.add_memory(i)
        for j in range(i):
            graph.add_edge(i, j, EdgeKind.DERIVED_FROM)
    return graph


def test_max_scan_bounds_the_edges_gathered_on_a_link_dense_graph() -> None:
    graph = dense(300)
    whole = graph.spread({0: 1.0, 1: 0.5}, hops=2, max_nodes=2000, fanout=400, max_scan=10**9)
    assert len(whole.reached) == 300
    assert len(whole.edges[0]) == 300 * 299 // 2
    bounded = graph.spread({0: 1.0, 1: 0.5}, hops=2, max_nodes=2000, fanout=400, max_scan=1000)
    # The walk stops once it has read 1,000 adjacency entries: the first seed's 299 and most of the second's.
    assert {0, 1} <= set(bounded.reached) and len(bounded.reached) == 300
    # Collecting the edges reads at most max_scan entries, plus one node's worth of overshoot (its reached set).
    assert 0 < len(bounded.edges[0]) <= 1000 + 300
    # The seeds' edges come first: the best seed keeps every one of its edges.
    assert sum(1 for a, b in zip(*bounded.edges[:2], strict=True) if 0 in (a, b)) == 299


def test_max_scan_stops_the_walk_and_keeps_every_seed() -> None:
    graph = MemoryGraph()
    graph.add_memory("seed")
    graph.add_memory("other seed")
    for i in range(50):
        graph.add_memory(f"a{i}")
        graph.add_edge("seed", f"a{i}", EdgeKind.LINK)
        for j in range(100):
            graph.add_memory(f"b{i}.{j}")
            graph.add_edge(f"a{i}", f"b{i}.{j}", EdgeKind.LINK)
    seeds = {"seed": 1.0, "other seed": 0.2}
    assert len(graph.reach(seeds, hops=2, max_nodes=10_000, fanout=200, max_scan=10**9)) == 50 + 50 * 100
    # 50 entries for the seed's hop, then 101 for each a (its seed, its b's): three of them, and the first
    # 47 entries of the fourth (its seed and 46 b's) spend the 400.
    reached = graph.reach(seeds, hops=2, max_nodes=10_000, fanout=200, max_scan=400)
    assert len(reached) == 50 + 3 * 100 + 46
    results = {r.id for r in graph.expand(seeds, k=10_000, max_scan=400)}
    assert {"seed", "other seed"} <= results


def test_a_strongly_connected_memory_outranks_a_weak_seed() -> None:
    graph = MemoryGraph()
    for name in ("top", "second", "weak", "bridge"):
        graph.add_memory(name)
    graph.add_edge("top", "bridge", EdgeKind.LINK)
    graph.add_edge("second", "bridge", EdgeKind.LINK)
    ranked = [r.id for r in graph.expand({"top": 1.0, "second": 0.9, "weak": 0.2}, k=4)]
    assert ranked.index("bridge") < ranked.index("weak")
    # with all the weight on the seed scores, the graph only appends
    ranked = [r.id for r in graph.expand({"top": 1.0, "second": 0.9, "weak": 0.2}, k=4, seed_weight=1.0)]
    assert ranked[:3] == ["top", "second", "weak"]


def test_graphs_spread_apart_rank_on_one_scale() -> None:
    """Seeds in two cubes: each cube's graph gathers its own seeds' neighbourhood, and PageRank runs over
    both at once. The scores equal those of one graph holding both cubes (with an isolated seed, whose rank
    restarts at every seed, and a seed its graph does not hold), so a memory linked to weak seeds in one
    cube does not rank with one linked to strong seeds in another (cube by cube, both would top their own)."""
    edges = {"one": [("s1", "x1"), ("s2", "x1")], "two": [("t1", "x2"), ("t2", "x2"), ("w", "t2")]}
    alone_in = {"one": ["iso"], "two": []}
    seeds = {"s1": 1.0, "s2": 0.8, "iso": 0.9, "t1": 0.35, "t2": 0.3, "w": 0.0, "gone": 0.95}
    graphs = {name: MemoryGraph() for name in edges}
    union = MemoryGraph()
    for name, pairs in edges.items():
        for graph in (graphs[name], union):
            for memory_id in alone_in[name]:
                graph.add_memory(memory_id)
            for a, b in pairs:
                graph.add_memory(a)
                graph.add_memory(b)
                graph.add_edge(a, b, EdgeKind.LINK)
    scaled = scale_seeds(seeds)
    home = {m: name for name, pairs in edges.items() for pair in pairs for m in pair} | {"iso": "one", "gone": "one"}
    parts = [graph.spread({m: v for m, v in scaled.items() if home[m] == name}) for name, graph in graphs.items()]
    apart = {e.id: e.score for e in combine(parts)}
    together = {e.id: e.score for e in union.expand(seeds, k=20)}
    assert apart.keys() == together.keys()
    for memory_id, score in together.items():
        assert apart[memory_id] == pytest.approx(score, abs=1e-4)
    assert apart["x1"] > 2 * apart["x2"] > 0
    # Each graph alone gives its own linked memory the whole inflow scale: x2 would tie with x1.
    alone = [
        {e.id: e.score for e in graph.expand(dict(p.seeds), k=20)}
        for graph, p in zip(graphs.values(), parts, strict=True)
    ]
    assert alone[0]["x1"] == pytest.approx(alone[1]["x2"], abs=0.05)


def test_seeds_unknown_to_the_graph_keep_their_score() -> None:
    graph = MemoryGraph()
    graph.add_memory("known")
    results = graph.expand({"known": 0.5, "unknown": 1.0}, k=5)
    assert [(r.id, r.via) for r in results] == [("unknown", "seed"), ("known", "seed")]
    assert graph.expand({}, k=5) == []


def test_sequence_edges_follow_turn_order() -> None:
    graph = MemoryGraph()
    graph.add_memory("t1", session="s", turn=1)
    graph.add_memory("t3", session="s", turn=3)
    graph.add_memory("t2", session="s", turn=2)  # arrives late: sits between t1 and t3
    graph.add_memory("other", session="s2", turn=2)
    assert {(o, kind) for o, kind, _ in graph.edges("t2")} == {("t1", "sequence"), ("t3", "sequence")}
    assert {o for o, _, _ in graph.edges("t1")} == {"t2"}
    graph.remove_memory("t2")
    assert {o for o, _, _ in graph.edges("t1")} == {"t3"}  # the chain is mended
    assert graph.edges("other") == []


def test_knn_edges_respect_the_floor() -> None:
    graph = MemoryGraph(knn_floor=0.6)
    for name in "abc":
        graph.add_memory(name)
    assert graph.add_knn("a", [("b", 0.8), ("c", 0.4), ("missing", 0.9)]) == 1
    assert graph.edges("a") == [("b", "knn", 0.8)]


def test_a_very_common_entity_is_not_traversed() -> None:
    graph = MemoryGraph()
    for i in range(200):
        graph.add_memory(i, entities=["everyone"] + (["rare"] if i in (0, 150) else []))
    assert graph.mentions("everyone") == 200
    vias = via_of(graph.expand({0: 1.0}, k=50))
    assert vias == {0: "seed", 150: "graph:entity(rare)<-0"}


def test_entity_hubs_stay_linear_in_mentions() -> None:
    graph = MemoryGraph()
    for i in range(500):
        graph.add_memory(i, entities=["common"])
    assert graph.graph.number_of_edges() == 500  # one hub, not 500 * 499 / 2 pairwise edges


def test_updates_replace_entities_and_keep_age() -> None:
    graph = MemoryGraph(max_nodes=2)
    graph.add_memory("a", entities=["x"], colour="red")
    graph.add_memory("b", entities=["x"])
    assert graph.add_memory("a", entities=["y"], size=3) == []
    assert graph.entities("a") == {"y"}
    assert graph.attrs("a") == {"colour": "red", "size": 3}
    assert graph.mentions("x") == 1
    assert graph.add_memory("c") == ["a"]  # still the oldest


def test_bounded_size_evicts_the_oldest() -> None:
    graph = MemoryGraph(max_nodes=3)
    evicted = [graph.add_memory(i, entities=[f"e{i}", "shared"], session="s", turn=i) for i in range(5)]
    assert evicted == [[], [], [], [0], [1]]
    assert list(graph.memory_ids()) == [2, 3, 4]
    assert len(graph) == 3
    assert graph.mentions("e0") == 0
    assert graph.mentions("shared") == 3
    assert "e0" not in graph.known_entities
    assert 0 not in graph
    assert graph.graph.number_of_nodes() == 3 + 4  # memories + hubs e2, e3, e4, shared
    assert {o for o, _, _ in graph.edges(2)} == {3}


def test_edge_api_validates() -> None:
    graph = MemoryGraph()
    graph.add_memory("a")
    graph.add_memory("b")
    assert not graph.add_edge("a", "a", EdgeKind.LINK)
    assert not graph.add_edge("a", "missing", EdgeKind.LINK)
    with pytest.raises(ValueError, match="entity edges"):
        graph.add_edge("a", "b", EdgeKind.ENTITY)
    with pytest.raises(ValueError, match="positive"):
        graph.add_edge("a", "b", EdgeKind.KNN, 0.0)
    graph.add_edge("a", "b", "link")
    graph.add_edge("a", "b", "knn", 0.7)
    assert graph.remove_edge("a", "b", "knn")
    assert graph.edges("a") == [("b", "link", 1.0)]
    assert graph.remove_edge("a", "b")
    assert not graph.remove_edge("a", "b")


def test_max_links_bounds_the_links_a_graph_holds() -> None:
    graph = MemoryGraph(max_links=4)
    for name in "abcdef":
        graph.add_memory(name, entities=[])
    assert graph.add_edge("a", "b", EdgeKind.LINK, label="about")
    assert graph.add_edge("a", "b", EdgeKind.LINK, label="cites")  # another label: another link
    assert graph.add_edge("b", "a", EdgeKind.KNN, 0.8)
    assert graph.add_edge("c", "d", EdgeKind.DERIVED_FROM)
    assert graph.links == 4
    assert not graph.add_edge("e", "f", EdgeKind.LINK)  # full: a new link is not held
    assert not graph.add_edge("a", "b", EdgeKind.LINK, label="third")
    assert graph.edges("e") == []
    assert graph.add_edge("b", "a", EdgeKind.KNN, 0.9)  # reweighing one it holds adds none
    assert graph.add_edge("a", "b", EdgeKind.SEQUENCE)  # nor does an edge that is not a link
    assert graph.links == 4
    # Every way a link goes frees its place: removed alone, with its edge, or with its memory.
    assert graph.remove_edge("a", "b", EdgeKind.LINK, label="cites")
    assert graph.links == 3 and graph.add_edge("e", "f", EdgeKind.LINK)
    assert graph.remove_edge("e", "f")
    assert graph.remove_memory("a")
    assert graph.links == 1  # c -> d
    assert graph.add_edge("e", "f", EdgeKind.LINK) and graph.add_edge("b", "c", EdgeKind.LINK, label="x")
    assert graph.add_edge("c", "b", EdgeKind.KNN, 0.7) and graph.links == 4
    assert not graph.add_edge("d", "e", EdgeKind.KNN, 0.7)


def test_links_each_way_are_kept_apart_as_a_rebuild_has_them() -> None:
    """A knn link from each of two memories to the other is one edge weighing the larger, whatever the order
    they came in; removing one memory's links (it was re-embedded) leaves the other's link to it, as a graph
    built afresh from the stored links has it."""

    def fresh() -> MemoryGraph:
        graph = MemoryGraph()
        for name in ("a", "b", "c"):
            graph.add_memory(name, entities=[])
        return graph

    incremental = fresh()
    incremental.add_edge("b", "a", EdgeKind.KNN, 0.82)
    incremental.add_edge("a", "b", EdgeKind.KNN, 0.875)
    incremental.add_edge("a", "c", EdgeKind.KNN, 0.6)
    backwards = fresh()
    backwards.add_edge("a", "c", EdgeKind.KNN, 0.6)
    backwards.add_edge("a", "b", EdgeKind.KNN, 0.875)
    backwards.add_edge("b", "a", EdgeKind.KNN, 0.82)
    assert sorted(incremental.edges("a")) == sorted(backwards.edges("a")) == [("b", "knn", 0.875), ("c", "knn", 0.6)]

    # "a" is re-embedded: its own knn links go; "b"'s link to it stays (in Postgres and so in a rebuild).
    assert incremental.remove_edge("a", "b", EdgeKind.KNN)
    assert incremental.remove_edge("a", "c", EdgeKind.KNN)
    rebuilt = fresh()
    rebuilt.add_edge("b", "a", EdgeKind.KNN, 0.82)
    assert incremental.edges("a") == rebuilt.edges("a") == [("b", "knn", 0.82)]
    seeds = {"c": 1.0, "b": 0.5}
    assert incremental.expand(seeds, k=3) == rebuilt.expand(seeds, k=3)
    # A direction never written is not there to remove.
    assert not rebuilt.remove_edge("a", "b", EdgeKind.KNN)
    assert rebuilt.edges("a") == [("b", "knn", 0.82)]

    # A memory that leaves takes its links with it: back again, it has none of their weight.
    incremental.remove_memory("b")
    incremental.add_memory("b", entities=[])
    incremental.add_edge("a", "b", EdgeKind.KNN, 0.7)
    assert incremental.edges("a") == [("b", "knn", 0.7)]
    assert incremental.remove_edge("a", "b", EdgeKind.KNN)
    assert incremental.edges("a") == []


def test_spread_passes_only_through_admitted_memories() -> None:
    """With ``admit``, an edge to a memory outside it (or, with ``now``, to an expired one) leads nowhere: what lies behind it is not reached
    through it, and no ``via`` names it."""
    graph = MemoryGraph()
    for name in ("seed", "blocked", "behind", "open", "beyond"):
        graph.add_memory(name, entities=[])
    graph.add_edge("seed", "blocked", EdgeKind.LINK)
    graph.add_edge("blocked", "behind", EdgeKind.LINK)
    graph.add_edge("seed", "open", EdgeKind.LINK)
    graph.add_edge("open", "beyond", EdgeKind.LINK)
    everything = graph.spread({"seed": 1.0})
    assert everything.reached["behind"] == "graph:link<-blocked"
    admitted = graph.spread({"seed": 1.0}, admit={"behind", "open", "beyond"})
    assert admitted.memories() == ["open", "beyond"]
    assert admitted.reached["beyond"] == "graph:link<-open"
    assert [e.id for e in combine([admitted])] == ["seed", "open", "beyond"]
    # An expired memory is not visited either, from the moment it expires; a new expiry (a PATCH) counts.
    graph.add_memory("blocked", entities=[], expires_at=100.0)
    assert graph.spread({"seed": 1.0}, now=99.0).reached["behind"] == "graph:link<-blocked"
    assert "blocked" not in graph.spread({"seed": 1.0}, now=100.0).reached
    assert graph.spread({"seed": 1.0}, now=100.0).memories() == ["open", "beyond"]
    graph.add_memory("blocked", entities=[], expires_at=None)
    assert graph.spread({"seed": 1.0}, now=200.0).reached["behind"] == "graph:link<-blocked"


def test_reach_is_what_spread_reaches_without_its_edges() -> None:
    """A filtered search checks the memories ``reach`` names before its one ``spread``: they must be the ones
    ``spread`` reaches, on graphs with links, sequences, entities, caps and expiry."""
    rng = random.Random(5)
    graph = MemoryGraph()
    names = [f"m{i}" for i in range(300)]
    for i, name in enumerate(names):
        graph.add_memory(
            name,
            entities=[f"e{rng.randrange(40)}" for _ in range(2)],
            metadata={"session": i // 20, "turn": i % 20},
            expires_at=50.0 if i % 37 == 0 else None,
        )
    for _ in range(400):
        a, b = rng.sample(names, 2)
        graph.add_edge(a, b, rng.choice([EdgeKind.LINK, EdgeKind.KNN]), rng.random())
    for trial in range(20):
        seeds = {name: rng.random() for name in rng.sample(names, 5)}
        for hops, most, now in ((1, 2000, None), (2, 2000, 100.0), (2, 60 + trial, None), (3, 150, 10.0)):
            assert graph.reach(seeds, hops, most, now=now) == graph.spread(seeds, hops, most, now=now).memories()


def test_edge_weights_are_applied_at_query_time() -> None:
    graph = MemoryGraph()
    for name in ("seed", "by-link", "by-sequence"):
        graph.add_memory(name)
    graph.add_edge("seed", "by-link", EdgeKind.LINK)
    graph.add_edge("seed", "by-sequence", EdgeKind.SEQUENCE)
    assert [r.id for r in graph.expand({"seed": 1.0}, k=3)][1] == "by-link"
    graph.weights = EdgeWeights(sequence=3.0)
    assert [r.id for r in graph.expand({"seed": 1.0}, k=3)][1] == "by-sequence"


def test_expand_on_a_100k_memory_graph() -> None:
    """Not a timed assertion: builds a 100k-memory graph and shows expansion stays local (time printed)."""
    rng = random.Random(0)
    graph = MemoryGraph(max_nodes=100_000)
    started = time.perf_counter()
    for i in range(100_000):
        entities = [f"topic{rng.randrange(5000)}", f"name{int(rng.paretovariate(1.2))}"]
        graph.add_memory(i, entities=entities, session=f"s{i // 25}", turn=i % 25)
        if i > 10:
            graph.add_knn(i, [(rng.randrange(i), 0.6), (i - rng.randrange(1, 10), 0.8)])
    built = time.perf_counter() - started
    seeds = {rng.randrange(100_000): 1.0 / (61 + rank) for rank in range(20)}
    started = time.perf_counter()
    results = graph.expand(seeds, k=50, max_nodes=2000)
    took = time.perf_counter() - started
    print(f"\n100k-memory graph: built in {built:.1f}s, expand(20 seeds, max_nodes=2000) in {took * 1000:.1f} ms")
    assert len(results) == 50
    assert sum(r.via == "seed" for r in results) >= 1
    assert all(r.via == "seed" or r.via.startswith("graph:") for r in results)


# -- selection ------------------------------------------------------------------------------


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


CANDIDATES = [("a", 1.0), ("a-paraphrase", 0.95), ("b", 0.7), ("c", 0.7), ("a-again", 0.9)]
VECTORS = {
    "a": unit(1, 0, 0),
    "a-paraphrase": unit(1, 0.05, 0),
    "a-again": unit(1, 0, 0.05),
    "b": unit(0, 1, 0),
    "c": unit(0, 0, 1),
}


def test_mmr_without_diversity_is_score_order() -> None:
    picked = mmr(CANDIDATES, VECTORS, k=5, diversity=0.0)
    assert picked == [("a", 1.0), ("a-paraphrase", 0.95), ("a-again", 0.9), ("b", 0.7), ("c", 0.7)]
    assert mmr(CANDIDATES, None, k=2, diversity=0.8) == picked[:2]  # nothing to judge redundancy by


def test_mmr_with_diversity_skips_near_duplicates() -> None:
    picked = [cid for cid, _ in mmr(CANDIDATES, VECTORS, k=3, diversity=0.7)]
    assert picked == ["a", "b", "c"]


def test_mmr_tolerates_missing_vectors_and_edge_cases() -> None:
    partial = {"a": VECTORS["a"], "a-paraphrase": VECTORS["a-paraphrase"]}
    picked = [cid for cid, _ in mmr(CANDIDATES, partial, k=2, diversity=0.7)]
    assert picked == ["a", "a-again"]  # no vector, no known redundancy: relevance decides
    assert mmr(CANDIDATES, VECTORS, k=0, diversity=0.5) == []
    assert mmr([], VECTORS, k=3, diversity=0.5) == []
    assert len(mmr(CANDIDATES, VECTORS, k=50, diversity=0.5)) == len(CANDIDATES)
    with pytest.raises(ValueError, match="diversity"):
        mmr(CANDIDATES, VECTORS, k=2, diversity=1.5)


def test_entity_coverage_without_vectors() -> None:
    candidates = [("m1", 1.0), ("m2", 0.9), ("m3", 0.8)]
    entities = {"m1": {"caroline", "sweden"}, "m2": {"caroline", "sweden"}, "m3": {"melanie"}}
    assert [cid for cid, _ in coverage(candidates, entities, k=2, diversity=0.6)] == ["m1", "m3"]
    assert [cid for cid, _ in coverage(candidates, entities, k=2, diversity=0.0)] == ["m1", "m2"]


def test_clear_links_drops_a_memorys_links_and_keeps_its_entities_and_session() -> None:
    g = MemoryGraph()
    for name, text, turn in (("a", "Melanie went to Zanzibar.", 1), ("b", "Zanzibar again.", 2), ("c", "Other.", 3)):
        g.add_memory(name, text=text, session="s", turn=turn)
    g.add_edge("a", "c", EdgeKind.LINK, 2.0, label="about")
    g.add_edge("c", "a", EdgeKind.DERIVED_FROM)
    g.add_edge("a", "b", EdgeKind.KNN, 0.8)
    g.add_edge("b", "c", EdgeKind.KNN, 0.7)
    assert g.links == 4
    assert g.clear_links("a") == 2  # two neighbours' edges changed
    assert g.links == 1  # b -> c stays
    kinds = {(other, kind) for other, kind, _ in g.edges("a")}
    assert kinds == {("b", "sequence")}, "the session's sequence edge stays; the links went"
    assert "zanzibar" in g.entities("a")
    assert g.add_edge("a", "c", EdgeKind.LINK, 1.0, label="about")  # and links come back as new ones
    assert g.links == 2

"""The semantic cache on the dev pairs and at 100k entries: quality through the service, decision latency.

Quality (per dataset, ``../shared/data/semcache/*-dev.jsonl``): every pair is a one-entry cache, as the
datasets intend: store ``a`` (with its conversation for context-dev), look up ``b``, then delete the
entry. It runs through the real service (``SemCacheService.store``/``lookup``, the memories write
path, Postgres, the in-memory index, the real embedder) on an embedded Postgres, in two cubes:

- ``plain``: a single global cosine threshold (0.85, as GPTCache or RedisVL use it): a category with
  every guard disabled and context ignored;
- ``memos``: the cube's defaults, nothing tuned per dataset.

``same_answer`` (``paraphrase`` for QQP) says whether a hit is right. hit rate = hits / pairs; precision =
correct hits / hits; recall = correct hits / pairs that should hit. From the plain run's similarities
the table also shows a plain threshold fitted on the very data it is scored on (best F1, and the highest
reaching the target recall), which flatters the baseline.

Latency: one cube of 100,000 cached entries (the QQP ``a`` questions replicated with their real MiniLM
vectors plus a little noise, written straight into Postgres), looked up with QQP ``b`` questions,
in-process (``SemCacheService.lookup``) and through HTTP (``memos serve`` in a subprocess, httpx over
127.0.0.1): a first pass embeds each query (including embedding), a second repeats them (the query LRU
answers: excluding embedding).

``--core`` evaluates ``memos.semcache.decide()`` alone (no database, no service), with a threshold sweep:
the fast loop used to tune the decision core. Embeddings are cached in ``--cache`` (an ``.npz``), so a
second run embeds nothing. Nothing here asserts a target: figures are reported as they are.

    python -m bench.semcache                       # quality through the service + latency at 100k
    python -m bench.semcache --only traps --skip-latency
    python -m bench.semcache --core                # the decision core alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import psycopg
from litestar import Litestar

from bench.bulk import copy_memories
from bench.locomo import machine
from memos.app import create_app
from memos.cubes.schemas import CubeIn
from memos.embed import DEFAULT_MODEL
from memos.identity.principal import OPERATOR, Principal
from memos.identity.schemas import TenantIn
from memos.memories.ann import EXACT_CUBE_MAX
from memos.semcache.context import Turn, as_turns, context_facts, context_text
from memos.semcache.decide import Candidate, Decision, decide
from memos.semcache.guards import GUARD_NAMES, analyze
from memos.semcache.policy import DEFAULT_POLICY, CachePolicy
from memos.semcache.schemas import ConfigIn, LookupIn, StoreIn, TurnIn
from memos.semcache.service import SemCacheService
from memos.settings import Settings


def _data_dir() -> Path:
    """``shared/data/semcache`` beside the checkout (a worktree may sit one level deeper than the main one)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "semcache"
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "semcache"


DATA_DIR = _data_dir()
DEFAULT_CACHE = Path("/tmp/semcache_vectors.npz")
OPERATOR_KEY = "bench-operator-" + "s" * 32
FIXED_THRESHOLD = 0.85
SWEEP = (0.70, 0.80, 0.85, 0.90)
TARGET_RECALL = {"traps": 0.60, "qqp": 0.45, "context": 0.80}

# The issue-4 targets, reported next to the figures, never enforced.
TARGETS = {
    "traps": "precision >= 0.95 at recall >= 0.60; negation, entity_swap, number_date, scope near 0 false hits",
    "qqp": "precision >= 0.90 at recall >= 0.45",
    "context": "no false hit on same_answer=false at recall >= 0.80",
}

Vector = npt.NDArray[np.float32]


# -- embeddings -----------------------------------------------------------------------------------


class VectorCache:
    """Text -> vector, backed by an ``.npz`` file; embeds only what the file does not hold yet."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.vectors: dict[str, Vector] = {}
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as data:
                texts = data["texts"].tolist()
                self.vectors = dict(zip(texts, data["vectors"].astype(np.float32), strict=True))

    def ensure(self, texts: Iterable[str]) -> None:
        missing = sorted({t for t in texts if t not in self.vectors})
        if not missing:
            return
        from memos.embed.registry import load_embedder

        print(f"embedding {len(missing)} texts ...", file=sys.stderr, flush=True)
        vectors = load_embedder(None).embed(missing)
        self.vectors.update(zip(missing, vectors, strict=True))
        if self.path is not None:
            texts = list(self.vectors)
            np.savez(self.path, texts=np.array(texts), vectors=np.stack([self.vectors[t] for t in texts]))

    def __getitem__(self, text: str) -> Vector:
        return self.vectors[text]


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    same: bool
    group: str
    a_context: tuple[Turn, ...] = ()
    b_context: tuple[Turn, ...] = ()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_traps(path: Path) -> list[Pair]:
    return [Pair(r["a"], r["b"], bool(r["same_answer"]), r["category"]) for r in read_jsonl(path)]


def load_qqp(path: Path) -> list[Pair]:
    return [Pair(r["a"], r["b"], bool(r["paraphrase"]), "qqp") for r in read_jsonl(path)]


def load_context(path: Path) -> list[Pair]:
    out = []
    for r in read_jsonl(path):
        a, b = as_turns(r["a"]), as_turns(r["b"])
        out.append(Pair(a[-1].content, b[-1].content, bool(r["same_answer"]), r["subtype"], a[:-1], b[:-1]))
    return out


def texts_of(pairs: Sequence[Pair]) -> set[str]:
    out: set[str] = set()
    for p in pairs:
        out.update((p.a, p.b))
        if p.a_context:
            out.add(context_text(p.a_context))
        if p.b_context:
            out.add(context_text(p.b_context))
    return out


# -- scoring --------------------------------------------------------------------------------------


@dataclass
class Score:
    pairs: int = 0
    hittable: int = 0
    hits: int = 0
    correct: int = 0

    def add(self, hit: bool, same: bool) -> None:
        self.pairs += 1
        self.hittable += same
        self.hits += hit
        self.correct += hit and same

    @property
    def false_hits(self) -> int:
        return self.hits - self.correct

    def row(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "hittable": self.hittable,
            "hits": self.hits,
            "false_hits": self.false_hits,
            "hit_rate": self.hits / self.pairs if self.pairs else None,
            "precision": self.correct / self.hits if self.hits else None,
            "recall": self.correct / self.hittable if self.hittable else None,
        }


@dataclass
class Run:
    name: str
    total: Score = field(default_factory=Score)
    groups: dict[str, Score] = field(default_factory=dict)

    def add(self, pair: Pair, hit: bool) -> None:
        self.total.add(hit, pair.same)
        self.groups.setdefault(pair.group, Score()).add(hit, pair.same)


def baseline(pairs: Sequence[Pair], sims: npt.NDArray[np.float64], threshold: float, name: str) -> Run:
    run = Run(name)
    for pair, sim in zip(pairs, sims, strict=True):
        run.add(pair, bool(sim >= threshold))
    return run


def best_f1_threshold(pairs: Sequence[Pair], sims: npt.NDArray[np.float64]) -> float:
    same = np.array([p.same for p in pairs])
    best, best_t = -1.0, FIXED_THRESHOLD
    for t in np.round(np.arange(0.50, 1.0, 0.005), 3):
        hits = sims >= t
        correct = int((hits & same).sum())
        if not hits.any() or not correct:
            continue
        precision, recall = correct / hits.sum(), correct / same.sum()
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best:
            best, best_t = f1, float(t)
    return best_t


def threshold_at_recall(pairs: Sequence[Pair], sims: npt.NDArray[np.float64], recall: float) -> float:
    """The highest threshold whose recall is still at least ``recall`` (none, for a file without a positive pair)."""
    same = np.array([p.same for p in pairs])
    positives = np.sort(sims[same])[::-1]
    if not len(positives):
        return float("inf")
    needed = max(1, int(np.ceil(recall * len(positives))))
    return float(positives[min(needed, len(positives)) - 1])


def memos_run(
    pairs: Sequence[Pair], vectors: VectorCache, latencies: list[float], *, policy: CachePolicy = DEFAULT_POLICY
) -> tuple[Run, list[Decision]]:
    default = policy.category(None)
    label = "memos decide() @ defaults" if policy is DEFAULT_POLICY else f"memos, threshold {default.threshold:.2f}"
    run = Run(label)
    decisions = []
    for i, pair in enumerate(pairs):
        candidate = Candidate(
            id=str(i),
            query=pair.a,
            vector=vectors[pair.a],
            context=pair.a_context or None,
            context_vec=vectors[context_text(pair.a_context)] if pair.a_context else None,
        )
        # the stored side is read when it is stored (the service memoizes it); the lookup side is read cold
        analyze(pair.a)
        if pair.a_context:
            context_facts(pair.a_context)
        started = time.perf_counter()
        decision = decide(
            pair.b,
            vectors[pair.b],
            [candidate],
            policy,
            context=pair.b_context or None,
            context_vec=vectors[context_text(pair.b_context)] if pair.b_context else None,
        )
        latencies.append(time.perf_counter() - started)
        decisions.append(decision)
        run.add(pair, decision.hit)
    return run, decisions


# -- reporting ------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def print_table(dataset: str, runs: Sequence[Run], *, groups: bool) -> None:
    print(f"\n## {dataset}   (target: {TARGETS[dataset]})")
    print(f"{'run':<44} {'pairs':>6} {'hits':>6} {'false':>6} {'hit rate':>9} {'precision':>9} {'recall':>7}")
    for run in runs:
        rows = [(run.name, run.total)]
        if groups:
            rows += [(f"  {name}", score) for name, score in sorted(run.groups.items())]
        for label, score in rows:
            r = score.row()
            print(
                f"{label:<44} {r['pairs']:>6} {r['hits']:>6} {r['false_hits']:>6} {_fmt(r['hit_rate']):>9} "
                f"{_fmt(r['precision']):>9} {_fmt(r['recall']):>7}"
            )


def evaluate_core(name: str, pairs: Sequence[Pair], vectors: VectorCache, *, groups: bool) -> dict[str, Any]:
    sims = np.array([float(np.dot(vectors[p.a], vectors[p.b])) for p in pairs])
    best = best_f1_threshold(pairs, sims)
    at_recall = threshold_at_recall(pairs, sims, TARGET_RECALL[name])
    latencies: list[float] = []
    mine, decisions = memos_run(pairs, vectors, latencies)
    runs = [
        baseline(pairs, sims, FIXED_THRESHOLD, f"baseline cosine >= {FIXED_THRESHOLD}"),
        baseline(pairs, sims, best, f"baseline cosine >= {best:.3f} (best F1)"),
        baseline(pairs, sims, at_recall, f"baseline cosine >= {at_recall:.3f} (at target recall)"),
        mine,
    ]
    print_table(name, runs, groups=groups)
    sweep = {}
    if name != "context":
        # not the defaults: what the same guards give if the default category's threshold were moved
        base = DEFAULT_POLICY.category(None)
        for threshold in SWEEP:
            policy = DEFAULT_POLICY.with_category(replace(base, threshold=threshold, min_threshold=0.5))
            swept, _ = memos_run(pairs, vectors, [], policy=policy)
            sweep[f"{threshold:.2f}"] = swept.total.row()
        print(
            "  memos with another default threshold (precision/recall): "
            + ", ".join(f"{t}: {_fmt(r['precision'])}/{_fmt(r['recall'])}" for t, r in sweep.items())
        )
    stages: dict[str, int] = {}
    for d in decisions:
        if not d.hit and d.rejections:
            key = d.rejections[0].stage + (
                ":" + d.rejections[0].reason.split(":")[0] if d.rejections[0].stage == "guard" else ""
            )
            stages[key] = stages.get(key, 0) + 1
    print("  memos misses by first refusal: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
    micro = sorted(x * 1e6 for x in latencies)
    print(
        "  decide() per lookup (1 candidate; stored side pre-read, lookup read cold): "
        f"p50 {statistics.median(micro):.0f} us, p99 {micro[int(0.99 * (len(micro) - 1))]:.0f} us"
    )
    return {
        "pairs": len(pairs),
        "best_f1_threshold": best,
        "target_recall_threshold": at_recall,
        "runs": {
            run.name: {"total": run.total.row(), "groups": {g: s.row() for g, s in sorted(run.groups.items())}}
            for run in runs
        },
        "miss_stages": stages,
        "memos_threshold_sweep": sweep,
        "decide_p50_us": statistics.median(micro),
    }


# -- through the service --------------------------------------------------------------------------

PLAIN_CONFIG = {
    "default": "plain",
    "categories": {
        "plain": {
            "threshold": FIXED_THRESHOLD,
            "min_threshold": 0.5,
            "context": "ignore",
            "disabled_guards": sorted(GUARD_NAMES),
        }
    },
}
WORKERS = 4
"""Pairs evaluated at once, each worker with its own two cubes (a cube never holds two pairs' entries)."""


@dataclass
class Harness:
    """An in-process memos app on an embedded Postgres, and a tenant admin to act as."""

    app: Litestar
    principal: Principal
    admin_key: str
    tenant_id: uuid.UUID

    @property
    def cache(self) -> SemCacheService:
        service: SemCacheService = self.app.state.semcache
        return service

    async def cube(self, name: str, config: dict[str, Any] | None = None) -> uuid.UUID:
        cube = await self.app.state.cubes.create(self.principal, CubeIn(name=f"{name}-{uuid.uuid4().hex[:8]}"))
        if config is not None:
            await self.cache.put_config(self.principal, ConfigIn(cube_id=cube.id, **config))
        return uuid.UUID(str(cube.id))


@asynccontextmanager
async def harness(data_dir: Path, query_lru: int) -> AsyncIterator[Harness]:
    settings = Settings(
        data_dir=data_dir, operator_key=OPERATOR_KEY, log_level="WARNING", cache_query_lru=query_lru, db_pool_size=12
    )
    app = create_app(settings)
    async with app.lifespan():
        worker = app.state.embed_worker
        await worker.wait_ready()
        created = await app.state.identity.create_tenant(OPERATOR, TenantIn(name="bench"))
        principal = Principal(role="admin", agent_id=created.admin_agent_id, tenant_id=created.id)
        yield Harness(app, principal, created.admin_key, created.id)


def _turns(turns: Sequence[Turn]) -> list[str | TurnIn] | None:
    return [TurnIn(role=t.role, content=t.content) for t in turns] if turns else None  # type: ignore[arg-type]


async def service_run(h: Harness, pairs: Sequence[Pair]) -> tuple[Run, Run, list[float], dict[str, int]]:
    """Every pair through the service in a plain cube and a memos cube; the plain run's similarities too."""
    plain, mine = Run(f"plain cosine >= {FIXED_THRESHOLD} (service)"), Run("memos @ defaults (service)")
    outcomes: list[tuple[Pair, bool, bool, float]] = [None] * len(pairs)  # type: ignore[list-item]
    reasons: dict[str, int] = {}
    next_pair = iter(range(len(pairs)))
    done = [0]

    async def worker() -> None:
        plain_cube = await h.cube("plain", PLAIN_CONFIG)
        memos_cube = await h.cube("memos")
        for i in next_pair:
            pair = pairs[i]
            hits = []
            similarity = 0.0
            for cube in (plain_cube, memos_cube):
                stored = await h.cache.store(
                    h.principal,
                    StoreIn(cube_id=cube, query=pair.a, response=f"answer {i}", context=_turns(pair.a_context)),
                )
                found = await h.cache.lookup(
                    h.principal, LookupIn(cube_id=cube, query=pair.b, context=_turns(pair.b_context))
                )
                hits.append(found.hit and found.memory_id == stored.id)
                if cube == plain_cube:
                    similarity = found.similarity if found.similarity is not None else 0.0
                elif not found.hit:
                    key = (
                        found.reason.split(" refused at the ")[-1].split(" stage")[0]
                        if "refused" in found.reason
                        else "other"
                    )
                    if key == "guard":
                        key += ":" + found.reason.split("stage: ")[1].split(":")[0]
                    reasons[key] = reasons.get(key, 0) + 1
                await h.app.state.memories.delete(h.principal, stored.id, None)
            outcomes[i] = (pair, hits[0], hits[1], similarity)
            done[0] += 1
            if done[0] % 2000 == 0:
                print(f"  ... {done[0]} of {len(pairs)} pairs", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    sims = []
    for pair, plain_hit, memos_hit, similarity in outcomes:
        plain.add(pair, plain_hit)
        mine.add(pair, memos_hit)
        sims.append(similarity)
    return plain, mine, sims, reasons


async def evaluate_service(
    h: Harness, name: str, pairs: Sequence[Pair], vectors: VectorCache, *, groups: bool
) -> dict[str, Any]:
    # The query LRU is the service's own; filling it from the embedding cache saves re-embedding 40k texts.
    tenant_id, _ = h.principal.tenant_member()
    for text in texts_of(pairs):
        h.cache.vectors.put(tenant_id, text, vectors[text])
    started = time.perf_counter()
    plain, mine, sims_list, reasons = await service_run(h, pairs)
    seconds = time.perf_counter() - started
    sims = np.array(sims_list)
    best = best_f1_threshold(pairs, sims)
    at_recall = threshold_at_recall(pairs, sims, TARGET_RECALL[name])
    runs = [
        plain,
        baseline(pairs, sims, best, f"plain cosine >= {best:.3f} (best F1, fitted)"),
        baseline(pairs, sims, at_recall, f"plain cosine >= {at_recall:.3f} (at target recall, fitted)"),
        mine,
    ]
    print_table(name, runs, groups=groups)
    print("  memos misses by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    print(f"  {len(pairs)} pairs x 2 cubes (store, lookup, delete) in {seconds:.0f} s")
    return {
        "pairs": len(pairs),
        "seconds": round(seconds, 1),
        "best_f1_threshold": best,
        "target_recall_threshold": at_recall,
        "runs": {
            run.name: {"total": run.total.row(), "groups": {g: sc.row() for g, sc in sorted(run.groups.items())}}
            for run in runs
        },
        "miss_stages": reasons,
    }


# -- latency at 100k ------------------------------------------------------------------------------

NOISE = 0.02
"""Per-dimension noise on a replica's vector (cosine ~0.93 to its original), as bench/search_scale.py does."""


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def fill(url: str, h: Harness, cube_id: uuid.UUID, texts: list[str], vectors: VectorCache, n: int) -> float:
    """``n`` response memories in one cube, straight into Postgres by binary COPY: replicas of ``texts``."""
    from pgvector.psycopg import register_vector
    from psycopg.types.json import Jsonb

    rng = np.random.default_rng(7)

    # The vectors come from the bundled model (VectorCache); lookups compare only vectors of the same model.
    agent, model = h.principal.agent_id, DEFAULT_MODEL

    def rows() -> Iterator[list[Any]]:
        for i in range(n):
            text = texts[i % len(texts)]
            vector = vectors[text] + rng.normal(0, NOISE, size=vectors[text].shape).astype(np.float32)
            vector /= np.linalg.norm(vector)
            metadata = Jsonb({"query": text, "category": "default"})
            answer = f"cached answer {i}"
            yield [uuid.uuid4(), h.tenant_id, cube_id, "response", "active", 1, answer, metadata, agent, vector, model]

    started = time.perf_counter()
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        register_vector(conn)
        copy_memories(conn, rows(), indexed=n >= EXACT_CUBE_MAX)
    return time.perf_counter() - started


def summary(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "n": len(ordered)}


async def latency_in_process(h: Harness, cube_id: uuid.UUID, queries: list[str]) -> dict[str, Any]:
    cache = h.cache
    started = time.perf_counter()
    state = await cache.indexes.state(cube_id, h.principal.tenant_member()[0])
    await cache.indexes.index(state)
    if state.building is not None:
        await state.building
    assert state.index is not None, "the index build failed (see the log)"
    build_s = time.perf_counter() - started
    cache.vectors.clear()
    out: dict[str, Any] = {"index_build_seconds": round(build_s, 1), "index_entries": len(state.index)}
    hits = 0
    for label in ("including_embedding", "excluding_embedding"):  # the first pass embeds, the second repeats
        took = []
        for query in queries:
            t0 = time.perf_counter()
            result = await cache.lookup(h.principal, LookupIn(cube_id=cube_id, query=query))
            took.append((time.perf_counter() - t0) * 1000)
            hits += result.hit and label == "excluding_embedding"
            assert result.via == "index", result
        out[label] = summary(took)
    out["hit_rate"] = round(hits / len(queries), 3)
    return out


def latency_http(url: str, admin_key: str, cube_id: uuid.UUID, queries: list[str]) -> dict[str, Any]:
    """The same lookups through ``memos serve`` (a subprocess on the same Postgres) over 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATABASE_URL=url, MEMOS_OPERATOR_KEY=OPERATOR_KEY, MEMOS_LOG_LEVEL="WARNING")
    memos = str(Path(sys.executable).parent / "memos")
    proc = subprocess.Popen(
        [memos, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    auth = {"Authorization": f"Bearer {admin_key}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for _ in range(1200):
                try:
                    if http.get("/readyz").status_code == 200 and http.get("/readyz").json()["embedder"] == "ready":
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            started = time.perf_counter()
            body = {"cube_id": str(cube_id), "query": "warm-up: is the index built?"}
            while http.post("/v1/cache/lookup", json=body, headers=auth).json()["via"] != "index":
                time.sleep(0.2)
            out: dict[str, Any] = {"index_build_seconds": round(time.perf_counter() - started, 1)}
            for label in ("including_embedding", "excluding_embedding"):
                took, server = [], []
                for query in queries:
                    t0 = time.perf_counter()
                    r = http.post("/v1/cache/lookup", json={"cube_id": str(cube_id), "query": query}, headers=auth)
                    took.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200, r.text
                    server.append(r.json()["took_ms"])
                out[label] = summary(took)
                out[label + "_server"] = summary(server)
            return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def latency(h: Harness, vectors: VectorCache, data: Path, entries: int, n_queries: int) -> dict[str, Any]:
    qqp = load_qqp(data / "qqp-pairs-dev.jsonl")
    stored = list(dict.fromkeys(p.a for p in qqp))
    asked = [q for q in dict.fromkeys(p.b for p in qqp) if q not in set(stored)][:n_queries]
    vectors.ensure(stored + asked)
    cube_id = await h.cube("latency")
    url = h.app.state.db.url
    # In a thread: the service shares this event loop, and its periodic hit-counter flush holds a lock on
    # memories until its transaction commits; a fill blocking the loop waited on that lock forever (the
    # 100k pass that "stopped unfinished" before).
    fill_s = await asyncio.to_thread(fill, url, h, cube_id, stored, vectors, entries)
    print(f"\nfilled {entries:,} entries in {fill_s:.0f} s", flush=True)
    result: dict[str, Any] = {"entries": entries, "queries": len(asked), "fill_seconds": round(fill_s, 1)}
    result["in_process"] = await latency_in_process(h, cube_id, asked)
    print_latency("in-process (SemCacheService.lookup)", result["in_process"])
    result["http"] = await asyncio.to_thread(latency_http, url, h.admin_key, cube_id, asked)
    print_latency("HTTP (memos serve, httpx over 127.0.0.1)", result["http"])
    return result


def print_latency(label: str, r: dict[str, Any]) -> None:
    print(f"\n## lookup latency at 100k entries, {label}; index build {r['index_build_seconds']} s")
    print(f"{'':<28}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for key in (
        "excluding_embedding",
        "including_embedding",
        "excluding_embedding_server",
        "including_embedding_server",
    ):
        if key in r:
            row = r[key]
            print(f"{key.replace('_', ' '):<28}{row['p50']:>9}{row['p95']:>9}{row['p99']:>9}")
    print("  (targets: p50 <= 2 ms excluding query embedding, <= 12 ms including it)")


# -- main -----------------------------------------------------------------------------------------

LOADERS: dict[str, tuple[str, Callable[[Path], list[Pair]], bool]] = {
    "traps": ("traps-dev.jsonl", load_traps, True),
    "qqp": ("qqp-pairs-dev.jsonl", load_qqp, False),
    "context": ("context-dev.jsonl", load_context, True),
}


async def run_service(
    args: argparse.Namespace, datasets: dict[str, list[Pair]], vectors: VectorCache
) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="memos-semcache-") as tmp:
        async with harness(Path(tmp), query_lru=200_000) as h:
            for name, pairs in datasets.items():
                results[name] = await evaluate_service(h, name, pairs, vectors, groups=LOADERS[name][2])
            if not args.skip_latency:
                results["latency"] = await latency(h, vectors, args.data, args.entries, args.queries)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the three *-dev.jsonl files")
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="one dataset's file instead of the dev file in --data (e.g. traps=/elsewhere/traps.jsonl)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="embedding cache (.npz); 'none' to skip")
    parser.add_argument("--json", type=Path, default=Path("bench/results/semcache.json"), help="write figures here")
    parser.add_argument("--only", choices=list(LOADERS), action="append", help="evaluate only these datasets")
    parser.add_argument("--core", action="store_true", help="the decision core alone (no service, no latency)")
    parser.add_argument("--skip-latency", action="store_true", help="quality only")
    parser.add_argument("--entries", type=int, default=100_000, help="cached entries for the latency run")
    parser.add_argument("--queries", type=int, default=500, help="lookups per latency pass")
    args = parser.parse_args(argv)

    files = {name: args.data / file for name, (file, _, _) in LOADERS.items()}
    for item in args.file:
        name, _, path = item.partition("=")
        if name not in LOADERS or not path:
            parser.error(f"--file {item}: expected NAME=PATH with NAME one of {', '.join(LOADERS)}")
        files[name] = Path(path)
    chosen = args.only or list(LOADERS)
    datasets = {name: LOADERS[name][1](files[name]) for name in chosen}
    print("datasets: " + ", ".join(f"{name} = {files[name]}" for name in chosen))
    vectors = VectorCache(None if str(args.cache) == "none" else args.cache)
    vectors.ensure(t for pairs in datasets.values() for t in texts_of(pairs))

    if args.core:
        results = {
            name: evaluate_core(name, pairs, vectors, groups=LOADERS[name][2]) for name, pairs in datasets.items()
        }
    else:
        results = asyncio.run(run_service(args, datasets, vectors))
    results["files"] = {name: str(files[name]) for name in chosen}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

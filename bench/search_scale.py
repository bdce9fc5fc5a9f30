"""Search latency at scale: POST /v1/search p50/p95/p99 against one cube of 100k memories, per mode.

A real ``memos serve`` runs in a subprocess on embedded Postgres. The cube is filled straight in that
Postgres (the API would spend the better part of an hour embedding 100k texts on 2 cores): the LoCoMo dev
turns, replicated up to 100k with their real MiniLM vectors plus a little noise, so full text has the
word statistics of real conversation and HNSW the geometry of real sentence vectors. Queries are the
LoCoMo questions, embedded by the service itself: the figures include query embedding. Two suffixes search
with a metadata filter, the path that checks graph candidates against it, each matched by about one memory
in five: ``<mode>+group`` filters on ``group`` (0-4, drawn at random per memory: a filter that has nothing to
do with what the memories say), ``<mode>+speaker`` on the speaker with the most turns. The speaker filter is
the worst case for HNSW here: a turn's replicas sit together in vector space and share their speaker, so the
index scan passes whole clusters that fail the filter (thousands of rows) before it finds enough that match.

Run: ``python -m bench.search_scale [--memories 100000] [--queries 200]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from bench.bulk import copy_memories
from bench.locomo import DATA, machine, sessions, turn_text
from memos.embed.registry import load_embedder
from memos.memories.ann import EXACT_CUBE_MAX

OPERATOR_KEY = "bench-operator-" + "y" * 32
GROUPS = 5
"""Memories get a random ``metadata.group`` of 0 to GROUPS - 1 (the ``+group`` filter keeps group 0)."""
NOISE = 0.02
"""Per-dimension noise added to a replica's vector: replicas stay close to (cosine ~0.9) but not on the original."""


def corpus() -> tuple[list[dict[str, Any]], list[str]]:
    """The LoCoMo dev turns (speaker, session, turn, text) and the questions of categories 1-4."""
    data = json.loads(DATA.read_text())
    turns = [
        {"speaker": t["speaker"], "session": n, "turn": i, "text": turn_text(t)}
        for conv in data
        for n, _, ts in sessions(conv["conversation"])
        for i, t in enumerate(ts)
    ]
    questions = [qa["question"] for conv in data for qa in conv["qa"] if qa.get("category") in (1, 2, 3, 4)]
    return turns, questions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_conninfo(pgdata: Path) -> str:
    # postmaster.pid: pid, data dir, start time, port, socket directory, ...
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return f"host={lines[4]} port={lines[3]} user=postgres dbname=memos"


def fill(conninfo: str, cube_id: str, tenant_id: str, agent_id: str, n: int, turns: list[dict[str, Any]]) -> float:
    """Replicate the LoCoMo turns up to ``n`` memories with their real embeddings (plus noise), by binary COPY."""
    from pgvector.psycopg import register_vector

    tenant, cube, agent = uuid.UUID(tenant_id), uuid.UUID(cube_id), uuid.UUID(agent_id)
    embedder = load_embedder(None)
    vectors = embedder.embed([f"{t['speaker']}: {t['text']}" for t in turns])
    rng = np.random.default_rng(7)
    groups = np.random.default_rng(11)  # its own stream: the vectors' noise stays what it was

    def rows() -> Iterator[list[Any]]:
        for i in range(n):
            turn = turns[i % len(turns)]
            replica = i // len(turns)
            vector = vectors[i % len(turns)] + np.asarray(rng.normal(0, NOISE, size=vectors.shape[1]), dtype=np.float32)
            vector /= np.linalg.norm(vector)
            metadata = Jsonb(
                {
                    "speaker": turn["speaker"],
                    "session": replica * 1000 + turn["session"],
                    "turn": turn["turn"],
                    "group": int(groups.integers(GROUPS)),
                }
            )
            yield [
                uuid.uuid4(),
                tenant,
                cube,
                "plaintext",
                "active",
                1,
                turn["text"],
                metadata,
                agent,
                vector,
                embedder.name,
            ]

    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        register_vector(conn)
        copy_memories(conn, rows(), indexed=n >= EXACT_CUBE_MAX)
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(memories: int, queries: int, modes: list[str], out: Path | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="memos-scale-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(tmp), MEMOS_OPERATOR_KEY=OPERATOR_KEY, MEMOS_LOG_LEVEL="WARNING")
    memos = str(Path(sys.executable).parent / "memos")
    proc = subprocess.Popen(
        [memos, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as http:
            for _ in range(600):
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            tenant = http.post("/v1/tenants", json={"name": "scale"}, headers=_auth(OPERATOR_KEY)).json()
            auth = _auth(tenant["admin_key"])
            cube = http.post("/v1/cubes", json={"name": "big"}, headers=auth).json()
            turns, questions = corpus()
            fill_s = fill(_pg_conninfo(tmp / "pg"), cube["id"], tenant["id"], tenant["admin_agent_id"], memories, turns)
            rng = random.Random(7)
            result: dict[str, Any] = {
                "machine": machine(),
                "memories": memories,
                "queries": queries,
                "fill_seconds": round(fill_s, 1),
                "modes": {},
            }
            speaker, count = Counter(t["speaker"] for t in turns).most_common(1)[0]
            filters = {"group": {"group": 0}, "speaker": {"speaker": speaker}}
            result["filters"] = {"group": 1 / GROUPS, "speaker": round(count / len(turns), 3)}
            for name in modes:
                mode, _, filtered = name.partition("+")
                body: dict[str, Any] = {"query": questions[0], "cube_ids": [cube["id"]], "k": 10, "mode": mode}
                if filtered:
                    body["filters"] = filters[filtered]
                first = time.perf_counter()
                r = http.post("/v1/search", json=body, headers=auth)  # warms caches (and starts the graph build)
                assert r.status_code == 200, r.text
                warm_ms = (time.perf_counter() - first) * 1000
                # Graph mode answers in hybrid while the cube's graph builds in the background: measure it
                # only once the graph answers (and report how long that took).
                while any(x["via"].startswith("graph-building:") for x in r.json()["results"]):
                    time.sleep(0.5)
                    r = http.post("/v1/search", json=body, headers=auth)
                ready_s = time.perf_counter() - first
                for _ in range(10):
                    http.post("/v1/search", json=body, headers=auth)
                took: list[float] = []
                server: list[float] = []
                sizes: list[int] = []  # results per query: a fast empty answer must show up here
                for _ in range(queries):
                    body["query"] = rng.choice(questions)
                    started = time.perf_counter()
                    r = http.post("/v1/search", json=body, headers=auth)
                    took.append((time.perf_counter() - started) * 1000)
                    assert r.status_code == 200, r.text
                    server.append(r.json()["took_ms"])
                    sizes.append(len(r.json()["results"]))
                result["modes"][name] = {
                    "first_query_ms": round(warm_ms, 1),
                    "graph_ready_s": round(ready_s, 1),
                    "p50": round(statistics.median(took), 2),
                    "p95": round(pct(took, 0.95), 2),
                    "p99": round(pct(took, 0.99), 2),
                    "server_p50": round(statistics.median(server), 2),
                    "results_min": min(sizes),
                    "results_mean": round(statistics.fmean(sizes), 2),
                }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print_table(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\nsearch latency, one cube of {result['memories']:,} memories, {result['queries']} queries per mode, k=10")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}, {m['date']}; fill {result['fill_seconds']} s"
    )
    shares = result["filters"]
    print(
        f"filtered: +group (random, nothing to do with the text) matches {shares['group']:.1%} of the memories, "
        f"+speaker (shared by a turn's replicas, HNSW's worst case) {shares['speaker']:.1%}"
    )
    print(
        f"{'mode':<16}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'server p50':>12}{'first query':>13}{'ready s':>9}"
        f"{'results min/mean':>18}"
    )
    for mode, row in result["modes"].items():
        print(
            f"{mode:<16}{row['p50']:>9}{row['p95']:>9}{row['p99']:>9}{row['server_p50']:>12}{row['first_query_ms']:>13}"
            f"{row['graph_ready_s']:>9}{row['results_min']:>11} / {row['results_mean']:<5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--modes", default="vector,text,hybrid,graph,hybrid+group,graph+group,hybrid+speaker,graph+speaker"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/search_scale.json"))
    args = parser.parse_args()
    run(args.memories, args.queries, args.modes.split(","), args.out)


if __name__ == "__main__":
    main()

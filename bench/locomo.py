"""LoCoMo evidence recall: ingest the dev conversations through the memos API, then search with every mode.

One cube per conversation, one memory per dialog turn (speaker, session date and turn in metadata, turns
of a session linked in order). For each question of categories 1-4, evidence recall@k is the share of its
gold evidence turns (``qa[].evidence``) found in the top k; figures are averaged over questions. The dense
baseline embeds the raw turns with the same model and ranks by cosine in numpy, outside memos.

Run: ``python -m bench.locomo`` (``make bench`` runs it). Tune on the dev file only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from litestar import Litestar
from litestar.testing import TestClient

from bench.rawembed import RawEmbedder
from memos.app import create_app
from memos.search.indexing import embedding_text
from memos.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo-dev.json"
OPERATOR_KEY = "bench-operator-" + "x" * 32
KS = (5, 10, 25)
MODES = ("vector", "text", "hybrid", "graph")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
_DIA = re.compile(r"D\d+:\d+")


def evidence_ids(raw: list[str]) -> set[str]:
    """Gold turn ids, read leniently: 'D8:6; D9:17' holds two, 'D:11:26' means D11:26, 'D' means nothing."""
    found: set[str] = set()
    for item in raw:
        found.update(_DIA.findall(item.replace("D:", "D")))
    return found


def turn_text(turn: dict[str, Any]) -> str:
    text = str(turn["text"])
    if turn.get("blip_caption"):
        text += f" [shares a photo: {turn['blip_caption']}]"
    return text


def indexed_texts(turns: list[dict[str, Any]]) -> list[str]:
    """What the service embeds for these turns (speaker in front): the raw embedder's share of the ratio."""
    return [embedding_text("plaintext", turn_text(t), {"speaker": t["speaker"]}) for t in turns]


def sessions(conv: dict[str, Any]) -> list[tuple[int, str, list[dict[str, Any]]]]:
    out = []
    for key, turns in conv.items():
        match = re.fullmatch(r"session_(\d+)", key)
        if match and isinstance(turns, list):
            n = int(match.group(1))
            out.append((n, str(conv.get(f"session_{n}_date_time", "")), turns))
    return sorted(out, key=lambda s: s[0])


def session_items(n: int, when: str, turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch body for one session: a memory per turn, speaker, session, turn and date in metadata."""
    return [
        {
            "kind": "plaintext",
            "content": turn_text(t),
            "metadata": {"speaker": t["speaker"], "session": n, "turn": i, "dia_id": t["dia_id"], "time": when},
            "tags": [f"session-{n}"],
        }
        for i, t in enumerate(turns)
    ]


def ingest_in_flight(
    client: TestClient[Litestar], raw: RawEmbedder, data: list[dict[str, Any]], auth: dict[str, str], in_flight: int
) -> tuple[float, float, float]:
    """Seconds to batch-create every session with ``in_flight`` requests at a time, and the raw embedder's
    seconds on the same batches two ways: one after another on all its threads, and ``in_flight`` calls
    side by side on a share of them each (faster on the 2-core box: a team of two threads waits for the
    slower one at every barrier). The ratio takes the raw embedder's better figure. Paired per conversation,
    into throwaway cubes.
    """
    api_s = raw_s = side_s = 0.0
    with ThreadPoolExecutor(in_flight) as pool:
        for conv in data:
            cube = client.post("/v1/cubes", json={"name": f"{conv['sample_id']}-in-flight"}, headers=auth).json()
            url = f"/v1/cubes/{cube['id']}/memories/batch"
            batches = [
                (session_items(n, when, turns), indexed_texts(turns))
                for n, when, turns in sessions(conv["conversation"])
            ]
            started = time.perf_counter()
            codes = list(
                pool.map(lambda b, u=url: client.post(u, json={"items": b[0]}, headers=auth).status_code, batches)
            )
            api_s += time.perf_counter() - started
            assert set(codes) == {201}, codes
            raw_s += sum(raw.seconds(texts) for _, texts in batches)
            side_s += raw.side_by_side([texts for _, texts in batches], in_flight)
    return api_s, raw_s, side_s


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def recall_at(ranked: list[str], gold: set[str], k: int) -> float:
    return len(gold & set(ranked[:k])) / len(gold)


def run(
    limit_conversations: int | None,
    out: Path | None,
    data_dir: Path | None = None,
    k: int | None = None,
    source: Path = DATA,
) -> dict[str, Any]:
    # Ask with k, as a caller would, and score only the cut-offs it covers (the candidate pool depends on k).
    ks = KS if k is None else (tuple(x for x in KS if x <= k) or (k,))
    data = json.loads(source.read_text())[:limit_conversations]
    with RawEmbedder() as raw, tempfile.TemporaryDirectory(prefix="memos-locomo-") as tmp:
        # --data-dir keeps the ingested service data for later inspection; by default it is thrown away.
        settings = Settings(data_dir=data_dir or Path(tmp), operator_key=OPERATOR_KEY, log_level="WARNING")
        # The service loads its own encoder, in its embed worker (the raw embedder runs in another process:
        # bench/rawembed.py says why).
        app = create_app(settings)
        with TestClient(app, timeout=120) as client:
            return _run(client, raw, data, out, ks, source.name)


def _run(
    client: TestClient[Litestar],
    raw: RawEmbedder,
    data: list[dict[str, Any]],
    out: Path | None,
    ks: tuple[int, ...],
    source: str = DATA.name,
) -> dict[str, Any]:
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    tenant = client.post("/v1/tenants", json={"name": "locomo"}, headers=op).json()
    auth = {"Authorization": f"Bearer {tenant['admin_key']}"}

    # ---- ingest through the API, timing the raw embedder on the same texts for the throughput ratio.
    # The CPU kernels are prepared per input shape on first use (a fresh process embedded the same batches
    # 1.6-2x slower the first time): one untimed pass over every batch first, so the API and the raw
    # embedder both run warm, whichever goes first. The cold first pass is reported too.
    # Each API batch is followed by the raw embedder on the same texts (one batch per session, as sent),
    # so both see the same machine: this box's speed drifts up to 2x within minutes, and timing all of
    # one, then all of the other, moved the ratio by more than any change to the write path did.
    all_batches = [indexed_texts(turns) for conv in data for _, _, turns in sessions(conv["conversation"])]
    worker = client.app.state.embed_worker
    portal = client.blocking_portal
    portal.call(worker.wait_ready)
    deadline = time.monotonic() + 60  # the worker warms up while idle, after it is ready
    while not getattr(worker.embedder, "warmed_up", True):
        if time.monotonic() > deadline:
            raise RuntimeError("the service's encoder did not finish warming up in 60 s (see its log)")
        time.sleep(0.1)
    pass_cost = getattr(worker.embedder, "pass_cost", None)
    if pass_cost is not None:
        raw.same_passes_as(int(pass_cost))
    cold_embed_s = sum(raw.seconds(texts) for texts in all_batches)
    # The service's encoder, in its own process, on the same batches: through its embed worker, untimed,
    # nothing written (its warm-up prepared query lengths only).
    for texts in all_batches:
        portal.call(worker.embed, texts)
    # The same for the share of threads a pass gets beside another (the two-in-flight pass below).
    raw.side_by_side(all_batches, 2)
    ingest_s = raw_embed_s = 0.0
    texts_all: list[str] = []
    cubes: dict[str, dict[str, Any]] = {}
    for conv in data:
        cube = client.post("/v1/cubes", json={"name": conv["sample_id"]}, headers=auth).json()
        by_dia: dict[str, str] = {}
        dia_of: dict[str, str] = {}
        raw_texts: list[str] = []
        raw_ids: list[str] = []
        for n, when, turns in sessions(conv["conversation"]):
            items = session_items(n, when, turns)
            started = time.perf_counter()
            r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=auth)
            ingest_s += time.perf_counter() - started
            assert r.status_code == 201, r.text
            raw_embed_s += raw.seconds(indexed_texts(turns))
            made = r.json()["items"]
            for t, m in zip(turns, made, strict=True):
                by_dia[t["dia_id"]] = m["id"]
                dia_of[m["id"]] = t["dia_id"]
                raw_texts.append(turn_text(t))
                raw_ids.append(t["dia_id"])
            for prev, nxt in itertools.pairwise(made):
                r = client.post(
                    f"/v1/memories/{nxt['id']}/links", json={"to": prev["id"], "type": "next"}, headers=auth
                )
                assert r.status_code == 201, r.text
            texts_all += [i["content"] for i in items]
        cubes[conv["sample_id"]] = {"cube": cube, "dia_of": dia_of, "raw_texts": raw_texts, "raw_ids": raw_ids}

    # ---- questions
    hits: dict[str, dict[int, list[float]]] = {m: defaultdict(list) for m in ("dense-baseline", *MODES)}
    per_cat: dict[str, dict[int, dict[int, list[float]]]] = {
        m: defaultdict(lambda: defaultdict(list)) for m in ("dense-baseline", *MODES)
    }
    # recall@10 per conversation: how far apart the conversations are (the project is judged on others too).
    per_conv: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in ("dense-baseline", *MODES)}
    latency: dict[str, list[float]] = defaultdict(list)
    questions = 0
    for conv in data:
        info = cubes[conv["sample_id"]]
        raw_vectors = raw.vectors(info["raw_texts"])
        asked = [qa for qa in conv["qa"] if qa.get("category") in CATEGORIES and evidence_ids(qa.get("evidence", []))]
        query_vectors = raw.vectors([qa["question"] for qa in asked], each=True)
        for qa, q in zip(asked, query_vectors, strict=True):
            gold = evidence_ids(qa.get("evidence", []))
            questions += 1
            order = np.argsort(-(raw_vectors @ q))[: max(ks)]
            baseline = [info["raw_ids"][i] for i in order]
            for k in ks:
                value = recall_at(baseline, gold, k)
                hits["dense-baseline"][k].append(value)
                per_cat["dense-baseline"][qa["category"]][k].append(value)
            per_conv["dense-baseline"][conv["sample_id"]].append(recall_at(baseline, gold, 10))
            for mode in MODES:
                body = {"query": qa["question"], "cube_ids": [info["cube"]["id"]], "k": max(ks), "mode": mode}
                started = time.perf_counter()
                r = client.post("/v1/search", json=body, headers=auth)
                latency[mode].append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, r.text
                ranked = [info["dia_of"][x["memory"]["id"]] for x in r.json()["results"]]
                for k in ks:
                    value = recall_at(ranked, gold, k)
                    hits[mode][k].append(value)
                    per_cat[mode][qa["category"]][k].append(value)
                per_conv[mode][conv["sample_id"]].append(recall_at(ranked, gold, 10))

    # ---- ingest again with two batches in flight, as a bulk loader would send them (after the questions:
    # the extra cubes share the table and its HNSW index, and must not change what the recall figures saw).
    in_flight_s, in_flight_raw_s, side_by_side_s = ingest_in_flight(client, raw, data, auth, in_flight=2)
    best_raw_s = min(in_flight_raw_s, side_by_side_s)

    def pct(values: list[float]) -> float:
        return round(100 * statistics.fmean(values), 1) if values else float("nan")

    result: dict[str, Any] = {
        "machine": machine(),
        "data": source,
        "conversations": len(data),
        "turns": len(texts_all),
        "questions": questions,
        "recall": {m: {f"@{k}": pct(hits[m][k]) for k in ks} for m in hits},
        "recall_by_category": {
            m: {CATEGORIES[c]: {f"@{k}": pct(per_cat[m][c][k]) for k in ks} for c in sorted(per_cat[m])}
            for m in per_cat
        },
        "recall_at_10_by_conversation": {m: {c: pct(v) for c, v in per_conv[m].items()} for m in per_conv},
        "search_ms_p50": {m: round(statistics.median(v), 2) for m, v in latency.items()},
        "ingest": {
            "api_texts_per_s": round(len(texts_all) / ingest_s, 1),
            "raw_embedder_texts_per_s": round(len(texts_all) / raw_embed_s, 1),
            "ratio": round(raw_embed_s / ingest_s, 3),
            "raw_embedder_cold_texts_per_s": round(len(texts_all) / cold_embed_s, 1),
            "pass_cost_tokens": pass_cost,
            "two_in_flight": {
                "api_texts_per_s": round(len(texts_all) / in_flight_s, 1),
                "raw_embedder_texts_per_s": round(len(texts_all) / in_flight_raw_s, 1),
                "raw_embedder_side_by_side_texts_per_s": round(len(texts_all) / side_by_side_s, 1),
                "ratio": round(best_raw_s / in_flight_s, 3),
            },
        },
    }
    print_table(result, ks)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict[str, Any], ks: tuple[int, ...] = KS) -> None:
    m = result["machine"]
    print(
        f"\nLoCoMo evidence recall ({result.get('data', DATA.name)}) — {result['conversations']} conversations, "
        f"{result['turns']} turns, "
        f"{result['questions']} questions (categories 1-4)"
    )
    print(f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}, {m['date']}")
    print(f"{'mode':<16}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'p50 ms':>10}")
    for mode, row in result["recall"].items():
        p50 = result["search_ms_p50"].get(mode)
        print(f"{mode:<16}" + "".join(f"{row[f'@{k}']:>8}" for k in ks) + (f"{p50:>10}" if p50 else f"{'-':>10}"))
    print("\nrecall@10 by category")
    cats = list(CATEGORIES.values())
    print(f"{'mode':<16}" + "".join(f"{c:>13}" for c in cats))
    for mode, per in result["recall_by_category"].items():
        print(f"{mode:<16}" + "".join(f"{per.get(c, {}).get('@10', float('nan')):>13}" for c in cats))
    by_conv = result["recall_at_10_by_conversation"]
    convs = list(next(iter(by_conv.values())))
    print("\nrecall@10 by conversation")
    print(f"{'mode':<16}" + "".join(f"{c:>9}" for c in convs) + f"{'min':>8}{'max':>8}")
    for mode, per_c in by_conv.items():
        values = [per_c[c] for c in convs]
        print(f"{mode:<16}" + "".join(f"{v:>9}" for v in values) + f"{min(values):>8}{max(values):>8}")
    ing = result["ingest"]
    print(
        f"\ningest: {ing['api_texts_per_s']} memories/s through the API vs {ing['raw_embedder_texts_per_s']} "
        f"texts/s raw embedder: ratio {ing['ratio']} (both warm, taking turns batch by batch; the raw embedder's "
        f"cold first pass: {ing['raw_embedder_cold_texts_per_s']} texts/s)"
    )
    two = ing["two_in_flight"]
    print(
        f"ingest, two batches in flight: {two['api_texts_per_s']} memories/s vs the raw embedder's best of "
        f"{two['raw_embedder_texts_per_s']} texts/s one batch after another and "
        f"{two['raw_embedder_side_by_side_texts_per_s']} two side by side (paired per conversation): "
        f"ratio {two['ratio']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data", type=Path, default=DATA, help="a LoCoMo JSON file (default: the dev conversations); tune on dev only"
    )
    parser.add_argument("--conversations", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--out", type=Path, default=Path("bench/results/locomo.json"))
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the service's data here (must be new)")
    parser.add_argument("--k", type=int, default=None, help="ask with this k (default 25) and score up to it")
    args = parser.parse_args()
    run(args.conversations, args.out, args.data_dir, args.k, args.data)


if __name__ == "__main__":
    main()

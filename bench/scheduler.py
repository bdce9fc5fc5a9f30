"""The scheduler's decisions, measured: TTFT and tier hit rates of a skewed generation workload.

Two agents share a cube of ``--memories`` memories (300 words, about 300 tokens each). Each request generates one
token after one memory, drawn from a Zipf distribution (s = 1.1, a fixed seed; the ranking of memories is
reshuffled halfway, so what is hot changes), alternating agents, through ``POST /v1/generate``. A randomly
initialised causal LM (``memos dev make-model`` preset ``small``: 4 layers, 2 KV heads, head dim 32) runs on
the CPU; the service runs in process (Litestar's test client, embedded PostgreSQL in a temporary directory).
Scheduler passes are run by the bench every ``--every`` requests (as the background task would, every two
seconds), so runs are repeatable. Three runs:

1. ``prefill``: no activations and no building (what memos did before the scheduler, unless a client built
   KV itself): every request prefills its memory.
2. ``build by heat``: the same workload with ``MEMOS_BUILD_HEAT`` = 2: the scheduler builds KV of memories
   that turn hot, and promotes it.
3. ``LRU`` vs ``scheduler`` with every activation built beforehand and the same memory for KV in both:
   one host tier of ``2 x --chunks`` chunks, least recently used out (requests keep what they load, no
   passes), against a device tier of ``--chunks`` chunks filled by heat plus a host tier of ``--chunks``.

Writes ``bench/results/scheduler.json``. Figures are reported, never enforced.

    python -m bench.scheduler                # as `make bench` runs it
    python -m bench.scheduler --quick        # fewer requests
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.api_latency import machine_info
from bench.kv_ttft import WORDS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "small"
OPERATOR_KEY = "bench-operator-" + "s" * 32
ZIPF_S = 1.1


@contextmanager
def service(model_dir: Path, workdir: Path) -> Iterator[Any]:
    from litestar.testing import TestClient

    from memos.app import create_app
    from memos.kv.spec import ModelSpec
    from memos.settings import Settings

    settings = Settings(
        data_dir=workdir,
        operator_key=OPERATOR_KEY,
        log_level="WARNING",
        models={MODEL: ModelSpec(name=MODEL, path=model_dir)},
        scheduler_seconds=0,  # the bench runs the passes itself
    )
    app = create_app(settings)
    with TestClient(app, timeout=600) as client:
        yield client


def ok(r: Any, status: int = 200) -> Any:
    if r.status_code != status:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
    return r.json()


def zipf_draws(n: int, count: int, rng: random.Random) -> list[int]:
    """``count`` memory indexes, Zipf(s) over ``n`` ranks; the rank -> memory mapping reshuffled halfway."""
    weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(n)]
    order = list(range(n))
    draws = []
    for i in range(count):
        if i == count // 2:
            rng.shuffle(order)
        draws.append(order[rng.choices(range(n), weights)[0]])
    return draws


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)


def run_workload(
    client: Any,
    keys: list[str],
    memory_ids: list[str],
    draws: list[int],
    every: int | None,
    clock: RequestClock,
) -> dict[str, Any]:
    """Send the requests; a scheduler pass every ``every`` requests (None: never). Figures of the run."""
    scheduler = client.app.state.scheduler
    tiers = client.app.state.activations.tiers
    ttft: list[float] = []
    reused = prefilled = 0
    passes: list[float] = []
    built = 0
    for i, index in enumerate(draws):
        memory_id = memory_ids[index]
        body = {"model": MODEL, "prompt": "What should I remember?", "memory_ids": [memory_id], "max_new_tokens": 1}
        out = ok(client.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {keys[i % len(keys)]}"}))
        ttft.append(out["ttft_ms"])
        clock.now += 1
        reused += out["reused_tokens"]
        prefilled += out["prefill_tokens"]
        if every is not None and (i + 1) % every == 0:
            started = time.perf_counter()
            report = client.blocking_portal.call(scheduler.run_pass)
            passes.append((time.perf_counter() - started) * 1000)
            built += report.built
    stats = {s.name: s.hit_rate for s in tiers.stats()}
    return {
        "requests": len(draws),
        "ttft_ms_p50": round(statistics.median(ttft), 2),
        "ttft_ms_p95": percentile(ttft, 0.95),
        "ttft_ms_mean": round(statistics.fmean(ttft), 2),
        "reused_token_share": round(reused / max(1, reused + prefilled), 3),
        "device_hit_rate": stats.get("device"),
        "host_hit_rate": stats.get("host"),
        "store_hit_rate": tiers.store_hit_rate(),
        "built_by_scheduler": built,
        "pass_ms_p50": round(statistics.median(passes), 2) if passes else None,
        "pass_ms_max": round(max(passes), 2) if passes else None,
    }


class RequestClock:
    """Time for the heat table, counted in requests: the bench sends its requests as fast as it can, so a
    half-life in seconds would mean nothing here. ``HALF_LIFE`` requests stand for the service's hour."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


HALF_LIFE = 40.0


def fresh_state(client: Any, clock: RequestClock) -> None:
    """No heat (a heat table on the request clock), empty tiers, zeroed hit counters: each run starts alike."""
    from memos.activations.tiers import KVTiers
    from memos.scheduler.heat import HeatTable

    clock.now = 0.0
    client.app.state.scheduler.heat = HeatTable(HALF_LIFE, clock=clock)
    activations = client.app.state.activations
    old = activations.tiers
    activations.tiers = KVTiers(old.budgets["device"], old.budgets["host"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=24)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--every", type=int, default=10, help="requests between scheduler passes")
    parser.add_argument("--chunks", type=int, default=4, help="chunks the device tier holds in run 3")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.memories = 80, 12

    from memos.kv.maker import make_model

    rng = random.Random(7)
    clock = RequestClock()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", "qwen2", "small", seed=0)
        with service(model_dir, Path(tmp) / "data") as client:
            op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
            tenant = ok(client.post("/v1/tenants", json={"name": "bench"}, headers=op), 201)
            owner = tenant["admin_key"]
            auth = {"Authorization": f"Bearer {owner}"}
            agent = ok(client.post("/v1/agents", json={"name": "reader", "role": "agent"}, headers=auth), 201)
            cube = ok(client.post("/v1/cubes", json={"name": "shared"}, headers=auth), 201)
            grant = {"access": "read"}
            ok(client.put(f"/v1/cubes/{cube['id']}/grants/{agent['id']}", json=grant, headers=auth))
            keys = [owner, agent["api_key"]]
            texts = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(args.memories)]
            items = [{"kind": "plaintext", "content": t} for t in texts]
            made = ok(client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=auth), 201)
            memory_ids = [m["id"] for m in made["items"]]
            draws = zipf_draws(args.memories, args.requests, rng)
            scheduler = client.app.state.scheduler
            tiers = client.app.state.activations.tiers
            lm_bytes = ok(client.get("/v1/models", headers=auth))["items"][0]["kv_bytes_per_token"]

            # 1. prefill only
            fresh_state(client, clock)
            prefill = run_workload(client, keys, memory_ids, draws, None, clock)

            # 2. build by heat (the default budgets: everything fits)
            fresh_state(client, clock)
            scheduler.build_heat = 2.0
            building = run_workload(client, keys, memory_ids, draws, args.every, clock)
            scheduler.build_heat = 0.0

            # 3. every activation built; the same bytes for KV in memory
            tokens = []
            for memory_id in memory_ids:
                r = client.post(f"/v1/memories/{memory_id}/activations", json={"model": MODEL}, headers=auth)
                tokens.append(ok(r, 200 if r.status_code == 200 else 201)["tokens"])  # 200: built in run 2
            chunk = max(tokens) * lm_bytes
            fresh_state(client, clock)
            tiers = client.app.state.activations.tiers
            tiers.budgets.update(device=0, host=2 * args.chunks * chunk)
            lru = run_workload(client, keys, memory_ids, draws, None, clock)
            fresh_state(client, clock)
            tiers = client.app.state.activations.tiers
            tiers.budgets.update(device=args.chunks * chunk, host=args.chunks * chunk)
            heat = run_workload(client, keys, memory_ids, draws, args.every, clock)

    runs = {"prefill": prefill, "build_by_heat": building, "lru_only": lru, "scheduler": heat}
    result = {
        "machine": machine_info(),
        "model": "qwen2 'small' preset (random weights), CPU",
        "memories": args.memories,
        "tokens_per_memory": {"min": min(tokens), "max": max(tokens)},
        "requests": args.requests,
        "zipf_s": ZIPF_S,
        "pass_every_requests": args.every,
        "heat_half_life_requests": HALF_LIFE,
        "chunk_bytes": chunk,
        "runs": runs,
    }
    print(f"\nScheduler on a Zipf({ZIPF_S}) generation workload: {args.requests} requests over {args.memories}")
    print(f"memories of {min(tokens)}-{max(tokens)} tokens, two agents sharing the cube, a pass every {args.every}.")
    print(f"{'run':<16} {'TTFT p50':>9} {'p95':>8} {'reused':>7} {'device':>7} {'host':>7} {'store':>7} {'built':>6}")
    for name, r in runs.items():
        print(
            f"{name:<16} {r['ttft_ms_p50']:>9} {r['ttft_ms_p95']:>8} {r['reused_token_share']:>7} "
            f"{r['device_hit_rate']!s:>7} {r['host_hit_rate']!s:>7} {r['store_hit_rate']!s:>7} "
            f"{r['built_by_scheduler']:>6}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "scheduler.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Issue-5 figures: time to first token with and without stored KV, through ``POST /v1/generate``.

A randomly initialised model shaped like Qwen2.5-0.5B (``memos dev make-model`` preset ``qwen2.5-0.5b``:
24 layers, 2 KV heads, head dim 64) is configured through ``MEMOS_MODELS``; the service runs in process
(Litestar's test client, real HTTP semantics, embedded PostgreSQL in a temporary data directory). For
each memory size it measures:

- TTFT with a full prefill of memory + 32-token prompt (``use_activations: false``);
- TTFT with the memory's activation from the blob store (cold: host tier emptied and the file dropped
  from the OS page cache with ``posix_fadvise(DONTNEED)`` before each run);
- TTFT with the activation already decoded in RAM (warm host tier);

plus KV bytes per token against 2 x layers x kv_heads x head_dim x dtype bytes, blob-store load
bandwidth (read + sha256 check) next to a plain read of the same file, and top-1 next-token agreement
of 3-chunk compositions with a full prefill, with and without selective recompute. Targets are
reported next to the figures, never enforced. Writes ``bench/results/kv_ttft.json``.

    python -m bench.kv_ttft                 # sizes 512 2048 4096, as `make bench` runs it
    python -m bench.kv_ttft --quick         # one size, one repeat, a few compositions
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.api_latency import machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "qwen2.5-0.5b"
OPERATOR_KEY = "bench-operator-" + "k" * 32
PROMPT_TOKENS = 32
TARGET_RAM = 20.0
TARGET_STORE = 10.0
TARGET_SIZE = 2048

WORDS = [
    *("the", "agent", "remembered", "that", "a", "meeting", "with", "design", "team", "moved", "to", "thursday"),
    *("because", "lab", "was", "booked", "and", "quarterly", "report", "needs", "fresh", "numbers", "from"),
    *("sales", "database", "before", "anyone", "can", "sign", "it", "off", "while", "garden", "behind", "office"),
    *("grows", "tomatoes", "basil", "stubborn", "lemon", "tree", "nobody", "waters"),
]


def text_of(lm: Any, tokens: int, rng: random.Random, memory: bool = True) -> str:
    """Random words whose tokenization is ``tokens`` long (or one or two more: word boundaries)."""
    count = lm.memory_token_ids if memory else lm.prompt_token_ids
    words: list[str] = []
    # Grow in large steps, then trim word by word: tokenizing 4k tokens thousands of times would be slow.
    while len(count(" ".join(words))) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(max(1, (tokens - len(count(" ".join(words)))) // 2)))
    while len(words) > 1 and len(count(" ".join(words[:-1]))) >= tokens:
        words.pop()
    return " ".join(words)


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@contextlib.contextmanager
def service(model_dir: Path, workdir: Path) -> Iterator[tuple[Any, Any, Any]]:
    from litestar.testing import TestClient

    from memos.app import create_app
    from memos.kv.spec import ModelSpec
    from memos.settings import Settings

    settings = Settings(
        data_dir=workdir / "data",
        operator_key=OPERATOR_KEY,
        log_level="WARNING",
        models={MODEL: ModelSpec(name=MODEL, path=model_dir)},
    )
    app = create_app(settings)
    with TestClient(app, timeout=600) as client:
        yield app, client, settings


def ok(r: Any, status: int = 200) -> Any:
    if r.status_code != status:
        raise RuntimeError(f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text}")
    return r.json()


def measure_ttft(
    client: Any, app: Any, headers: dict[str, str], memory_id: str, prompt: str, blob: Path, repeats: int
) -> dict[str, Any]:
    def run(use_activations: bool) -> tuple[float, float, dict[str, Any]]:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "memory_ids": [memory_id],
            "max_new_tokens": 1,
            "use_activations": use_activations,
        }
        started = time.perf_counter()
        out = ok(client.post("/v1/generate", json=body, headers=headers))
        return out["ttft_ms"], (time.perf_counter() - started) * 1000.0, out

    host = app.state.activations.host
    full, cold, warm = [], [], []
    full_http, cold_http, warm_http = [], [], []
    last: dict[str, dict[str, Any]] = {}
    # Interleaved (full, store, RAM) per repeat: on a shared machine the load drifts, and measuring the
    # three one after the other in each repeat keeps the drift out of the ratios.
    for _ in range(repeats):
        ttft, wall, last["full"] = run(False)
        full.append(ttft)
        full_http.append(wall)
        host.clear()
        drop_page_cache(blob)
        ttft, wall, last["cold"] = run(True)
        cold.append(ttft)
        cold_http.append(wall)
        ttft, wall, last["warm"] = run(True)  # the cold run left the decoded KV in the host tier
        warm.append(ttft)
        warm_http.append(wall)
    if not (last["cold"]["reused_tokens"] > 0 and last["warm"]["reused_tokens"] > 0 == last["full"]["reused_tokens"]):
        raise RuntimeError(f"the activation was not used as expected: {last}")
    return {
        "full_prefill_ttft_ms": median(full),
        "store_ttft_ms": median(cold),
        "ram_ttft_ms": median(warm),
        "full_prefill_http_ms": median(full_http),
        "store_http_ms": median(cold_http),
        "ram_http_ms": median(warm_http),
        "speedup_store": median(full) / median(cold),
        "speedup_ram": median(full) / median(warm),
        "prefill_tokens_full": last["full"]["prefill_tokens"],
        "prefill_tokens_reused": last["warm"]["prefill_tokens"],
        "reused_tokens": last["warm"]["reused_tokens"],
        "same_first_token": last["full"]["token_ids"] == last["warm"]["token_ids"] == last["cold"]["token_ids"],
        "samples_ms": {"full": full, "store": cold, "ram": warm},
    }


def load_bandwidth(blobs: Any, key: str, path: Path, repeats: int) -> dict[str, Any]:
    """GB/s of the blob store's checked read next to a plain read of the same file, page cache dropped."""
    size = path.stat().st_size
    store_s, plain_s = [], []
    for _ in range(repeats):
        drop_page_cache(path)
        started = time.perf_counter()
        blobs.read(key)
        store_s.append(time.perf_counter() - started)
        drop_page_cache(path)
        started = time.perf_counter()
        with open(path, "rb") as fh:
            fh.read()
        plain_s.append(time.perf_counter() - started)
    return {
        "bytes": size,
        "blob_store_gb_s": size / median(store_s) / 1e9,
        "plain_read_gb_s": size / median(plain_s) / 1e9,
    }


def composition_agreement(lm: Any, rng: random.Random, compositions: int, chunk_tokens: int) -> dict[str, Any]:
    """Top-1 next-token agreement with a full prefill for compositions of 3 stored chunks.

    Two controls come with it: recompute_ratio 1.0 (every token after the first chunk recomputed, which
    should agree always: it checks the pipeline, not the method), and how often the next token without
    any memory equals the full prefill's (how much the memories matter to this model at all).
    """
    from memos.kv.runtime import compose, next_token_logits, prefill

    pool_texts = [text_of(lm, chunk_tokens, rng) for _ in range(12)]
    pool = [prefill(lm, lm.memory_token_ids(t)) for t in pool_texts]  # each stored at positions 0..n-1
    prompts = [text_of(lm, 16, rng, memory=False) for _ in range(8)]
    ratios = (0.0, 0.15, 1.0)
    agree = dict.fromkeys(ratios, 0)
    no_memory = 0
    started = time.perf_counter()
    for _ in range(compositions):
        picks = rng.sample(range(len(pool)), 3)
        prompt_ids = lm.prompt_token_ids(rng.choice(prompts))
        all_ids = [i for p in picks for i in pool[p].token_ids.tolist()]
        truth = int(next_token_logits(lm, prompt_ids, prefix_token_ids=all_ids, use_prefix_kv=False).argmax())
        no_memory += int(int(next_token_logits(lm, prompt_ids).argmax()) == truth)
        for ratio in ratios:
            composed = compose(lm, [pool[p] for p in picks], recompute_ratio=ratio)
            agree[ratio] += int(int(next_token_logits(lm, prompt_ids, prefix=composed).argmax()) == truth)
    return {
        "compositions": compositions,
        "chunk_tokens": chunk_tokens,
        "top1_agreement_no_recompute": agree[0.0] / compositions,
        "top1_agreement_recompute_0.15": agree[0.15] / compositions,
        "top1_agreement_recompute_1.0_control": agree[1.0] / compositions,
        "top1_same_without_memories": no_memory / compositions,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[512, 2048, 4096], help="memory sizes in tokens (none: skip TTFT)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--compositions", type=int, default=50, help="3-chunk compositions for agreement")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="tokens per composed chunk")
    parser.add_argument("--quick", action="store_true", help="one 512-token size, one repeat, 5 compositions")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a made model instead of making one")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.compositions = [512], 1, 5

    import torch

    from memos.kv.maker import make_model

    rng = random.Random(5)
    report: dict[str, Any] = {"machine": machine_info(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="memos-kv-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            started = time.perf_counter()
            model_dir = make_model(workdir / "model", "qwen2", "qwen2.5-0.5b", seed=0)
            report["make_model_s"] = time.perf_counter() - started
        with service(model_dir, workdir) as (app, client, settings):
            started = time.perf_counter()
            (info,) = ok(client.get("/v1/models", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}))["items"]
            report["model_load_s"] = time.perf_counter() - started
            report["model"] = info
            lm = app.state.activations.models.loaded(MODEL)
            tenant = ok(
                client.post("/v1/tenants", json={"name": "bench"}, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}),
                201,
            )
            headers = {"Authorization": f"Bearer {tenant['admin_key']}"}
            cube = ok(client.post("/v1/cubes", json={"name": "bench"}, headers=headers), 201)
            prompt = text_of(lm, PROMPT_TOKENS, rng, memory=False)
            blobs = app.state.activations.blobs
            sizes = []
            for size in args.sizes:
                memory = ok(
                    client.post(
                        f"/v1/cubes/{cube['id']}/memories",
                        json={"kind": "plaintext", "content": text_of(lm, size, rng)},
                        headers=headers,
                    ),
                    201,
                )
                started = time.perf_counter()
                act = ok(
                    client.post(f"/v1/memories/{memory['id']}/activations", json={"model": MODEL}, headers=headers),
                    201,
                )
                build_s = time.perf_counter() - started
                blob = settings.blob_root / act["sha256"][:2] / act["sha256"][2:4] / act["sha256"]
                row: dict[str, Any] = {
                    "tokens": act["tokens"],
                    "build_s": build_s,
                    "kv_file_bytes": act["bytes"],
                    "kv_bytes_per_token_file": act["bytes"] / act["tokens"],
                    "kv_bytes_per_token_formula": info["kv_bytes_per_token"],
                }
                row.update(measure_ttft(client, app, headers, memory["id"], prompt, blob, args.repeats))
                row.update(load_bandwidth(blobs, act["sha256"], blob, max(3, args.repeats)))
                sizes.append(row)
                print_row(row)
            report["sizes"] = sizes
            if args.compositions > 0:
                report["composition"] = composition_agreement(lm, rng, args.compositions, args.chunk_tokens)
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report["targets"] = targets(report["sizes"])
    print_report(report)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "kv_ttft.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


def targets(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at = next((s for s in sizes if abs(s["tokens"] - TARGET_SIZE) <= 8), None)
    if at is None:
        return []
    return [
        {
            "target": f">= {TARGET_RAM:.0f}x TTFT at {TARGET_SIZE} tokens from RAM",
            "measured": at["speedup_ram"],
            "met": at["speedup_ram"] >= TARGET_RAM,
        },
        {
            "target": f">= {TARGET_STORE:.0f}x TTFT at {TARGET_SIZE} tokens from the blob store",
            "measured": at["speedup_store"],
            "met": at["speedup_store"] >= TARGET_STORE,
        },
    ]


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['tokens']:>6} tokens: full {row['full_prefill_ttft_ms']:9.1f} ms | store {row['store_ttft_ms']:8.1f} ms"
        f" ({row['speedup_store']:5.1f}x) | RAM {row['ram_ttft_ms']:8.1f} ms ({row['speedup_ram']:5.1f}x)",
        flush=True,
    )


def print_report(report: dict[str, Any]) -> None:
    m, model = report["machine"], report["model"]
    print()
    print(f"machine: {m['cpu_model']} ({m['cpu_cores_usable']} usable cores), {m['ram_gib']} GiB, {m['date_utc']}")
    print(
        f"model: {model['name']} random weights, {model['layers']} layers x {model['kv_heads']} KV heads x "
        f"head dim {model['head_dim']}, {model['dtype']} on {model['device']}; torch threads {report['torch_threads']}"
    )
    print()
    header = (
        "| tokens | full prefill TTFT ms | blob store TTFT ms | x | RAM TTFT ms | x | KV B/token (file / formula) "
        "| blob store GB/s | plain read GB/s |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for s in report["sizes"]:
        print(
            f"| {s['tokens']} | {s['full_prefill_ttft_ms']:.0f} | {s['store_ttft_ms']:.0f} | {s['speedup_store']:.1f} "
            f"| {s['ram_ttft_ms']:.0f} | {s['speedup_ram']:.1f} "
            f"| {s['kv_bytes_per_token_file']:.0f} / {s['kv_bytes_per_token_formula']} "
            f"| {s['blob_store_gb_s']:.2f} | {s['plain_read_gb_s']:.2f} |"
        )
    for t in report["targets"]:
        print(f"target {t['target']}: measured {t['measured']:.1f}x -> {'met' if t['met'] else 'MISSED'}")
    c = report.get("composition")
    if c is None:
        return
    print()
    print(
        f"composition of 3 x {c['chunk_tokens']}-token chunks, {c['compositions']} draws: top-1 agreement with full "
        f"prefill {c['top1_agreement_no_recompute']:.2f} without recompute, "
        f"{c['top1_agreement_recompute_0.15']:.2f} with 15% recompute; controls: "
        f"{c['top1_agreement_recompute_1.0_control']:.2f} with 100% recompute, "
        f"{c['top1_same_without_memories']:.2f} same token with no memories at all"
    )


if __name__ == "__main__":
    raise SystemExit(main())

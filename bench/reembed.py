"""``memos admin reembed`` throughput: the LoCoMo dev turns, written through the API, re-embedded by "another" model.

The other model is the bundled all-MiniLM-L6-v2 copied to a directory: a different name (so every memory
needs re-embedding) with the same cost per text, so the tool's figure compares with the raw embedder's on the
same texts in the same batches. Both run in this process, one after the other.

Run: ``python -m bench.reembed [--conversations N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from litestar.testing import TestClient
from sqlalchemy import select

from bench.locomo import DATA, OPERATOR_KEY, machine, session_items, sessions
from memos.admin.reembed import DEFAULT_BATCH, reembed
from memos.app import create_app
from memos.embed import bundled_model_dir
from memos.embed.base import Embedder
from memos.embed.registry import load_embedder
from memos.search.indexing import embedding_text
from memos.settings import Settings
from memos.store.db import Database
from memos.store.models import memories


def _ingest(client: TestClient[Any], conversations: list[dict[str, Any]]) -> None:
    """Write every session of every conversation as one batch through the API, a cube per conversation."""
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    tenant = client.post("/v1/tenants", json={"name": "reembed"}, headers=operator).json()
    auth = {"Authorization": f"Bearer {tenant['admin_key']}"}
    for conv in conversations:
        cube = client.post("/v1/cubes", json={"name": conv["sample_id"]}, headers=auth).json()["id"]
        for n, when, turns in sessions(conv["conversation"]):
            r = client.post(
                f"/v1/cubes/{cube}/memories/batch", json={"items": session_items(n, when, turns)}, headers=auth
            )
            assert r.status_code == 201, r.text


async def _measure(settings: Settings, other: Embedder) -> dict[str, Any]:
    db = Database(settings)
    await db.start()
    try:
        started = time.perf_counter()
        report = await reembed(db, other)
        tool_s = time.perf_counter() - started
        async with db.read() as conn:
            rows = (await conn.execute(select(memories.c.kind, memories.c.content, memories.c.metadata))).all()
    finally:
        await db.stop()
    texts = [embedding_text(r.kind, r.content, r.metadata) for r in rows]
    started = time.perf_counter()
    for i in range(0, len(texts), DEFAULT_BATCH):
        other.embed(texts[i : i + DEFAULT_BATCH])
    raw_s = time.perf_counter() - started
    return {
        "memories": report.reembedded,
        "skipped": report.skipped,
        "batches": report.batches,
        "tool_s": round(tool_s, 2),
        "tool_memories_per_s": round(report.reembedded / tool_s, 1),
        "raw_embedder_s": round(raw_s, 2),
        "raw_embedder_texts_per_s": round(len(texts) / raw_s, 1),
        "ratio": round(raw_s / tool_s, 3),
    }


def run(conversations: int | None, out: Path) -> dict[str, Any]:
    data = json.loads(DATA.read_text())[:conversations]
    current = load_embedder(None)
    with tempfile.TemporaryDirectory() as tmp:
        copy = shutil.copytree(bundled_model_dir(), Path(tmp) / "minilm-copy")
        other = load_embedder(str(copy))
        other.embed(["warm up the kernels before timing"] * 8)
        settings = Settings(data_dir=Path(tmp) / "data", operator_key=OPERATOR_KEY, log_level="WARNING")
        app = create_app(settings, embedder_factory=lambda: current)
        with TestClient(app, timeout=300) as client:
            _ingest(client, data)
            # The tool runs beside the service, as it may in production, reaching its Postgres by URL.
            url = app.state.db.url
            figures = asyncio.run(_measure(dataclasses.replace(settings, database_url=url), other))
    result = {"machine": machine(), "conversations": len(data), **figures}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"reembed: {figures['memories']} memories in {figures['tool_s']} s ({figures['tool_memories_per_s']}/s, "
        f"{figures['batches']} batches) vs the raw embedder on the same texts {figures['raw_embedder_s']} s "
        f"({figures['raw_embedder_texts_per_s']}/s): ratio {figures['ratio']}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reembed.json"))
    args = parser.parse_args()
    run(args.conversations, args.out)


if __name__ == "__main__":
    main()

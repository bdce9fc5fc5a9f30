"""The SDK's KV calls (models, activations, generate) against the real app with a small random model."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

import httpx
import pytest
from conftest import Factory, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient
from litestar.testing import transport as litestar_transport
from memos_client import (
    Activation,
    AsyncMemosClient,
    Conflict,
    Generation,
    Invalid,
    MemosClient,
    NotFound,
    Pin,
    SchedulerState,
)

from memos.app import create_app
from memos.embed.base import Embedder
from memos.settings import Settings

MODEL = "tiny"
BASE = "http://memos.test"


class InProcess(httpx.BaseTransport):
    def __init__(self, client: TestClient[Litestar]) -> None:
        self._inner = litestar_transport.TestClientTransport(client=client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(request)


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=3)


@pytest.fixture(scope="module")
async def async_app(settings: Settings, embedder: Embedder) -> AsyncIterator[Litestar]:
    """An app whose lifespan runs in the test's event loop (ASGITransport sends no lifespan events)."""
    app = create_app(settings, embedder_factory=lambda: embedder)
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(serve())
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()
    assert started.is_set(), "the app did not start"
    yield app
    stop.set()
    await task


@pytest.fixture
def sdk(client: TestClient[Litestar], factory: Factory) -> Iterator[MemosClient]:
    tenant = factory.tenant()
    with MemosClient(BASE, api_key=tenant.admin_key, transport=InProcess(client)) as c:
        yield c


def test_models_build_list_get_download_import_generate(sdk: MemosClient, factory: Factory) -> None:
    (model,) = sdk.models()
    assert (model.name, model.layers, model.kv_heads, model.head_dim) == (MODEL, 2, 2, 16)
    cube = sdk.cubes.create("kv")
    memory = sdk.memories.add(cube.id, content="The spare tyre is under the boot floor.")
    act = sdk.activations.build(memory.id, model=MODEL)
    assert isinstance(act, Activation) and act.memory_id == memory.id and not act.stale
    assert sdk.activations.build(memory.id, model=MODEL).id == act.id
    assert [a.id for a in sdk.activations.list(memory.id)] == [act.id]
    assert sdk.activations.get(act.id) == act
    data = sdk.activations.download(act.id)
    assert hashlib.sha256(data).hexdigest() == act.sha256
    # The same text elsewhere: the downloaded file imports for it.
    twin = sdk.memories.add(cube.id, content=memory.content)
    imported = sdk.activations.import_(twin.id, data, model=MODEL)
    assert imported.memory_id == twin.id and imported.sha256 == act.sha256
    out = sdk.generate("Where is the tyre?", model=MODEL, memory_ids=[memory.id], max_new_tokens=4)
    assert isinstance(out, Generation) and out.activations_used == [act.id]
    full = sdk.generate(
        "Where is the tyre?", model=MODEL, memory_ids=[memory.id], max_new_tokens=4, use_activations=False
    )
    assert full.token_ids == out.token_ids and full.reused_tokens == 0
    found = sdk.generate("Tyre?", model=MODEL, search={"query": "spare tyre", "cube_ids": [cube.id], "k": 1})
    assert len(found.memory_ids) == 1


def test_scheduler_state_and_pins(sdk: MemosClient) -> None:
    cube = sdk.cubes.create("scheduler")
    memory = sdk.memories.add(cube.id, content="Keep this one close: the boat leaves at dawn.")
    sdk.memories.get(memory.id)  # a read warms it
    state = sdk.scheduler()
    assert isinstance(state, SchedulerState) and [t.name for t in state.tiers] == ["device", "host", "store"]
    assert [h.memory_id for h in state.hot] == [memory.id] and state.hot[0].tier is None
    pin = sdk.pin(memory.id, model=MODEL, tier="host")
    assert isinstance(pin, Pin) and (pin.tier, pin.memory_id) == ("host", memory.id)
    assert sdk.activations.get(pin.activation_id).tier == "host"
    assert sdk.scheduler().hot[0].tier == "host"
    assert sdk.pin(memory.id, model=MODEL, tier="store").tier == "store"
    with pytest.raises(Invalid):
        sdk.pin(memory.id, model=MODEL, tier="gpu")


def test_kv_errors_are_typed(sdk: MemosClient) -> None:
    cube = sdk.cubes.create("kv-errors")
    memory = sdk.memories.add(cube.id, content="Another fact entirely.")
    with pytest.raises(Invalid) as caught:
        sdk.activations.build(memory.id, model="nope")
    assert caught.value.field_errors[0].field == "model"
    with pytest.raises(Invalid):
        sdk.activations.import_(memory.id, b"garbage", model=MODEL)
    with pytest.raises(NotFound):
        sdk.activations.get("00000000-0000-0000-0000-000000000000")
    other = sdk.memories.add(cube.id, content="A different text.")
    act = sdk.activations.build(other.id, model=MODEL)
    with pytest.raises(Conflict):  # KV of other text
        sdk.activations.import_(memory.id, sdk.activations.download(act.id), model=MODEL)
    with pytest.raises(TypeError):
        sdk.activations.import_(memory.id, "not bytes", model=MODEL)  # type: ignore[arg-type]


async def test_async_client(client: TestClient[Litestar], factory: Factory, async_app: Litestar) -> None:
    tenant = factory.tenant()
    sync = MemosClient(BASE, api_key=tenant.admin_key, transport=InProcess(client))
    cube = sync.cubes.create("kv-async")
    memory = sync.memories.add(cube.id, content="The gate code is 2468.")
    sync.close()
    transport: Any = httpx.ASGITransport(app=async_app)  # type: ignore[arg-type]
    async with AsyncMemosClient(BASE, api_key=tenant.admin_key, transport=transport) as a:
        assert [m.name for m in await a.models()] == [MODEL]
        act = await a.activations.build(memory.id, model=MODEL)
        assert [x.id async for x in a.activations.list(memory.id)] == [act.id]
        assert (await a.activations.get(act.id)).id == act.id
        data = await a.activations.download(act.id)
        assert hashlib.sha256(data).hexdigest() == act.sha256
        assert (await a.activations.import_(memory.id, data, model=MODEL)).id == act.id
        out = await a.generate("Code?", model=MODEL, memory_ids=[memory.id], max_new_tokens=3)
        assert out.activations_used == [act.id]
        assert (await a.pin(memory.id, model=MODEL, tier="device")).activation_id == act.id
        assert memory.id in [h.memory_id for h in (await a.scheduler()).hot]


def test_load_dynamic_cache_in_another_process_model(
    sdk: MemosClient, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A downloaded activation becomes a DynamicCache for a locally loaded copy of the model, checked first."""
    import torch
    from memos_client.kv import KVError, KVMismatch, load_dynamic_cache, model_fingerprint, read_kv
    from transformers import AutoModelForCausalLM

    from memos.kv.maker import make_model

    model_dir = Path(settings.models[MODEL].path)
    (served,) = sdk.models()
    assert model_fingerprint(model_dir, "float32") == served.fingerprint
    cube = sdk.cubes.create("kv-local")
    memory = sdk.memories.add(cube.id, content="The boiler pressure should read 1.5 bar when cold.")
    act = sdk.activations.build(memory.id, model=MODEL)
    data = sdk.activations.download(act.id)

    local = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    local.eval()
    cache = load_dynamic_cache(data, local)
    assert cache.get_seq_length() == act.tokens
    # The reused KV gives the same next-token logits as prefilling the memory and the prompt together.
    memory_ids = read_kv(data).token_ids.unsqueeze(0)
    prompt = torch.tensor([[101, 2054, 2003, 1996, 3778, 102]])
    with torch.no_grad():
        positions = torch.arange(act.tokens, act.tokens + prompt.shape[1]).unsqueeze(0)
        reused = local(input_ids=prompt, past_key_values=cache, position_ids=positions).logits[0, -1]
        full = local(input_ids=torch.cat([memory_ids, prompt], dim=1)).logits[0, -1]
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)
    # The stored file is never changed by use: loading it again gives the same cache length.
    assert load_dynamic_cache(data, model_dir).get_seq_length() == act.tokens

    other = make_model(tmp_path_factory.mktemp("other") / "tiny", "llama", "tiny", seed=4)
    with pytest.raises(KVMismatch) as caught:
        load_dynamic_cache(data, other)
    assert caught.value.actual == served.fingerprint
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    with pytest.raises(KVError, match="payload_sha256"):
        load_dynamic_cache(bytes(damaged), model_dir)
    with pytest.raises(KVError, match=r"not a memos-kv/1 file|truncated"):
        read_kv(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")

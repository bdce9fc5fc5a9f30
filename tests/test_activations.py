"""KV activations through real HTTP, with small random transformers models built in the test.

Build, list, export, import (and every way an import can be refused), staleness, sharing, corruption
and repair, isolation, and generation on top of stored KV compared with a full prefill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
import pytest
from conftest import OPERATOR_KEY, bearer
from litestar import Litestar
from litestar.testing import TestClient

from memos.activations.service import IMPORTS_AT_ONCE, ActivationService
from memos.app import create_app
from memos.kv.codec import read_meta
from memos.kv.spec import ModelSpec
from memos.settings import Settings
from memos.store.blobs import LocalBlobStore

MODEL = "tiny"
OTHER = "tiny-other"
"""Same shape as MODEL, other weights: another fingerprint."""
DYNAMIC = "tiny-dynamic"
"""MODEL with dynamic NTK RoPE: its keys cannot be moved, so chunks cannot be composed."""
JSON_LIMIT = 64 * 1024
KV_LIMIT = 512 * 1024

FACTS = [
    "Alice keeps her grandmother's recipe for plum cake in a blue tin on the top shelf of the pantry.",
    "The lighthouse on Gull Island was automated in 1987 and its keeper moved to the village of Port Ellen.",
    "Bob trains for the autumn marathon by running along the canal every morning before work.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from memos.kv.maker import make_model

    base = tmp_path_factory.mktemp("models")
    tiny = make_model(base / MODEL, "qwen2", "tiny", seed=0)
    other = make_model(base / OTHER, "qwen2", "tiny", seed=1)
    dynamic = base / DYNAMIC
    shutil.copytree(tiny, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (dynamic / "config.json").write_text(json.dumps(config))
    return {MODEL: tiny, OTHER: other, DYNAMIC: dynamic}


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("memos-data"),
        operator_key=OPERATOR_KEY,
        log_level="WARNING",
        max_body_bytes=JSON_LIMIT,
        max_kv_bytes=KV_LIMIT,
        models={name: ModelSpec(name=name, path=path) for name, path in model_dirs.items()},
    )


def build(client: TestClient[Litestar], key: str, memory_id: str, model: str = MODEL) -> Any:
    return client.post(f"/v1/memories/{memory_id}/activations", json={"model": model}, headers=bearer(key))


def built(client: TestClient[Litestar], key: str, memory_id: str, model: str = MODEL) -> dict[str, Any]:
    r = build(client, key, memory_id, model)
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body


def generate(client: TestClient[Litestar], key: str, **body: Any) -> Any:
    return client.post("/v1/generate", json={"model": MODEL, "max_new_tokens": 6, **body}, headers=bearer(key))


def generated(client: TestClient[Litestar], key: str, **body: Any) -> dict[str, Any]:
    r = generate(client, key, **body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def download(client: TestClient[Litestar], key: str, activation_id: str) -> bytes:
    r = client.get(f"/v1/activations/{activation_id}/kv", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["x-memos-sha256"] == hashlib.sha256(r.content).hexdigest()
    return r.content


def import_kv(client: TestClient[Litestar], key: str, memory_id: str, data: bytes, model: str = MODEL) -> Any:
    return client.post(
        "/v1/activations/import",
        params={"memory_id": memory_id, "model": model},
        content=data,
        headers={**bearer(key), "Content-Type": "application/octet-stream"},
    )


def blob_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.blob_root.rglob("*") if p.is_file())


def blob_path(settings: Settings, sha256: str) -> Path:
    return settings.blob_root / sha256[:2] / sha256[2:4] / sha256


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


# ---------------------------------------------------------------------- models, build, list, get


def test_models_lists_configured_models_with_their_fingerprints(client, tenant) -> None:
    r = client.get("/v1/models", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in r.json()["items"]}
    assert set(models) == {MODEL, OTHER, DYNAMIC}
    tiny = models[MODEL]
    assert (tiny["layers"], tiny["kv_heads"], tiny["head_dim"], tiny["dtype"], tiny["device"]) == (
        2,
        2,
        16,
        "float32",
        "cpu",
    )
    assert tiny["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert len(tiny["fingerprint"]) == 64
    assert tiny["fingerprint"] != models[OTHER]["fingerprint"]
    assert tiny["rope_shiftable"] is True and models[DYNAMIC]["rope_shiftable"] is False


def test_models_are_paged_like_every_other_list(client, tenant) -> None:
    """API.md conventions: ?limit= is 1..500 and ?cursor= opaque, bad ones 422 (both were ignored: 200)."""
    auth = bearer(tenant.admin_key)
    first = client.get("/v1/models", params={"limit": 2}, headers=auth)
    assert first.status_code == 200, first.text
    assert [m["name"] for m in first.json()["items"]] == [MODEL, DYNAMIC] and first.json()["next_cursor"]
    rest = client.get("/v1/models", params={"limit": 2, "cursor": first.json()["next_cursor"]}, headers=auth).json()
    assert [m["name"] for m in rest["items"]] == [OTHER] and rest["next_cursor"] is None
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "zzz"}, "cursor"),
        ({"cursor": "WzFd"}, "cursor"),  # [1]: a cursor of the right shape, not a name
    ):
        body = problem(client.get("/v1/models", params=params, headers=auth), 422)
        assert [e["field"] for e in body["errors"]] == [field], body


def test_build_list_get(client, factory, tenant, cube, settings) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], FACTS[0])
    r = build(client, tenant.admin_key, m["id"])
    assert r.status_code == 201, r.text
    act = r.json()
    assert r.headers["location"] == f"/v1/activations/{act['id']}"
    assert act["memory_id"] == m["id"] and act["source_version"] == 1 and act["model"] == MODEL
    assert act["stale"] is False and act["corrupt"] is False and act["hits"] == 0
    assert act["dtype"] == "float32" and act["tier"] == "host"
    assert act["tokens"] > 10
    assert act["bytes"] > act["tokens"] * 2 * 2 * 2 * 16 * 4  # the KV plus a header and token ids
    assert blob_path(settings, act["sha256"]).is_file()
    # The same memory, version and model: the existing activation, not a second one.
    again = build(client, tenant.admin_key, m["id"])
    assert again.status_code == 200 and again.json()["id"] == act["id"]
    assert "location" not in again.headers  # nothing was created
    listed = client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(tenant.admin_key)).json()
    assert [a["id"] for a in listed["items"]] == [act["id"]] and listed["next_cursor"] is None
    one = client.get(f"/v1/activations/{act['id']}", headers=bearer(tenant.admin_key))
    assert one.status_code == 200 and one.json() == act
    # The activation is a memory of kind activation, derived from the source version.
    memory = client.get(f"/v1/memories/{act['id']}", headers=bearer(tenant.admin_key)).json()
    assert memory["kind"] == "activation"
    assert memory["provenance"]["derived_from"] == [{"memory_id": m["id"], "version": 1}]
    graph = client.get(f"/v1/memories/{m['id']}/provenance", headers=bearer(tenant.admin_key)).json()
    assert {"from_id": act["id"], "to_id": m["id"], "to_version": 1} in graph["edges"]
    cube_now = client.get(f"/v1/cubes/{cube['id']}", headers=bearer(tenant.admin_key)).json()
    assert cube_now["stats"]["activations"] >= 1


def test_shared_text_is_stored_once_whoever_builds_it(client, factory, tenant, cube, settings) -> None:
    other_cube = factory.cube(tenant.admin_key)
    agent = factory.agent(tenant)
    agents_cube = factory.cube(agent.key)
    text = "Shared fact: the staff meeting moved to Thursdays at ten."
    a = factory.memory(tenant.admin_key, cube["id"], text)
    b = factory.memory(tenant.admin_key, other_cube["id"], text)
    c = factory.memory(agent.key, agents_cube["id"], text)
    before = len(blob_files(settings))
    first = built(client, tenant.admin_key, a["id"])
    time.sleep(1.1)  # the header's time is to the second: the others' builds come a second later
    second = built(client, tenant.admin_key, b["id"])
    third = built(client, agent.key, c["id"])
    assert first["id"] != second["id"] != third["id"]
    assert first["sha256"] == second["sha256"] == third["sha256"]
    assert len(blob_files(settings)) == before + 1
    # The agent cannot read the cube of the memory the file was first built for: the file it downloads names
    # its own memory, never that one (found in review: the shared file's header leaked a's id).
    assert client.get(f"/v1/memories/{a['id']}", headers=bearer(agent.key)).status_code == 404
    for key, memory, act in ((tenant.admin_key, a, first), (tenant.admin_key, b, second), (agent.key, c, third)):
        data = download(client, key, act["id"])  # X-Memos-SHA256 is the body's
        meta = read_meta(data)
        assert (meta["memory_id"], meta["version"]) == (memory["id"], "1")
        assert a["id"].encode() not in data or memory is a
        # Nor when the first was built: the header's time is the caller's activation's (a security review).
        if memory is not a:
            made = datetime.fromisoformat(act["created_at"]).astimezone(UTC)
            assert meta["created_at"] == made.isoformat(timespec="seconds").replace("+00:00", "Z"), (meta, act)
        # still a sound file: its tensors, their checksum and token ids are those of the stored one
        assert data[-1000:] == blob_path(settings, first["sha256"]).read_bytes()[-1000:]
        assert import_kv(client, key, memory["id"], data).status_code in (200, 201)


def test_read_only_grant_cannot_build_but_can_read(client, factory, tenant, cube) -> None:
    reader = factory.agent(tenant)
    r = client.put(
        f"/v1/cubes/{cube['id']}/grants/{reader.id}", json={"access": "read"}, headers=bearer(tenant.admin_key)
    )
    assert r.status_code == 200, r.text
    m = factory.memory(tenant.admin_key, cube["id"], FACTS[1])
    problem(build(client, reader.key, m["id"]), 403)
    act = built(client, tenant.admin_key, m["id"])
    assert client.get(f"/v1/activations/{act['id']}", headers=bearer(reader.key)).status_code == 200
    download(client, reader.key, act["id"])
    out = generated(client, reader.key, prompt="Who keeps the light?", memory_ids=[m["id"]])
    assert out["activations_used"] == [act["id"]]


def test_only_plaintext_memories_get_activations(client, factory, tenant, cube) -> None:
    answer = client.post(
        f"/v1/cubes/{cube['id']}/memories",
        json={"kind": "response", "content": "42", "metadata": {"query": "the answer?"}},
        headers=bearer(tenant.admin_key),
    ).json()
    body = problem(build(client, tenant.admin_key, answer["id"]), 422)
    assert body["errors"][0]["field"] == "memory_id"
    m = factory.memory(tenant.admin_key, cube["id"], "Carol's flight lands at 6pm.")
    act = built(client, tenant.admin_key, m["id"])
    body = problem(build(client, tenant.admin_key, act["id"]), 422)
    assert "source memory" in body["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "model"),
        ({"model": 5}, "model"),
        ({"model": ""}, "model"),
        ({"model": "no-such-model"}, "model"),
        ({"model": MODEL, "extra": 1}, "extra"),
    ],
)
def test_bad_build_bodies_name_the_field(client, factory, tenant, cube, body, field) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], "Dana's bike is green.")
    r = client.post(f"/v1/memories/{m['id']}/activations", json=body, headers=bearer(tenant.admin_key))
    assert problem(r, 422)["errors"][0]["field"] == field


# ---------------------------------------------------------------------- export and import


@pytest.fixture(scope="module")
def exported(client, factory, tenant, cube) -> dict[str, Any]:
    """A memory with an activation, and its KV file as downloaded."""
    m = factory.memory(tenant.admin_key, cube["id"], FACTS[2])
    act = built(client, tenant.admin_key, m["id"])
    r = client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    return {"memory": m, "activation": act, "data": r.content, "headers": r.headers}


def test_export_streams_the_verified_file_with_its_identity(exported) -> None:
    act, data, headers = exported["activation"], exported["data"], exported["headers"]
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-memos-fingerprint"] == act["fingerprint"]
    assert headers["x-memos-sha256"] == act["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(data) == act["bytes"]
    from memos.kv.codec import decode

    chunk, meta = decode(data, expect_fingerprint=act["fingerprint"])
    assert (meta.memory_id, meta.version, meta.model) == (exported["memory"]["id"], 1, MODEL)
    assert chunk.tokens == act["tokens"]


def test_export_import_inject_round_trip_gives_identical_logits(client, factory, exported, model_dirs) -> None:
    # Another tenant has a memory with the same text; it imports the file instead of building.
    other = factory.tenant()
    cube = factory.cube(other.admin_key)
    m = factory.memory(other.admin_key, cube["id"], exported["memory"]["content"])
    r = import_kv(client, other.admin_key, m["id"], exported["data"])
    assert r.status_code == 201, r.text
    imported = r.json()
    assert r.headers["location"] == f"/v1/activations/{imported['id']}"
    assert imported["memory_id"] == m["id"] and imported["sha256"] == exported["activation"]["sha256"]
    assert import_kv(client, other.admin_key, m["id"], exported["data"]).json()["id"] == imported["id"]
    prompt = "Where does Bob run?"
    with_kv = generated(client, other.admin_key, prompt=prompt, memory_ids=[m["id"]])
    assert with_kv["activations_used"] == [imported["id"]]
    assert with_kv["reused_tokens"] == imported["tokens"] and with_kv["fallback"] is None
    full = generated(client, other.admin_key, prompt=prompt, memory_ids=[m["id"]], use_activations=False)
    assert full["activations_used"] == [] and full["reused_tokens"] == 0
    assert full["prefill_tokens"] == with_kv["prefill_tokens"] + imported["tokens"]
    assert with_kv["token_ids"] == full["token_ids"] and with_kv["text"] == full["text"]
    # The logits themselves: the imported bytes as a prefix against a full prefill of the same tokens.
    from memos.kv.codec import decode
    from memos.kv.runtime import load_model, next_token_logits

    lm = load_model(ModelSpec(name=MODEL, path=model_dirs[MODEL]))
    chunk, _ = decode(download(client, other.admin_key, imported["id"]), expect_fingerprint=lm.fingerprint)
    prompt_ids = lm.prompt_token_ids(prompt)
    reused = next_token_logits(lm, prompt_ids, prefix=chunk)
    prefilled = next_token_logits(lm, prompt_ids, prefix=chunk, use_prefix_kv=False)
    assert float((reused - prefilled).abs().max()) <= 1e-4


def test_tampered_truncated_and_foreign_files_are_refused(client, factory, tenant, cube, exported) -> None:
    m = exported["memory"]
    data: bytes = exported["data"]
    header_end = 8 + int.from_bytes(data[:8], "little")
    tampered = bytearray(data)
    tampered[header_end + 100] ^= 0x40
    # A whole file whose tensor bytes are not the ones its payload_sha256 vouches for: API.md's checksum mismatch.
    body = problem(import_kv(client, tenant.admin_key, m["id"], bytes(tampered)), 409)
    assert body["type"].endswith("/checksum-mismatch") and "checksum" in body["detail"]
    assert body["errors"][0]["field"] == "body"
    # Files that are not a complete memos-kv/1 file at all are malformed, not mismatched: 422.
    for cut in (len(data) - 1, header_end + 3, header_end - 5, 5):
        body = problem(import_kv(client, tenant.admin_key, m["id"], data[:cut]), 422)
        assert body["errors"][0]["field"] == "body"
    problem(import_kv(client, tenant.admin_key, m["id"], b"\x00" * 64), 422)
    problem(import_kv(client, tenant.admin_key, m["id"], b"not safetensors at all"), 422)
    assert "empty" in problem(import_kv(client, tenant.admin_key, m["id"], b""), 422)["detail"]
    # A header edited to claim another model (tensors and checksum intact): the fingerprint check refuses it.
    fingerprint = exported["activation"]["fingerprint"].encode()
    forged = data.replace(fingerprint, b"f" * len(fingerprint), 1)
    body = problem(import_kv(client, tenant.admin_key, m["id"], forged), 409)
    assert body["extra"] == {"expected_fingerprint": fingerprint.decode(), "actual_fingerprint": "f" * 64}


def test_import_checks_the_checksum_before_the_fingerprint(client, tenant, exported) -> None:
    """The order api.md's import table gives (it had the two the other way round); both are 409 (API.md)."""
    data: bytes = exported["data"]
    fingerprint = exported["activation"]["fingerprint"].encode()
    both = bytearray(data.replace(fingerprint, b"f" * len(fingerprint), 1))
    both[-10] ^= 0x01
    body = problem(import_kv(client, tenant.admin_key, exported["memory"]["id"], bytes(both)), 409)
    assert body["type"].endswith("/checksum-mismatch") and body["errors"][0]["field"] == "body"


def with_metadata(data: bytes, **changes: str) -> bytes:
    """``data`` with values of its header's ``__metadata__`` replaced; the tensor bytes, and so their
    ``payload_sha256``, unchanged (the header is not covered by it)."""
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    header["__metadata__"] = {**header["__metadata__"], **changes}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the tensor bytes 8-aligned
    return len(text).to_bytes(8, "little") + text + data[start:]


@pytest.mark.parametrize("fingerprint", ["not-a-fingerprint", "", "F" * 64, "a" * 63, "a" * 65])
def test_a_malformed_fingerprint_in_the_header_is_422_naming_it(client, tenant, exported, fingerprint: str) -> None:
    """Found in review: it was 409 fingerprint-mismatch, as if the file held KV of another model; a value that is no
    fingerprint at all is the caller's mistake. Checked with the header, before the checksum."""
    m, data = exported["memory"], exported["data"]
    assert import_kv(client, tenant.admin_key, m["id"], with_metadata(data)).status_code == 200  # the helper is sound
    for body in (
        with_metadata(data, fingerprint=fingerprint),
        with_metadata(data[:-1] + b"?", fingerprint=fingerprint),
    ):
        problem_body = problem(import_kv(client, tenant.admin_key, m["id"], body), 422)
        assert [e["field"] for e in problem_body["errors"]] == ["body.__metadata__.fingerprint"], problem_body
        assert "64 lowercase hex digits" in problem_body["detail"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dtype", "int8"),
        ("version", "one"),
        ("version", "1" * 19),
        ("format", "memos-kv/2"),
        ("payload_sha256", "a" * 64 + "\n"),  # `$` matched before a trailing newline
    ],
)
def test_a_bad_header_value_is_422_naming_its_key(client, tenant, exported, key: str, value: str) -> None:
    """Each value of the header that is malformed is named, as the fingerprint is (they were all 422 on `body`)."""
    m, data = exported["memory"], exported["data"]
    problem_body = problem(import_kv(client, tenant.admin_key, m["id"], with_metadata(data, **{key: value})), 422)
    assert [e["field"] for e in problem_body["errors"]] == [f"body.__metadata__.{key}"], problem_body


@pytest.mark.parametrize(
    "created_at",
    [
        "yesterday",
        "",
        "2026-01-31",  # a date, no time
        "2026-01-31T09:30:00",  # no offset: not a point in time
        "2026-13-01T09:30:00Z",  # no 13th month
        "2026-02-30T09:30:00+01:00",
        "20260131T093000Z",  # ISO 8601's basic form, not RFC 3339
        "9999-01-01T00:00:00Z",  # the future
        "FUTURE",  # an hour ahead of now, filled in below
    ],
)
def test_an_unreadable_or_future_created_at_in_the_header_is_422_naming_it(
    client, tenant, exported, created_at: str
) -> None:
    """Found in review: created_at was not checked at all, so an upload could say anything about when it was built,
    and its downloads repeated it."""
    from datetime import UTC, datetime, timedelta

    if created_at == "FUTURE":
        created_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")
    m, data = exported["memory"], exported["data"]
    body = problem(import_kv(client, tenant.admin_key, m["id"], with_metadata(data, created_at=created_at)), 422)
    assert [e["field"] for e in body["errors"]] == ["body.__metadata__.created_at"], body


def test_a_created_at_in_the_past_or_within_the_clock_skew_is_accepted(client, tenant, exported) -> None:
    from datetime import UTC, datetime, timedelta

    m, data = exported["memory"], exported["data"]
    soon = (datetime.now(UTC) + timedelta(minutes=2)).isoformat(timespec="seconds")
    for created_at in ("2001-01-01T00:00:00+02:00", "2026-01-31t09:30:00.123456789z", soon):
        r = import_kv(client, tenant.admin_key, m["id"], with_metadata(data, created_at=created_at))
        assert r.status_code == 200, (created_at, r.text)  # the memory's fresh activation exists already


def test_kv_of_another_model_is_409_with_both_fingerprints(client, factory, tenant, cube, exported) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], exported["memory"]["content"] + " Also on Sundays.")
    foreign = built(client, tenant.admin_key, m["id"], model=OTHER)
    data = download(client, tenant.admin_key, foreign["id"])
    r = import_kv(client, tenant.admin_key, m["id"], data, model=MODEL)
    body = problem(r, 409)
    assert body["extra"]["actual_fingerprint"] == foreign["fingerprint"]
    assert body["extra"]["expected_fingerprint"] == exported["activation"]["fingerprint"]
    assert foreign["fingerprint"] in body["detail"] and exported["activation"]["fingerprint"] in body["detail"]


def test_kv_of_other_text_is_409(client, factory, tenant, cube, exported) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], "Something else entirely.")
    body = problem(import_kv(client, tenant.admin_key, m["id"], exported["data"]), 409)
    assert body["type"].endswith("token-mismatch")


def test_import_has_its_own_size_limit(client, tenant, exported) -> None:
    m = exported["memory"]
    # Larger than the JSON limit, within the KV limit: not refused for its size.
    padded = b"x" * (JSON_LIMIT * 2)
    assert problem(import_kv(client, tenant.admin_key, m["id"], padded), 422)["errors"][0]["field"] == "body"
    problem(import_kv(client, tenant.admin_key, m["id"], b"x" * (KV_LIMIT + 1)), 413)
    # The JSON endpoints keep the small limit.
    r = client.post(
        "/v1/generate", json={"model": MODEL, "prompt": "y" * (JSON_LIMIT + 10)}, headers=bearer(tenant.admin_key)
    )
    problem(r, 413)


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"model": MODEL}, 422, "memory_id"),
        ({"memory_id": "MEMORY"}, 422, "model"),
        ({"memory_id": "not-a-uuid", "model": MODEL}, 404, None),
        ({"memory_id": "00000000-0000-0000-0000-000000000000", "model": MODEL}, 404, None),
        ({"memory_id": "MEMORY", "model": "no-such-model"}, 422, "model"),
    ],
)
def test_bad_import_parameters(client, tenant, exported, params, status, field) -> None:
    params = {k: exported["memory"]["id"] if v == "MEMORY" else v for k, v in params.items()}
    r = client.post("/v1/activations/import", params=params, content=exported["data"], headers=bearer(tenant.admin_key))
    body = problem(r, status)
    if field is not None:
        assert body["errors"][0]["field"] == field


def test_a_header_integer_too_long_for_python_is_422_on_body(client, factory, tenant, cube) -> None:
    """json.loads raises a plain ValueError for an integer of over 4300 digits: it was a 500 (found in review)."""
    m = factory.memory(tenant.admin_key, cube["id"], "The ferry leaves at 7:40 on weekdays.")
    header = b'{"__metadata__":{"format":"memos-kv/1"},"x":' + b"1" * 5000 + b"}"
    body = problem(import_kv(client, tenant.admin_key, m["id"], len(header).to_bytes(8, "little") + header), 422)
    assert body["errors"][0]["field"] == "body" and "integer too long" in body["detail"]


# ---------------------------------------------------------------------- uploaded KV stays in its cube


def forged_kv(client: TestClient[Litestar], factory: Any, text: str) -> bytes:
    """A file an import accepts for a memory of ``text``: the right tokens, shapes, fingerprint and checksum,
    but K/V values no prefill computed (built in a tenant of its own, then scaled)."""
    from memos.kv.codec import decode, encode

    donor = factory.tenant()
    m = factory.memory(donor.admin_key, factory.cube(donor.admin_key)["id"], text)
    chunk, meta = decode(download(client, donor.admin_key, built(client, donor.admin_key, m["id"])["id"]))
    forged = dataclasses.replace(chunk, keys=[k * 5.0 for k in chunk.keys], values=[v * 5.0 for v in chunk.values])
    return encode(forged, meta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_import_of_keys_or_values_that_are_not_finite_is_422(client, factory, tenant, bad: float) -> None:
    """An upload of NaN keys (right tokens, shapes, fingerprint and checksum) was stored, and every generation
    that used the memory then answered an empty text (found in review)."""
    from memos.kv.codec import decode, encode

    cube = factory.cube(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "The gate code is 2468.")
    chunk, meta = decode(download(client, tenant.admin_key, built(client, tenant.admin_key, m["id"])["id"]))
    values = [v.clone() for v in chunk.values]
    values[-1].view(-1)[3] = bad
    poisoned = encode(dataclasses.replace(chunk, values=values), meta)
    target = factory.memory(tenant.admin_key, cube["id"], "The gate code is 2468.")
    body = problem(import_kv(client, tenant.admin_key, target["id"], poisoned), 422)
    assert body["errors"][0]["field"] == "body" and "finite" in body["detail"]
    assert (
        client.get(f"/v1/memories/{target['id']}/activations", headers=bearer(tenant.admin_key)).json()["items"] == []
    )


def import_marks(database_url: str, activation_ids: list[str]) -> dict[str, str]:
    """activation id -> the cube its file was uploaded into, for those of ``activation_ids`` with uploaded bytes."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT activation_id::text, cube_id::text FROM activation_imports WHERE activation_id::text = ANY(%s)",
            (activation_ids,),
        ).fetchall()
    return dict(rows)


def test_imported_kv_is_reused_only_in_the_cube_it_was_imported_into(client, factory, tenant, database_url) -> None:
    """Found in review: a build reused any stored file of the same KV in the tenant, uploads too, so an agent
    could plant K/V values that builds of the same text in cubes it cannot read then injected."""
    mallory, carol, bob = factory.agent(tenant), factory.agent(tenant), factory.agent(tenant)
    m_cube, c_cube, b_cube = factory.cube(mallory.key), factory.cube(carol.key), factory.cube(bob.key)
    text = "Payments over 10,000 EUR need a second approval from the finance lead."
    m_mem, m_mem2 = (factory.memory(mallory.key, m_cube["id"], text) for _ in range(2))
    c_mem = factory.memory(carol.key, c_cube["id"], text)
    b_mem = factory.memory(bob.key, b_cube["id"], text)
    r = import_kv(client, mallory.key, m_mem["id"], forged_kv(client, factory, text))
    assert r.status_code == 201, r.text
    planted = r.json()
    # In the cube it was uploaded into, the upload is reused: whoever can build there could import there too.
    own = built(client, mallory.key, m_mem2["id"])
    assert own["sha256"] == planted["sha256"]
    # A scheduler build (a pin builds) in another cube prefills instead of taking the upload...
    r = client.post(
        "/v1/scheduler/pin", json={"memory_id": c_mem["id"], "model": MODEL, "tier": "host"}, headers=bearer(carol.key)
    )
    assert r.status_code == 200, r.text
    (pinned,) = client.get(f"/v1/memories/{c_mem['id']}/activations", headers=bearer(carol.key)).json()["items"]
    assert pinned["sha256"] != planted["sha256"]
    # ...and so does a request's build; what the server computed is still shared tenant-wide.
    bobs = built(client, bob.key, b_mem["id"])
    assert bobs["sha256"] == pinned["sha256"]
    marks = import_marks(database_url, [planted["id"], own["id"], pinned["id"], bobs["id"]])
    assert marks == {planted["id"]: m_cube["id"], own["id"]: m_cube["id"]}
    prompt = "Who must approve large payments?"
    with_kv = generated(client, bob.key, prompt=prompt, memory_ids=[b_mem["id"]])
    assert with_kv["activations_used"] == [bobs["id"]]
    plain = generated(client, bob.key, prompt=prompt, memory_ids=[b_mem["id"]], use_activations=False)
    assert with_kv["token_ids"] == plain["token_ids"]
    # Once a server-built file exists, the importing cube's next build takes it rather than the upload.
    m_mem3 = factory.memory(mallory.key, m_cube["id"], text)
    assert built(client, mallory.key, m_mem3["id"])["sha256"] == pinned["sha256"]


def test_migration_0010_marks_earlier_uploads_and_stales_builds_that_took_them(
    client, factory, tenant, database_url
) -> None:
    """A database from before 0010: uploads unmarked, and a build in another cube already on the upload. The
    migration's backfill (from the audit log) marks the upload and makes that build stale; its rebuild prefills."""
    import importlib

    migration = importlib.import_module("memos.migrations.versions.0010_activation_imports")
    mallory, bob = factory.agent(tenant), factory.agent(tenant)
    m_cube, b_cube = factory.cube(mallory.key), factory.cube(bob.key)
    text = "The server room door code changes on the first Monday of each month."
    m_mem = factory.memory(mallory.key, m_cube["id"], text)
    b_mem = factory.memory(bob.key, b_cube["id"], text)
    planted = import_kv(client, mallory.key, m_mem["id"], forged_kv(client, factory, text)).json()
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM activation_imports WHERE activation_id = %s", (planted["id"],))
    took = built(client, bob.key, b_mem["id"])
    assert took["sha256"] == planted["sha256"]  # what the code before 0010 did
    with psycopg.connect(database_url) as conn:
        for statement in migration.BACKFILL:
            conn.execute(statement)
    assert import_marks(database_url, [planted["id"], took["id"]]) == {
        planted["id"]: m_cube["id"],
        took["id"]: m_cube["id"],
    }
    assert client.get(f"/v1/activations/{took['id']}", headers=bearer(bob.key)).json()["stale"] is True
    assert client.get(f"/v1/activations/{planted['id']}", headers=bearer(mallory.key)).json()["stale"] is False
    out = generated(client, bob.key, prompt="When does the code change?", memory_ids=[b_mem["id"]])
    assert out["activations_used"] == []
    rebuilt = build(client, bob.key, b_mem["id"])
    assert rebuilt.status_code == 201 and rebuilt.json()["sha256"] != planted["sha256"]


def test_migration_0010_marks_an_upload_whose_own_activation_is_gone(client, factory, tenant, database_url) -> None:
    """The audit log decides, not the surviving rows: once the importing cube dropped its activation (a purge, a
    ``kv drop``), the other cube's build was the file's first row, and it passed for server-built (found in
    review)."""
    import importlib

    migration = importlib.import_module("memos.migrations.versions.0010_activation_imports")
    mallory, bob = factory.agent(tenant), factory.agent(tenant)
    m_cube, b_cube = factory.cube(mallory.key), factory.cube(bob.key)
    text = "The loading dock alarm is disarmed with the code on the blue card."
    m_mem = factory.memory(mallory.key, m_cube["id"], text)
    b_mem = factory.memory(bob.key, b_cube["id"], text)
    planted = import_kv(client, mallory.key, m_mem["id"], forged_kv(client, factory, text)).json()
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM activation_imports WHERE activation_id = %s", (planted["id"],))
    took = built(client, bob.key, b_mem["id"])
    assert took["sha256"] == planted["sha256"]
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM memories WHERE id = %s", (planted["id"],))  # the upload's own row, dropped
        for statement in migration.BACKFILL:
            conn.execute(statement)
    assert import_marks(database_url, [took["id"]]) == {took["id"]: m_cube["id"]}
    assert client.get(f"/v1/activations/{took['id']}", headers=bearer(bob.key)).json()["stale"] is True
    rebuilt = build(client, bob.key, b_mem["id"])
    assert rebuilt.status_code == 201 and rebuilt.json()["sha256"] != planted["sha256"]


def test_a_repaired_upload_is_server_built_and_shared_again(client, factory, tenant, settings, database_url) -> None:
    """A repair rebuilds an uploaded file from the memory's text: its bytes are the server's now, unmarked."""
    owner, other = factory.agent(tenant), factory.agent(tenant)
    o_cube, x_cube = factory.cube(owner.key), factory.cube(other.key)
    text = "The backup generator is tested every second Friday at noon."
    mine = factory.memory(owner.key, o_cube["id"], text)
    planted = import_kv(client, owner.key, mine["id"], forged_kv(client, factory, text)).json()
    assert import_marks(database_url, [planted["id"]]) == {planted["id"]: o_cube["id"]}
    corrupt(settings, planted["sha256"])
    r = client.get(f"/v1/activations/{planted['id']}/kv", headers=bearer(owner.key))
    assert r.status_code == 200 and "x-memos-repaired" in r.headers
    assert import_marks(database_url, [planted["id"]]) == {}
    repaired = client.get(f"/v1/activations/{planted['id']}", headers=bearer(owner.key)).json()["sha256"]
    theirs = factory.memory(other.key, x_cube["id"], text)
    assert built(client, other.key, theirs["id"])["sha256"] == repaired


# ---------------------------------------------------------------------- staleness


def patch(client, key: str, memory_id: str, body: dict[str, Any], version: int) -> Any:
    r = client.patch(f"/v1/memories/{memory_id}", json=body, headers={**bearer(key), "If-Match": f'"{version}"'})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_new_version_makes_activations_stale_and_they_are_never_injected(client, factory, tenant, cube) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Erin's locker code is 4471.")
    act = built(client, key, m["id"])
    assert generated(client, key, prompt="Locker?", memory_ids=[m["id"]])["activations_used"] == [act["id"]]
    patch(client, key, m["id"], {"content": "Erin's locker code is 9012."}, 1)
    stale = client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()
    assert stale["stale"] is True
    out = generated(client, key, prompt="Locker?", memory_ids=[m["id"]])
    assert out["activations_used"] == [] and out["reused_tokens"] == 0
    full = generated(client, key, prompt="Locker?", memory_ids=[m["id"]], use_activations=False)
    assert out["token_ids"] == full["token_ids"]
    # Rebuilding gives a fresh activation of version 2; the stale one stays listed, marked.
    fresh = build(client, key, m["id"])
    assert fresh.status_code == 201 and fresh.json()["source_version"] == 2
    assert fresh.json()["sha256"] != act["sha256"]
    listed = client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(key)).json()["items"]
    assert [(a["id"], a["stale"]) for a in listed] == [(act["id"], True), (fresh.json()["id"], False)]
    assert generated(client, key, prompt="Locker?", memory_ids=[m["id"]])["activations_used"] == [fresh.json()["id"]]


def test_restore_and_tag_changes_also_make_stale_and_rebuilding_reuses_the_bytes(
    client, factory, tenant, cube, settings
) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Frank waters the ferns on Fridays.")
    act = built(client, key, m["id"])
    patch(client, key, m["id"], {"tags": ["plants"]}, 1)
    assert client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()["stale"] is True
    files = len(blob_files(settings))
    again = built(client, key, m["id"])
    # The text did not change: same tokens, same KV, the same stored file.
    assert again["source_version"] == 2 and again["sha256"] == act["sha256"]
    assert len(blob_files(settings)) == files
    r = client.post(f"/v1/memories/{m['id']}/restore", json={"version": 1}, headers={**bearer(key), "If-Match": '"2"'})
    assert r.status_code == 200, r.text
    assert client.get(f"/v1/activations/{again['id']}", headers=bearer(key)).json()["stale"] is True


def test_an_archived_memory_can_have_fresh_activations(client, factory, tenant, cube) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Ivy's old address was 12 Elm Street.")
    first = built(client, key, m["id"])
    patch(client, key, m["id"], {"state": "archived"}, 1)
    assert client.get(f"/v1/activations/{first['id']}", headers=bearer(key)).json()["stale"] is True
    r = build(client, key, m["id"])
    assert r.status_code == 201 and r.json()["stale"] is False and r.json()["source_version"] == 2
    assert build(client, key, m["id"]).json()["id"] == r.json()["id"]  # built once, not on every call
    out = generated(client, key, prompt="Address?", memory_ids=[m["id"]])
    assert out["activations_used"] == [r.json()["id"]]


def test_deleting_the_source_makes_its_activations_stale(client, factory, tenant, cube) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Gina's train leaves from platform 9.")
    act = built(client, key, m["id"])
    assert client.delete(f"/v1/memories/{m['id']}", headers=bearer(key)).status_code == 204
    assert client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()["stale"] is True
    assert problem(build(client, key, m["id"]), 409)["detail"].startswith("this memory is deleted")
    body = problem(generate(client, key, prompt="Platform?", memory_ids=[m["id"]]), 422)
    assert body["errors"][0]["field"] == "memory_ids[0]"


def test_purging_the_source_erases_its_activations_and_unshared_blobs(client, factory, tenant, cube, settings) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Hugo's passport number is X1234567.")
    act = built(client, key, m["id"])
    path = blob_path(settings, act["sha256"])
    assert path.is_file()
    assert client.delete(f"/v1/memories/{m['id']}", params={"purge": "true"}, headers=bearer(key)).status_code == 204
    problem(client.get(f"/v1/activations/{act['id']}", headers=bearer(key)), 404)
    problem(client.get(f"/v1/memories/{act['id']}", headers=bearer(key)), 404)
    assert client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(key)).json()["items"] == []
    assert not path.exists()


def test_purge_keeps_a_blob_another_activation_shares(client, factory, tenant, cube, settings) -> None:
    key = tenant.admin_key
    text = "Iris' cat is called Pepper."
    a = factory.memory(key, cube["id"], text)
    b = factory.memory(key, cube["id"], text)
    first, second = built(client, key, a["id"]), built(client, key, b["id"])
    assert first["sha256"] == second["sha256"]
    assert client.delete(f"/v1/memories/{a['id']}", params={"purge": "true"}, headers=bearer(key)).status_code == 204
    assert blob_path(settings, second["sha256"]).is_file()
    download(client, key, second["id"])


# ---------------------------------------------------------------------- corruption


def corrupt(settings: Settings, sha256: str) -> None:
    path = blob_path(settings, sha256)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_corrupted_blob_is_never_served_and_is_rebuilt(client, app, factory, tenant, cube, settings) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Jack parks in bay 14 of the north garage.")
    act = built(client, key, m["id"])
    original = download(client, key, act["id"])
    corrupt(settings, act["sha256"])
    r = client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["x-memos-repaired"] == "rebuilt after the stored file failed its checksum"
    assert r.headers["x-memos-sha256"] == hashlib.sha256(r.content).hexdigest() != act["sha256"]
    assert not blob_path(settings, act["sha256"]).exists()
    from memos.kv.codec import decode

    rebuilt, _ = decode(r.content, expect_fingerprint=act["fingerprint"])
    before, _ = decode(original)
    assert rebuilt.token_ids.tolist() == before.token_ids.tolist()
    assert all(float((x - y).abs().max()) <= 1e-5 for x, y in zip(rebuilt.keys, before.keys, strict=True))
    now = client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()
    assert now["sha256"] == r.headers["x-memos-sha256"] and now["corrupt"] is False


def test_two_repairs_of_one_file_send_the_file_they_name(client, app, factory, tenant, cube, settings) -> None:
    """Found in review: of two downloads repairing one corrupt file at once, the second wrote a file of its own
    that no row took, and sent it under headers naming the first one's file. The second now sends the file the
    first repair left (here: the second starts from the row both read before either repaired)."""
    from memos.identity.principal import Principal
    from memos.store.blobs import BlobCorrupt

    service: ActivationService = app.state.activations
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Kim keeps the spare key under the blue pot.")
    act = built(client, key, m["id"])
    corrupt(settings, act["sha256"])
    principal = Principal(role="admin", tenant_id=uuid.UUID(tenant.id), agent_id=uuid.UUID(tenant.admin_id))

    async def read_row() -> Any:
        async with service.db.read() as conn:
            return await service._visible(conn, principal, uuid.UUID(act["id"]))

    before = client.blocking_portal.call(read_row)
    problem_ = BlobCorrupt(act["sha256"], "0" * 64)
    first_data, first_row = client.blocking_portal.call(service._repair, principal, before, problem_)
    second_data, second_row = client.blocking_portal.call(service._repair, principal, before, problem_)
    assert first_row.sha256 == second_row.sha256 == hashlib.sha256(second_data).hexdigest()
    assert second_data == first_data
    r = client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key))
    assert r.status_code == 200 and "x-memos-repaired" not in r.headers


@pytest.mark.faults
def test_a_deleted_blob_is_reported_and_rebuilt(client, app, factory, tenant, cube, settings) -> None:
    """Fault run 3: the KV file removed behind memos' back is detected on read, never served, and rebuilt."""
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "The storm shutters are in the shed behind the mower.")
    act = built(client, key, m["id"])
    original = download(client, key, act["id"])
    blob_path(settings, act["sha256"]).unlink()
    app.state.activations.tiers.clear()
    r = client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key))
    assert r.status_code == 200, r.text
    # Found in review: it said the file "failed its checksum", which sends an operator to the wrong problem.
    assert r.headers["x-memos-repaired"] == "rebuilt after the stored file was found missing"
    assert r.headers["x-memos-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert blob_path(settings, r.headers["x-memos-sha256"]).exists()
    assert len(r.content) == len(original)
    print(f"\nfault run: deleted blob detected and rebuilt ({len(r.content)} bytes)")


class _FullDisk(LocalBlobStore):
    """A blob store whose disk fills up after half of a file has been written."""

    def _write(self, fh: BinaryIO, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.faults
def test_a_full_blob_store_is_503_and_leaves_nothing_half_written(
    client, app, factory, tenant, cube, settings, database_url
) -> None:
    """Fault run 4: a full disk during a build is a clear 503 storage-full; no file, no row, no memory left."""
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "The generator runs for nine hours on a full tank.")
    service = app.state.activations
    real = service.blobs
    files_before = blob_files(settings)
    derived_before = _activation_memories(database_url, cube["id"])
    service.blobs = _FullDisk(settings.blob_root)
    try:
        body = problem(build(client, key, m["id"]), 503)
    finally:
        service.blobs = real
    assert body["type"].endswith("storage-full") and "no space" in body["detail"].lower()
    assert blob_files(settings) == files_before
    assert client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(key)).json()["items"] == []
    assert _activation_memories(database_url, cube["id"]) == derived_before
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM activations WHERE memory_id = %s", (m["id"],)).fetchone()
    assert rows == (0,)
    # Once there is room again the same request succeeds.
    act = built(client, key, m["id"])
    assert blob_path(settings, act["sha256"]).exists()
    print("\nfault run: full blob store -> 503 storage-full; no file, no activation row or memory left")


def _activation_memories(database_url: str, cube_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM memories WHERE kind = 'activation' AND cube_id = %s", (cube_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_corrupted_blob_is_not_injected(client, app, factory, tenant, cube, settings) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Kim's spare key is under the third flowerpot.")
    act = built(client, key, m["id"])
    corrupt(settings, act["sha256"])
    app.state.activations.tiers.clear()  # cold: the KV must come from the blob store
    out = generated(client, key, prompt="Key?", memory_ids=[m["id"]])
    assert out["activations_used"] == [] and out["reused_tokens"] == 0
    assert client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()["corrupt"] is True
    full = generated(client, key, prompt="Key?", memory_ids=[m["id"]], use_activations=False)
    assert out["token_ids"] == full["token_ids"]


def test_a_corrupted_blob_of_a_changed_memory_is_409(client, factory, tenant, cube, settings) -> None:
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Leo's dentist appointment is on the 3rd.")
    act = built(client, key, m["id"])
    patch(client, key, m["id"], {"content": "Leo's dentist appointment is on the 5th."}, 1)
    corrupt(settings, act["sha256"])
    body = problem(client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key)), 409)
    assert body["type"].endswith("kv-corrupt") and "POST /v1/memories/" in body["detail"]
    assert "failed its checksum" in body["detail"]
    now = client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).json()
    assert now["corrupt"] is True and now["stale"] is True
    # A file that is gone is said to be missing, not to have failed its checksum.
    gone = factory.memory(key, cube["id"], "Leo's orthodontist is on Mill Lane.")
    act = built(client, key, gone["id"])
    patch(client, key, gone["id"], {"content": "Leo's orthodontist moved to Bridge Street."}, 1)
    blob_path(settings, act["sha256"]).unlink()
    body = problem(client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key)), 409)
    assert "was found missing" in body["detail"] and "checksum" not in body["detail"], body


# ---------------------------------------------------------------------- generation


def test_generate_composes_several_memories(client, factory, tenant, cube) -> None:
    key = tenant.admin_key
    ms = [factory.memory(key, cube["id"], f"{fact} (note {i})") for i, fact in enumerate(FACTS)]
    acts = [built(client, key, m["id"]) for m in ms[:2]]
    ids = [m["id"] for m in ms]
    out = generated(client, key, prompt="What do we know?", memory_ids=ids)
    # The first two come from their activations; the last has none and is prefilled with the prompt.
    assert out["activations_used"] == [a["id"] for a in acts]
    assert out["reused_tokens"] == acts[0]["tokens"] + acts[1]["tokens"]
    assert out["memory_ids"] == ids and out["fallback"] is None
    assert len(out["token_ids"]) <= 6 and out["ttft_ms"] > 0 and out["total_ms"] >= out["ttft_ms"]
    full = generated(client, key, prompt="What do we know?", memory_ids=ids, use_activations=False)
    assert full["prefill_tokens"] == out["prefill_tokens"] + out["reused_tokens"]
    hits = client.get(f"/v1/activations/{acts[0]['id']}", headers=bearer(key)).json()
    assert hits["hits"] >= 1 and hits["last_used_at"] is not None


def test_generate_falls_back_to_full_prefill_when_rope_cannot_shift(client, factory, tenant, cube) -> None:
    key = tenant.admin_key
    ms = [factory.memory(key, cube["id"], f"{fact} (dyn {i})") for i, fact in enumerate(FACTS[:2])]
    for m in ms:
        built(client, key, m["id"], model=DYNAMIC)
    ids = [m["id"] for m in ms]
    out = generated(client, key, model=DYNAMIC, prompt="Tell me.", memory_ids=ids)
    assert out["fallback"].startswith("not_shiftable") and out["activations_used"] == []
    full = generated(client, key, model=DYNAMIC, prompt="Tell me.", memory_ids=ids, use_activations=False)
    assert out["token_ids"] == full["token_ids"] and out["reused_tokens"] == 0
    # One memory needs no move: its KV is used as is even for this model.
    single = generated(client, key, model=DYNAMIC, prompt="Tell me.", memory_ids=ids[:1])
    assert single["fallback"] is None and len(single["activations_used"]) == 1


def test_generate_from_a_search(client, factory, tenant) -> None:
    key = tenant.admin_key
    cube = factory.cube(key)
    lighthouse = factory.memory(key, cube["id"], "The old lighthouse keeper retired to Port Ellen.")
    factory.memory(key, cube["id"], "Quarterly taxes are due in April.")
    act = built(client, key, lighthouse["id"])
    out = generated(
        client, key, prompt="Who retired?", search={"query": "lighthouse keeper", "cube_ids": [cube["id"]], "k": 1}
    )
    assert out["memory_ids"] == [lighthouse["id"]]
    assert out["activations_used"] == [act["id"]]


def test_a_prompt_of_20000_characters_is_accepted(client, tenant) -> None:
    """kv.md's bound, in characters: 20,000 of a two-byte character pass (one more is 422 on prompt, below)."""
    assert generated(client, tenant.admin_key, prompt="\u00e9" * 20_000, max_new_tokens=1)["memory_ids"] == []


def test_generate_with_no_memories_is_just_the_prompt(client, tenant) -> None:
    out = generated(client, tenant.admin_key, prompt="Hello there")
    assert out["memory_ids"] == [] and out["reused_tokens"] == 0 and out["prefill_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": MODEL}, "prompt"),
        ({"prompt": "hi"}, "model"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": "x" * 20_001}, "prompt"),  # kv.md: at most 20,000 characters
        ({"model": MODEL, "prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
        ({"model": MODEL, "prompt": "hi", "recompute_ratio": 1.5}, "recompute_ratio"),
        ({"model": MODEL, "prompt": "hi", "memory_ids": ["nope"]}, "memory_ids[0]"),
        ({"model": MODEL, "prompt": "hi", "memory_ids": [], "search": {"query": "x"}}, "search"),
        ({"model": MODEL, "prompt": "hi", "search": {"query": ""}}, "search.query"),
        ({"model": "unknown", "prompt": "hi"}, "model"),
        ({"model": MODEL, "prompt": "hi", "stream": True}, "stream"),
    ],
)
def test_bad_generate_bodies_name_the_field(client, tenant, body, field) -> None:
    r = client.post("/v1/generate", json=body, headers=bearer(tenant.admin_key))
    assert problem(r, 422)["errors"][0]["field"] == field


def test_a_generate_search_names_its_fields_under_search(client, factory, tenant, cube) -> None:
    """Found in a contract review: the search's own errors named "cube_ids[0]" or "query", fields the generate
    body does not have; and a search for deleted memories fed their text to the model, where memory_ids
    answers 422 for a deleted memory."""
    other = factory.tenant()
    theirs = factory.cube(other.admin_key)
    key = tenant.admin_key
    cases = [
        ({"query": "tea", "cube_ids": [theirs["id"]]}, 404, "search.cube_ids[0]"),
        ({"query": "tea\u0000"}, 422, "search.query"),
        ({"query": "tea", "filters": {"k": "a\u0000"}}, 422, "search.filters.k"),
        ({"query": "tea", "states": ["active", "deleted"]}, 422, "search.states"),
    ]
    for search, status, field in cases:
        body = problem(generate(client, key, prompt="hi", search=search), status)
        assert [e["field"] for e in body["errors"]] == [field], body
        assert body["detail"].startswith(f"{field}:"), body
    # What a search for deleted memories found was generated from; now only where they are not asked for.
    gone = factory.memory(key, cube["id"], "The spare key is under the mat.")
    assert client.delete(f"/v1/memories/{gone['id']}", headers=bearer(key)).status_code == 204
    problem(generate(client, key, prompt="Where?", search={"query": "spare key mat", "states": ["deleted"]}), 422)


def test_unreadable_memories_in_generate_are_404(client, factory, tenant, cube) -> None:
    agent = factory.agent(tenant)  # no grant on the admin's cube
    m = factory.memory(tenant.admin_key, cube["id"], "Secret: the vault code is 0000.")
    body = problem(generate(client, agent.key, prompt="Code?", memory_ids=[m["id"]]), 404)
    assert body["errors"][0]["field"] == "memory_ids[0]"
    missing = "00000000-0000-0000-0000-000000000001"
    body = problem(generate(client, tenant.admin_key, prompt="?", memory_ids=[m["id"], missing]), 404)
    assert body["errors"][0]["field"] == "memory_ids[1]"


def test_generate_refuses_memories_too_long_for_the_model_before_any_prefill(
    client, factory, tenant, cube, monkeypatch
) -> None:
    """Found in review: every memory without stored KV was prefilled before the combined length was checked,
    so a read-only key could hold the KV worker for minutes and still get 422."""
    import memos.kv.runtime as runtime

    prefilled: list[int] = []
    real = runtime.prefill

    def counting(lm: Any, ids: Any, **kw: Any) -> Any:
        prefilled.append(len(ids))
        return real(lm, ids, **kw)

    monkeypatch.setattr(runtime, "prefill", counting)
    key = tenant.admin_key
    # "the" is one token: two memories of 4,500 fit the tiny model's 8,192 positions alone, not together.
    long_a, long_b = (factory.memory(key, cube["id"], " ".join(["the"] * 4500) + f" {n}") for n in ("one", "two"))
    stored = factory.memory(key, cube["id"], "A short fact with stored KV.")
    built(client, key, stored["id"])
    prefilled.clear()
    for use_activations in (True, False):
        r = generate(
            client,
            key,
            prompt="hi",
            memory_ids=[long_a["id"], long_b["id"], stored["id"]],
            use_activations=use_activations,
        )
        body = problem(r, 422)
        assert body["errors"][0]["field"] == "memory_ids" and "8192 positions" in body["detail"]
        assert prefilled == []


def test_generate_refuses_stored_kv_past_the_models_positions_before_reading_any(
    client, app, factory, tenant, cube, monkeypatch
) -> None:
    """Found in review: every memory's stored KV was read from the blob store and decoded before the length was
    checked (64 activations of a 0.5B model at 8k tokens: ~48 GiB, outside every tier's budget, then a 422)."""
    service = app.state.activations
    key = tenant.admin_key
    # "the" is one token: each memory fits the tiny model's 8,192 positions alone, not together.
    a, b = (factory.memory(key, cube["id"], " ".join(["the"] * 4500) + f" {n}") for n in ("one", "two"))
    for m in (a, b):
        built(client, key, m["id"])

    # The scheduler loads nothing meanwhile (on a loaded CI box a pass read three other memories' KV and promoted
    # this one's between the clear and the request), and only a request's reads are counted.
    async def scheduler_holds_nothing(*args: Any) -> bool:
        return False

    monkeypatch.setattr(service, "hold", scheduler_holds_nothing)
    service.tiers.clear()  # cold: a chunk would have to come from the blob store
    reads: list[str] = []
    real = service._from_store

    async def counting(lm: Any, row: Any) -> Any:
        reads.append(row.sha256)
        return await real(lm, row)

    monkeypatch.setattr(service, "_from_store", counting)
    body = problem(generate(client, key, prompt="hi", memory_ids=[a["id"], b["id"]]), 422)
    assert body["errors"][0]["field"] == "memory_ids" and "stored KV alone is 9002 tokens" in body["detail"]
    assert reads == []
    # And a full KV worker is 503 before anything is read.
    monkeypatch.setattr(service.worker, "_pending", service.worker._max_pending)
    assert problem(generate(client, key, prompt="hi", memory_ids=[a["id"]]), 503)["type"].endswith("kv-busy")
    assert reads == []
    monkeypatch.setattr(service.worker, "_pending", 0)
    service.tiers.clear()  # cold again
    out = generated(client, key, prompt="hi", memory_ids=[a["id"]], max_new_tokens=1)
    assert len(reads) == 1 and out["reused_tokens"] > 4000


def test_a_memory_with_no_tokens_between_stored_kv_adds_nothing(client, factory, tenant, cube) -> None:
    """Found in review: a memory whose text has no tokens for the model (a zero-width space; the memories API
    takes it) made a generate 422 when a memory with stored KV came after it."""
    key = tenant.admin_key
    empty = factory.memory(key, cube["id"], "\u200b")
    a, b = (factory.memory(key, cube["id"], f"Fact {n} about the lighthouse keeper.") for n in ("one", "two"))
    for m in (a, b):
        built(client, key, m["id"])
    out = generated(client, key, prompt="Tell me.", memory_ids=[a["id"], empty["id"], b["id"]], max_new_tokens=1)
    assert out["memory_ids"] == [a["id"], empty["id"], b["id"]] and out["reused_tokens"] > 0


def test_builds_of_one_memory_at_once_run_one_prefill(
    client, app, factory, tenant, cube, monkeypatch, database_url
) -> None:
    """Found in review: N builds of one memory at once ran N prefills, wrote N files and kept N chunks in the host
    tier, one of them referenced by a row. Now they take turns; the later ones find the first one's activation."""
    import asyncio

    from memos.activations import service as activation_service
    from memos.activations.schemas import BuildIn
    from memos.identity.principal import Principal

    service: ActivationService = app.state.activations
    m = factory.memory(tenant.admin_key, cube["id"], "The night ferry leaves from pier nine.")
    prefills: list[int] = []
    real = activation_service._prefill_file

    def counting(*args: Any) -> Any:
        prefills.append(1)
        return real(*args)

    monkeypatch.setattr(activation_service, "_prefill_file", counting)
    principal = Principal(role="admin", tenant_id=uuid.UUID(tenant.id), agent_id=uuid.UUID(tenant.admin_id))
    service.tiers.clear()

    async def four() -> list[Any]:
        return list(
            await asyncio.gather(
                *(service.build(principal, uuid.UUID(m["id"]), BuildIn(model=MODEL)) for _ in range(4))
            )
        )

    results = client.blocking_portal.call(four)
    assert len(prefills) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert len({activation.id for activation, _ in results}) == 1
    held = set(service.tiers.keys("host")) | set(service.tiers.keys("device"))
    assert results[0][0].sha256 in held
    # No chunk that no activation refers to. (Counting every held chunk failed on a loaded CI box: a scheduler pass
    # promoted other memories' KV into the tiers while the four builds ran.)
    with psycopg.connect(database_url) as conn:
        stored = {row[0] for row in conn.execute("SELECT sha256 FROM activations")}
    assert held <= stored
    assert service._builds == {}


def test_expired_memories_are_not_found_for_generate_and_build(client, factory, tenant, cube) -> None:
    """As GET /v1/memories/{id} (404) and search (hidden) treat them; they were used (found in review)."""
    import time

    key = tenant.admin_key
    live = factory.memory(key, cube["id"], "Frank's parcel is at the post office.")
    expiring = factory.memory(key, cube["id"], "Frank's parcel code is 5512.", ttl_seconds=1)
    time.sleep(1.5)
    assert client.get(f"/v1/memories/{expiring['id']}", headers=bearer(key)).status_code == 404
    body = problem(generate(client, key, prompt="Code?", memory_ids=[live["id"], expiring["id"]]), 404)
    assert body["errors"][0]["field"] == "memory_ids[1]"
    problem(build(client, key, expiring["id"]), 404)
    problem(import_kv(client, key, expiring["id"], b"not read: the memory is not found first"), 404)
    problem(
        client.post(
            "/v1/scheduler/pin", json={"memory_id": expiring["id"], "model": MODEL, "tier": "host"}, headers=bearer(key)
        ),
        404,
    )


def test_an_expired_memorys_activations_are_not_found(client, factory, tenant, cube, database_url) -> None:
    """Their tokens are its text: 404 as the memory, its versions and its provenance are (found in review: the
    KV file of an expired memory was still served)."""
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "Grace's locker code is 7301.", ttl_seconds=3600)
    act = built(client, key, m["id"])
    urls = [f"/v1/activations/{act['id']}", f"/v1/activations/{act['id']}/kv", f"/v1/memories/{m['id']}/activations"]
    assert [client.get(u, headers=bearer(key)).status_code for u in urls] == [200, 200, 200]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE memories SET expires_at = now() - interval '1 second' WHERE id = %s", [m["id"]])
    for url in urls:
        problem(client.get(url, headers=bearer(key)), 404)


# ---------------------------------------------------------------------- isolation


def test_other_tenants_get_404_on_every_activation_endpoint(client, factory, tenant, cube, exported) -> None:
    stranger = factory.tenant()
    key = stranger.admin_key
    m, act = exported["memory"], exported["activation"]
    problem(build(client, key, m["id"]), 404)
    problem(client.get(f"/v1/memories/{m['id']}/activations", headers=bearer(key)), 404)
    problem(client.get(f"/v1/activations/{act['id']}", headers=bearer(key)), 404)
    problem(client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key)), 404)
    problem(import_kv(client, key, m["id"], exported["data"]), 404)
    problem(generate(client, key, prompt="?", memory_ids=[m["id"]]), 404)
    out = generated(client, key, prompt="?", search={"query": m["content"]})
    assert out["memory_ids"] == []
    # An agent of the same tenant without a grant sees nothing either.
    outsider = factory.agent(tenant)
    problem(client.get(f"/v1/activations/{act['id']}", headers=bearer(outsider.key)), 404)
    problem(client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(outsider.key)), 404)


def test_activation_endpoints_need_a_key(client, exported) -> None:
    act = exported["activation"]
    for r in (
        client.get("/v1/models"),
        client.get(f"/v1/activations/{act['id']}"),
        client.get(f"/v1/activations/{act['id']}/kv"),
        client.post("/v1/generate", json={"model": MODEL, "prompt": "x"}),
        client.post("/v1/activations/import", content=b"x"),
    ):
        problem(r, 401)


# ---------------------------------------------------------------------- no model configured


@pytest.fixture(scope="module")
def bare_client(settings: Settings, embedder: Any) -> Iterator[TestClient[Litestar]]:
    bare = dataclasses.replace(settings, models={})
    with TestClient(create_app(bare, embedder_factory=lambda: embedder)) as c:
        yield c


def test_without_models_kv_endpoints_say_how_to_configure_one(bare_client, factory, tenant, cube, exported) -> None:
    key = tenant.admin_key
    m, act = exported["memory"], exported["activation"]
    r = bare_client.get("/v1/models", headers=bearer(key))
    assert r.status_code == 200 and r.json()["items"] == []
    for r in (
        build(bare_client, key, m["id"]),
        generate(bare_client, key, prompt="?"),
        import_kv(bare_client, key, m["id"], exported["data"]),
    ):
        body = problem(r, 409)
        assert body["type"].endswith("no-model") and "MEMOS_MODELS" in body["detail"]
    # What was stored stays readable and downloadable.
    assert bare_client.get(f"/v1/activations/{act['id']}", headers=bearer(key)).status_code == 200
    download(bare_client, key, act["id"])


# ---------------------------------------------------------------------- a model that does not load

BROKEN = "broken"
"""Sorts before MODEL: the first page of the list holds it."""


@pytest.fixture(scope="module")
def broken_client(
    settings: Settings, embedder: Any, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient[Litestar]]:
    """MEMOS_MODELS with one more model, whose weights file is cut short (a copy that broke on the way)."""
    broken = tmp_path_factory.mktemp("broken") / BROKEN
    shutil.copytree(model_dirs[MODEL], broken)
    (weights,) = broken.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    models = {**settings.models, BROKEN: ModelSpec(name=BROKEN, path=broken)}
    with TestClient(create_app(dataclasses.replace(settings, models=models), embedder_factory=lambda: embedder)) as c:
        yield c


def test_a_model_that_does_not_load_is_listed_unavailable_and_503_only_where_needed(
    broken_client, factory, tenant, cube
) -> None:
    """Found in review: one broken model made every page of GET /v1/models that held it a 503, hiding the models
    that work. It is listed, unavailable and why; only the requests that need it answer 503."""
    key = tenant.admin_key
    r = broken_client.get("/v1/models", headers=bearer(key))
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in r.json()["items"]}
    assert set(models) == {BROKEN, MODEL, OTHER, DYNAMIC}
    broken = models[BROKEN]
    assert broken["status"] == "unavailable" and f"model {BROKEN!r} could not be loaded" in broken["reason"]
    # The error names the server's directories: it stays in the log (a security review found it here).
    assert "/" not in broken["reason"] and "safetensors" not in broken["reason"], broken["reason"]
    assert broken["fingerprint"] is None and broken["layers"] is None and broken["kv_bytes_per_token"] is None
    assert (broken["dtype"], broken["device"]) == ("float32", "auto")
    tiny = models[MODEL]
    assert tiny["status"] == "ready" and tiny["reason"] is None and len(tiny["fingerprint"]) == 64
    # A page holding only the broken model answers too, and the next page goes on.
    first = broken_client.get("/v1/models", params={"limit": 1}, headers=bearer(key))
    assert first.status_code == 200, first.text
    assert [m["name"] for m in first.json()["items"]] == [BROKEN]
    rest = broken_client.get("/v1/models", params={"cursor": first.json()["next_cursor"]}, headers=bearer(key))
    assert [m["name"] for m in rest.json()["items"]] == [MODEL, DYNAMIC, OTHER]
    # What needs the broken model is 503 (retry later); the other models work as before.
    m = factory.memory(key, cube["id"], "The spare key is taped under the third drawer.")
    for r in (
        build(broken_client, key, m["id"], model=BROKEN),
        broken_client.post("/v1/generate", json={"model": BROKEN, "prompt": "Where is the key?"}, headers=bearer(key)),
    ):
        body = problem(r, 503)
        # 30 s from the failed load, counting down while it is remembered.
        assert 1 <= int(r.headers["retry-after"]) <= 30 and f"model {BROKEN!r} could not be loaded" in body["detail"]
        assert "/" not in body["detail"], body["detail"]
    assert build(broken_client, key, m["id"]).status_code == 201


# ---------------------------------------------------------------------- model loading


async def test_models_load_only_after_the_embedder_has(tmp_path: Path) -> None:
    """transformers patches class attributes during from_pretrained: two loads at once can break weight tying."""
    import asyncio

    from memos.activations.models import KVWorker, ModelRegistry
    from memos.errors import Unavailable

    gate = asyncio.Event()
    calls: list[str] = []

    async def embedder_loaded() -> None:
        calls.append("waited")
        await gate.wait()

    worker = KVWorker()
    registry = ModelRegistry({"x": ModelSpec(name="x", path=tmp_path)}, worker, before_load=embedder_loaded)
    try:
        task = asyncio.create_task(registry.get("x"))
        await asyncio.sleep(0.05)
        assert calls == ["waited"] and not task.done()  # held back while the embedder loads
        gate.set()
        # The directory holds no model: a configuration problem, 503, never a 500.
        with pytest.raises(Unavailable, match="could not be loaded"):
            await task
    finally:
        worker.close()


async def test_a_kv_job_holds_its_place_until_it_ends_even_when_its_caller_left() -> None:
    """A caller that went away (a client that disconnected) freed its place in the KV queue while its job still
    ran: each such caller let one more job in than the bound (found in review)."""
    import asyncio
    import threading

    from memos.activations.models import KVBusy, KVWorker

    worker = KVWorker(max_pending=1)
    release = threading.Event()
    try:
        left = asyncio.create_task(worker.run(release.wait, 10))
        await asyncio.sleep(0.05)  # the job is running now
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        with pytest.raises(KVBusy):  # the job runs on, in the only place there is
            await worker.run(lambda: None)
        release.set()
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # its place comes back once it has ended
            try:
                assert await worker.run(lambda: 7) == 7
                break
            except KVBusy:
                assert asyncio.get_running_loop().time() < deadline, "the place never came back"
                await asyncio.sleep(0.01)
    finally:
        release.set()
        worker.close()


# ---------------------------------------------------------------------- an import's body: read last, bounded
# Found in review: the body (up to MEMOS_MAX_KV_BYTES, 1 GiB) was read before the model, the memory and the
# caller's access were checked, and concurrent uploads each held it: four 900 MiB uploads answered 409 no-model
# with the server at 5.5 GiB.


class Body:
    """A request body sent as it is iterated, which records whether the server asked for any of it."""

    def __init__(self, data: bytes, pieces: int = 4) -> None:
        step = max(1, -(-len(data) // pieces))
        self.pieces = [data[i : i + step] for i in range(0, len(data), step)]
        self.read = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield from self.pieces


def post_streamed(
    client: Any, key: str, memory_id: str, body: Body, model: str = MODEL, length: int | None = None
) -> Any:
    """The import with ``body`` streamed: chunked, or with a declared ``length`` (what the SDK sends)."""
    headers = {**bearer(key), "Content-Type": "application/octet-stream"}
    if length is not None:
        headers["Content-Length"] = str(length)
    return client.post(
        "/v1/activations/import",
        params={"memory_id": memory_id, "model": model},
        content=iter(body),
        headers=headers,
    )


def test_without_a_model_the_body_is_never_read(bare_client, tenant, exported) -> None:
    data = exported["data"]
    for length in (None, len(data)):
        body = Body(data)
        r = post_streamed(bare_client, tenant.admin_key, exported["memory"]["id"], body, length=length)
        assert problem(r, 409)["type"].endswith("no-model")
        assert not body.read, f"the body was read before the 409 (Content-Length {length})"


def test_an_unknown_model_or_a_memory_the_caller_may_not_write_is_refused_unread(
    client, factory, tenant, cube, exported
) -> None:
    data = exported["data"]
    stranger = factory.tenant()
    reader = factory.agent(tenant)
    r = client.put(
        f"/v1/cubes/{cube['id']}/grants/{reader.id}", json={"access": "read"}, headers=bearer(tenant.admin_key)
    )
    assert r.status_code in (200, 201), r.text
    m = exported["memory"]["id"]
    for key, model, status in (
        (tenant.admin_key, "no-such-model", 422),  # model configured
        (stranger.admin_key, MODEL, 404),  # a memory of another tenant
        (reader.key, MODEL, 403),  # a cube the caller may only read
    ):
        body = Body(data)
        problem(post_streamed(client, key, m, body, model=model, length=len(data)), status)
        assert not body.read, f"the body was read before the {status}"


def test_the_checks_keep_api_md_order_for_an_empty_body(client, factory, tenant, exported) -> None:
    """Body not empty comes before the memory's checks, with a declared length (read from it) and chunked."""
    stranger = factory.tenant()
    for length in (0, None):
        body = Body(b"")
        r = post_streamed(client, stranger.admin_key, exported["memory"]["id"], body, length=length)
        assert problem(r, 422)["errors"][0]["field"] == "body"
    problem(post_streamed(client, stranger.admin_key, exported["memory"]["id"], Body(b"x")), 404)


def test_imports_past_the_bound_are_503_unread_and_the_places_come_back(client, app, factory, exported) -> None:
    service: ActivationService = app.state.activations
    other = factory.tenant()
    c = factory.cube(other.admin_key)
    m = factory.memory(other.admin_key, c["id"], FACTS[2])
    data = exported["data"]
    places = [service._import_slot(uuid.uuid4()) for _ in range(IMPORTS_AT_ONCE)]
    for place in places:  # as imports of other tenants reading their bodies would hold them
        place.__enter__()
    try:
        for length in (len(data), None):
            body = Body(data)
            r = post_streamed(client, other.admin_key, m["id"], body, length=length)
            assert problem(r, 503)["type"].endswith("kv-busy") and r.headers["retry-after"] == "2"
            # With its length declared, unread. (Chunked, the server looks at its first message only, but this test
            # client hands over the whole iterator at the first receive: not observable here.)
            if length is not None:
                assert not body.read
    finally:
        for place in places:
            place.__exit__(None, None, None)
    assert post_streamed(client, other.admin_key, m["id"], Body(data), length=len(data)).status_code == 201
    # A refused or failed import gives its place back too: both places are free again.
    problem(import_kv(client, other.admin_key, m["id"], b"not a kv file"), 422)
    assert service._importing == 0


def test_a_chunked_upload_over_the_limit_is_413_and_a_chunked_import_works(client, factory, exported) -> None:
    other = factory.tenant()
    c = factory.cube(other.admin_key)
    m = factory.memory(other.admin_key, c["id"], FACTS[2])
    # No Content-Length to refuse it by: the limit is counted as the body arrives.
    problem(post_streamed(client, other.admin_key, m["id"], Body(b"x" * (KV_LIMIT + 1), pieces=8)), 413)
    # A declared length over the limit is refused before anything else, unread.
    body = Body(b"x" * 16)
    problem(post_streamed(client, other.admin_key, m["id"], body, model="no-such-model", length=KV_LIMIT + 1), 413)
    assert not body.read
    r = post_streamed(client, other.admin_key, m["id"], Body(exported["data"], pieces=7))
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == exported["activation"]["sha256"]


def test_a_model_that_failed_to_load_is_not_loaded_again_until_its_retry_after(
    broken_client, factory, tenant, cube, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each listing or build loaded the broken directory again (its files read, an ERROR with a traceback each
    time) in the KV worker that every tenant's generations wait on: any agent polling GET /v1/models kept it
    busy. A failure now answers 503 at once until its Retry-After has passed (found in review)."""
    registry = broken_client.app.state.activations.models
    now = [time.monotonic()]
    monkeypatch.setattr(registry, "clock", lambda: now[0])
    monkeypatch.setattr(registry, "retry_failed_after", 1.0)
    now[0] += 1.1  # a failure remembered from an earlier test has lapsed
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "The ladder is in the shed.")

    def loads() -> int:
        return sum(1 for r in caplog.records if r.getMessage() == "model failed to load")

    with caplog.at_level(logging.ERROR, logger="memos.activations.models"):
        for _ in range(3):
            listed = {x["name"]: x for x in broken_client.get("/v1/models", headers=bearer(key)).json()["items"]}
            assert listed[BROKEN]["status"] == "unavailable"
        r = build(broken_client, key, m["id"], model=BROKEN)
        problem(r, 503)
        assert r.headers["retry-after"] == "1"
        assert loads() == 1, "one load for three listings and a build"
        now[0] += 0.5
        assert build(broken_client, key, m["id"], model=BROKEN).status_code == 503
        assert loads() == 1, "not yet"
        now[0] += 0.6
        assert broken_client.get("/v1/models", headers=bearer(key)).status_code == 200
        assert loads() == 2, "loaded again once the retry time had passed"


def test_one_tenants_import_takes_one_place(client, app, factory, exported) -> None:
    """Found in the second look: the places were taken before the body was read, with no limit on how long that
    took, so one agent with two stalled uploads made every tenant's import a 503 until it hung up. A tenant holds
    at most one place (and a body that stops arriving is 408: the next test)."""
    service: ActivationService = app.state.activations
    other = factory.tenant()
    c = factory.cube(other.admin_key)
    m = factory.memory(other.admin_key, c["id"], FACTS[2])
    data = exported["data"]
    with service._import_slot(uuid.UUID(other.id)):  # an import of this tenant is being read
        r = post_streamed(client, other.admin_key, m["id"], Body(data), length=len(data))
        assert problem(r, 503)["type"].endswith("kv-busy")
        assert service._importing == 1, "the other place stays free for other tenants"
    assert service._importing == 0 and not service._importing_tenants
    assert post_streamed(client, other.admin_key, m["id"], Body(data), length=len(data)).status_code == 201


async def test_a_body_that_stops_arriving_is_408(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ASGI channel of a client that sent part of its body and stopped (Litestar's test client hands a body
    over whole, so the channel is played here): the read gives up after BODY_IDLE_S."""
    from litestar.exceptions import HTTPException

    from memos.activations import controller

    class Stalled:
        content_length = 1000
        sent = False

        async def receive(self) -> dict[str, Any]:
            if not self.sent:
                self.sent = True
                return {"type": "http.request", "body": b"x" * 10, "more_body": True}
            await asyncio.Event().wait()  # nothing more ever arrives
            raise AssertionError("unreachable")

    monkeypatch.setattr(controller, "BODY_IDLE_S", 0.2)
    upload = controller._RequestUpload(Stalled(), None)  # type: ignore[arg-type]
    with pytest.raises(HTTPException) as caught:
        await asyncio.wait_for(upload.read(), 5)
    assert caught.value.status_code == 408


def test_a_kv_download_whose_rebuild_races_a_purge_is_404_not_500(
    app, client, factory, tenant, cube, settings, monkeypatch
) -> None:
    """The stored file was missing, so the download rebuilt it; the memory's purge committed during the prefill and
    deleted the activation, and the repair's assert made it a 500 (found in a concurrency review)."""
    from memos.activations import service as activation_service
    from memos.identity.principal import Principal

    service: ActivationService = app.state.activations
    key = tenant.admin_key
    m = factory.memory(key, cube["id"], "The vault code is 4417 and the door is blue.")
    act = built(client, key, m["id"])
    service.tiers.discard(act["sha256"])
    blob_path(settings, act["sha256"]).unlink()  # the stored file goes missing
    principal = Principal(role="admin", tenant_id=uuid.UUID(tenant.id), agent_id=uuid.UUID(tenant.admin_id))
    real_run = service.worker.run

    async def purge_first(fn: Any, *args: Any) -> Any:
        if fn is activation_service._prefill_file:
            await app.state.memories.delete(principal, uuid.UUID(m["id"]), None, purge=True)
        return await real_run(fn, *args)

    monkeypatch.setattr(service.worker, "run", purge_first)
    r = client.get(f"/v1/activations/{act['id']}/kv", headers=bearer(key))
    assert problem(r, 404)["detail"] == "no such activation"
    assert not blob_path(settings, act["sha256"]).exists()

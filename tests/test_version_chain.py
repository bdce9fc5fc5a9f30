"""Property: any sequence of PATCH, restore and delete keeps a memory's version chain whole.

Hypothesis draws sequences of writes (with current, stale, wildcard and missing If-Match
headers, no-op patches, restores of versions that do and do not exist, soft deletes and
purges) and sends them through the HTTP API to the real database. A small model predicts
each answer. After every step:

- the versions are exactly 1..N, with the ops the model expects, each with the content the model has;
- the memory's current version is N, and its content, tags and state are those of version N;
- in Postgres, ``memories.version`` equals the highest version row and the row count (no version
  row without its current-state update, and no gap).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hypothesis
import psycopg
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient

from tests.conftest import Factory, bearer

Client = TestClient[Litestar]

CONTENTS = st.sampled_from(["alpha", "beta", "gamma", "delta"])
TAGS = st.lists(st.sampled_from(["x", "y", "z"]), max_size=2, unique=True)
# Mostly writes that go through; stale and missing headers some of the time.
IF_MATCH = st.sampled_from(["current", "any", "current", "stale", "none"])

PATCH = st.fixed_dictionaries(
    {"op": st.just("patch"), "if_match": IF_MATCH},
    optional={"content": CONTENTS, "tags": TAGS, "state": st.sampled_from(["active", "archived"])},
)
RESTORE = st.fixed_dictionaries(
    {
        "op": st.just("restore"),
        # Mostly versions that exist; 99 never does, and 0 is not a version number.
        "version": st.one_of(st.integers(min_value=1, max_value=3), st.sampled_from([1, 2, 0, 99])),
        "if_match": IF_MATCH,
    }
)
DELETE = st.fixed_dictionaries({"op": st.just("delete"), "purge": st.just(False), "if_match": IF_MATCH})
PURGE = st.fixed_dictionaries({"op": st.just("delete"), "purge": st.just(True), "if_match": IF_MATCH})
_KINDS = {"patch": PATCH, "restore": RESTORE, "delete": DELETE}
STEP = st.sampled_from(["patch"] * 4 + ["restore"] * 3 + ["delete"]).flatmap(_KINDS.__getitem__)
# After a purge every write is refused, so a purge, when drawn, comes late: a few steps after it at most.
STEPS = st.tuples(st.lists(STEP, min_size=1, max_size=12), st.lists(STEP, max_size=3), st.one_of(st.none(), PURGE)).map(
    lambda parts: parts[0] + ([parts[2], *parts[1]] if parts[2] is not None else [])
)


@dataclasses.dataclass
class Snapshot:
    op: str
    content: str | None
    tags: list[str]
    state: str


@dataclasses.dataclass
class Model:
    versions: list[Snapshot]
    purged: bool = False

    @property
    def current(self) -> Snapshot:
        return self.versions[-1]

    def add(self, op: str, **changes: Any) -> None:
        last = self.current
        self.versions.append(dataclasses.replace(last, op=op, **changes))

    def expect(self, step: dict[str, Any]) -> int:
        """Apply ``step`` to the model; the status the API must answer."""
        n = len(self.versions)
        if step["op"] == "patch":
            if step["if_match"] == "none":
                return 428
            if self.purged or self.current.state == "deleted":
                return 409
            if step["if_match"] == "stale":
                return 412
            changes = {k: step[k] for k in ("content", "tags", "state") if k in step}
            if any(getattr(self.current, k) != v for k, v in changes.items()):
                self.add("update", **changes)
            return 200
        if step["op"] == "restore":
            if step["version"] < 1:
                return 422  # the body's schema says so, before anything is looked up
            if self.purged:
                return 409
            if step["if_match"] == "stale":
                return 412
            if not 1 <= step["version"] <= n:
                return 404
            old = self.versions[step["version"] - 1]
            self.add("restore", content=old.content, tags=list(old.tags), state="active")
            return 200
        # delete
        if step["if_match"] == "stale":
            return 412
        if self.current.state != "deleted":
            self.add("delete", state="deleted")
        if step["purge"]:
            self.purged = True
            self.versions = [dataclasses.replace(v, content=None, tags=[]) for v in self.versions]
        return 204


def _headers(key: str, if_match: str, version: int) -> dict[str, str]:
    headers = bearer(key)
    if if_match == "current":
        headers["If-Match"] = f'"{version}"'
    elif if_match == "stale":
        headers["If-Match"] = f'"{version + 1 if version == 1 else version - 1}"'
    elif if_match == "any":
        headers["If-Match"] = "*"
    return headers


def _send(client: Client, key: str, memory_id: str, step: dict[str, Any], version: int) -> Any:
    headers = _headers(key, step["if_match"], version)
    if step["op"] == "patch":
        body = {k: step[k] for k in ("content", "tags", "state") if k in step}
        return client.patch(f"/v1/memories/{memory_id}", json=body, headers=headers)
    if step["op"] == "restore":
        return client.post(f"/v1/memories/{memory_id}/restore", json={"version": step["version"]}, headers=headers)
    purge = "?purge=true" if step["purge"] else ""
    return client.delete(f"/v1/memories/{memory_id}{purge}", headers=headers)


def _check(client: Client, key: str, database_url: str, memory_id: str, model: Model) -> None:
    n = len(model.versions)
    r = client.get(f"/v1/memories/{memory_id}", headers=bearer(key))
    assert r.status_code == 200, r.text
    memory = r.json()
    assert r.headers["ETag"] == f'"{n}"'
    assert memory["version"] == n
    assert (memory["content"], memory["tags"], memory["state"]) == (
        model.current.content,
        model.current.tags,
        model.current.state,
    )
    page = client.get(f"/v1/memories/{memory_id}/versions?limit=500", headers=bearer(key)).json()
    assert [v["version"] for v in page["items"]] == list(range(1, n + 1))
    assert [(v["op"], v["content"], v["tags"], v["state"]) for v in page["items"]] == [
        (s.op, s.content, s.tags, s.state) for s in model.versions
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT m.version, max(v.version), count(v.version) FROM memories m"
            " JOIN memory_versions v ON v.memory_id = m.id WHERE m.id = %s GROUP BY m.version",
            (memory_id,),
        ).fetchone()
    assert row == (n, n, n)


@pytest.fixture(scope="module")
def owner(factory: Factory) -> tuple[str, str]:
    """A tenant admin's key and a cube: one for every example (a tenant per example would only slow it)."""
    key = factory.tenant().admin_key
    return key, factory.cube(key)["id"]


@hypothesis.settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@hypothesis.given(first=CONTENTS, first_tags=TAGS, steps=STEPS)
def test_any_write_sequence_keeps_versions_contiguous_and_current_last(
    client: Client,
    factory: Factory,
    owner: tuple[str, str],
    database_url: str,
    first: str,
    first_tags: list[str],
    steps: list[dict[str, Any]],
) -> None:
    key, cube_id = owner
    memory = factory.memory(key, cube_id, first, tags=first_tags)
    model = Model(versions=[Snapshot(op="create", content=first, tags=first_tags, state="active")])
    _check(client, key, database_url, memory["id"], model)
    for step in steps:
        version = len(model.versions)
        expected = model.expect(step)
        r = _send(client, key, memory["id"], step, version)
        assert r.status_code == expected, (step, r.text)
        if r.status_code == 200:
            assert r.headers["ETag"] == f'"{len(model.versions)}"'
        _check(client, key, database_url, memory["id"], model)

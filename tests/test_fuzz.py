"""Schemathesis against the OpenAPI document the service serves: every operation, with a key and without.

The service runs for real (uvicorn on a loopback port, this module's database, the shared
embedder), and schemathesis reads ``/schema/openapi.json`` from it, so operations added
later are fuzzed without touching this file. Each operation gets a bounded number of
generated requests (``MEMOS_FUZZ_EXAMPLES``, default below), valid and invalid ones.

What must hold: no 5xx, every status code, content type, header and body the document
describes (schemathesis' conformance checks), invalid input refused with a 4xx. Path ids
are drawn from real resources as well as random ones, so requests reach past the 404.

One check is replaced rather than used as is: schemathesis' ``positive_data_acceptance``
expects every schema-valid request to succeed. Some rules cannot be said in a JSON schema
(an opaque pagination cursor must be one the server handed out; a ``response`` memory
needs ``metadata.query``), and memos answers them with 422 naming the field. The
replacement accepts a 422 only when every field it names is in ``SEMANTIC_FIELDS``, so a
422 for anything the schema allows (an unknown field, a length the schema does not state)
still fails. 412 (a stale If-Match) depends on state, not on the input, like 404 and 409.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis.checks import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.pytest._test_builder import build_operation_test
from schemathesis.specs.openapi.checks import positive_data_acceptance

from memos.app import create_app
from memos.embed.base import Embedder
from memos.settings import Settings
from tests.conftest import OPERATOR_KEY, free_port

EXAMPLES = int(os.environ.get("MEMOS_FUZZ_EXAMPLES", "20"))

# Request fields whose validity depends on more than their JSON schema (see the module docstring).
SEMANTIC_FIELDS = {"cursor", "metadata.query", "default", "threshold", "min_threshold", "categories", "search"}
"""The rules between fields, which a schema cannot state. The cache configuration's: ``default`` names a
category of the body; ``min_threshold`` <= ``threshold`` <= ``max_threshold``; ``categories``: at most 64 with
the built-in ones. A generation's ``search``: not together with ``memory_ids`` (a 500 hid it until the
dependency named ``search`` was renamed)."""


@pytest.fixture(scope="module")
def base_url(settings: Settings, embedder: Embedder) -> Iterator[str]:
    """The app served by uvicorn in a thread, until the module ends."""
    app = create_app(settings, embedder_factory=lambda: embedder)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("the service did not become ready")
    yield url
    server.should_exit = True
    thread.join(timeout=30)


class World:
    """Real resources of one tenant, so generated requests can name ids that exist.

    ``refresh`` gives each operation resources of its own: a fuzzed DELETE of a cube must not leave
    the operations after it nothing but 404s.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        r = httpx.post(url + "/v1/tenants", json={"name": "fuzz"}, headers=op)
        assert r.status_code == 201, r.text
        self.admin_key = r.json()["admin_key"]
        self.ids: dict[str, list[str]] = {}
        self.versions: dict[str, int] = {}
        self.statuses: list[int] = []

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(self.url + path, json=body, headers=self.auth, timeout=30)
        assert r.status_code in (200, 201), r.text
        result: dict[str, Any] = r.json()
        return result

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def refresh(self) -> None:
        agent = self._post("/v1/agents", {"name": f"fuzz-{uuid.uuid4().hex[:8]}", "role": "agent"})
        cube = self._post("/v1/cubes", {"name": f"fuzz-{uuid.uuid4().hex[:8]}"})
        first = self._post(f"/v1/cubes/{cube['id']}/memories", {"kind": "plaintext", "content": "the sky is blue"})
        second = self._post(
            f"/v1/cubes/{cube['id']}/memories",
            {
                "kind": "plaintext",
                "content": "the sea is blue too",
                "tags": ["t"],
                "provenance": {"derived_from": [{"memory_id": first["id"]}]},
                "links": [{"to": first["id"], "type": "related"}],
            },
        )
        r = httpx.patch(
            self.url + f"/v1/memories/{first['id']}",
            json={"content": "the sky is blue by day"},
            headers={**self.auth, "If-Match": '"1"'},
        )
        assert r.status_code == 200, r.text
        # The agent's key may be revoked by the fuzzer; the admin's (used for everything) is never offered.
        self.ids = {
            "agent_id": [agent["id"]],
            "prefix": [agent["api_key"].split("_")[1]],
            "cube_id": [cube["id"]],
            "memory_id": [first["id"], second["id"]],
            "n": ["1", "2"],
        }
        self.versions = {first["id"]: 2, second["id"]: 1}


@pytest.fixture(scope="module")
def world(base_url: str) -> World:
    return World(base_url)


def _config(examples: int, key: str | None) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            # Given as the BearerAuth scheme's credentials (not a plain header), so the ignored_auth check
            # knows the key is valid and probes each operation again without it and with a wrong one.
            **({"auth": {"openapi": {"BearerAuth": {"bearer": key}}}} if key else {}),
            "phases": {
                "examples": {"enabled": False},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            # Postgres stores no NUL in text or JSON; memos refuses one anywhere with a 422 naming the field
            # (tests/test_regressions.py::test_nul_characters_are_422_naming_the_field), which no JSON schema can say of free-form metadata.
            # Unknown query parameters are ignored (docs/api.md), so an extra one does not make a request invalid.
            "generation": {
                "max-examples": examples,
                "mode": "all",
                "allow-x00": False,
                "allow-extra-parameters": False,
                "with-security-parameters": key is None,
            },
            "checks": {
                # A malformed or stale If-Match is a failed precondition (RFC 9110 §13.1.1), not a bad request.
                # A missing If-Match where one is required is 428 Precondition Required (RFC 6585).
                "missing_required_header": {"expected-statuses": ["400", "401", "403", "422", "428"]},
                "negative_data_rejection": {
                    "expected-statuses": ["400", "401", "403", "404", "405", "409", "412", "413", "422", "428", "429"]
                },
            },
        }
    )


@pytest.fixture(scope="module")
def keyed_schema(base_url: str, world: World) -> Any:
    """The document as the running service serves it; requests carry the tenant admin's key."""
    config = _config(EXAMPLES, world.admin_key)
    return schemathesis.openapi.from_url(base_url + "/schema/openapi.json", config=config)


@pytest.fixture(scope="module")
def keyless_schema(base_url: str) -> Any:
    """The same document; requests carry no key."""
    return schemathesis.openapi.from_url(base_url + "/schema/openapi.json", config=_config(EXAMPLES, None))


def _operation_labels() -> list[str]:
    """Every operation of the document, known at collection time (building the app starts nothing)."""
    app = create_app(Settings(database_url="postgresql://collect-only/none", operator_key=OPERATOR_KEY))
    document = app.openapi_schema.to_schema()
    return [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in ("get", "put", "post", "delete", "patch")
        if method in item
    ]


LABELS = _operation_labels()


def _run(api_schema: Any, label: str, test_func: Any, given: dict[str, Any], **fixtures: Any) -> None:
    """Run one operation's generated cases (coverage and fuzzing phases) through ``test_func``.

    This is what schemathesis' pytest plugin does per operation; it is called directly because that
    plugin does not run under pytest 9 (it rewrites ``Node._nodeid``, which pytest 9 no longer has).
    """
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    test = build_operation_test(
        config=api_schema.config,
        operation=operation,
        test_func=test_func,
        given_kwargs=given,
        feedback=FeedbackSources(),
        explicit_settings=SETTINGS,
    )
    try:
        test(**fixtures)
    except FailureGroup as exc:
        raise AssertionError(str(exc)) from None


def semantic_positive_data_acceptance(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, except a 422 naming only ``SEMANTIC_FIELDS`` and a 412 are accepted."""
    if response.status_code == 412:
        return None
    if response.status_code == 422 and case.meta is not None and case.meta.generation.mode.is_positive:
        fields = [e.get("field") for e in (response.json().get("errors") or [])]
        # A field inside a list item reads like items[2].metadata.query.
        if fields and all(any(f == s or f.endswith("." + s) for s in SEMANTIC_FIELDS) for f in fields):
            return None
    positive_data_acceptance(ctx, response, case)
    return None


def _use_real_ids(case: Any, world: World, data: st.DataObject) -> None:
    """Swap schema-valid ids for ids of real resources, some of the time (never where the case is negative).

    A memory's If-Match becomes its current version or ``*`` some of the time too, so writes get past 412.
    """
    meta = case.meta

    def positive(location: ParameterLocation) -> bool:
        info = meta.components.get(location) if meta is not None else None
        return info is None or info.mode.is_positive

    if not case.path_parameters or not positive(ParameterLocation.PATH):
        return
    for name in list(case.path_parameters):
        pool = world.ids.get(name)
        if pool:
            choice = data.draw(st.sampled_from([None, *pool]), label=name)
            if choice is not None:
                case.path_parameters[name] = choice
    memory = case.path_parameters.get("memory_id")
    if memory in world.versions and case.headers and "If-Match" in case.headers and positive(ParameterLocation.HEADER):
        tag = data.draw(st.sampled_from([None, f'"{world.versions[memory]}"', "*"]), label="If-Match")
        if tag is not None:
            case.headers["If-Match"] = tag


SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


def _with_key(case: Any, data: st.DataObject, world: World) -> None:
    _use_real_ids(case, world, data)
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance],
        additional_checks=[semantic_positive_data_acceptance],
        timeout=30,
    )
    if response.status_code < 300 and case.operation.path == "/v1/memories/{memory_id}" and case.method != "GET":
        # The memory moved on: keep If-Match drawing its current version.
        memory = case.path_parameters["memory_id"]
        if memory in world.versions:
            world.versions[memory] += 1
    world.statuses.append(response.status_code)


def _without_key(case: Any) -> None:
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance],
        additional_checks=[semantic_positive_data_acceptance],
        timeout=30,
    )
    if not case.path.startswith("/v1/") or response.status_code == 401:
        return
    if response.request.method != case.operation.method.upper():
        # A method the path does not have (the coverage phase tries them): the router's 405.
        assert response.status_code == 405, response.text
    else:
        # Only the router may answer first: a path no route matches (``/versions/abc``) is its 404.
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == "Not Found", response.text


@pytest.mark.parametrize("label", LABELS)
def test_fuzz_with_a_tenant_admin_key(keyed_schema: Any, world: World, label: str) -> None:
    world.refresh()
    world.statuses.clear()
    _run(keyed_schema, label, _with_key, {"data": st.data()}, world=world)
    # Guards the harness itself: had the key not been sent, every answer would have been 401.
    assert set(world.statuses) - {401}, f"{label}: only 401s"


@pytest.mark.parametrize("label", LABELS)
def test_fuzz_without_a_key(keyless_schema: Any, label: str) -> None:
    _run(keyless_schema, label, _without_key, {})

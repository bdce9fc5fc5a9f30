"""Bad input gets a clear answer and loses nothing: problem+json naming the field, never a 500.

One test per defect the input review found (bodies that are not UTF-8, JSON nested too deep, impossible UTC
offsets, KV input the model cannot take, a body field named like a dependency, hostile KV headers, admin
commands that printed tracebacks, NUL in identity input, unbalanced If-Match, forged version cursors).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import uuid
from typing import Any

import msgspec
import pytest
from conftest import OPERATOR_KEY, Factory, Tenant, bearer, with_tiny_model
from litestar import Litestar
from litestar.testing import TestClient

from memos.cli.main import main as cli_main
from memos.settings import Settings
from memos.validation import MAX_JSON_DEPTH

MODEL = "tiny"
Client = TestClient[Litestar]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return with_tiny_model(settings, tmp_path_factory, MODEL, seed=0)


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def field_of(r: Any, status: int = 422) -> str:
    field: str = problem(r, status)["errors"][0]["field"]
    return field


def count(client: Client, key: str, cube_id: str) -> int:
    r = client.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 500}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


def deep(template: str, levels: int) -> str:
    """``template`` with JSON arrays ``levels`` deep in place of ``NEST``."""
    return template.replace("NEST", "[" * levels + "]" * levels)


# ---------------------------------------------------------------- D1: a body that is not UTF-8


def test_a_body_that_is_not_utf8_is_400_and_writes_nothing(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    key = bearer(tenant.admin_key)
    before = count(client, tenant.admin_key, cube["id"])
    bodies = [
        (f"/v1/cubes/{cube['id']}/memories", b'{"kind":"plaintext","content":"\xff"}', key),
        (f"/v1/cubes/{cube['id']}/memories", b'{"kind":"plaintext","content":"x","metadata":{"\xff":1}}', key),
        ("/v1/search", b'{"query":"\xff"}', key),
        ("/v1/cubes", '{"name":"caf\u00e9"}'.encode("latin-1"), key),
        ("/v1/tenants", b'{"name":"\xff"}', bearer(OPERATOR_KEY)),
    ]
    for path, body, headers in bodies:
        detail = problem(client.post(path, content=body, headers={**headers, **JSON}), 400)["detail"]
        assert "UTF-8" in detail, detail
    assert count(client, tenant.admin_key, cube["id"]) == before


# ---------------------------------------------------------------- D2: JSON nested too deep


def test_a_body_nested_too_deep_to_parse_is_400(client: Client, tenant: Tenant, cube: dict[str, Any]) -> None:
    body = deep('{"kind":"plaintext","content":"deep","metadata":{"x":NEST}}', 5000)
    r = client.post(
        f"/v1/cubes/{cube['id']}/memories", content=body.encode(), headers={**bearer(tenant.admin_key), **JSON}
    )
    assert "nested too deeply" in problem(r, 400)["detail"]


def test_free_form_json_deeper_than_the_limit_is_422_naming_the_field(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    key = tenant.admin_key
    headers = {**bearer(key), **JSON}
    memories = f"/v1/cubes/{cube['id']}/memories"
    before = count(client, key, cube["id"])
    # metadata is the first level: {"x": 31 arrays} is exactly the limit, one more is refused.
    ok = deep('{"kind":"plaintext","content":"deep ok","metadata":{"x":NEST}}', MAX_JSON_DEPTH - 1)
    assert client.post(memories, content=ok.encode(), headers=headers).status_code == 201
    # ~960 deep parsed and then failed inside the write's transaction (a 500): now refused before it.
    for levels in (MAX_JSON_DEPTH, 500):
        body = deep('{"kind":"plaintext","content":"deep","metadata":{"x":NEST}}', levels)
        assert field_of(client.post(memories, content=body.encode(), headers=headers)).startswith("metadata.x")
        batch = deep(
            '{"items":[{"kind":"plaintext","content":"a"},{"kind":"plaintext","content":"b","metadata":{"x":NEST}}]}',
            levels,
        )
        r = client.post(f"{memories}/batch", content=batch.encode(), headers=headers)
        assert field_of(r).startswith("items[1].metadata.x")
    assert count(client, key, cube["id"]) == before + 1
    m = factory.memory(key, cube["id"])
    r = client.patch(
        f"/v1/memories/{m['id']}",
        content=deep('{"metadata":{"x":NEST}}', MAX_JSON_DEPTH).encode(),
        headers={**headers, "If-Match": "*"},
    )
    assert field_of(r).startswith("metadata.x")
    r = client.post("/v1/search", content=deep('{"query":"q","filters":{"x":NEST}}', 100).encode(), headers=headers)
    assert field_of(r).startswith("filters.x")
    r = client.post("/v1/cubes", content=deep('{"name":"deep","metadata":{"x":NEST}}', 100).encode(), headers=headers)
    assert field_of(r).startswith("metadata.x")


# ---------------------------------------------------------------- D3: an impossible UTC offset


@pytest.mark.parametrize("when", ["8 May 2023 +99:00", "2023-05-08T13:56:00+25:00", "8 May 2023 +9999"])
def test_event_time_with_an_offset_of_a_day_or_more_is_422(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any], when: str
) -> None:
    key = bearer(tenant.admin_key)
    memories = f"/v1/cubes/{cube['id']}/memories"
    r = client.post(memories, json={"kind": "plaintext", "content": "t", "metadata": {"time": when}}, headers=key)
    assert field_of(r) == "metadata.time"
    items = [{"kind": "plaintext", "content": "a"}, {"kind": "plaintext", "content": "b", "metadata": {"time": when}}]
    assert field_of(client.post(f"{memories}/batch", json={"items": items}, headers=key)) == "items[1].metadata.time"
    m = factory.memory(tenant.admin_key, cube["id"])
    r = client.patch(f"/v1/memories/{m['id']}", json={"metadata": {"time": when}}, headers={**key, "If-Match": "*"})
    assert field_of(r) == "metadata.time"


# ---------------------------------------------------------------- D4: KV input the model cannot take


def test_kv_input_the_model_cannot_take_is_422_naming_the_field(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    key = bearer(tenant.admin_key)
    # The tiny model has 8192 positions; this text is well over that many tokens.
    long = factory.memory(tenant.admin_key, cube["id"], " ".join(f"w{i}" for i in range(3000)))
    r = client.post(f"/v1/memories/{long['id']}/activations", json={"model": MODEL}, headers=key)
    assert field_of(r) == "memory_id"
    r = client.post("/v1/scheduler/pin", json={"memory_id": long["id"], "model": MODEL, "tier": "host"}, headers=key)
    assert field_of(r) == "memory_id"
    for use_activations in (False, True):
        body = {"model": MODEL, "prompt": "hi", "memory_ids": [long["id"]], "max_new_tokens": 1}
        r = client.post("/v1/generate", json={**body, "use_activations": use_activations}, headers=key)
        assert field_of(r) == "memory_ids"
    r = client.post("/v1/generate", json={"model": MODEL, "prompt": "a b " * 4999, "max_new_tokens": 1}, headers=key)
    assert field_of(r) == "prompt"
    r = client.post("/v1/generate", json={"model": MODEL, "prompt": " ", "max_new_tokens": 1}, headers=key)
    assert field_of(r) == "prompt"


# ---------------------------------------------------------------- D5: a body field named like a dependency


@pytest.mark.parametrize(
    ("search", "field"),
    [(5, "search"), ({}, "search.query"), ({"query": "x", "zzz": 1}, "search.zzz")],
)
def test_a_bad_search_in_generate_is_422_on_search(client: Client, tenant: Tenant, search: Any, field: str) -> None:
    r = client.post(
        "/v1/generate", json={"model": MODEL, "prompt": "hi", "search": search}, headers=bearer(tenant.admin_key)
    )
    assert field_of(r) == field


def test_no_body_field_is_named_like_a_dependency(app: Litestar) -> None:
    """Litestar takes a validation error whose key is a dependency's name for a failed dependency: a 500."""
    clashes = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            data = handler.parsed_fn_signature.parameters.get("data")
            if data is None or not (isinstance(data.annotation, type) and issubclass(data.annotation, msgspec.Struct)):
                continue
            fields = {f.encode_name for f in msgspec.structs.fields(data.annotation)}
            clashes += [(route.path, name) for name in fields & set(handler.resolve_dependencies())]
    assert not clashes


# ---------------------------------------------------------------- D6, D7: hostile KV headers


def _with_header(header: bytes, tail: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + tail


@pytest.fixture(scope="module")
def exported(client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]) -> tuple[str, bytes]:
    """A memory and the memos-kv/1 file of its activation."""
    m = factory.memory(tenant.admin_key, cube["id"], "A short fact for KV.")
    activation = factory.activation(tenant.admin_key, m["id"], MODEL)
    r = client.get(f"/v1/activations/{activation['id']}/kv", headers=bearer(tenant.admin_key))
    assert r.status_code == 200, r.text
    return m["id"], r.content


@pytest.mark.parametrize("hostile", ["version of 5000 digits", "header nested 50000 deep"])
def test_kv_import_with_a_hostile_header_is_422_naming_it(
    client: Client, tenant: Tenant, exported: tuple[str, bytes], hostile: str
) -> None:
    memory_id, data = exported
    start = 8 + int.from_bytes(data[:8], "little")
    if hostile.startswith("version"):
        header = json.loads(data[8:start])
        header["__metadata__"]["version"] = "9" * 5000  # int() refuses past 4300 digits
        body = _with_header(json.dumps(header).encode(), data[start:])
    else:
        body = _with_header(b'{"a":' * 50000 + b"1" + b"}" * 50000)
    r = client.post(
        "/v1/activations/import",
        params={"memory_id": memory_id, "model": MODEL},
        content=body,
        headers={**bearer(tenant.admin_key), "Content-Type": "application/octet-stream"},
    )
    # A value of the header is named (f5553c1); a header that does not parse is the body's.
    assert field_of(r) == ("body.__metadata__.version" if hostile.startswith("version") else "body")


# ---------------------------------------------------------------- D9, D10: admin commands


def admin(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main(["admin", *args])
    return code, err.getvalue()


def test_admin_migrate_to_an_unknown_revision_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    assert settings.database_url is not None
    monkeypatch.setenv("MEMOS_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MEMOS_DATA_DIR", str(settings.data_dir))
    for args in (["nonexistent-rev"], ["--down", "zzz"]):
        code, err = admin("migrate", *args)
        assert code == 1 and err.startswith("memos admin migrate: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args", [["migrate"], ["reembed", "--dry-run"]])
def test_admin_commands_with_the_database_down_say_so_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, args: list[str]
) -> None:
    monkeypatch.setenv("MEMOS_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("MEMOS_DATA_DIR", str(settings.data_dir))
    code, err = admin(*args)
    assert code == 1 and err.startswith(f"memos admin {args[0]}: the database failed: "), err
    assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- D11: NUL in identity input


@pytest.mark.parametrize("prefix", ["%00", "a%00b"])
def test_nul_in_a_key_prefix_is_404(client: Client, tenant: Tenant, prefix: str) -> None:
    r = client.delete(f"/v1/keys/{prefix}", headers=bearer(tenant.admin_key))
    assert problem(r, 404)["detail"] == "no such key"


def test_nul_in_a_name_or_tag_is_422_naming_it(client: Client, tenant: Tenant, cube: dict[str, Any]) -> None:
    key = bearer(tenant.admin_key)
    assert field_of(client.post("/v1/tenants", json={"name": "a\x00b"}, headers=bearer(OPERATOR_KEY))) == "name"
    assert field_of(client.post("/v1/agents", json={"name": "a\x00b"}, headers=key)) == "name"
    r = client.get(f"/v1/cubes/{cube['id']}/memories?tag=a&tag=%00", headers=key)
    assert field_of(r) == "tag[1]"


# ---------------------------------------------------------------- If-Match and version cursors


def test_if_match_in_a_form_the_docs_do_not_list_is_412_and_changes_nothing(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    key = bearer(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], "v1")
    for if_match in ('"1', '1"', '"', "W/1", '""1""'):
        r = client.patch(f"/v1/memories/{m['id']}", json={"content": "v2"}, headers={**key, "If-Match": if_match})
        problem(r, 412)
    assert client.get(f"/v1/memories/{m['id']}", headers=key).json()["version"] == 1
    for if_match in ('"1"', 'W/"2"', "3"):
        r = client.patch(f"/v1/memories/{m['id']}", json={"content": if_match}, headers={**key, "If-Match": if_match})
        assert r.status_code == 200, r.text
    # A list, any of whose tags matches (RFC 9110 13.1.1): it was a 412 whatever it held. A bad item in it, or a
    # "*" among tags, is still a 412, and so is a list none of whose tags is the current version.
    for bad in ('"4", "1', '"4", *', '"4",'):
        problem(client.patch(f"/v1/memories/{m['id']}", json={"content": "x"}, headers={**key, "If-Match": bad}), 412)
    r = client.patch(f"/v1/memories/{m['id']}", json={"content": "x"}, headers={**key, "If-Match": '"1", "2"'})
    assert problem(r, 412)["extra"]["current_version"] == 4
    assert "versions 1, 2, the memory is at version 4" in r.json()["detail"]
    for if_match in ('"3", "4"', '"5" , W/"9"'):
        r = client.patch(f"/v1/memories/{m['id']}", json={"content": if_match}, headers={**key, "If-Match": if_match})
        assert r.status_code == 200, r.text
    r = client.delete(f"/v1/memories/{m['id']}", headers={**key, "If-Match": '"1", "6"'})
    assert r.status_code == 204, r.text


@pytest.mark.parametrize("keys", [["x"], [-5], [0], [1.5], [True], [2**70], [None]])
def test_a_forged_versions_cursor_is_422_on_cursor(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any], keys: list[Any]
) -> None:
    m = factory.memory(tenant.admin_key, cube["id"], f"cursor {uuid.uuid4()}")
    cursor = base64.urlsafe_b64encode(json.dumps(keys).encode()).decode().rstrip("=")
    r = client.get(f"/v1/memories/{m['id']}/versions", params={"cursor": cursor}, headers=bearer(tenant.admin_key))
    assert field_of(r) == "cursor"


# ---------------------------------------------------------------- JSON types taken as they are written
# Litestar converted bodies leniently: "5" was 5, 1 and "true" were true, 5 was a Unix time; 1e2 was a page size.


@pytest.mark.parametrize(
    ("body", "field"),
    [({"k": "5"}, "k"), ({"mode": "graph", "diversity": "0.5"}, "diversity"), ({"since": 5}, "since")],
)
def test_a_search_field_of_the_wrong_json_type_is_422_naming_it(
    client: Client, tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/search", json={"query": "tea", **body}, headers=bearer(tenant.admin_key))
    assert field_of(r) == field


def test_a_memory_ttl_written_as_a_string_is_422_and_writes_nothing(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    before = count(client, tenant.admin_key, cube["id"])
    body = {"kind": "plaintext", "content": "x", "ttl_seconds": "100"}
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json=body, headers=bearer(tenant.admin_key))
    assert field_of(r) == "ttl_seconds"
    assert count(client, tenant.admin_key, cube["id"]) == before


def test_a_restore_version_written_as_a_string_is_422_and_restores_nothing(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    key = bearer(tenant.admin_key)
    m = factory.memory(tenant.admin_key, cube["id"], f"restore {uuid.uuid4()}")
    r = client.post(f"/v1/memories/{m['id']}/restore", json={"version": "1"}, headers=key)
    assert field_of(r) == "version"
    assert client.get(f"/v1/memories/{m['id']}", headers=key).json()["version"] == 1


@pytest.mark.parametrize("correct", [1, "true"])
def test_cache_feedback_that_is_not_a_json_boolean_is_422_on_correct(
    client: Client, tenant: Tenant, cube: dict[str, Any], correct: Any
) -> None:
    key = bearer(tenant.admin_key)
    query = f"what is the answer {uuid.uuid4()}"
    entry = client.post("/v1/cache", json={"cube_id": cube["id"], "query": query, "response": "42"}, headers=key)
    assert entry.status_code == 201, entry.text
    body = {"memory_id": entry.json()["id"], "query": query, "correct": correct}
    assert field_of(client.post("/v1/cache/feedback", json=body, headers=key)) == "correct"


@pytest.mark.parametrize(("query", "field"), [("limit=1e2", "limit"), ("limit=100.0", "limit"), ("since=5", "since")])
def test_a_query_integer_or_time_not_written_as_one_is_422_naming_it(
    client: Client, tenant: Tenant, cube: dict[str, Any], query: str, field: str
) -> None:
    r = client.get(f"/v1/cubes/{cube['id']}/memories?{query}", headers=bearer(tenant.admin_key))
    assert field_of(r) == field


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=active&state=deleted", "state"),
        ("kind=plaintext&kind=response", "kind"),
        ("limit=1&limit=2", "limit"),
        ("include_expired=true&include_expired=false", "include_expired"),
    ],
)
def test_a_single_valued_query_parameter_given_twice_is_422_naming_it(
    client: Client, tenant: Tenant, cube: dict[str, Any], query: str, field: str
) -> None:
    """Found by a new user: Litestar kept the last value, so ?state=active&state=deleted listed deleted memories
    only, with no error. A list parameter still repeats."""
    r = client.get(f"/v1/cubes/{cube['id']}/memories?{query}", headers=bearer(tenant.admin_key))
    assert field_of(r) == field
    assert "given more than once" in r.json()["errors"][0]["message"]
    ok = client.get(f"/v1/cubes/{cube['id']}/memories?tag=a&tag=b&state=active", headers=bearer(tenant.admin_key))
    assert ok.status_code == 200, ok.text


def test_whole_floats_are_still_integers_and_times_still_rfc3339(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """What strict decoding must keep: JSON Schema's integer 5.0, RFC 3339 times, floats in free-form metadata."""
    key = bearer(tenant.admin_key)
    search = {"query": "tea", "k": 5.0, "since": "2020-01-01T00:00:00Z", "until": "2999-01-01T00:00:00+02:00"}
    assert client.post("/v1/search", json=search, headers=key).status_code == 200
    items = [
        {"kind": "plaintext", "content": f"whole {i}", "ttl_seconds": 100.0, "metadata": {"x": 1.0}} for i in (1, 2)
    ]
    r = client.post(f"/v1/cubes/{cube['id']}/memories/batch", json={"items": items}, headers=key)
    assert r.status_code == 201, r.text
    created = client.get(f"/v1/memories/{r.json()['items'][0]['id']}", headers=key).json()
    assert created["metadata"] == {"x": 1.0} and isinstance(created["metadata"]["x"], float)
    # A fraction, or a whole float where an integer does not go, is still refused.
    assert field_of(client.post("/v1/search", json={"query": "tea", "k": 5.5}, headers=key)) == "k"
    assert field_of(client.post("/v1/search", json={"query": 5.0}, headers=key)) == "query"
    params = {"since": "2020-01-01T00:00:00Z", "limit": "7"}
    r = client.get(f"/v1/cubes/{cube['id']}/memories", params=params, headers=key)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid", "graph"])
def test_nul_in_a_search_is_422_naming_the_field_in_every_mode(client: Client, tenant: Tenant, mode: str) -> None:
    """api.md said vector mode took a NUL in the query and that the 422 named no field; it names it everywhere."""
    key = bearer(tenant.admin_key)
    assert field_of(client.post("/v1/search", json={"query": "a\x00b", "mode": mode}, headers=key)) == "query"
    body = {"query": "ab", "mode": mode, "filters": {"a": "x\x00"}}
    assert field_of(client.post("/v1/search", json=body, headers=key)) == "filters.a"


def test_blank_text_and_a_lone_surrogate_are_refused_in_plain_words(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """A blank content's 422 quoted our schema's regex; half a surrogate pair was "Input data was truncated"."""
    key = bearer(tenant.admin_key)
    url = f"/v1/cubes/{cube['id']}/memories"
    before = count(client, tenant.admin_key, cube["id"])
    r = client.post(url, json={"kind": "plaintext", "content": " \t"}, headers=key)
    assert problem(r, 422)["errors"] == [
        {"field": "content", "message": "must contain a character that is not a space"}
    ]
    for lone in (rb"a\ud800b", rb"\udc00", rb"\ud83d\ud83d"):
        body = b'{"kind":"plaintext","content":"' + lone + b'"}'
        detail = problem(client.post(url, content=body, headers={**key, **JSON}), 400)["detail"]
        assert "surrogate pair" in detail, detail
    assert count(client, tenant.admin_key, cube["id"]) == before
    # A whole pair is text (an emoji), and other malformed JSON keeps its own words.
    assert (
        client.post(url, content=rb'{"kind":"plaintext","content":"\ud83d\ude00"}', headers={**key, **JSON}).status_code
        == 201
    )
    detail = problem(
        client.post(url, content=rb'{"kind":"plaintext","content":"\ud83d\ude00"', headers={**key, **JSON}), 400
    )
    assert "surrogate" not in detail["detail"]
    # An escaped backslash before "uD800" is text, not an escape: a body malformed otherwise keeps its own words.
    body = rb'{"kind":"plaintext","content":"C:\\uD800dir",}'
    detail = problem(client.post(url, content=body, headers={**key, **JSON}), 400)
    assert "surrogate" not in detail["detail"], detail


def test_a_link_type_ending_in_a_newline_is_422(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """The type's pattern is tested with re.search, whose ``$`` matches before a trailing newline: "next\\n" was
    stored as a link type (found in review)."""
    a = factory.memory(tenant.admin_key, cube["id"], "a")
    b = factory.memory(tenant.admin_key, cube["id"], "b")
    r = client.post(
        f"/v1/memories/{a['id']}/links",
        json={"to": b["id"], "type": "next\n"},
        headers=bearer(tenant.admin_key),
    )
    assert r.status_code == 422 and field_of(r) == "type", r.text
    # Its message says what a type is; it quoted the pattern, lookahead and all (found by a new user).
    assert r.json()["errors"][0]["message"] == "must be a letter, then letters, digits or _ . : -"
    assert "regex" not in r.json()["detail"]


def test_text_of_only_invisible_characters_is_blank_where_it_is_read_as_words(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """A query of zero-width spaces, a soft hyphen or control characters was searched (graph mode answered arbitrary
    memories at score 1.0), and looked up in the cache; a cube could be named with them (found in review). A
    memory's content is stored as written, so it keeps the whitespace-only rule."""
    key = bearer(tenant.admin_key)
    invisible = ["\u200b", "\u200b\u200c\u200d\u2060", "\u00ad", "\x01\x02", " \u200e ", "\u3164", "\ufe0f\u034f"]
    for text in invisible:
        for mode in ("vector", "text", "hybrid", "graph"):
            r = client.post("/v1/search", json={"query": text, "mode": mode}, headers=key)
            assert problem(r, 422)["errors"][0] == {
                "field": "query",
                "message": "must contain a character that is neither a space nor invisible",
            }, (text, mode)
        assert field_of(client.post("/v1/cubes", json={"name": text}, headers=key)) == "name"
        r = client.post("/v1/cache/lookup", json={"cube_id": cube["id"], "query": text}, headers=key)
        assert field_of(r) == "query", text
    assert client.post("/v1/search", json={"query": "\u200bcafé"}, headers=key).status_code == 200
    r = client.post(f"/v1/cubes/{cube['id']}/memories", json={"kind": "plaintext", "content": "\u200b"}, headers=key)
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------- text past Postgres's full-text limit


def _words_past_the_index_limit() -> str:
    """About 840 KB of distinct made-up words (under the 1 MiB body limit): their full-text vector is ~1.2 MB,
    past Postgres's 1 MiB for one tsvector."""
    import random

    rng = random.Random(7)
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(120_000))


def test_text_too_large_to_index_is_422_naming_it_not_a_503(
    client: Client, factory: Factory, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """Found in review: Postgres refuses such a row with "string is too long for tsvector" (SQLSTATE 54000, an
    OperationalError), which was taken for a lost database: 503 "not answering" with Retry-After, retried for ever."""
    key = bearer(tenant.admin_key)
    huge = _words_past_the_index_limit()
    memories = f"/v1/cubes/{cube['id']}/memories"
    before = count(client, tenant.admin_key, cube["id"])
    r = client.post(memories, json={"kind": "plaintext", "content": huge}, headers=key)
    assert field_of(r) == "content"
    assert "too large to index for full-text search" in problem(r, 422)["detail"]
    assert "Retry-After" not in r.headers
    r = client.post(memories, json={"kind": "plaintext", "content": "Ada", "metadata": {"speaker": huge}}, headers=key)
    assert field_of(r) == "metadata.speaker"
    items = [{"kind": "plaintext", "content": "fits"}, {"kind": "plaintext", "content": huge}]
    assert field_of(client.post(f"{memories}/batch", json={"items": items}, headers=key)) == "items[1].content"
    r = client.post("/v1/cache", json={"cube_id": cube["id"], "query": "what?", "response": huge}, headers=key)
    assert field_of(r) == "response"
    assert count(client, tenant.admin_key, cube["id"]) == before
    m = factory.memory(tenant.admin_key, cube["id"], "small")
    r = client.patch(f"/v1/memories/{m['id']}", json={"content": huge}, headers={**key, "If-Match": '"1"'})
    assert field_of(r) == "content"
    assert client.get(f"/v1/memories/{m['id']}", headers=key).json()["version"] == 1


def test_nul_in_the_cache_config_is_422_naming_the_part_it_is_in(
    client: Client, tenant: Tenant, cube: dict[str, Any]
) -> None:
    """Found in an API review: the whole configuration was walked as "body", so the field was "body.categories"."""
    key = bearer(tenant.admin_key)
    r = client.put("/v1/cache/config", json={"cube_id": cube["id"], "categories": {"a\x00": {}}}, headers=key)
    assert field_of(r) == "categories"
    r = client.put(
        "/v1/cache/config", json={"cube_id": cube["id"], "categories": {"code": {"x": "a\x00"}}}, headers=key
    )
    assert field_of(r) == "categories.code.x"

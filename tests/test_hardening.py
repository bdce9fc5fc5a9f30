"""Hardening checks: what the code must never do, and limits every endpoint must keep.

- No unsafe deserialization or code execution on data (pickle, ``torch.load``, ``weights_only=False``,
  ``eval``/``exec``, ``yaml.load``, ``allow_pickle=True``, ``shell=True``) anywhere in the service,
  the SDK or the scripts: a static scan of the syntax tree, itself tested on code that does each.
- SQL only through bound parameters: no f-string, ``%`` or ``+`` built text handed to ``text()``,
  ``execute()`` or ``sql.SQL()``.
- Secrets compared in constant time: no ``==`` on a hash, key, token or secret.
- API keys stored only as hashes (no column of any table holds a key), and never logged, even at DEBUG.
- Every operation with a request body answers 413 past the configured limit (with or without
  ``Content-Length``), driven by the OpenAPI document so new endpoints are covered.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from psycopg import sql

from memos.identity.keys import generate_key, key_prefix
from memos.observability import JsonFormatter
from memos.settings import Settings
from tests.conftest import OPERATOR_KEY, Factory, bearer

REPO = Path(__file__).resolve().parents[1]
SCANNED = ["memos", "clients", "scripts"]

Client = TestClient[Litestar]

# ---------------------------------------------------------------- static scans

_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
_UNSAFE_CALLS = {
    "torch.load": "torch.load unpickles",
    "yaml.load": "yaml.load can build arbitrary objects; use yaml.safe_load",
    "yaml.unsafe_load": "yaml.unsafe_load",
    "pandas.read_pickle": "read_pickle unpickles",
    "pd.read_pickle": "read_pickle unpickles",
    "eval": "eval runs code",
    "exec": "exec runs code",
    "os.system": "os.system runs a shell",
}
_UNSAFE_KEYWORDS = {
    ("weights_only", False): "weights_only=False unpickles",
    ("allow_pickle", True): "allow_pickle=True unpickles",
    ("shell", True): "shell=True runs a shell",
}
_SQL_ENTRY = {"text", "execute", "exec_driver_sql", "SQL", "scalar", "scalars"}
_SECRET_NAME = re.compile(r"(hash|secret|token|api_?key|password|digest)", re.IGNORECASE)
# Checksums of bytes anyone may hold (a KV file, its payload, the token ids of a text) and counts of
# LLM tokens are not secrets: comparing them with == leaks nothing.
_INTEGRITY_NAME = re.compile(r"(sha256|checksum|payload|hexdigest|^tokens$)", re.IGNORECASE)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _built_string(node: ast.AST) -> bool:
    """An f-string, a ``%`` or ``+`` of strings, or ``"...".format(...)``: text built from values."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in (node.left, node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
    return False


def _secretish(node: ast.AST) -> bool:
    name = _dotted(node.func if isinstance(node, ast.Call) else node)
    last = name.rsplit(".", 1)[-1]
    return bool(name) and bool(_SECRET_NAME.search(last)) and not _INTEGRITY_NAME.search(last)


def scan(source: str, filename: str = "<code>") -> list[str]:
    """Every unsafe construct in ``source``, as ``file:line: why``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in _UNSAFE_CALLS:
                found.append(f"{where}: {_UNSAFE_CALLS[name]}")
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in _UNSAFE_KEYWORDS:
                    found.append(f"{where}: {_UNSAFE_KEYWORDS[(kw.arg, kw.value.value)]}")
            if name.rsplit(".", 1)[-1] in _SQL_ENTRY and node.args and _built_string(node.args[0]):
                found.append(f"{where}: SQL text built from values (use bound parameters)")
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(_secretish(s) for s in sides) and not any(
                isinstance(s, ast.Constant) and s.value is None for s in sides
            ):
                found.append(f"{where}: secret compared with ==; use hmac.compare_digest")
    return found


def _python_files() -> Iterator[Path]:
    for top in SCANNED:
        if (REPO / top).exists():
            yield from (p for p in (REPO / top).rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize(
    "code",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from marshal import loads",
        "torch.load(f)",
        "safetensors_or_not = torch.load(path, weights_only=False)",
        "x = something(weights_only=False)",
        "np.load(f, allow_pickle=True)",
        "eval(user_input)",
        "exec(code)",
        "yaml.load(stream)",
        "subprocess.run(cmd, shell=True)",
        "conn.execute(text(f'SELECT * FROM t WHERE id = {i}'))",
        "conn.execute('DELETE FROM t WHERE id = %s' % i)",
        "conn.execute(text('SELECT ' + column))",
        "conn.exec_driver_sql('SELECT {}'.format(x))",
        "if token == expected: pass",
        "ok = row.key_hash != hash_key(k)",
        "ok = api_key_digest == expected",
    ],
)
def test_the_scan_catches_each_unsafe_construct(code: str) -> None:
    assert scan(code), code


@pytest.mark.parametrize(
    "code",
    [
        "import safetensors.torch",
        "safetensors.torch.load_file(path)",
        "yaml.safe_load(s)",
        "conn.execute(text('SELECT 1 WHERE x = :x'), {'x': value})",
        "conn.execute(sql.SQL('DROP DATABASE {}').format(sql.Identifier(name)))",
        "hmac.compare_digest(hash_key(token), stored)",
        "if token is None: pass",
        "if principal.key_prefix == None: pass",
        "subprocess.run([exe, '-c', code], check=False)",
        "if hashlib.sha256(data).hexdigest() != meta['payload_sha256']: pass",
        "ok = token_ids_sha256(ids) == row.token_ids_sha256",
        "if tokens == 0: pass",
    ],
)
def test_the_scan_passes_safe_code(code: str) -> None:
    assert scan(code) == []


def test_no_unsafe_deserialization_sql_building_or_secret_equality_in_the_code() -> None:
    offences: list[str] = []
    files = list(_python_files())
    assert len(files) > 40, "the scan found the code"
    for path in files:
        offences += scan(path.read_text(), str(path.relative_to(REPO)))
    assert offences == []


def test_key_checks_use_compare_digest() -> None:
    for path in ("memos/identity/keys.py", "memos/identity/service.py"):
        assert "hmac.compare_digest(" in (REPO / path).read_text(), path


# ---------------------------------------------------------------- keys at rest and in logs


def _secret_piece(secret: str) -> str:
    """The longest "_"-free piece of a key's secret part, to catch a key stored cut at a separator.

    Not simply the text after the last "_": a random secret may end in "_x", and two characters
    turn up in any column (a CI flake at stop 14). Never the public prefix, which is stored.
    """
    part = secret.split("_", 2)[2] if key_prefix(secret) else secret
    piece = max(part.split("_"), key=len)
    return piece if len(piece) >= 16 else part


def test_secret_piece_is_long_and_never_the_prefix() -> None:
    assert _secret_piece("memos_0123456789ab_" + "x" * 30 + "_y") == "x" * 30
    assert _secret_piece("memos_0123456789ab_abc_def_ghi") == "abc_def_ghi"
    for _ in range(2000):
        key, prefix = generate_key()
        assert len(_secret_piece(key)) >= 16 and prefix not in _secret_piece(key)


def test_keys_are_stored_hashed_and_never_logged(
    client: Client, factory: Factory, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tenant = factory.tenant()
    agent = factory.agent(tenant)
    r = client.post(f"/v1/agents/{agent.id}/keys", headers=bearer(tenant.admin_key))
    assert r.status_code == 201, r.text
    rotated = r.json()["api_key"]
    keys = [tenant.admin_key, agent.key, rotated]
    # Use every key, a revoked one and a wrong secret behind a real prefix.
    for key in keys:
        assert client.get("/v1/agents/me", headers=bearer(key)).status_code == 200
    r = client.delete(f"/v1/keys/{key_prefix(agent.key)}", headers=bearer(tenant.admin_key))
    assert r.status_code == 204, r.text
    assert client.get("/v1/agents/me", headers=bearer(agent.key)).status_code == 401
    forged = "_".join(agent.key.split("_", 2)[:2]) + "_" + "A" * 43  # the secret may contain "_" itself
    assert client.get("/v1/agents/me", headers=bearer(forged)).status_code == 401

    secrets = [*keys, OPERATOR_KEY, forged] + [k.split("_", 2)[2] for k in keys]
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert '"logger": "memos.access"' in logged, "the requests' logs were captured"
    for secret in secrets:
        assert secret not in logged

    with psycopg.connect(database_url, autocommit=True) as conn:
        stored = {prefix: bytes(h) for prefix, h in conn.execute("SELECT prefix, key_hash FROM api_keys").fetchall()}
        for key in keys:
            assert stored[key_prefix(key)] == hashlib.sha256(key.encode()).digest()
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
            " AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea', 'ARRAY')"
        ).fetchall()
        assert len(columns) > 10
        for table, column in columns:
            query = sql.SQL("SELECT count(*) FROM {} WHERE {}::text LIKE %s OR {}::text LIKE %s").format(
                sql.Identifier(table), sql.Identifier(column), sql.Identifier(column)
            )
            for secret in secrets:
                count = conn.execute(query, (f"%{secret}%", f"%{_secret_piece(secret)}%")).fetchone()
                assert count == (0,), f"{table}.{column} holds a key"


# ---------------------------------------------------------------- body limits


def _body_operations(client: Client) -> list[tuple[str, str]]:
    """The operations with a JSON body (the KV import's body is a file, under its own limit: test_api_review_kv)."""
    spec = client.get("/schema/openapi.json").json()
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "application/json" in op.get("requestBody", {}).get("content", {})
    ]


def _filled(path: str) -> str:
    return re.sub(r"\{n\}", "1", re.sub(r"\{[a-z_]+\}", lambda _: str(uuid.uuid4()), path))


def _json_of_size(size: int) -> bytes:
    head, tail = b'{"padding": "', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_every_operation_with_a_body_answers_413_past_the_limit(client: Client, settings: Settings) -> None:
    tenant_key = Factory(client).tenant().admin_key
    operations = _body_operations(client)
    assert len(operations) >= 10
    limit = settings.max_body_bytes
    too_big = _json_of_size(limit + 1)
    for method, path in operations:
        url = _filled(path)
        headers = {**bearer(tenant_key), "Content-Type": "application/json", "If-Match": "*"}
        r = client.request(method, url, content=too_big, headers=headers)
        assert r.status_code == 413, (method, path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["detail"].endswith(f"at most {limit} bytes"), r.text  # it said no limit (a new user)
        # Without Content-Length (chunked), the limit holds while the body streams in.
        r = client.request(method, url, content=iter([too_big[:4096], too_big[4096:]]), headers=headers)
        assert r.status_code == 413, (method, path, "chunked", r.status_code)
        # At the limit the body is read (and then refused for what it says, not for its size).
        r = client.request(method, url, content=_json_of_size(limit), headers=headers)
        assert r.status_code != 413, (method, path)


def test_the_body_limit_is_the_configured_one(settings: Settings, embedder: Any) -> None:
    import dataclasses

    from memos.app import create_app

    app = create_app(dataclasses.replace(settings, max_body_bytes=4096), embedder_factory=lambda: embedder)
    with TestClient(app) as small:
        key = Factory(small).tenant().admin_key
        body = json.dumps({"name": "x" * 5000}).encode()
        r = small.post("/v1/cubes", content=body, headers={**bearer(key), "Content-Type": "application/json"})
        assert r.status_code == 413
        r = small.post("/v1/cubes", json={"name": "fits"}, headers=bearer(key))
        assert r.status_code == 201


# ---------------------------------------------------------------- dependency audit (make lint)


def _audit_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_deps", REPO / "scripts" / "audit_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_audit_blocks_only_on_advisories_with_a_fix(capsys: pytest.CaptureFixture[str]) -> None:
    summarize = _audit_module().summarize
    ok = {"name": "fine", "version": "1.0", "vulns": []}
    unfixed = {"name": "old", "version": "1.0", "vulns": [{"id": "GHSA-1", "fix_versions": []}]}
    fixed = {"name": "lib", "version": "2.0", "vulns": [{"id": "PYSEC-2", "fix_versions": ["2.1"]}]}
    unknown = {"name": "private", "skip_reason": "Dependency not found on PyPI"}

    assert summarize({"dependencies": [ok, unknown]}) == 0
    assert "no known vulnerabilities" in capsys.readouterr().out
    assert summarize({"dependencies": [ok, unfixed]}) == 0
    assert "not blocking: old 1.0: GHSA-1" in capsys.readouterr().out
    assert summarize({"dependencies": [ok, unfixed, fixed]}) == 1
    assert "lib 2.0: PYSEC-2 (fixed in 2.1)" in capsys.readouterr().out
    # A service that knows none of the packages audited nothing, and says so without failing.
    assert summarize({"dependencies": [unknown]}) == 0
    assert "NOT AUDITED" in capsys.readouterr().out

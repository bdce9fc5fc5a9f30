"""Tenants, agents and API keys; turning a bearer token into a ``Principal``."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import uuid
from pathlib import Path

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.errors import Conflict, NotFound
from memos.identity import schemas
from memos.identity.keycache import KeyCache
from memos.identity.keys import generate_key, hash_key, key_matches, key_prefix
from memos.identity.principal import OPERATOR, Principal
from memos.pagination import Page, decode_keyset, decode_text_keyset, encode_keyset, list_tag
from memos.settings import OPERATOR_KEY_MIN, Settings, SettingsError
from memos.store.audit import record
from memos.store.blobs import fsync_dir
from memos.store.db import Database
from memos.store.models import agents, api_keys, tenants
from memos.validation import reject_nul

log = logging.getLogger(__name__)

AGENTS = list_tag("agents")
"""The tag of ``GET /v1/agents``'s cursors."""


class OperatorKeyFileError(SettingsError):
    """``<data_dir>/operator.key`` holds no usable key."""


def load_operator_key(settings: Settings) -> str:
    """``MEMOS_OPERATOR_KEY``, else the key in ``<data_dir>/operator.key``, generated (mode 0600) on first start.

    The file appears whole or not at all: the key is written to a temporary file, synced, and linked into
    place. Created empty and then written, a crash in between left an empty file, read as the key '' (found
    in review); two first starts at once, one died of ``FileExistsError``, and now the second uses the
    first one's key.
    """
    if settings.operator_key is not None:
        return settings.operator_key
    path = Path(settings.data_dir) / "operator.key"
    with contextlib.suppress(FileNotFoundError):
        return _read_operator_key(path)
    # 0700 when memos makes it, as the embedded server does (memos/store/embedded.py): it holds the key.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key, _ = generate_key()
    partial = path.with_name(f".operator.key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(partial, path)  # unlike rename, fails if another start put its key there first
        except FileExistsError:
            return _read_operator_key(path)
    finally:
        partial.unlink(missing_ok=True)
    fsync_dir(path.parent)
    log.warning("generated the operator key", extra={"path": str(path.resolve())})
    return key


def _read_operator_key(path: Path) -> str:
    key = path.read_text().strip()
    if len(key) < OPERATOR_KEY_MIN:
        raise OperatorKeyFileError(
            f"{path.resolve()} holds {len(key)} characters, and an operator key needs at least {OPERATOR_KEY_MIN}: "
            "delete the file to have a new key generated, or set MEMOS_OPERATOR_KEY"
        )
    return key


# Every request runs this: written out, it costs the event loop no statement building (about 0.4 ms).
_KEY_LOOKUP = """
SELECT k.key_hash, a.id, a.tenant_id, a.role
FROM api_keys k JOIN agents a ON a.id = k.agent_id
WHERE k.prefix = %(prefix)s AND k.revoked_at IS NULL
"""


class IdentityService:
    def __init__(self, db: Database, operator_key: str, keys: KeyCache | None = None) -> None:
        self.db = db
        self._operator_hash = hash_key(operator_key)
        self.keys = keys if keys is not None else KeyCache(0)
        """Keys checked before (``keycache.py``); with no listener it is never live, so never used."""

    async def authenticate(self, token: str) -> Principal | None:
        """The principal a bearer token stands for, or None. Constant-time compares either way."""
        if hmac.compare_digest(hash_key(token), self._operator_hash):
            return OPERATOR
        prefix = key_prefix(token)
        if prefix is None:
            return None
        if (known := self.keys.get(prefix)) is not None:
            stored_hash, principal = known
            return principal if key_matches(token, stored_hash) else None
        generation = self.keys.generation  # read before the lookup: a change heard meanwhile voids what it reads
        async with self.db.read() as conn:
            row = (await conn.exec_driver_sql(_KEY_LOOKUP, {"prefix": prefix})).first()
        if row is None or not key_matches(token, row.key_hash):
            return None
        principal = Principal(role=row.role, agent_id=row.id, tenant_id=row.tenant_id, key_prefix=prefix)
        self.keys.put(prefix, row.key_hash, principal, generation)
        return principal

    async def create_tenant(self, principal: Principal, body: schemas.TenantIn) -> schemas.TenantCreated:
        reject_nul(body.name, "name")  # else Postgres refuses it: a 422 that named no field
        tenant_id, admin_id = uuid.uuid4(), uuid.uuid4()
        try:
            async with self.db.transaction() as conn:
                await conn.execute(insert(tenants).values(id=tenant_id, name=body.name))
                await conn.execute(insert(agents).values(id=admin_id, tenant_id=tenant_id, name="admin", role="admin"))
                key = await issue_key(conn, admin_id)
                await record(conn, principal, "tenant.create", "tenant", tenant_id, tenant_id=tenant_id)
        except IntegrityError:
            raise Conflict(f"a tenant named {body.name!r} already exists") from None
        return schemas.TenantCreated(id=tenant_id, name=body.name, admin_agent_id=admin_id, admin_key=key)

    async def create_agent(self, principal: Principal, body: schemas.AgentIn) -> schemas.AgentCreated:
        tenant_id, _ = principal.require_admin()
        reject_nul(body.name, "name")  # else Postgres refuses it: a 422 that named no field
        agent_id = uuid.uuid4()
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    insert(agents).values(id=agent_id, tenant_id=tenant_id, name=body.name, role=body.role)
                )
                key = await issue_key(conn, agent_id)
                await record(conn, principal, "agent.create", "agent", agent_id, detail={"role": body.role})
        except IntegrityError:
            raise Conflict(f"an agent named {body.name!r} already exists in this tenant") from None
        return schemas.AgentCreated(id=agent_id, name=body.name, role=body.role, api_key=key)

    async def list_agents(self, principal: Principal, limit: int, cursor: str | None) -> Page[schemas.Agent]:
        tenant_id, _ = principal.require_admin()
        after = decode_keyset(cursor, AGENTS)
        query = select(agents).where(agents.c.tenant_id == tenant_id)
        if after is not None:
            query = query.where(func.row(agents.c.created_at, agents.c.id) > func.row(*after))
        async with self.db.read() as conn:
            rows = (await conn.execute(query.order_by(agents.c.created_at, agents.c.id).limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[
                schemas.Agent(id=r.id, name=r.name, role=r.role, tenant_id=r.tenant_id, created_at=r.created_at)
                for r in rows
            ],
            next_cursor=encode_keyset(rows[-1].created_at, rows[-1].id, AGENTS) if more else None,
        )

    async def list_keys(
        self, principal: Principal, agent_id: uuid.UUID, limit: int, cursor: str | None
    ) -> Page[schemas.ApiKey]:
        """An agent's keys, revoked ones included, oldest first: a tenant admin's for any agent of its tenant, an
        agent's for itself (another agent's are 404, as revoking them is)."""
        tenant_id, caller = principal.tenant_member()
        if not principal.is_admin and agent_id != caller:
            raise NotFound("no such agent")
        tag = list_tag("keys", agent_id)
        after = decode_text_keyset(cursor, tag)
        query = select(api_keys.c.prefix, api_keys.c.agent_id, api_keys.c.created_at, api_keys.c.revoked_at).where(
            api_keys.c.agent_id == agent_id
        )
        if after is not None:
            query = query.where(func.row(api_keys.c.created_at, api_keys.c.prefix) > func.row(*after))
        async with self.db.read() as conn:
            owner = select(agents.c.id).where(agents.c.id == agent_id, agents.c.tenant_id == tenant_id)
            if await conn.scalar(owner) is None:
                raise NotFound("no such agent")
            rows = (await conn.execute(query.order_by(api_keys.c.created_at, api_keys.c.prefix).limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[schemas.ApiKey(r.prefix, r.agent_id, r.created_at, r.revoked_at) for r in rows],
            next_cursor=encode_keyset(rows[-1].created_at, rows[-1].prefix, tag) if more else None,
        )

    async def me(self, principal: Principal) -> schemas.Me:
        tenant_id, agent_id = principal.tenant_member()
        async with self.db.read() as conn:
            row = (await conn.execute(select(agents).where(agents.c.id == agent_id))).one()
        return schemas.Me(id=row.id, name=row.name, role=row.role, tenant_id=tenant_id)

    async def rotate_key(self, principal: Principal, agent_id: uuid.UUID) -> schemas.KeyCreated:
        """Issue a new key for an agent. Old keys stay valid until revoked, so callers can switch over."""
        tenant_id, _ = principal.require_admin()
        async with self.db.transaction() as conn:
            found = await conn.scalar(
                select(agents.c.id).where(agents.c.id == agent_id, agents.c.tenant_id == tenant_id)
            )
            if found is None:
                raise NotFound("no such agent")
            key = await issue_key(conn, agent_id)
            prefix = key_prefix(key)
            assert prefix is not None
            await record(conn, principal, "key.create", "api_key", prefix, detail={"agent_id": str(agent_id)})
        return schemas.KeyCreated(api_key=key, prefix=prefix)

    async def revoke_key(self, principal: Principal, prefix: str) -> None:
        """A tenant admin revokes any key of its tenant; an agent may revoke its own keys. ``prefix`` may be the
        whole key (as ``memos admin keys revoke`` takes it): it was a 404 "no such key" for a key that exists."""
        tenant_id, agent_id = principal.tenant_member()
        prefix = key_prefix(prefix) or prefix
        if "\x00" in prefix:
            # No key has a NUL in its prefix, and Postgres refuses one in a query (a DataError, answered 422).
            raise NotFound("no such key")
        owner_filter = agents.c.tenant_id == tenant_id if principal.is_admin else agents.c.id == agent_id
        async with self.db.transaction() as conn:
            owned = select(agents.c.id).where(owner_filter)
            result = await conn.execute(
                update(api_keys)
                .where(
                    and_(
                        api_keys.c.prefix == prefix,
                        api_keys.c.revoked_at.is_(None),
                        api_keys.c.agent_id.in_(owned.scalar_subquery()),
                    )
                )
                .values(revoked_at=func.now())
            )
            if result.rowcount == 0:
                raise NotFound("no such key")
            await record(conn, principal, "key.revoke", "api_key", prefix)
        # Its notification reaches this process's listener a moment later: the caller's next request must not
        # find the key still good here.
        self.keys.forget(prefix)


async def issue_key(conn: AsyncConnection, agent_id: uuid.UUID) -> str:
    """A new key for the agent (only its hash is stored); the caller shows it once."""
    key, prefix = generate_key()
    await conn.execute(insert(api_keys).values(prefix=prefix, agent_id=agent_id, key_hash=hash_key(key)))
    return key

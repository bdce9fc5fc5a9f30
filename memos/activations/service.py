"""KV activations: build, list, export, import, repair, and generation on top of stored KV.

An activation is a memory of kind ``activation`` (provenance ``derived_from`` the source version) plus
a row in ``activations`` that points at a ``memos-kv/1`` file in the blob store. Identical KV (same
model fingerprint, same token ids) is stored once per tenant and shared by every activation that
needs it. All tensor work runs in the KV worker thread; torch is imported there, never at import.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from sqlalchemy import Row, delete, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.activations import files, schemas
from memos.activations.freshness import SOURCE_LIVE, is_fresh, is_stale, with_freshness
from memos.activations.models import KVBusy, KVWorker, ModelRegistry, ModelUnavailable
from memos.activations.tiers import KVTiers, ResidentTier
from memos.cubes.access import readable_cube_ids
from memos.errors import Conflict, FieldError, Invalid, MemosError, NotFound, Unavailable
from memos.identity.principal import Principal
from memos.kv.errors import FingerprintMismatch, KVChecksumError, KVError, KVFormatError, KVInputError, NotShiftable
from memos.memories.service import ACTIVATION, Accesses, MemoryService, not_expired
from memos.pagination import NOT_ISSUED, Page, decode_cursor, decode_keyset, encode_cursor, encode_keyset, list_tag
from memos.search.service import SearchService
from memos.store.audit import record
from memos.store.blobs import BlobCorrupt, BlobNotFound, BlobStore, BlobStoreFull
from memos.store.db import Database
from memos.store.models import activation_imports, activations, memories

if TYPE_CHECKING:
    from memos.kv.codec import KVChunk
    from memos.kv.runtime import LoadedModel

log = logging.getLogger(__name__)

HEADER_FIELD = "body.__metadata__"
"""How a refused import names a value of the file's header: the path of ``__metadata__`` in the body."""
CREATED_AT_SKEW = timedelta(minutes=5)
"""How far ahead of this server's clock an uploaded file's ``created_at`` may be (the uploader's clock may run fast)."""
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII)

PINNED = text("activations.tier IN ('device', 'host')")
"""Pinned to a memory tier: written out (not bound) so that it matches the partial index of migration 0007."""
DEFAULT_COMPOSE_RECOMPUTE = 0.15
"""Share of tokens recomputed when several chunks are composed (CacheBlend-style), unless the request says."""
IMPORTS_AT_ONCE = 2
"""Imports reading, verifying and storing a body at the same time in one process; one more is 503 ``kv-busy``.
Each holds about twice its body at its peak (the file, then its decoded tensors), up to ``MEMOS_MAX_KV_BYTES``."""
IMPORTS_BUSY_RETRY_AFTER = "2"


class KVUpload(Protocol):
    """An import's body, which ``import_file`` reads only once every check that does not need it has passed."""

    async def empty(self) -> bool:
        """Whether the body is empty, reading as little of it as can tell (nothing when its length is declared)."""
        ...

    async def read(self) -> bytes:
        """The whole body (413 past the limit); called at most once."""
        ...


class FingerprintConflict(Conflict):
    slug = "fingerprint-mismatch"
    title = "KV built for another model"


class TokenMismatch(Conflict):
    slug = "token-mismatch"
    title = "KV of other text"


MODELS = list_tag("models")
"""The tag of ``GET /v1/models``'s cursors."""


class ChecksumConflict(Conflict):
    """An upload whose tensor bytes do not hash to its header's ``payload_sha256`` (API.md: "checksum verified;
    mismatch is 409"). A file that is not a well-formed memos-kv/1 file at all stays a 422."""

    slug = "checksum-mismatch"
    title = "KV checksum mismatch"


class KVCorrupt(Conflict):
    slug = "kv-corrupt"
    title = "Stored KV is corrupt"


class StorageFull(Unavailable):
    slug = "storage-full"
    title = "Blob store full"


def token_ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of the ids as little-endian int64: the key, with the fingerprint, of identical KV."""
    return hashlib.sha256(b"".join(int(i).to_bytes(8, "little", signed=True) for i in ids)).hexdigest()


@dataclass(slots=True)
class _Blob:
    sha256: str
    nbytes: int
    tokens: int
    dtype: str
    imported_into: uuid.UUID | None = None
    """The cube whose import uploaded these bytes; None when this server computed them (decisions 86)."""


class _FileFreed(Exception):
    """The stored file chosen for an activation was freed before its row could refer to it (``files``)."""


@dataclass(slots=True)
class _Part:
    """One memory placed before the prompt: its text, and its stored KV when a fresh activation exists."""

    memory_id: uuid.UUID
    content: str
    chunk: KVChunk | None = None
    activation_id: uuid.UUID | None = None


@dataclass(slots=True)
class _Outcome:
    text: str
    token_ids: list[int]
    ttft_ms: float
    prefill_tokens: int
    reused_tokens: int
    used: list[uuid.UUID] = field(default_factory=list)
    fallback: str | None = None


class ActivationService:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        models: ModelRegistry,
        tiers: KVTiers,
        memories: MemoryService,
        search: SearchService,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.models = models
        self.tiers = tiers
        self.memories = memories
        self.search = search
        self.on_access: Accesses | None = None
        """Told which memories a generation placed before its prompt (the scheduler's heat)."""
        self._importing = 0
        """Imports holding a body now (``_import_slot``)."""
        self._importing_tenants: set[uuid.UUID] = set()
        """The tenants those imports are of: one place each."""
        self._builds: dict[tuple[uuid.UUID, str], tuple[asyncio.Lock, list[int]]] = {}
        """(memory, model) -> the lock its builds take turns under, and how many hold or wait for it."""

    @property
    def worker(self) -> KVWorker:
        return self.models.worker

    # ------------------------------------------------------------------ models

    async def list_models(self, principal: Principal, limit: int, cursor: str | None) -> Page[schemas.Model]:
        """The configured models by name, a page at a time (only the page's models are loaded)."""
        principal.tenant_member()  # the operator key's only job is creating tenants (403, as everywhere in /v1)
        after = decode_cursor(cursor, 1, MODELS)
        if after is not None and not isinstance(after[0], str):
            raise Invalid.field("cursor", NOT_ISSUED)
        names = [n for n in sorted(self.models.specs) if after is None or n > after[0]]
        out = [await self._model_entry(name) for name in names[:limit]]
        more = len(names) > limit
        return Page(items=out, next_cursor=encode_cursor([out[-1].name], MODELS) if more else None)

    async def _model_entry(self, name: str) -> schemas.Model:
        """The model as listed; one whose directory does not load is listed as unavailable, with why. Only the
        requests that need it answer 503: one broken model made every page it was on a 503, hiding the rest."""
        try:
            return _model_dto(await self.models.get(name))
        except ModelUnavailable as exc:
            spec = self.models.specs[name]
            return schemas.Model(
                name=name,
                fingerprint=None,
                layers=None,
                kv_heads=None,
                head_dim=None,
                dtype=spec.dtype,
                device=spec.device,
                kv_bytes_per_token=None,
                rope_shiftable=None,
                status="unavailable",
                reason=exc.detail,
            )

    # ------------------------------------------------------------------ build

    async def build(
        self, principal: Principal, memory_id: uuid.UUID, body: schemas.BuildIn
    ) -> tuple[schemas.Activation, bool]:
        """The memory's KV for ``body.model``: built now (True), or the fresh one that exists already (False)."""
        principal.tenant_member()  # the operator is 403 before anything is looked at (pinning builds here too)
        self.models.spec(body.model)
        async with self.db.read() as conn:
            source = await self.memories.load_row(conn, principal, memory_id, "write")
        _check_live(source)
        _check_source(source)
        lm = await self.models.get(body.model)
        # One build of a memory for a model at a time in this process; the next finds its activation fresh. N at
        # once ran N prefills, wrote N files and kept N chunks in the host tier, one of them referenced (review).
        async with self._one_build((memory_id, body.model)):
            return await self._build(principal, source, lm)

    @asynccontextmanager
    async def _one_build(self, key: tuple[uuid.UUID, str]) -> AsyncIterator[None]:
        lock, holders = self._builds.setdefault(key, (asyncio.Lock(), [0]))
        holders[0] += 1
        try:
            async with lock:
                yield
        finally:
            holders[0] -= 1
            if not holders[0]:
                del self._builds[key]

    async def _build(self, principal: Principal, source: Row[Any], lm: LoadedModel) -> tuple[schemas.Activation, bool]:
        memory_id = source.id
        async with self.db.read() as conn:
            existing = await self._fresh_for(conn, memory_id, lm, source.version)
        if existing is not None:
            return self._dto(existing), False
        ids: list[int] = await self.worker.run(_memory_ids, lm, source.content)
        if not ids:
            raise Invalid.field("memory_id", "the memory's text has no tokens for this model")
        if len(ids) > lm.max_positions:
            # The prefill would refuse it with a KVInputError from the worker, which no handler maps (a 500):
            # a memory too long for the model is the caller's to fix. Pinning builds through here too.
            raise Invalid.field(
                "memory_id",
                f"the memory's text is {len(ids)} tokens; model {lm.name!r} has {lm.max_positions} positions",
            )
        ids_sha = token_ids_sha256(ids)
        if (reused := await self._reuse(principal, source, lm, ids_sha, "activation.build")) is not None:
            return reused
        meta = _meta(lm, source.id, source.version)
        data, chunk = await self.worker.run(_prefill_file, lm, ids, meta)
        key = await self._put(data)
        blob = _Blob(sha256=key, nbytes=len(data), tokens=len(ids), dtype=lm.dtype)
        activation, created = await self._insert_written(principal, source, lm, ids_sha, blob, data, "activation.build")
        if created:
            # Just computed, so likely to be used soon: keep it in memory. Only once its row is in: a build that
            # lost to a PATCH (409) or to another process kept a chunk no row referred to (found in review).
            self.tiers.put(key, chunk, chunk.nbytes, lm.device)
            activation = msgspec.structs.replace(activation, tier=self.tiers.tier_of(key) or "store")
        return activation, created

    async def _insert_written(
        self,
        principal: Principal,
        source: Row[Any],
        lm: LoadedModel,
        ids_sha: str,
        blob: _Blob,
        data: bytes,
        action: str,
    ) -> tuple[schemas.Activation, bool]:
        """``_insert`` for a file this request wrote: freed before its row landed (a drop's sweep between the two),
        it is written again, once."""
        try:
            return await self._insert(principal, source, lm, ids_sha, blob, action)
        except _FileFreed:
            await self._put(data)
        try:
            return await self._insert(principal, source, lm, ids_sha, blob, action)
        except _FileFreed:
            raise Unavailable(
                "the KV file was removed while it was being stored; retry", headers={"Retry-After": "1"}
            ) from None

    async def _insert(
        self, principal: Principal, source: Row[Any], lm: LoadedModel, ids_sha: str, blob: _Blob, action: str
    ) -> tuple[schemas.Activation, bool]:
        async with self.db.transaction() as conn:
            # Checks write access and holds the cube (shared, against deletion), then the memory, till commit.
            current = await self.memories.load_row(conn, principal, source.id, "write", lock=True)
            if current.version != source.version:
                raise Conflict("the memory changed while its KV was being built; retry")
            # A concurrent build of the same KV may have won while this one computed: answer with its result.
            if (existing := await self._fresh_for(conn, source.id, lm, source.version)) is not None:
                return self._dto(existing), False
            # The file must still be there, and stays until this commits (memos/activations/files.py).
            if not await files.claim(conn, self.blobs, blob.sha256):
                raise _FileFreed(blob.sha256)
            memory = await self.memories.insert_derived(
                conn,
                principal,
                current,
                kind=ACTIVATION,
                content=(
                    f"KV activation of memory {source.id} version {source.version} "
                    f"for model {lm.name}: {blob.tokens} tokens, {blob.dtype}"
                ),
                metadata={
                    "model": lm.name,
                    "fingerprint": lm.fingerprint,
                    "tokens": blob.tokens,
                    "source_memory_id": str(source.id),
                    "source_version": source.version,
                },
                model=lm.name,
            )
            await conn.execute(
                insert(activations).values(
                    id=memory.id,
                    tenant_id=memory.tenant_id,
                    cube_id=memory.cube_id,
                    memory_id=source.id,
                    source_version=source.version,
                    model=lm.name,
                    fingerprint=lm.fingerprint,
                    token_ids_sha256=ids_sha,
                    tokens=blob.tokens,
                    dtype=blob.dtype,
                    bytes=blob.nbytes,
                    sha256=blob.sha256,
                    created_by=memory.created_by,
                )
            )
            if blob.imported_into is not None:
                # Uploaded bytes stay in the cube they were uploaded into (decisions 86); reuse found them there.
                await conn.execute(
                    insert(activation_imports).values(activation_id=memory.id, cube_id=blob.imported_into)
                )
            await record(
                conn,
                principal,
                action,
                "memory",
                memory.id,
                detail={"source": str(source.id), "version": source.version, "model": lm.name, "sha256": blob.sha256},
            )
            row = await self._row(conn, memory.id)
        self.memories.derived_written(memory, source.id)
        return self._dto(row), True

    async def _reuse(
        self, principal: Principal, source: Row[Any], lm: LoadedModel, ids_sha: str, action: str
    ) -> tuple[schemas.Activation, bool] | None:
        """The activation made from a stored file with this KV; None when there is none, or when a drop or gc
        freed it meanwhile (the caller then writes one)."""
        blob = await self._reusable_blob(principal, source.cube_id, lm.fingerprint, ids_sha)
        if blob is None:
            return None
        try:
            return await self._insert(principal, source, lm, ids_sha, blob, action)
        except _FileFreed:
            return None

    async def _reusable_blob(
        self, principal: Principal, cube_id: uuid.UUID, fingerprint: str, ids_sha: str
    ) -> _Blob | None:
        """A stored file with exactly this KV that a memory of cube ``cube_id`` may use: computed by this server
        for anyone in the caller's tenant, or uploaded into that cube itself (decisions 86: an import's values
        are unchecked). ``_insert`` claims it, and finds it if it is gone."""
        imported_into = activation_imports.c.cube_id
        async with self.db.read() as conn:
            found = (
                await conn.execute(
                    select(
                        activations.c.sha256,
                        activations.c.bytes,
                        activations.c.tokens,
                        activations.c.dtype,
                        imported_into.label("imported_into"),
                    )
                    .select_from(
                        activations.outerjoin(
                            activation_imports, activation_imports.c.activation_id == activations.c.id
                        )
                    )
                    .where(
                        activations.c.tenant_id == principal.tenant_id,
                        activations.c.fingerprint == fingerprint,
                        activations.c.token_ids_sha256 == ids_sha,
                        activations.c.corrupt_at.is_(None),
                        or_(imported_into.is_(None), imported_into == cube_id),
                    )
                    # Server-built bytes first: the cube's own upload only when no build of this KV exists.
                    .order_by(imported_into.is_(None).desc(), activations.c.created_at.desc())
                    .limit(1)
                )
            ).first()
        if found is None:
            return None
        return _Blob(
            sha256=found.sha256,
            nbytes=found.bytes,
            tokens=found.tokens,
            dtype=found.dtype,
            imported_into=found.imported_into,
        )

    async def _put(self, data: bytes) -> str:
        try:
            return await asyncio.to_thread(self.blobs.put, data)
        except BlobStoreFull as exc:
            log.error("blob store full", extra={"error": str(exc)})
            raise StorageFull(f"the KV could not be stored: {exc}", headers={"Retry-After": "60"}) from None

    # ------------------------------------------------------------------ read

    async def list_for_memory(
        self, principal: Principal, memory_id: uuid.UUID, limit: int, cursor: str | None
    ) -> Page[schemas.Activation]:
        principal.tenant_member()
        tag = list_tag("activations", memory_id)
        after = decode_keyset(cursor, tag)
        async with self.db.read() as conn:
            _check_live(await self.memories.load_row(conn, principal, memory_id, "read"))
            query = with_freshness().where(activations.c.memory_id == memory_id)
            if after is not None:
                query = query.where(func.row(activations.c.created_at, activations.c.id) > func.row(*after))
            rows = (
                await conn.execute(query.order_by(activations.c.created_at, activations.c.id).limit(limit + 1))
            ).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[self._dto(r) for r in rows],
            next_cursor=encode_keyset(rows[-1].created_at, rows[-1].id, tag) if more else None,
        )

    async def get(self, principal: Principal, activation_id: uuid.UUID) -> schemas.Activation:
        async with self.db.read() as conn:
            return self._dto(await self._visible(conn, principal, activation_id))

    async def _visible(self, conn: AsyncConnection, principal: Principal, activation_id: uuid.UUID) -> Row[Any]:
        """The activation's row if the caller may read its cube and its memory has not expired; 404 otherwise
        (other tenants included)."""
        row = (
            await conn.execute(
                with_freshness().where(
                    activations.c.id == activation_id,
                    activations.c.tenant_id == principal.tenant_id,
                    activations.c.cube_id.in_(readable_cube_ids(principal)),
                    SOURCE_LIVE,
                )
            )
        ).first()
        if row is None:
            raise NotFound("no such activation")
        return row

    async def _row(self, conn: AsyncConnection, activation_id: uuid.UUID) -> Row[Any]:
        row = await _row_if_any(conn, activation_id)
        assert row is not None
        return row

    async def _fresh_for(
        self, conn: AsyncConnection, memory_id: uuid.UUID, lm: LoadedModel, version: int
    ) -> Row[Any] | None:
        row = (
            await conn.execute(
                with_freshness()
                .where(
                    activations.c.memory_id == memory_id,
                    activations.c.model == lm.name,
                    activations.c.fingerprint == lm.fingerprint,
                    activations.c.source_version == version,
                )
                .order_by(activations.c.created_at.desc())
            )
        ).all()
        return next((r for r in row if is_fresh(r)), None)

    def _dto(self, row: Row[Any]) -> schemas.Activation:
        return schemas.Activation(
            id=row.id,
            memory_id=row.memory_id,
            source_version=row.source_version,
            model=row.model,
            fingerprint=row.fingerprint,
            tokens=row.tokens,
            dtype=row.dtype,
            bytes=row.bytes,
            sha256=row.sha256,
            tier=self.tiers.tier_of(row.sha256) or "store",
            stale=is_stale(row),
            corrupt=row.corrupt_at is not None,
            hits=row.hits,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
        )

    # ------------------------------------------------------------------ export

    async def kv_file(
        self, principal: Principal, activation_id: uuid.UUID
    ) -> tuple[bytes, str, schemas.Activation, str | None]:
        """The activation's memos-kv/1 bytes, checked against their sha256; (bytes, their sha256, activation,
        what was wrong with the stored file when it was rebuilt, else None). The header names this activation's
        memory and version (a shared file's names the memory it was first built for, maybe in a cube the caller
        cannot read).

        A file that is missing or fails its checksum is never served: it is reported (logged, the row marked),
        and rebuilt from the source memory when that is still the version it was built from.
        """
        async with self.db.read() as conn:
            row = await self._visible(conn, principal, activation_id)
        try:
            data = await asyncio.to_thread(self.blobs.read, row.sha256)
            repaired = None
        except (BlobCorrupt, BlobNotFound) as exc:
            data, row = await self._repair(principal, row, exc)
            repaired = blob_problem(exc)
        sent, sha256 = await asyncio.to_thread(_own_header, data, row)  # a file of megabytes: off the event loop
        return sent, sha256, self._dto(row), repaired

    async def _repair(self, principal: Principal, row: Row[Any], problem: Exception) -> tuple[bytes, Row[Any]]:
        """Rebuild the KV behind ``row`` after its file failed; KVCorrupt (409) when that cannot be done."""
        await self._mark_corrupt(row.sha256, problem)
        async with self.db.read() as conn:
            source = (await conn.execute(select(memories).where(memories.c.id == row.memory_id))).first()
        source_changed = (
            is_stale(row) or source is None or source.content is None or source.version != row.source_version
        )
        lm = None
        if source_changed:
            why = "its source memory has changed since it was built"
            async with self.db.transaction() as conn:
                await conn.execute(update(activations).where(activations.c.id == row.id).values(stale=True))
        elif row.model not in self.models.specs:
            why = f"model {row.model!r} is no longer configured"
        else:
            lm = await self.models.get(row.model)
            why = "" if lm.fingerprint == row.fingerprint else "the configured model is not the one it was built with"
        if why or lm is None or source is None:
            raise KVCorrupt(
                f"the stored KV of activation {row.id} {blob_problem(problem)} and cannot be rebuilt: {why}; "
                f"build a new one with POST /v1/memories/{row.memory_id}/activations",
                extra={"activation_id": str(row.id), "sha256": row.sha256},
            )
        ids = await self.worker.run(_memory_ids, lm, source.content)
        if token_ids_sha256(ids) != row.token_ids_sha256:
            raise KVCorrupt(
                f"the stored KV of activation {row.id} {blob_problem(problem)} and the model now tokenizes its text "
                "differently; build a new one",
                extra={"activation_id": str(row.id), "sha256": row.sha256},
            )
        data, chunk = await self.worker.run(_prefill_file, lm, ids, _meta(lm, row.memory_id, row.source_version))
        async with self.db.transaction() as conn:
            # Under the bad file's lock (memos/activations/files.py): a build cannot claim it between its
            # deletion and the rows moving to the new file. The bad file goes first: the rebuilt bytes may hash
            # the same (same KV, same second), and a damaged copy under that name must not be taken for the new one.
            await files.hold_exclusive(conn, row.sha256)
            current = await _row_if_any(conn, row.id)
            if current is None:
                # Purged meanwhile (its memory's purge deleted it): nothing to repair, and no file to write. It was
                # an AssertionError, a 500 (found in a concurrency review).
                raise NotFound("no such activation")
            if current.sha256 != row.sha256:
                # Another request repaired it while this one computed: its file is the activation's now. This
                # rebuild went on to write a file no row took, and sent headers naming that other file (review).
                return await asyncio.to_thread(self.blobs.read, current.sha256), current
            await asyncio.to_thread(self.blobs.delete, row.sha256)
            key = await self._put(data)
            # Every activation that shared the bad file shares the good one (same fingerprint, same tokens).
            moved = (
                await conn.execute(
                    update(activations)
                    .where(activations.c.sha256 == row.sha256, activations.c.token_ids_sha256 == row.token_ids_sha256)
                    .values(sha256=key, bytes=len(data), corrupt_at=None)
                    .returning(activations.c.id)
                )
            ).scalars()
            # Their bytes are now this server's prefill: uploaded ones no longer (decisions 86).
            await conn.execute(delete(activation_imports).where(activation_imports.c.activation_id.in_(list(moved))))
            await record(
                conn,
                principal,
                "activation.repair",
                "memory",
                row.id,
                detail={"bad_sha256": row.sha256, "sha256": key},
            )
            fixed = await self._row(conn, row.id)
        self.tiers.put(key, chunk, chunk.nbytes, lm.device)
        log.warning(
            "activation rebuilt",
            extra={"activation": str(row.id), "sha256": key, "stored_file": blob_problem(problem)},
        )
        return data, fixed

    async def is_current(self, activation_id: uuid.UUID) -> bool:
        """Whether the activation still exists and is fresh (its memory neither changed nor deleted since)."""
        async with self.db.read() as conn:
            row = await _row_if_any(conn, activation_id)
        return row is not None and is_fresh(row)

    async def _mark_corrupt(self, key: str, problem: Exception) -> None:
        self.tiers.discard(key)
        async with self.db.transaction() as conn:
            marked = await conn.execute(
                update(activations).where(activations.c.sha256 == key).values(corrupt_at=func.now())
            )
        if not marked.rowcount and isinstance(problem, BlobNotFound):
            # No activation refers to it any more: freed on purpose (a purge, a drop) while this request was on
            # its way, not damage. It was an ERROR, a false alarm for a pin racing a purge (found in review).
            log.info("stored KV file gone with its activations", extra={"sha256": key})
            return
        log.error(
            "stored KV file not served",
            extra={"sha256": key, "stored_file": blob_problem(problem), "error": str(problem)},
        )

    # ------------------------------------------------------------------ import

    async def import_file(
        self, principal: Principal, memory_id: uuid.UUID, model: str, upload: KVUpload
    ) -> tuple[schemas.Activation, bool]:
        """Accept a memos-kv/1 file for a memory after checking format, checksum, model and tokens.

        Every check that does not need the file comes first, in api.md's order, and only then is the body read:
        a refused import never holds it (found in review: four 900 MiB uploads answered 409 no-model after the
        server had held 5.5 GiB of them)."""
        principal.tenant_member()
        self.models.spec(model)
        if await upload.empty():
            raise Invalid.field("body", "the body is empty; send a memos-kv/1 (safetensors) file")
        async with self.db.read() as conn:
            source = await self.memories.load_row(conn, principal, memory_id, "write")
        _check_live(source)
        _check_source(source, field="memory_id")
        lm = await self.models.get(model)
        with self._import_slot(source.tenant_id):
            return await self._import(principal, source, lm, await upload.read())

    @contextmanager
    def _import_slot(self, tenant_id: uuid.UUID) -> Iterator[None]:
        """One of ``IMPORTS_AT_ONCE`` places, at most one a tenant, or 503 before the body is read: concurrent
        uploads each hold their file and its tensors, so without a bound they multiply the memory an import
        needs; and one tenant's slow uploads must not take every place from the others (found in review)."""
        if self._importing >= IMPORTS_AT_ONCE or tenant_id in self._importing_tenants:
            raise KVBusy(
                f"{IMPORTS_AT_ONCE} KV imports (one a tenant) are being read already; retry shortly",
                headers={"Retry-After": IMPORTS_BUSY_RETRY_AFTER},
            )
        self._importing += 1  # no await since the check: nothing else ran in between
        self._importing_tenants.add(tenant_id)
        try:
            yield
        finally:
            self._importing -= 1
            self._importing_tenants.discard(tenant_id)

    async def _import(
        self, principal: Principal, source: Row[Any], lm: LoadedModel, data: bytes
    ) -> tuple[schemas.Activation, bool]:
        chunk = await self._verified_chunk(lm, data)
        file_ids, file_tokens = chunk.token_ids.tolist(), chunk.tokens
        del chunk  # its tensors are a second copy of the file; only the token ids are needed from here
        ids: list[int] = await self.worker.run(_memory_ids, lm, source.content)
        if file_ids != ids:
            raise TokenMismatch(
                f"the file holds KV of {file_tokens} tokens that are not the memory's current text "
                f"({len(ids)} tokens at version {source.version}); build it from this memory instead",
                extra={"file_tokens": file_tokens, "memory_tokens": len(ids), "memory_version": source.version},
            )
        ids_sha = token_ids_sha256(ids)
        async with self.db.read() as conn:
            existing = await self._fresh_for(conn, source.id, lm, source.version)
        if existing is not None:
            return self._dto(existing), False
        if (reused := await self._reuse(principal, source, lm, ids_sha, "activation.import")) is not None:
            return reused  # the tenant already stores this KV where this cube may use it: the upload is dropped
        key = await self._put(data)
        # Checked in every way but its values, which only a prefill could check: reusable in this cube only.
        blob = _Blob(sha256=key, nbytes=len(data), tokens=file_tokens, dtype=lm.dtype, imported_into=source.cube_id)
        return await self._insert_written(principal, source, lm, ids_sha, blob, data, "activation.import")

    async def _verified_chunk(self, lm: LoadedModel, data: bytes) -> KVChunk:
        try:
            # The header first, alone (no hashing): a malformed value in it is the caller's to fix, named, before
            # the checksum and the fingerprint are compared.
            header = await asyncio.to_thread(_read_meta, data)
            _check_created_at(header["created_at"], datetime.now(UTC))
            chunk, meta = await asyncio.to_thread(_decode, data, lm.fingerprint, True)
        except FingerprintMismatch as exc:
            raise FingerprintConflict(
                f"this KV was built for model fingerprint {exc.actual}; model {lm.name!r} has fingerprint "
                f"{exc.expected}. KV is never loaded into another model",
                extra={"expected_fingerprint": exc.expected, "actual_fingerprint": exc.actual},
            ) from None
        except KVChecksumError as exc:
            # A well-formed file whose bytes are not the ones its header vouches for: altered or damaged in transit.
            # API.md: "fingerprint and checksum verified; mismatch is 409". Malformed files are 422 (below).
            raise ChecksumConflict(
                f"body: checksum mismatch: {exc}", errors=[FieldError("body", f"checksum mismatch: {exc}")]
            ) from None
        except KVFormatError as exc:
            field = "body" if exc.key is None else f"{HEADER_FIELD}.{exc.key}"
            raise Invalid.field(field, f"not a valid memos-kv/1 file: {exc}") from None
        want = (lm.layers, lm.kv_heads, lm.head_dim)
        got = (chunk.layers, chunk.kv_heads, chunk.head_dim)
        if got != want:
            raise Invalid.field(
                "body", f"KV shape (layers, kv_heads, head_dim) {got} does not fit model {lm.name!r} {want}"
            )
        if meta.dtype != lm.dtype:
            raise Invalid.field("body", f"KV dtype {meta.dtype} is not model {lm.name!r}'s {lm.dtype}")
        if chunk.positions.tolist() != list(range(chunk.tokens)):
            raise Invalid.field("body", "positions must be 0..tokens-1 (KV as built from the start of a prompt)")
        if not await asyncio.to_thread(_finite, chunk):
            # A model never computes NaN or infinite keys or values; injected, they made every generation that
            # used this memory empty (found in review). The one check of the values an upload can have.
            raise Invalid.field("body", "the keys and values must be finite numbers (no NaN or infinity)")
        return chunk

    # ------------------------------------------------------------------ blobs

    async def release_blobs(self, keys: Sequence[str]) -> None:
        """Delete the blobs no activation refers to any more (after a purge, say)."""
        for key in await files.free(self.db, self.blobs, keys):
            self.tiers.discard(key)

    # ------------------------------------------------------------------ generate

    async def generate(self, principal: Principal, body: schemas.GenerateIn) -> schemas.Generation:
        # Before any work: a prompt alone reads no memory, so nothing below would refuse the operator, whose key
        # the rate limit never throttles (it could keep the KV worker busy without end; found in review).
        principal.tenant_member()
        if body.memory_ids is not None and body.search is not None:
            raise Invalid.field("search", "send memory_ids or search, not both")
        lm = await self.models.get(body.model)
        started = time.perf_counter()
        parts = await self._parts(principal, body)
        if body.use_activations and parts:
            # Before any KV is read: a job the worker would refuse, or memories whose stored KV alone is past the
            # model's positions, read and decoded every activation first (64 of a 0.5B model's at 8k tokens:
            # ~48 GiB, outside every tier's budget, for a request that then failed; found in review).
            self.worker.check_room()
            best = await self.fresh_for_memories(list({p.memory_id for p in parts}), lm)
            stored = sum(best[p.memory_id].tokens for p in parts if p.memory_id in best)
            if stored > lm.max_positions:
                field = "search" if body.search is not None else "memory_ids"
                message = f"the memories' stored KV alone is {stored} tokens; model {lm.name!r} has"
                raise Invalid.field(field, f"{message} {lm.max_positions} positions")
            await self._attach_kv(lm, parts, best)
        try:
            outcome: _Outcome = await self.worker.run(
                _generate_job,
                lm,
                parts,
                body.prompt,
                body.max_new_tokens,
                body.use_activations,
                body.recompute_ratio,
                started,
            )
        except KVInputError as exc:
            # _generate_job checks the prompt on its own first, so what the KV library still refuses is the
            # memories (with the prompt after them) not fitting the model's positions: the caller's input.
            raise Invalid.field("search" if body.search is not None else "memory_ids", str(exc)) from None
        waited_ms = (time.perf_counter() - started) * 1000.0
        # Only a generation that ran warms its memories, and those a search found were warmed by the search.
        if self.on_access is not None and parts and body.search is None:
            self.on_access(principal.tenant_id, [(p.memory_id, 1.0) for p in parts])
        if outcome.used:
            async with self.db.transaction() as conn:
                await conn.execute(
                    update(activations)
                    .where(activations.c.id.in_(outcome.used))
                    .values(hits=activations.c.hits + 1, last_used_at=func.now())
                )
        return schemas.Generation(
            text=outcome.text,
            ttft_ms=round(outcome.ttft_ms, 3),
            total_ms=round(waited_ms, 3),
            prefill_tokens=outcome.prefill_tokens,
            reused_tokens=outcome.reused_tokens,
            activations_used=outcome.used,
            token_ids=outcome.token_ids,
            memory_ids=[p.memory_id for p in parts],
            fallback=outcome.fallback,
        )

    async def _parts(self, principal: Principal, body: schemas.GenerateIn) -> list[_Part]:
        """The memories to put before the prompt, in order, each one the caller may read."""
        if body.search is not None:
            request = body.search
            if request.states is not None and "deleted" in request.states:
                # As memory_ids answers for a deleted memory: its text is not generated from.
                raise Invalid.field("search.states", "a deleted memory is not generated from")
            if request.kinds is None:
                request = msgspec.structs.replace(request, kinds=["plaintext"])
            try:
                found = await self.search.search(principal, request)
            except MemosError as exc:  # its fields are the search object's: "cube_ids[0]" is "search.cube_ids[0]"
                raise exc.within("search") from None
            return [
                _Part(memory_id=r.memory.id, content=r.memory.content)
                for r in found.results
                if r.memory.kind != ACTIVATION and r.memory.content
            ]
        ids = body.memory_ids or []
        if not ids:
            return []
        async with self.db.read() as conn:
            rows = {
                r.id: r
                for r in await conn.execute(
                    select(memories.c.id, memories.c.kind, memories.c.state, memories.c.content).where(
                        memories.c.id.in_(ids),
                        memories.c.tenant_id == principal.tenant_id,
                        memories.c.cube_id.in_(readable_cube_ids(principal)),
                        # Expired: not found, as GET /v1/memories/{id} answers and as search hides it.
                        not_expired(),
                    )
                )
            }
        parts = []
        for i, memory_id in enumerate(ids):
            where = f"memory_ids[{i}]"
            row = rows.get(memory_id)
            if row is None:
                raise NotFound(f"{where}: no such memory", errors=[FieldError(where, "no such memory")])
            if row.kind == ACTIVATION:
                raise Invalid.field(where, "an activation memory is KV, not text; name its source memory")
            if row.state == "deleted" or row.content is None:
                raise Invalid.field(where, "this memory is deleted")
            parts.append(_Part(memory_id=memory_id, content=row.content))
        return parts

    async def _attach_kv(self, lm: LoadedModel, parts: list[_Part], best: Mapping[uuid.UUID, Row[Any]]) -> None:
        """Give each part the KV of its fresh activation in ``best`` (``fresh_for_memories``), from a memory tier
        or the blob store."""
        loaded: dict[str, KVChunk | None] = {}
        for part in parts:
            row = best.get(part.memory_id)
            if row is None:
                continue
            if row.sha256 not in loaded:
                loaded[row.sha256] = await self._load_chunk(lm, row)
            chunk = loaded[row.sha256]
            if chunk is not None:
                part.chunk, part.activation_id = chunk, row.id

    async def _load_chunk(self, lm: LoadedModel, row: Row[Any]) -> KVChunk | None:
        cached: KVChunk | None = self.tiers.get(row.sha256)
        if cached is not None:
            return cached
        return await self._from_store(lm, row)

    async def _from_store(self, lm: LoadedModel, row: Row[Any]) -> KVChunk | None:
        """A request's miss: the activation's chunk from the blob store, kept in memory; None if its file is bad
        (reported and marked; the request prefills the memory's text instead)."""
        chunk = await self._read_chunk(lm, row.sha256)
        if chunk is not None:
            self.tiers.store_hit()
            self.tiers.put(row.sha256, chunk, chunk.nbytes, lm.device)
        return chunk

    async def _read_chunk(self, lm: LoadedModel, key: str) -> KVChunk | None:
        """Read, check and decode a stored file onto ``lm``'s device; None (and the file marked) if it is bad."""
        try:
            data = await asyncio.to_thread(self.blobs.read, key)
            # The blob store has just checked the whole file's sha256, so the codec need not hash it again.
            chunk, _ = await asyncio.to_thread(_decode, data, lm.fingerprint, False, lm.device)
        except (BlobCorrupt, BlobNotFound, KVError) as exc:
            await self._mark_corrupt(key, exc)
            return None
        return chunk

    # ------------------------------------------------------------------ the scheduler's hands

    async def fresh_for_memories(self, memory_ids: Sequence[uuid.UUID], lm: LoadedModel) -> dict[uuid.UUID, Row[Any]]:
        """Each memory's newest fresh activation for ``lm`` (memories without one are absent)."""
        if not memory_ids:
            return {}
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    with_freshness()
                    .where(
                        activations.c.memory_id.in_(list(memory_ids)),
                        activations.c.model == lm.name,
                        activations.c.fingerprint == lm.fingerprint,
                        SOURCE_LIVE,  # an expired memory's KV is not promoted (nor used: it is 404)
                    )
                    .order_by(activations.c.created_at.desc())
                )
            ).all()
        best: dict[uuid.UUID, Row[Any]] = {}
        for row in rows:
            if is_fresh(row):
                best.setdefault(row.memory_id, row)
        return best

    async def hold(self, lm: LoadedModel, key: str, tier: ResidentTier | None = None) -> bool:
        """Make sure the chunk of stored file ``key`` is in a memory tier (read from the store into ``tier`` if
        not), without counting a lookup: the scheduler's loads are not requests. False when the file is bad or
        the chunk does not fit."""
        if self.tiers.tier_of(key) is not None:
            return True
        chunk = await self._read_chunk(lm, key)
        return chunk is not None and self.tiers.put(key, chunk, chunk.nbytes, lm.device, tier)

    async def unpin(self, principal: Principal, memory_id: uuid.UUID, model: str) -> list[Any]:
        """Lift the pins of the memory's activations for ``model`` (write access, like a pin); its activations
        for that model, newest first (none: nothing was pinned)."""
        async with self.db.transaction() as conn:
            await self.memories.load_row(conn, principal, memory_id, "write")
            rows = (
                await conn.execute(
                    select(activations.c.id, activations.c.sha256)
                    .where(activations.c.memory_id == memory_id, activations.c.model == model)
                    .order_by(activations.c.created_at.desc())
                )
            ).all()
            await conn.execute(
                update(activations)
                .where(
                    activations.c.memory_id == memory_id, activations.c.model == model, activations.c.tier != "store"
                )
                .values(tier="store")
            )
        return list(rows)

    async def set_pin(self, activation_id: uuid.UUID, tier: str) -> None:
        """Record where the activation is pinned (``store``: not pinned), so a restart pins it again."""
        async with self.db.transaction() as conn:
            await conn.execute(update(activations).where(activations.c.id == activation_id).values(tier=tier))


# ---------------------------------------------------------------------- helpers


def _check_live(source: Row[Any]) -> None:
    """404 for an expired memory, as ``GET /v1/memories/{id}`` answers (``load_row`` includes expired ones)."""
    if source.expires_at is not None and source.expires_at <= datetime.now(UTC):
        raise NotFound("no such memory")


def _check_source(source: Row[Any], field: str = "memory_id") -> None:
    if source.kind == ACTIVATION:
        raise Invalid.field(field, "this memory is an activation already; build from its source memory")
    if source.kind != "plaintext":
        raise Invalid.field(field, f"KV is built from plaintext memories, this one is {source.kind}")
    if source.state == "deleted" or source.content is None:
        raise Conflict("this memory is deleted; restore a version of it first")


def blob_problem(exc: Exception) -> str:
    """What was wrong with a stored file, as the end of "the stored file ...": a missing file is not one that
    failed its checksum, and saying so sends an operator to the disk rather than to the bytes."""
    if isinstance(exc, BlobNotFound):
        return "was found missing"
    if isinstance(exc, BlobCorrupt):
        return "failed its checksum"
    return f"could not be read ({exc})"  # a file that hashes right but does not decode (_read_chunk)


def _model_dto(lm: LoadedModel) -> schemas.Model:
    return schemas.Model(
        name=lm.name,
        fingerprint=lm.fingerprint,
        layers=lm.layers,
        kv_heads=lm.kv_heads,
        head_dim=lm.head_dim,
        dtype=lm.dtype,
        device=str(lm.device),
        kv_bytes_per_token=lm.kv_bytes_per_token,
        rope_shiftable=lm.rope_unshiftable_reason is None,
    )


def rfc3339(moment: datetime) -> str:
    """A time as a KV file's header writes it: UTC, to the second, with Z."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _row_if_any(conn: AsyncConnection, activation_id: uuid.UUID) -> Row[Any] | None:
    """The activation's row with its freshness, None when it is gone."""
    row: Row[Any] | None = (await conn.execute(with_freshness().where(activations.c.id == activation_id))).first()
    return row


def _own_header(data: bytes, row: Row[Any]) -> tuple[bytes, str]:
    """The file as this activation's own, and its sha256: a shared file's header names the memory it was first
    built for, which may sit in a cube the caller cannot read (``codec.relabel``). Unchanged, it is the stored
    file, whose sha256 is its key."""
    from memos.kv.codec import relabel

    sent = relabel(data, str(row.memory_id), row.source_version, rfc3339(row.created_at))
    return sent, row.sha256 if sent is data else hashlib.sha256(sent).hexdigest()


def _meta(lm: LoadedModel, memory_id: uuid.UUID, version: int) -> Any:
    from memos.kv.codec import KVMeta

    return KVMeta(
        fingerprint=lm.fingerprint,
        model=lm.name,
        memory_id=str(memory_id),
        version=version,
        dtype=lm.dtype,
        created_at=rfc3339(datetime.now(UTC)),
    )


# ---------------------------------------------------------------------- worker-thread jobs (torch lives here)


def _memory_ids(lm: LoadedModel, text: str) -> list[int]:
    return [int(i) for i in lm.memory_token_ids(text)]


def _part_ids(lm: LoadedModel, part: _Part) -> list[int]:
    """The tokens ``part`` puts before the prompt: its stored KV's, or its text's (the same ids, since a fresh
    activation was built from this version's text by a model of the same fingerprint, tokenizer included)."""
    if part.chunk is not None:
        return [int(i) for i in part.chunk.token_ids.tolist()]
    return _memory_ids(lm, part.content)


def _prefill_file(lm: LoadedModel, ids: list[int], meta: Any) -> tuple[bytes, KVChunk]:
    from memos.kv.codec import encode
    from memos.kv.runtime import prefill

    chunk = prefill(lm, ids)
    return encode(chunk, meta), chunk


def _finite(chunk: KVChunk) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in (*chunk.keys, *chunk.values))


def _read_meta(data: bytes) -> dict[str, str]:
    from memos.kv.codec import read_meta

    return read_meta(data)


def _check_created_at(value: str, now: datetime) -> None:
    """An upload's ``created_at``: an RFC 3339 date-time with its offset, at most ``CREATED_AT_SKEW`` ahead of
    ``now``. Nothing depends on it, but it is what a reader of the file (and its later downloads) is told about
    when the KV was built, so a value that is not a time, or a build in the future, is refused rather than kept.
    Checked on import only: decoding stays lenient, so files stored before still read."""
    field = f"{HEADER_FIELD}.created_at"
    shown = repr(value[:80])
    if not _RFC3339.fullmatch(value):
        raise Invalid.field(field, f"{shown} is not an RFC 3339 date-time with an offset (2026-01-31T09:30:00Z)")
    try:
        at = datetime.fromisoformat(value.upper())
    except ValueError as exc:
        raise Invalid.field(field, f"{shown} is not a valid date-time: {exc}") from None
    if at > now + CREATED_AT_SKEW:
        raise Invalid.field(
            field,
            f"{shown} is in the future (more than {int(CREATED_AT_SKEW.total_seconds())} s ahead of the "
            f"server's clock, {now.isoformat(timespec='seconds')})",
        )


def _decode(data: bytes, fingerprint: str, verify: bool, device: Any = None) -> tuple[KVChunk, Any]:
    from memos.kv.codec import decode

    chunk, meta = decode(data, expect_fingerprint=fingerprint, verify=verify)
    if device is not None:
        chunk = chunk.to(device)
    return chunk, meta


def _generate_job(
    lm: LoadedModel,
    parts: list[_Part],
    prompt: str,
    max_new_tokens: int,
    use_activations: bool,
    recompute_ratio: float | None,
    started: float,
) -> _Outcome:
    """Tokenize, assemble the prefix and generate.

    ``ttft_ms`` counts from ``started`` (when the request's KV work began, a ``perf_counter`` value): loading
    activations from the blob store, waiting for the worker and composing are all part of the price.
    """
    from memos.kv.runtime import compose, generate, prefill

    prompt_ids = [int(i) for i in lm.prompt_token_ids(prompt)]
    # Refused here, naming the prompt, rather than as a KVInputError deep in the KV library (a 500 before).
    if not prompt_ids:
        raise Invalid.field("prompt", f"the prompt has no tokens for model {lm.name!r}")
    if len(prompt_ids) > lm.max_positions:
        raise Invalid.field(
            "prompt", f"the prompt is {len(prompt_ids)} tokens; model {lm.name!r} has {lm.max_positions} positions"
        )
    # Every memory's tokens before any forward pass (a stored chunk's are in its file): memories that cannot
    # fit are refused now, not after minutes of prefilling the ones before them (found in review). The
    # KVInputError is the caller's input, 422 on memory_ids or search (``generate``).
    part_ids = [_part_ids(lm, p) for p in parts]
    memory_tokens = sum(len(ids) for ids in part_ids)
    if memory_tokens + len(prompt_ids) > lm.max_positions:
        raise KVInputError(
            f"the memories ({memory_tokens} tokens) and the prompt ({len(prompt_ids)}) are "
            f"{memory_tokens + len(prompt_ids)} tokens; model {lm.name!r} has {lm.max_positions} positions"
        )
    last = max((i for i, p in enumerate(parts) if p.chunk is not None), default=-1) if use_activations else -1
    fallback: str | None = None
    if last >= 0:
        head = parts[: last + 1]
        chunks: list[KVChunk] = []
        fresh_tokens = 0
        for part, ids in zip(head, part_ids[: last + 1], strict=True):
            if part.chunk is not None:
                chunks.append(part.chunk)
            elif not ids:
                # A memory with no tokens for this model (a zero-width space) adds nothing: a prefill of it was a
                # KVInputError, the whole generate a 422 naming no memory (found in review).
                continue
            else:
                # No activation: its KV is computed now, on its own, and composed like the stored ones.
                chunks.append(prefill(lm, ids))
                fresh_tokens += len(ids)
        try:
            if len(chunks) == 1:
                prefix = chunks[0]
            else:
                ratio = DEFAULT_COMPOSE_RECOMPUTE if recompute_ratio is None else recompute_ratio
                prefix = compose(lm, chunks, recompute_ratio=ratio)
        except NotShiftable as exc:
            fallback = f"not_shiftable: {exc.reason}; every token was prefilled instead"
        else:
            tail_ids = [i for ids in part_ids[last + 1 :] for i in ids]
            before_generate = time.perf_counter()
            gen = generate(
                lm,
                tail_ids + prompt_ids,
                prefix=prefix,
                prefix_token_ids=prefix.token_ids.tolist(),
                use_prefix_kv=True,
                max_new_tokens=max_new_tokens,
            )
            used = list(dict.fromkeys(p.activation_id for p in head if p.activation_id is not None))
            return _Outcome(
                text=gen.text,
                token_ids=list(gen.token_ids),
                ttft_ms=(before_generate - started) * 1000.0 + gen.ttft_ms,
                prefill_tokens=gen.prefill_tokens + fresh_tokens,
                reused_tokens=gen.reused_tokens,
                used=used,
            )
    all_ids = [i for ids in part_ids for i in ids]
    before_generate = time.perf_counter()
    gen = generate(
        lm, prompt_ids, prefix=None, prefix_token_ids=all_ids, use_prefix_kv=False, max_new_tokens=max_new_tokens
    )
    return _Outcome(
        text=gen.text,
        token_ids=list(gen.token_ids),
        ttft_ms=(before_generate - started) * 1000.0 + gen.ttft_ms,
        prefill_tokens=gen.prefill_tokens,
        reused_tokens=0,
        fallback=fallback,
    )
